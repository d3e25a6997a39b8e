/**
 * Receivers: where they may live (checked when added and at every delivery attempt), and the
 * master keyring that encrypts their signing secrets (key ids, old ids, rekey).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger } from '@temporalio/worker';
import { createReceiverAgents, deliverRevocation } from '../activities/propagation.js';
import { TokenWarden } from '../client/index.js';
import { addressProblem, checkReceiverUrl, resolveReceiver, type ReceiverAllowance } from '../common/addresses.js';
import { loadSettings, PACKAGE_ROOT } from '../common/config.js';
import { ConfigError, InvalidInputError } from '../common/errors.js';
import { RECEIVER_REJECTED } from '../common/names.js';
import { encryptSecret, generateSigningSecret, MasterKeyring, masterKeyId } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import type { DeliveryView } from '../common/messages.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { runOutput } from './support/run-record.js';

let ctx: TestContext;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('receivers');
  receiver = await TestReceiver.start();
});
after(async () => {
  await receiver?.close();
  await ctx?.close();
});

const problem = (url: string, allow: ReceiverAllowance[] = []) => checkReceiverUrl(url, allow).problem;

describe('receiver addresses', () => {
  it('should always refuse link-local, metadata and unspecified addresses, in every spelling', () => {
    const never = [
      'http://169.254.169.254/latest/meta-data/',
      'http://[fd00:ec2::254]/latest/meta-data/',
      'http://100.100.100.200/latest/meta-data/',
      'http://metadata.google.internal/computeMetadata/v1/',
      'http://METADATA.google.internal./computeMetadata/v1/',
      'http://metadata.goog/',
      'http://metadata.azure.com/',
      'http://metadata/',
      'http://0/',
      'http://0.0.0.0:8080/',
      'http://[::]/',
      'http://[fe80::1]/',
      'http://[::ffff:169.254.169.254]/', // IPv4-mapped
      'http://[::ffff:a9fe:a9fe]/', // the same, in hex
      'http://[64:ff9b::a9fe:a9fe]/', // NAT64
      'http://[2002:a9fe:a9fe::1]/', // 6to4
      'http://[::169.254.169.254]/', // IPv4-compatible
      'http://0xa9.0xfe.0xa9.0xfe/', // hex
      'http://0251.0376.0251.0376/', // octal
      'http://2852039166/', // one number
      'http://224.0.0.1/',
      'http://255.255.255.255/',
    ];
    for (const url of never) {
      for (const allow of [[], ['loopback', 'private']] as ReceiverAllowance[][]) {
        assert.ok(problem(url, allow), `${url} with ${allow.join(',') || 'nothing'} allowed`);
      }
    }
    assert.match(problem('http://2852039166/')!, /169\.254\.169\.254 is a link-local, metadata/);
    assert.match(problem('http://metadata.google.internal/')!, /metadata service/);
  });

  it('should refuse loopback and private ranges unless allowed', () => {
    const loopback = [
      'http://127.0.0.1:9000/',
      'http://127.1.2.3/',
      'http://2130706433/',
      'http://0x7f.1/',
      'http://017700000001/',
      'http://[::1]/',
      'http://[::ffff:127.0.0.1]/',
      'http://[::127.0.0.1]/',
    ];
    const private_ = [
      'http://10.1.2.3/',
      'http://172.16.0.1/',
      'http://172.31.255.255/',
      'http://192.168.1.1/',
      'http://100.64.0.1/',
      'http://[fc00::1]/',
      'http://[fd12:3456::1]/',
      'http://[::ffff:10.0.0.1]/',
      'http://[fec0::1]/', // site-local, deprecated but still routed inside sites
    ];
    for (const url of loopback) {
      assert.match(problem(url) ?? '', /loopback address \(allowed only when TOKENWARDEN_RECEIVER_ALLOW includes/, url);
      assert.ok(problem(url, ['private']), url);
      assert.equal(problem(url, ['loopback']), undefined, url);
    }
    for (const url of private_) {
      assert.match(problem(url) ?? '', /private address/, url);
      assert.ok(problem(url, ['loopback']), url);
      assert.equal(problem(url, ['private']), undefined, url);
    }
  });

  it('should accept public addresses and names', () => {
    for (const url of [
      'https://hooks.example.com/revocations',
      'http://8.8.8.8/',
      'http://172.32.0.1/',
      'http://100.128.0.1/',
      'http://[2606:4700::1111]/',
      'http://[::ffff:8.8.8.8]/',
      'https://localhost.example.com/',
    ]) {
      assert.equal(problem(url), undefined, url);
    }
    assert.equal(addressProblem('2001:db8::1', []), undefined);
  });

  it('should refuse local-use NAT64, Teredo, IETF protocol and benchmarking ranges, literal or resolved', async () => {
    const never = [
      'http://[64:ff9b:1::a9fe:a9fe]/', // local-use NAT64 to 169.254.169.254
      'http://[64:ff9b:1:7::169.254.169.254]/',
      'http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/', // Teredo
      'http://[2001::1]/',
      'http://192.0.0.192/',
      'http://192.0.0.255/',
      'http://198.18.0.1/',
      'http://198.19.255.255/',
    ];
    for (const url of never) {
      for (const allow of [[], ['loopback', 'private']] as ReceiverAllowance[][]) {
        assert.ok(problem(url, allow), `${url} with ${allow.join(',') || 'nothing'} allowed`);
      }
    }
    assert.match(problem('http://[64:ff9b:1::a9fe:a9fe]/')!, /carries 169\.254\.169\.254 is a link-local/);
    assert.match(problem('http://[64:ff9b:1::7f00:1]/')!, /carries 127\.0\.0\.1 is a loopback address/);
    assert.equal(problem('http://[64:ff9b:1::7f00:1]/', ['loopback']), undefined);
    for (const url of [
      'http://[64:ff9b:1::808:808]/',
      'http://192.0.1.1/',
      'http://198.17.255.255/',
      'http://198.20.0.1/',
    ]) {
      assert.equal(problem(url), undefined, url);
    }
    // A name's addresses, as the resolver answers them, meet the same classifier at every attempt.
    for (const address of [
      '64:ff9b:1::a9fe:a9fe',
      'fec0::1',
      '2001:0:4136:e378:8000:63bf:3fff:fdd2',
      '192.0.0.170',
      '198.18.0.1',
    ]) {
      assert.ok(addressProblem(address, []), address);
      const host = address.includes(':') ? `[${address}]` : address;
      const resolved = await resolveReceiver(new URL(`http://${host}/`), [], AbortSignal.timeout(5_000));
      assert.match(resolved.problem ?? '', /resolves to a forbidden address/, address);
    }
  });

  it('should refuse control, whitespace and invisible formatting characters and store the URL normalised', async () => {
    for (const [url, char] of [
      ['http://exa\nmple.com/', 'U+000A'],
      ['http://example.com/a\tb', 'U+0009'],
      ['http://example.com/\r', 'U+000D'],
      ['http://example.com/\u0000', 'U+0000'],
      ['http://example.com/\u007f', 'U+007F'],
      ['http://example.com/\u0085', 'U+0085'],
      ['http://example.com/a b', 'U+0020'],
      ['http://example.com/\u00a0', 'U+00A0'],
      ['http://example.com/\u2028', 'U+2028'],
      ['http://exa\u00admple.com/', 'U+00AD'], // soft hyphen: the host parser drops it
      ['http://exa\u200bmple.com/', 'U+200B'],
      ['http://example.com/\u202egpj.exe', 'U+202E'],
      ['http://example.com/\u2066x', 'U+2066'],
      ['http://example.com/\u200f', 'U+200F'],
    ]) {
      const err = await ctx.warden.addReceiver({ id: 'unprintable', url: url! }).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, char);
      assert.equal(
        err.message,
        `invalid receiver: url: must not contain control, whitespace or invisible formatting characters (found ${char})`,
      );
      assert.deepEqual(
        err.fields.map((f) => f.path),
        ['url'],
      );
    }
    const { rows: none } = await ctx.sql.query(`SELECT count(*)::int AS n FROM receiver WHERE id = 'unprintable'`);
    assert.equal(none[0].n, 0);

    const port = new URL(receiver.url).port;
    const added = await ctx.warden.addReceiver({ id: 'normalised', url: `HTTP://0x7f.1:${port}/a/../revocations` });
    const href = `http://127.0.0.1:${port}/revocations`;
    assert.equal(added.url, href);
    const { rows } = await ctx.sql.query(`SELECT url FROM receiver WHERE id = 'normalised'`);
    assert.equal(rows[0].url, href);
    await ctx.warden.removeReceiver('normalised');
  });

  it('should never quote a URL that does not parse: it may hold a password', async () => {
    for (const url of [
      'http://ops:hun/ter2@hooks.example.com/',
      'http://ops:hun?ter2@hooks.example.com/',
      'http://ops:hun#ter2@hooks.example.com/',
      'https://ops:hun%ter2@[hooks.example.com/',
      'ops:hunter2@hooks.example.com', // no scheme: parses as an "ops:" URL
      'ops:hun/ter2@hooks.example.com',
      '//ops:hunter2@hooks.example.com/',
    ]) {
      const err = await ctx.warden.addReceiver({ id: 'leaky', url }).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, String(url.length));
      assert.match(err.message, /^invalid receiver: url: expected an http\(s\) URL \(got \d+ characters/);
      for (const part of ['ops', 'hun', 'ter2', 'hooks']) {
        assert.ok(!err.message.includes(part), `${part} quoted (input of ${url.length} characters)`);
        assert.ok(!err.fields.some((f) => f.message.includes(part)));
      }
    }
    assert.equal(
      problem('http://ops:hun/ter2@hooks.example.com/'),
      'expected an http(s) URL (got 38 characters starting "http://")',
    );
    assert.equal(
      problem('ftp://files.example.com/'),
      'expected an http(s) URL (got 24 characters, not starting with http:// or https://)',
    );
  });

  it('should name the field and what was wrong when a receiver is added', async () => {
    const cases: [string, RegExp][] = [
      ['http://a b/', /^invalid receiver: url: must not contain control, whitespace/],
      ['http://[::1/', /^invalid receiver: url: expected an http\(s\) URL \(got 12 characters starting "http:\/\/"\)$/],
      ['ftp://files.example.com/', /url: expected an http\(s\) URL/],
      ['https://u:hunter2@hooks.example.com/', /url: credentials in the URL are not accepted/],
      [`https://hooks.example.com/${'a'.repeat(100_000)}`, /url: at most 2048 characters, got 100026/],
      ['http://169.254.169.254/latest/meta-data/', /url: 169\.254\.169\.254 is a link-local/],
      ['http://[fd00:ec2::254]/', /url: fd00:ec2::254 is a link-local/],
    ];
    for (const [url, message] of cases) {
      const err = await ctx.warden.addReceiver({ id: 'refused', url }).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, url.slice(0, 60));
      assert.match(err.message, message);
      assert.deepEqual(
        err.fields.map((f) => f.path),
        ['url'],
      );
      assert.ok(!err.message.includes('hunter2'));
    }
    const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM receiver WHERE id = 'refused'`);
    assert.equal(rows[0].n, 0);
  });

  it('should refuse a loopback receiver where loopback is not allowed, by address or by name', async () => {
    const production = await TokenWarden.connect({ ...ctx.settings, receiverAllow: [] });
    try {
      for (const url of ['http://127.0.0.1:9000/', 'http://2130706433:9000/', 'http://localhost:9000/']) {
        const err = await production.addReceiver({ id: 'local', url }).catch((e: unknown) => e);
        assert.ok(err instanceof InvalidInputError, url);
        assert.match(err.message, /url: .*127\.0\.0\.1 is a loopback address/, url);
      }
    } finally {
      await production.close();
    }
  });

  it('should refuse, without retrying, a receiver whose name resolves to a forbidden address at delivery', async () => {
    // Added where loopback was allowed; the worker delivering it allows only public addresses.
    const url = receiver.url.replace('127.0.0.1', 'localhost');
    await ctx.warden.addReceiver({ id: 'rebound', url });
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_rcv', receivers: ['rebound'], ttl: '1h' });
    await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
    const [d] = await store.listDeliveries(ctx.pool, tokenId);
    const attempt = (receiverAllow: ReceiverAllowance[]) =>
      new MockActivityEnvironment(undefined, { logger: new DefaultLogger('ERROR') }).run(
        deliverRevocation,
        {
          pool: ctx.pool,
          keyring: new MasterKeyring(ctx.settings.masterKey),
          receiverAllow,
          agents: createReceiverAgents(),
        },
        { eventId: d!.eventId, receiverId: 'rebound' },
      ) as Promise<DeliveryView>;

    const err = await attempt([]).catch((e: unknown) => e);
    assert.ok(err instanceof ApplicationFailure);
    assert.equal(err.type, RECEIVER_REJECTED);
    assert.equal(err.nonRetryable, true);
    assert.match(
      err.message,
      /receiver rebound refused: localhost resolves to a forbidden address: 127\.0\.0\.1 is a loopback address/,
    );
    assert.equal(receiver.requests.length, 0, 'nothing was sent');
    const [failed] = await store.listDeliveries(ctx.pool, tokenId);
    assert.equal(failed!.status, 'failed');
    assert.equal(failed!.lastStatusCode, null);
    assert.match(failed!.lastError!, /127\.0\.0\.1 is a loopback address/);

    // Allowed again and retried by an operator, the same name reaches the receiver through the
    // address that was checked.
    await store.recordAudit(ctx.pool, tokenId, 'retry:test', 'propagation.retry-requested', { reason: 'allowed' });
    const delivered = await attempt(['loopback']);
    assert.equal(delivered.status, 'delivered');
    assert.equal(receiver.requests.length, 1);
  });
});

describe('settings', () => {
  const base = { DATABASE_URL: 'postgres://x/y', TOKENWARDEN_DATA_DIR: '/nonexistent' };

  it('should read the receiver allowance and the previous master keys', () => {
    const [k1, k2] = [randomBytes(32), randomBytes(32)];
    const s = loadSettings({
      ...base,
      TOKENWARDEN_RECEIVER_ALLOW: 'loopback, private',
      TOKENWARDEN_PREVIOUS_MASTER_KEYS: `${k1.toString('base64')},${k2.toString('base64')}`,
    });
    assert.deepEqual(s.receiverAllow, ['loopback', 'private']);
    assert.deepEqual(s.previousMasterKeys, [k1, k2]);
    const plain = loadSettings(base);
    assert.deepEqual(plain.receiverAllow, [], 'public addresses only by default');
    assert.deepEqual(plain.previousMasterKeys, []);
  });

  it('should name the setting, never quoting key material', () => {
    assert.throws(
      () => loadSettings({ ...base, TOKENWARDEN_RECEIVER_ALLOW: 'loopback,everything' }),
      (e: unknown) => e instanceof ConfigError && /TOKENWARDEN_RECEIVER_ALLOW .*"everything"/.test(e.message),
    );
    const good = randomBytes(32).toString('base64');
    assert.throws(
      () => loadSettings({ ...base, TOKENWARDEN_PREVIOUS_MASTER_KEYS: `${good},c2hvcnQ=` }),
      (e: unknown) =>
        e instanceof ConfigError &&
        /TOKENWARDEN_PREVIOUS_MASTER_KEYS .*key 2 is not/.test(e.message) &&
        !e.message.includes(good) &&
        !e.message.includes('c2hvcnQ='),
    );
  });

  it("should apply the dev stack's allowance to clients of its store", async () => {
    const dataDir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-stack-'));
    try {
      const stack = { databaseUrl: 'postgres://stack/db', temporalAddress: '127.0.0.1:1', namespace: 'ns' };
      await writeFile(
        path.join(dataDir, 'stack.json'),
        JSON.stringify({ ...stack, pid: process.pid, receiverAllow: ['loopback'] }),
      );
      assert.deepEqual(loadSettings({ TOKENWARDEN_DATA_DIR: dataDir }).receiverAllow, ['loopback']);
      assert.deepEqual(
        loadSettings({ TOKENWARDEN_DATA_DIR: dataDir, DATABASE_URL: 'postgres://stack/db' }).receiverAllow,
        ['loopback'],
      );
      assert.deepEqual(
        loadSettings({ TOKENWARDEN_DATA_DIR: dataDir, DATABASE_URL: 'postgres://elsewhere/db' }).receiverAllow,
        [],
      );
      assert.deepEqual(
        loadSettings({ TOKENWARDEN_DATA_DIR: dataDir, TOKENWARDEN_RECEIVER_ALLOW: '' }).receiverAllow,
        [],
        'an explicit setting wins',
      );
    } finally {
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});

describe('master keyring', () => {
  /** The key id earlier versions stored: a truncated SHA-256 of the key. */
  const legacyId = (key: Buffer) => createHash('sha256').update(key).digest('hex').slice(0, 16);

  it('should derive key ids that are not a plain hash of the key', () => {
    const key = randomBytes(32);
    assert.match(masterKeyId(key), /^[0-9a-f]{16}$/);
    assert.notEqual(masterKeyId(key), legacyId(key));
    assert.notEqual(masterKeyId(key), createHash('sha256').update(key).digest('hex').slice(-16));
    assert.equal(masterKeyId(key), masterKeyId(Buffer.from(key)), 'stable');
  });

  it('should encrypt under the current key and decrypt under any key, by id, old ids included', () => {
    const [current, previous, stranger] = [randomBytes(32), randomBytes(32), randomBytes(32)];
    const ring = new MasterKeyring(current, [previous]);
    const sealed = ring.encrypt('whsec_x', 'rcv')!;
    assert.equal(sealed.keyId, masterKeyId(current));
    assert.equal(ring.decrypt(sealed.keyId, sealed.ciphertext, 'rcv'), 'whsec_x');
    const old = encryptSecret(previous, 'whsec_old', 'rcv');
    assert.equal(ring.decrypt(masterKeyId(previous), old, 'rcv'), 'whsec_old');
    assert.equal(ring.decrypt(legacyId(previous), old, 'rcv'), 'whsec_old', 'an id stored by earlier versions');
    assert.equal(ring.decrypt(masterKeyId(stranger), encryptSecret(stranger, 'x', 'rcv'), 'rcv'), undefined);
    assert.equal(new MasterKeyring(undefined).encrypt('x', 'rcv'), undefined);
    assert.throws(() => ring.decrypt(sealed.keyId, sealed.ciphertext, 'another-receiver'), 'bound to its row');
  });

  it('should rekey secrets stored under an old id and report those no key can read', async () => {
    const key = ctx.settings.masterKey!;
    const secret = generateSigningSecret();
    // A receiver as an earlier version stored it: same key, the old id format.
    await store.insertReceiver(ctx.pool, {
      id: 'from-before',
      url: 'https://hooks.example.com/a',
      secretCiphertext: encryptSecret(key, secret, 'from-before'),
      secretKeyId: legacyId(key),
    });
    const lost = randomBytes(32);
    await store.insertReceiver(ctx.pool, {
      id: 'unreadable',
      url: 'https://hooks.example.com/b',
      secretCiphertext: encryptSecret(lost, generateSigningSecret(), 'unreadable'),
      secretKeyId: masterKeyId(lost),
    });
    const outcome = await ctx.warden.rekeyReceivers();
    assert.deepEqual(outcome.rekeyed, ['from-before']);
    assert.deepEqual(
      outcome.failed.map((f) => f.receiverId),
      ['unreadable'],
    );
    assert.match(
      outcome.failed[0]!.error,
      /no configured master key has id [0-9a-f]{16}.*TOKENWARDEN_PREVIOUS_MASTER_KEYS/,
    );
    const stored = await store.loadReceiverSecret(ctx.pool, 'from-before');
    assert.equal(stored!.keyId, masterKeyId(key));
    assert.equal(new MasterKeyring(key).decrypt(stored!.keyId, stored!.ciphertext, 'from-before'), secret);
    await ctx.sql.query(`DELETE FROM receiver WHERE id = 'unreadable'`);
  });

  it('should rekey from the command line', async () => {
    const newKey = randomBytes(32);
    const env = {
      ...ctx.childEnv(),
      TOKENWARDEN_MASTER_KEY: newKey.toString('base64'),
      TOKENWARDEN_PREVIOUS_MASTER_KEYS: ctx.settings.masterKey!.toString('base64'),
    };
    const run = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      const child = spawn(
        process.execPath,
        [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'receiver', 'rekey', '--json'],
        { env },
      );
      let stdout = '';
      let stderr = '';
      // rekey prints key ids and receiver ids, never a key: both streams are its log.
      const log = runOutput('rekey');
      child.stdout.on('data', (c: Buffer) => {
        stdout += c.toString();
        log(c);
      });
      child.stderr.on('data', (c: Buffer) => {
        stderr += c.toString();
        log(c);
      });
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });
    assert.equal(run.code, 0, run.stderr);
    const outcome = JSON.parse(run.stdout);
    assert.equal(outcome.keyId, masterKeyId(newKey));
    assert.ok(outcome.rekeyed.length >= 1);
    assert.ok(!run.stdout.includes(newKey.toString('base64')) && !run.stderr.includes(newKey.toString('base64')));
    const { rows } = await ctx.sql.query('SELECT DISTINCT secret_key_id FROM receiver');
    assert.deepEqual(
      rows.map((r) => r.secret_key_id),
      [masterKeyId(newKey)],
    );
  });
});
