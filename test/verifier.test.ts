/**
 * tokenwarden/verifier against the real store: answers, the cache and its invalidation by the kill
 * NOTIFY (in this process and in another one), the listener's loss and recovery, the races between
 * a lookup and a kill or a reconnect, the throttled last use, option errors and the import graph.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import {
  createVerifier,
  VerifierOptionError,
  VerifierUnavailableError,
  type Verifier,
  type VerifierOptions,
} from '../client/verifier.js';
import { PACKAGE_ROOT } from '../common/config.js';
import { KILL_CHANNEL } from '../common/names.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import { newCredentialId } from '../common/ids.js';
import { rotateCredential } from '../common/store/credentials.js';
import { changeExpiry } from '../common/store/expiry.js';
import { killToken } from '../common/store/kill.js';
import { setSuspended } from '../common/store/suspension.js';
import { freePort } from '../dev/processes.js';
import { TestContext } from './support/context.js';
import { allLoadedFiles, recordingAllModulesTo } from './support/loaded-modules.js';
import { insertTokenRow } from './support/tokens.js';
import { TcpProxy } from './support/tcp-proxy.js';
import type { Entry } from './support/verifier-process.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
const open: Array<{ close(): Promise<void> }> = [];
before(async () => {
  ctx = await TestContext.create('verifier');
});
after(async () => {
  for (const o of open.reverse()) await o.close().catch(() => {});
  await ctx?.close();
});

/** A token row in the store and the raw token only this test holds. */
async function newToken(scopes: string[] = ['read']) {
  const token = generateTokenString();
  const record = await insertTokenRow(ctx.pool, { subject: 'usr_verifier', scopes, secretHash: hashToken(token) });
  return { token, tokenId: record.id, record };
}

const kill = (tokenId: string) =>
  killToken(ctx.pool, { tokenId, reason: 'test', actor: 'test', initiatingEntity: 'admin' });

const errors: Error[] = [];
async function verifier(options: Partial<VerifierOptions> = {}): Promise<Verifier> {
  const v = await createVerifier({
    databaseUrl: ctx.settings.databaseUrl,
    schema: ctx.settings.databaseSchema,
    cacheTtlMs: 60_000,
    onError: (err) => errors.push(err),
    ...options,
  });
  open.push(v);
  return v;
}

async function proxy(): Promise<TcpProxy> {
  const p = await TcpProxy.start(TcpProxy.targetOf(ctx.settings.databaseUrl));
  open.push(p);
  return p;
}

/** Ends the verifier's listener backend on the server, as an operator or a failover would. */
async function terminateListener(applicationName: string): Promise<void> {
  const { rows } = await ctx.sql.query(
    'SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity WHERE application_name = $1',
    [`${applicationName}:listener`],
  );
  assert.equal(rows.length, 1, 'one listener backend');
}

const INACTIVE = { active: false };

describe('answers', () => {
  it('should answer an active token with its facts, and unknown, revoked, expired or rotated-out alike', async () => {
    const v = await verifier({ cacheTtlMs: 0 });
    const { token, tokenId, record } = await newToken(['read', 'write']);
    const { rows } = await ctx.sql.query('SELECT id FROM credential WHERE token_id = $1', [tokenId]);
    assert.deepEqual(await v.verify(token), {
      active: true,
      tokenId,
      subject: 'usr_verifier',
      scopes: ['read', 'write'],
      expiresAt: record.expiresAt,
      issuedAt: record.issuedAt,
      credentialId: rows[0].id,
    });

    assert.deepEqual(await v.verify(generateTokenString()), INACTIVE, 'unknown');

    const revoked = await newToken();
    await kill(revoked.tokenId);
    assert.deepEqual(await v.verify(revoked.token), INACTIVE, 'revoked');

    // Expired on the database clock while its row still says active (no worker recorded it).
    const expired = await newToken();
    await ctx.sql.query(
      `UPDATE token SET issued_at = now() - interval '2 hours', expires_at = now() - interval '1 second' WHERE id = $1`,
      [expired.tokenId],
    );
    assert.deepEqual(await v.verify(expired.token), INACTIVE, 'expired');

    const prepared = await verifier({ cacheTtlMs: 0, prepare: true });
    for (let i = 0; i < 2; i++) {
      assert.equal((await prepared.verify(token)).active, true, 'with a prepared statement');
      assert.deepEqual(await prepared.verify(revoked.token), INACTIVE, 'with a prepared statement');
    }

    const rotated = await newToken();
    await ctx.sql.query(`UPDATE credential SET state = 'previous' WHERE token_id = $1`, [rotated.tokenId]);
    assert.deepEqual(await v.verify(rotated.token), INACTIVE, 'a credential that is not current');
  });

  it('should reject malformed tokens offline, without a query', async () => {
    const v = await verifier();
    const good = generateTokenString();
    const badChecksum = `${good.slice(0, -1)}${good.endsWith('A') ? 'B' : 'A'}`;
    for (const garbage of ['', 'garbage', badChecksum, `${good}x`, ` ${good}`, undefined, 42]) {
      assert.deepEqual(await v.verify(garbage as string), INACTIVE, String(garbage));
    }
    assert.equal(v.stats().queries, 0);

    // With the database unreachable: garbage still answers, a well-formed token needs the store.
    const down = await verifier({ databaseUrl: `postgres://nobody@127.0.0.1:${await freePort()}/none` });
    assert.equal(down.listening, false);
    assert.deepEqual(await down.verify(badChecksum), INACTIVE);
    await assert.rejects(down.verify(good), VerifierUnavailableError);
  });

  it('should look up a token of another format only when foreignTokens is on, and still refuse garbage offline', async () => {
    // An imported token keeps the format it was born with; the store knows it by its hash.
    const foreign = `ghp_${'Ab3'.repeat(12)}`;
    const record = await insertTokenRow(ctx.pool, { subject: 'usr_imported', secretHash: hashToken(foreign) });
    const strict = await verifier();
    assert.deepEqual(await strict.verify(foreign), INACTIVE, 'off by default');
    assert.equal(strict.stats().queries, 0, 'without a query');

    const lenient = await verifier({ foreignTokens: true });
    const answer = await lenient.verify(foreign);
    assert.equal(answer.active, true);
    assert.equal(answer.active && answer.tokenId, record.id);
    const good = generateTokenString();
    const badChecksum = `${good.slice(0, -1)}${good.endsWith('A') ? 'B' : 'A'}`;
    const before = lenient.stats().queries;
    for (const garbage of [
      'short',
      badChecksum,
      `has space ${'x'.repeat(20)}`,
      'x'.repeat(4097),
      `tw_${'x'.repeat(30)}`,
    ]) {
      assert.deepEqual(await lenient.verify(garbage), INACTIVE, garbage.slice(0, 20));
    }
    assert.equal(lenient.stats().queries, before, 'garbage and our own format with a bad checksum: no query');
    assert.deepEqual(await lenient.verify(`ghp_${'Zz9'.repeat(12)}`), INACTIVE, 'an unknown foreign token');
    assert.equal(lenient.stats().queries, before + 1, 'looked up');

    await kill(record.id);
    await waitUntil(() => lenient.stats().kills >= 1, 'the kill heard');
    assert.deepEqual(await lenient.verify(foreign), INACTIVE, 'revoked');
    await assert.rejects(createVerifier({ databaseUrl: ctx.settings.databaseUrl, foreignTokens: 'yes' as never }), {
      name: 'VerifierOptionError',
      message: /option foreignTokens must be true or false/,
    });
  });
});

describe('cache and invalidation', () => {
  it('should serve a positive answer from cache and drop it on the kill NOTIFY', async () => {
    const killed: string[] = [];
    const v = await verifier({ onKilled: (id) => killed.push(id) });
    const { token, tokenId } = await newToken();
    assert.equal((await v.verify(token)).active, true);
    assert.equal((await v.verify(token)).active, true);
    assert.deepEqual({ hits: v.stats().cacheHits, queries: v.stats().queries }, { hits: 1, queries: 1 });

    await kill(tokenId);
    await waitUntil(() => killed.includes(tokenId), 'the kill notification');
    assert.deepEqual(await v.verify(token), INACTIVE);
    // A notification may be a suspend that a resume undoes: the answer is dropped, the store asked
    // once; the store says dead, which is final, so the refusal is kept.
    assert.equal(v.stats().queries, 2, 'refused by the store once the kill was heard');
    assert.deepEqual(await v.verify(token), INACTIVE);
    assert.equal(v.stats().queries, 2, 'then refused from cache, without a query');
  });

  it('should tell onKilled of a kill only, and onChanged of a rotation, a suspend, a resume or an expiry change', async () => {
    const killed: string[] = [];
    const changed: string[] = [];
    const v = await verifier({ onKilled: (id) => killed.push(id), onChanged: (id) => changed.push(id) });
    const { token, tokenId } = await newToken();
    const cached = async () => {
      assert.equal((await v.verify(token)).active, true);
      const hits = v.stats().cacheHits;
      assert.equal((await v.verify(token)).active, true);
      assert.equal(v.stats().cacheHits, hits + 1, 'answered from cache');
    };
    const dropped = async (what: string, count: number) => {
      await waitUntil(() => changed.length === count, what);
      const queries = v.stats().queries;
      await v.verify(token);
      assert.equal(v.stats().queries, queries + 1, `${what}: the cached answer was dropped`);
    };
    const operator = { actor: 'admin:test', reason: 'test' };

    await cached();
    await rotateCredential(ctx.pool, {
      tokenId,
      credentialId: newCredentialId(),
      secretHash: hashToken(generateTokenString()),
      graceMs: 60_000,
      ...operator,
    });
    await dropped('the rotation', 1);
    await cached();
    await setSuspended(ctx.pool, { tokenId, suspended: true, ...operator });
    await dropped('the suspend', 2);
    await setSuspended(ctx.pool, { tokenId, suspended: false, ...operator });
    await dropped('the resume', 3);
    await cached();
    await changeExpiry(ctx.pool, {
      tokenId,
      ttlMs: 30_000,
      mode: 'shorten',
      maxLifetimeMs: 24 * 3_600_000,
      requestId: 'req_shorten',
      ...operator,
    });
    await dropped('the expiry change', 4);
    assert.deepEqual(killed, [], 'none of these is a kill');
    assert.deepEqual({ kills: v.stats().kills, changes: v.stats().changes }, { kills: 0, changes: 4 });

    await cached();
    await kill(tokenId);
    await waitUntil(() => killed.length === 1, 'the kill');
    assert.deepEqual(killed, [tokenId]);
    assert.deepEqual(changed, [tokenId, tokenId, tokenId, tokenId], 'a kill is no change');
    assert.deepEqual({ kills: v.stats().kills, changes: v.stats().changes }, { kills: 1, changes: 4 });
    assert.deepEqual(await v.verify(token), INACTIVE);
  });

  it('should ignore kills of another schema', async () => {
    const v = await verifier();
    const { token, tokenId } = await newToken();
    const other = await newToken();
    await v.verify(token);
    await ctx.sql.query('SELECT pg_notify($1, $2)', [KILL_CHANNEL, `another_schema:${tokenId}`]);
    // Notifications arrive in order: once this one is heard, the other one was too.
    await kill(other.tokenId);
    await waitUntil(() => v.stats().kills === 1, 'the kill of this schema');
    const hits = v.stats().cacheHits;
    assert.equal((await v.verify(token)).active, true);
    assert.equal(v.stats().cacheHits, hits + 1);
  });

  it('should not cache past the token expiry on the database clock', async () => {
    const v = await verifier();
    const { token, tokenId } = await newToken();
    await ctx.sql.query(`UPDATE token SET expires_at = now() + interval '700 milliseconds' WHERE id = $1`, [tokenId]);
    assert.equal((await v.verify(token)).active, true);
    await waitUntil(
      async () =>
        (await ctx.sql.query('SELECT expires_at <= now() AS past FROM token WHERE id = $1', [tokenId])).rows[0].past,
      'the expiry on the database clock',
    );
    assert.deepEqual(await v.verify(token), INACTIVE);
  });

  it('should not cache an answer whose lookup began before a kill that was heard before it arrived', async () => {
    const pool = await proxy();
    const killed: string[] = [];
    const v = await verifier({
      databaseUrl: pool.url(ctx.settings.databaseUrl),
      listenUrl: ctx.settings.databaseUrl,
      onKilled: (id) => killed.push(id),
    });
    // A pool connection open and idle, so the next bytes from the server are the lookup's answer.
    const warm = await newToken();
    await v.verify(warm.token);
    await waitUntil(() => v.stats().lastUseWrites === 1, 'the warm-up last-use write');

    const { token, tokenId } = await newToken();
    pool.hold();
    const answer = v.verify(token);
    await pool.heldSomething();
    await kill(tokenId);
    await waitUntil(() => killed.includes(tokenId), 'the kill notification');
    pool.release();
    assert.equal((await answer).active, true, 'the lookup read the token before its kill');
    assert.deepEqual(await v.verify(token), INACTIVE, 'that answer was not cached');
  });

  it('should not cache an answer whose lookup began before the listener was lost and back', async () => {
    const pool = await proxy();
    const listen = await proxy();
    const applicationName = 'verifier-reconnect-race';
    const v = await verifier({
      databaseUrl: pool.url(ctx.settings.databaseUrl),
      listenUrl: listen.url(ctx.settings.databaseUrl),
      applicationName,
    });
    const warm = await newToken();
    await v.verify(warm.token);
    await waitUntil(() => v.stats().lastUseWrites === 1, 'the warm-up last-use write');

    const { token, tokenId } = await newToken();
    pool.hold();
    const answer = v.verify(token);
    await pool.heldSomething();
    listen.refuse(true);
    await terminateListener(applicationName);
    await waitUntil(() => !v.listening, 'the listener lost');
    await kill(tokenId); // announced to nobody
    listen.refuse(false);
    await waitUntil(() => v.listening && v.stats().listenerConnects === 2, 'the listener back');
    pool.release();
    assert.equal((await answer).active, true, 'the lookup read the token before its kill');
    assert.deepEqual(await v.verify(token), INACTIVE, 'that answer was not cached');
  });
});

describe('lookups in flight', () => {
  /** Holds a lookup of a fresh token in the pool's proxy, kills the token, and starts a second verify. */
  async function verifyAfterKillDuringLookup(v: Verifier, pool: TcpProxy) {
    const warm = await newToken();
    await v.verify(warm.token);
    await waitUntil(() => v.stats().lastUseWrites === 1, 'the warm-up last-use write');
    const { token, tokenId } = await newToken();
    pool.hold();
    const first = v.verify(token);
    await pool.heldSomething();
    await kill(tokenId); // revoke has returned
    const second = v.verify(token);
    pool.release();
    await first;
    return second;
  }

  it('should not share a lookup begun before a kill with a verify begun after it while the listener is down', async () => {
    const pool = await proxy();
    const listen = await proxy();
    const applicationName = 'verifier-deaf-join';
    const v = await verifier({
      databaseUrl: pool.url(ctx.settings.databaseUrl),
      listenUrl: listen.url(ctx.settings.databaseUrl),
      applicationName,
      // No reconnect attempt (which moves the epoch) inside the window.
      reconnectInitialMs: 600_000,
      reconnectMaxMs: 600_000,
    });
    listen.refuse(true);
    await terminateListener(applicationName);
    await waitUntil(() => !v.listening, 'the listener lost');
    assert.deepEqual(await verifyAfterKillDuringLookup(v, pool), INACTIVE);
  });

  it('should not share a lookup begun before a kill with a verify begun after it when nothing is cached', async () => {
    const pool = await proxy();
    const v = await verifier({
      databaseUrl: pool.url(ctx.settings.databaseUrl),
      listenUrl: ctx.settings.databaseUrl,
      cacheTtlMs: 0,
    });
    assert.deepEqual(await verifyAfterKillDuringLookup(v, pool), INACTIVE);
  });
});

describe('the listener', () => {
  it('should serve nothing from cache while the listener is down, then recover with an empty cache', async () => {
    const listen = await proxy();
    const applicationName = 'verifier-listener-down';
    const v = await verifier({ listenUrl: listen.url(ctx.settings.databaseUrl), applicationName });
    const a = await newToken();
    const b = await newToken();
    await v.verify(a.token);
    await v.verify(b.token);
    assert.equal(v.stats().cacheEntries, 2);

    listen.refuse(true);
    await terminateListener(applicationName);
    await waitUntil(() => !v.listening, 'the listener lost');
    assert.ok(
      errors.some((e) => /kill listener lost/.test(e.message)),
      'the loss reported to onError',
    );
    await kill(a.tokenId); // its NOTIFY reaches nobody
    assert.deepEqual(await v.verify(a.token), INACTIVE, 'no stale acceptance while the listener is down');
    const before = v.stats();
    assert.equal((await v.verify(b.token)).active, true);
    assert.equal((await v.verify(b.token)).active, true);
    assert.deepEqual(
      {
        hits: v.stats().cacheHits - before.cacheHits,
        queries: v.stats().queries - before.queries,
        entries: v.stats().cacheEntries,
      },
      { hits: 0, queries: 2, entries: 0 },
      'every answer from the store while down',
    );

    listen.refuse(false);
    await waitUntil(() => v.listening, 'the listener back');
    assert.equal(v.stats().listenerConnects, 2);
    await v.verify(b.token);
    const hits = v.stats().cacheHits;
    assert.equal((await v.verify(b.token)).active, true);
    assert.equal(v.stats().cacheHits, hits + 1, 'the cache works again');
    await kill(b.tokenId);
    await waitUntil(() => v.stats().kills === 1, 'the kill heard on the new connection');
    assert.deepEqual(await v.verify(b.token), INACTIVE);
  });

  it('should notice a connection gone silent by its heartbeat and reconnect', async () => {
    const listen = await proxy();
    const v = await verifier({
      listenUrl: listen.url(ctx.settings.databaseUrl),
      heartbeatIntervalMs: 100,
      heartbeatTimeoutMs: 300,
    });
    assert.equal(v.listening, true);
    listen.freeze();
    await waitUntil(() => !v.listening, 'the silent listener noticed', 10_000, 5);
    await waitUntil(() => v.listening && v.stats().listenerConnects === 2, 'the listener back');
  });
});

describe('another process', () => {
  it('should stop accepting a token within one NOTIFY after revoke returns, in a warmed verifier of another process', async () => {
    const { tokenId, token } = await ctx.warden.issue({ subject: 'usr_verifier_child', ttl: '1h' });
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'test', 'support', 'verifier-process.js')], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    const options: VerifierOptions = {
      databaseUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      cacheTtlMs: 60_000,
    };
    child.stdin.write(`${JSON.stringify({ options, token, afterKill: 20, deadlineMs: 30_000 })}\n`);
    assert.deepEqual(JSON.parse((await lines.next()).value as string), { ready: true, listening: true });

    await ctx.warden.revoke({ tokenId, reason: 'verifier test' });
    child.stdin.write('revoke returned\n');
    const { record, stats } = JSON.parse((await lines.next()).value as string) as {
      record: Entry[];
      stats: { cacheHits: number; queries: number };
    };
    child.stdin.end();

    const killedAt = record.findIndex((e) => e.kind === 'killed');
    assert.ok(killedAt >= 0, `the kill notification heard: ${JSON.stringify(record)}`);
    assert.deepEqual(record[killedAt], { kind: 'killed', tokenId });
    const verifies = (entries: Entry[]) => entries.filter((e) => e.kind === 'verify');
    const after = verifies(record.slice(killedAt + 1)) as Array<Extract<Entry, { kind: 'verify' }>>;
    assert.equal(after[0]?.active, false, `the next verify inactive: ${JSON.stringify(record)}`);
    assert.ok(
      after.every((e) => !e.active),
      `never active after the notification: ${JSON.stringify(record)}`,
    );
    assert.ok(
      after.reduce((n, e) => n + e.count, 0) >= 20,
      `at least 20 verifies after the notification: ${JSON.stringify(record)}`,
    );
    assert.ok(
      record.some((e) => e.kind === 'mark' && e.text === 'revoke returned'),
      'the revoke returned meanwhile',
    );
    assert.ok(
      verifies(record.slice(0, killedAt)).some((e) => e.active && e.count > 0),
      'active before',
    );
    assert.ok(
      stats.cacheHits > 0 && stats.queries <= 2,
      `answered from cache, before the kill and after it: ${JSON.stringify(stats)}`,
    );
  });
});

describe('last use', () => {
  const lastUsed = async (tokenId: string) =>
    (await ctx.sql.query('SELECT last_used_at FROM token WHERE id = $1', [tokenId])).rows[0]
      .last_used_at as Date | null;

  it('should write last use at most once per interval, across verifiers, however often a token is checked', async () => {
    const one = await verifier();
    const two = await verifier({ cacheTtlMs: 0 });
    const { token, tokenId } = await newToken();
    await Promise.all(Array.from({ length: 100 }, () => one.verify(token)));
    for (let i = 0; i < 100; i++) await one.verify(token);
    await waitUntil(() => one.stats().lastUseWrites === 1, 'the first write');
    const first = await lastUsed(tokenId);
    assert.ok(first);
    await Promise.all(Array.from({ length: 50 }, () => two.verify(token)));
    await waitUntil(() => two.stats().lastUseThrottled === 1, 'the other verifier throttled in the store');
    assert.deepEqual(
      [one.stats().lastUseWrites + one.stats().lastUseThrottled, two.stats().lastUseWrites],
      [1, 0],
      'one write attempt per verifier, one write in all',
    );
    assert.equal((await lastUsed(tokenId))?.getTime(), first.getTime());
  });

  it('should write again once the interval is over, and never fail a verify when the write fails', async () => {
    const v = await verifier({ lastUseIntervalMs: 300 });
    const { token, tokenId } = await newToken();
    await v.verify(token);
    await waitUntil(() => v.stats().lastUseWrites === 1, 'the first write');
    const first = (await lastUsed(tokenId))!;
    await waitUntil(
      async () => (await v.verify(token)).active && v.stats().lastUseWrites === 2,
      'a write after the interval',
    );
    assert.ok((await lastUsed(tokenId))!.getTime() >= first.getTime() + 300);

    const failing = await verifier({ lastUseIntervalMs: 1 });
    await ctx.sql.query('ALTER FUNCTION record_token_use(text, bigint) RENAME TO record_token_use_away');
    try {
      const before = errors.length;
      assert.equal((await failing.verify(token)).active, true);
      await waitUntil(
        () => errors.slice(before).some((e) => /last use failed/.test(e.message)),
        'the failure reported',
      );
    } finally {
      await ctx.sql.query('ALTER FUNCTION record_token_use_away(text, bigint) RENAME TO record_token_use');
    }
  });
});

describe('options', () => {
  it('should refuse bad options with an error naming the option, and never echo a URL', async () => {
    const url = ctx.settings.databaseUrl;
    const cases: Array<[unknown, string, RegExp]> = [
      [undefined, 'databaseUrl', /required/],
      [{}, 'databaseUrl', /postgres:\/\//],
      [
        { databaseUrl: 'mysql://user:hunter2@db/x' },
        'databaseUrl',
        /postgres:\/\/ or postgresql:\/\/ URL, got another string/,
      ],
      [{ databaseUrl: url, listenUrl: 5 }, 'listenUrl', /got 5/],
      [{ databaseUrl: url, schema: '' }, 'schema', /1 to 63/],
      [{ databaseUrl: url, cacheTtlMs: -1 }, 'cacheTtlMs', /whole number ≥ 0 \(milliseconds\), got -1/],
      [{ databaseUrl: url, cacheTtlMs: 1.5 }, 'cacheTtlMs', /whole number/],
      [{ databaseUrl: url, lastUseIntervalMs: '60s' }, 'lastUseIntervalMs', /got "60s"/],
      [{ databaseUrl: url, poolSize: 0 }, 'poolSize', /from 1 to 1000/],
      [{ databaseUrl: url, onError: 'log' }, 'onError', /function/],
      [{ databaseUrl: url, onChanged: true }, 'onChanged', /must be a function, got boolean/],
      [{ databaseUrl: url, prepare: 'yes' }, 'prepare', /true or false/],
      [{ databaseUrl: url, cacheTTLMs: 5 }, 'cacheTTLMs', /not an option/],
      [
        { databaseUrl: url, reconnectInitialMs: 500, reconnectMaxMs: 100 },
        'reconnectMaxMs',
        /at least reconnectInitialMs/,
      ],
    ];
    for (const [options, option, message] of cases) {
      await assert.rejects(createVerifier(options as VerifierOptions), (err: unknown) => {
        assert.ok(err instanceof VerifierOptionError, String(err));
        assert.equal(err.option, option);
        assert.match(err.message, new RegExp(`option ${option} `));
        assert.match(err.message, message);
        assert.doesNotMatch(err.message, /hunter2/);
        return true;
      });
    }
  });
});

describe('the import graph', () => {
  it('should load pg and Node only through tokenwarden/verifier', async () => {
    const { token } = await newToken();
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-verifier-modules-'));
    try {
      const file = path.join(dir, 'modules.json');
      const options = JSON.stringify({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
      const script = `const { createVerifier } = await import('tokenwarden/verifier');
        const v = await createVerifier(${options});
        const answer = await v.verify(${JSON.stringify(token)});
        await v.close();
        console.log(JSON.stringify({ active: answer.active }));`;
      const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], {
        cwd: PACKAGE_ROOT,
        env: { PATH: process.env.PATH ?? '', ...recordingAllModulesTo(file) },
      });
      assert.deepEqual(JSON.parse(stdout), { active: true });
      const loaded = await allLoadedFiles(file);
      const packages = new Set(
        loaded.flatMap((f) => {
          const m = /[\\/]node_modules[\\/]((@[^\\/]+[\\/])?[^\\/]+)[\\/]/.exec(f);
          return m ? [m[1]!.replaceAll('\\', '/')] : [];
        }),
      );
      const pgFamily = /^(pg|pg-.*|pgpass|postgres-.*|split2|xtend)$/;
      assert.deepEqual(
        [...packages].filter((p) => !pgFamily.test(p)),
        [],
        'only pg and its dependencies',
      );
      assert.ok(packages.has('pg'), 'the recorder saw pg');
      const own = loaded
        .filter((f) => f.startsWith(path.join(PACKAGE_ROOT, 'dist')))
        .map((f) => path.relative(path.join(PACKAGE_ROOT, 'dist'), f).replaceAll('\\', '/'))
        .filter((f) => !f.startsWith('test/'))
        .sort();
      assert.deepEqual(own, [
        'client/verifier.js',
        'common/identifiers.js',
        'common/names.js',
        'common/secrets.js',
        'common/store/last-use.js',
        'common/store/verification.js',
      ]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
