/**
 * Payload encryption: the codec itself (round trip, key roll, plaintext passing through, what it
 * cannot open left as it is), what Temporal stores (ciphertext only: no subject, reason or failure
 * message in the raw history), and the codec endpoints the Web UI calls (decode, encode, CORS, keys).
 * Real Temporal dev server, real PostgreSQL, the HTTP API on loopback.
 */
import assert from 'node:assert/strict';
import { createCipheriv, randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Payload } from '@temporalio/common';
import { createApiServer, type ApiServer } from '../client/api/server.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { TokenWarden } from '../client/index.js';
import { loadApiSettings, loadStoreSettings, type Settings } from '../common/config.js';
import { describePayloadEncryption, payloadCodecs } from '../common/data-converter.js';
import { ConfigError } from '../common/errors.js';
import { ENCRYPTED_ENCODING, EncryptionCodec, KEY_ID_METADATA } from '../common/payload-codec.js';
import { DECRYPT_ONLY, payloadKeyId } from '../common/payload-key-id.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { createApiKey } from '../common/store/api-keys.js';
import { call } from './support/api.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { historyText } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

const text = (p: Payload) => Buffer.from(p.data ?? new Uint8Array()).toString('utf8');
const meta = (p: Payload, key: string) => Buffer.from(p.metadata?.[key] ?? new Uint8Array()).toString('utf8');
const json = (value: unknown): Payload => ({
  metadata: { encoding: Buffer.from('json/plain') },
  data: Buffer.from(JSON.stringify(value)),
});

/** What this process writes to stderr while `body` runs (the codecs report unknown keys there). */
async function capturingStderr<T>(body: (written: () => string) => Promise<T>): Promise<T> {
  let text = '';
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: never[]) => {
    text += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    return write(chunk, ...rest);
  }) as typeof process.stderr.write;
  try {
    return await body(() => text);
  } finally {
    process.stderr.write = write;
  }
}

/** An encrypted payload as another codec would write it: `plaintext` sealed under `key` with `aad`. */
function sealed(key: Buffer, plaintext: Buffer, aad: string): Payload {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  cipher.setAAD(Buffer.from(aad));
  return {
    metadata: { encoding: Buffer.from(ENCRYPTED_ENCODING), [KEY_ID_METADATA]: Buffer.from(payloadKeyId(key)) },
    data: Buffer.concat([iv, cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]),
  };
}

describe('the payload codec', () => {
  it('should encrypt under the first key, name it, and decrypt back to the same payload', async () => {
    const key = randomBytes(32);
    const codec = new EncryptionCodec([key]);
    const original = json({ reason: 'left the company', subject: 'usr_codec' });
    const [encrypted] = await codec.encode([original]);
    assert.equal(meta(encrypted!, 'encoding'), ENCRYPTED_ENCODING);
    assert.equal(meta(encrypted!, KEY_ID_METADATA), payloadKeyId(key));
    assert.ok(!text(encrypted!).includes('left the company'), 'the data is ciphertext');
    const [decrypted] = await codec.decode([encrypted!]);
    assert.equal(meta(decrypted!, 'encoding'), 'json/plain');
    assert.deepEqual(Object.keys(decrypted!.metadata!), ['encoding']);
    assert.equal(text(decrypted!), text(original));
    const [again] = await codec.encode([original]);
    assert.notDeepEqual(again!.data, encrypted!.data, 'a fresh nonce each time');
  });

  it('should decrypt with an earlier key after a roll, and encrypt with the new one', async () => {
    const [oldKey, newKey] = [randomBytes(32), randomBytes(32)];
    const [underOld] = await new EncryptionCodec([oldKey]).encode([json('before the roll')]);
    const rolled = new EncryptionCodec([newKey, oldKey]);
    assert.equal(text((await rolled.decode([underOld!]))[0]!), '"before the roll"');
    const [underNew] = await rolled.encode([json('after')]);
    assert.equal(meta(underNew!, KEY_ID_METADATA), payloadKeyId(newKey));
  });

  it('should pass a payload that was never encrypted through unchanged', async () => {
    const codec = new EncryptionCodec([randomBytes(32)]);
    const plain = json({ recorded: 'before encryption' });
    assert.deepEqual(await codec.decode([plain]), [plain]);
  });

  it('should leave what it cannot open as it is, and report an unknown key id once', async () => {
    const unknown: string[] = [];
    const codec = new EncryptionCodec([randomBytes(32)], { onUnknownKey: (id) => unknown.push(id) });
    const [foreign] = await new EncryptionCodec([randomBytes(32)]).encode([json('another key')]);
    assert.deepEqual(await codec.decode([foreign!]), [foreign]);
    await codec.decode([foreign!]);
    assert.deepEqual(unknown, [meta(foreign!, KEY_ID_METADATA)], 'named once, by id');

    const [ours] = await codec.encode([json('tampered with')]);
    const tampered = { ...ours!, data: Buffer.from(ours!.data!) };
    tampered.data[20]! ^= 1;
    assert.deepEqual(await codec.decode([tampered]), [tampered], 'a tampered ciphertext fails authentication');
  });

  it('should leave as it is a payload whose nonce, tag, length, associated data or plaintext is wrong', async () => {
    const key = randomBytes(32);
    const codec = new EncryptionCodec([key]);
    const [ours] = await codec.encode([json('sealed')]);
    const flipped = (at: number): Payload => {
      const data = Buffer.from(ours!.data!);
      data[at < 0 ? data.length + at : at]! ^= 0x80;
      return { ...ours!, data };
    };
    const cases: Array<[string, Payload]> = [
      ['a flipped nonce byte', flipped(0)],
      ['a flipped tag byte', flipped(-1)],
      ['data shorter than a nonce and a tag', { ...ours!, data: Buffer.from(ours!.data!).subarray(0, 27) }],
      ['the right key under other associated data', sealed(key, Buffer.from(ours!.data!), 'another use v1')],
      // Authentic, but not a Payload message: a length prefix running past the end.
      [
        'an authentic ciphertext of bytes that are no payload',
        sealed(key, Buffer.from([0x0a, 0xff]), 'tokenwarden payload v1'),
      ],
    ];
    for (const [label, payload] of cases) assert.deepEqual(await codec.decode([payload]), [payload], label);
    assert.equal(text((await codec.decode([ours!]))[0]!), '"sealed"', 'the untouched payload still opens');
  });

  it('should encrypt with the key the setting names, or with none while every key still decrypts', async () => {
    const [first, second] = [randomBytes(32), randomBytes(32)];
    const [underSecond] = await new EncryptionCodec([second]).encode([json('written by a process already rolled')]);
    const named = new EncryptionCodec([first, second], { encryptKeyId: payloadKeyId(second) });
    assert.equal(meta((await named.encode([json('x')]))[0]!, KEY_ID_METADATA), payloadKeyId(second));

    const decryptOnly = new EncryptionCodec([first], { encryptKeyId: DECRYPT_ONLY });
    const plain = json('a first rollout: nothing encrypted yet');
    assert.deepEqual(await decryptOnly.encode([plain]), [plain], 'decrypt-only encrypts nothing');
    const [underFirst] = await new EncryptionCodec([first]).encode([json('already encrypted')]);
    assert.equal(text((await decryptOnly.decode([underFirst!]))[0]!), '"already encrypted"');
    assert.equal(text((await named.decode([underSecond!]))[0]!), '"written by a process already rolled"');

    assert.throws(() => new EncryptionCodec([first], { encryptKeyId: payloadKeyId(second) }), /not configured/);

    // What a worker logs at start: ids only, so a fleet halfway through a change shows.
    const [firstId, secondId] = [payloadKeyId(first), payloadKeyId(second)];
    assert.equal(
      describePayloadEncryption({ payloadKeys: [first, second], payloadEncryptKeyId: secondId }),
      `payloads encrypted with key ${secondId}; keys that decrypt: ${firstId}, ${secondId}`,
    );
    assert.equal(
      describePayloadEncryption({ payloadKeys: [first], payloadEncryptKeyId: DECRYPT_ONLY }),
      `payloads encrypted with key none (plaintext); keys that decrypt: ${firstId}`,
    );
  });

  it('should, without keys, encrypt nothing and still report the encrypted payloads it meets', async () => {
    const unknown: string[] = [];
    const keyless = new EncryptionCodec([], { onUnknownKey: (id) => unknown.push(id) });
    const plain = json('plaintext');
    assert.deepEqual(await keyless.encode([plain]), [plain]);
    const [foreign] = await new EncryptionCodec([randomBytes(32)]).encode([json('encrypted elsewhere')]);
    assert.deepEqual(await keyless.decode([foreign!]), [foreign]);
    assert.deepEqual(unknown, [meta(foreign!, KEY_ID_METADATA)]);
    // Every process gets a codec, keys or not: one without keys reports instead of staying silent.
    assert.equal(payloadCodecs({ payloadKeys: [] }).length, 1);
  });

  it('should refuse an encrypting key id that names no configured key, listing the configured ids', () => {
    const key = randomBytes(32);
    const env = {
      DATABASE_URL: 'postgres://tokenwarden@127.0.0.1:5432/tokenwarden',
      TOKENWARDEN_DATA_DIR: '/nonexistent',
      TOKENWARDEN_PAYLOAD_KEYS: key.toString('base64'),
    };
    const load = (id: string) => loadStoreSettings({ ...env, TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID: id });
    assert.equal(load(payloadKeyId(key)).payloadEncryptKeyId, payloadKeyId(key));
    assert.equal(load('none').payloadEncryptKeyId, DECRYPT_ONLY);
    assert.throws(
      () => load('0123456789abcdef'),
      (err: Error) =>
        err instanceof ConfigError &&
        err.message.includes('TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID') &&
        err.message.includes(payloadKeyId(key)) &&
        !err.message.includes(key.toString('base64')),
    );
    assert.throws(() => load('my-key'), /TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID must be a payload key id/);
  });

  it('should refuse keyless codec answers on an API that does not listen on loopback', () => {
    assert.throws(
      () => loadApiSettings({ TOKENWARDEN_CODEC_KEYLESS: 'loopback', TOKENWARDEN_API_HOST: '0.0.0.0' }),
      /TOKENWARDEN_CODEC_KEYLESS: loopback needs TOKENWARDEN_API_HOST to be a loopback address/,
    );
    assert.equal(loadApiSettings({ TOKENWARDEN_CODEC_KEYLESS: 'loopback' }).codec.keylessLoopback, true);
  });
});

describe('payloads in Temporal', () => {
  let ctx: TestContext;
  let worker: RunningWorker;
  let receiver: TestReceiver;
  let verifier: Verifier;
  let server: ApiServer;
  let url: string;
  let codecKey: string;
  let adminKey: string;
  const reason = 'codec check: contractor offboarded';
  const subject = 'usr_codec_plaintext_check';

  before(async () => {
    ctx = await TestContext.create('payload_codec');
    receiver = await TestReceiver.start();
    receiver.secret = (await ctx.warden.addReceiver({ id: 'codec-rejecting', url: receiver.url })).secret;
    // A rejection: the workflow records the activity's failure (its message names the answer).
    receiver.behaviour = () => ({ status: 400 });
    worker = await ctx.startWorker();
    verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
    server = await createApiServer({
      warden: ctx.warden,
      verifier,
      logger: false,
      codec: { origins: ['http://localhost:8233'], keylessLoopback: false },
    });
    await server.listen({ host: '127.0.0.1', port: 0 });
    const address = server.server.address();
    url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
    codecKey = (await createApiKey(ctx.pool, { name: 'ui', scopes: ['codec'] })).key;
    adminKey = (await createApiKey(ctx.pool, { name: 'admin', scopes: ['admin'] })).key;
  });
  after(async () => {
    await server?.close();
    await verifier?.close();
    await worker?.stop();
    await receiver?.close();
    await ctx?.close();
  });

  /** Every payload of a history, in protobuf JSON as the Web UI sends them to the codec. */
  function payloadsOf(value: unknown, out: Array<{ metadata: Record<string, string>; data: string }> = []) {
    if (Array.isArray(value)) for (const v of value) payloadsOf(v, out);
    else if (value && typeof value === 'object') {
      const o = value as Record<string, unknown>;
      if (o.metadata && typeof o.metadata === 'object' && 'encoding' in (o.metadata as object)) {
        const metadata = Object.fromEntries(
          Object.entries(o.metadata as Record<string, Uint8Array>).map(([k, v]) => [
            k,
            Buffer.from(v).toString('base64'),
          ]),
        );
        out.push({ metadata, data: Buffer.from((o.data as Uint8Array | undefined) ?? []).toString('base64') });
      } else for (const v of Object.values(o)) payloadsOf(v, out);
    }
    return out;
  }

  /** The events, with their search attributes left out. */
  function withoutSearchAttributes(value: unknown): unknown {
    if (Array.isArray(value)) return value.map(withoutSearchAttributes);
    if (value && typeof value === 'object' && !(value instanceof Uint8Array)) {
      return Object.fromEntries(
        Object.entries(value)
          .filter(([k]) => k !== 'searchAttributes')
          .map(([k, v]) => [k, withoutSearchAttributes(v)]),
      );
    }
    return value;
  }

  it('should store only ciphertext: no subject, reason or failure message in the raw history', async () => {
    const issued = await ctx.warden.issue({ subject, receivers: ['codec-rejecting'], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason });
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
    await waitUntil(
      async () => (await ctx.warden.show(issued.tokenId)).deliveries[0]?.status === 'failed',
      'the rejection recorded',
    );
    // The operator's retry runs an ordinary delivery activity, whose rejection history records as a failure.
    await ctx.warden.retryPropagation(issued.tokenId, { reason: 'codec check retry', actor: 'test' });
    await waitUntil(
      async () =>
        (await handle.fetchHistory()).events?.some((e) => e.activityTaskFailedEventAttributes) ? true : undefined,
      'the failed delivery in history',
    );
    const history = await handle.fetchHistory();
    // Search attributes are not encrypted by Temporal: they hold ids, states and dates only (the
    // subject is an opaque id, kept there so an operator can list one subject's tokens).
    const raw = historyText(withoutSearchAttributes(history.events)).join('\n');
    assert.ok(!raw.includes(subject), 'the subject is encrypted outside search attributes');
    assert.ok(!raw.includes(reason), 'the reason is encrypted');
    assert.ok(!raw.includes('HTTP 400'), "the receiver's answer in the failure message is encrypted");
    const failed = history.events!.find((e) => e.activityTaskFailedEventAttributes)!;
    const failure = failed.activityTaskFailedEventAttributes!.failure!;
    assert.equal(failure.message, 'Encoded failure');
    const encodedAttributes = failure.encodedAttributes as Payload;
    assert.equal(meta(encodedAttributes, 'encoding'), ENCRYPTED_ENCODING);
    // Search attributes are not encrypted by Temporal: they hold ids, states and dates only.
    const payloads = payloadsOf(history.events);
    assert.ok(payloads.length > 5);

    // The Web UI's view: the same payloads through the codec endpoint read as plaintext.
    const decoded = await call(url, 'POST', '/codec/decode', {
      key: codecKey,
      json: { payloads },
      headers: { 'x-namespace': ctx.settings.temporal.namespace },
    });
    assert.equal(decoded.status, 200, decoded.text);
    const plain = (decoded.body.payloads as Array<{ data: string }>)
      .map((p) => Buffer.from(p.data, 'base64').toString('utf8'))
      .join('\n');
    assert.ok(plain.includes(reason), 'the revoke reason decodes');
    assert.ok(plain.includes(subject), 'the subject decodes');
    assert.ok(plain.includes('HTTP 400'), 'the failure message decodes');

    await ctx.warden.forceComplete(issued.tokenId, { reason: 'test over', actor: 'test' });
  });

  it('should round-trip through /codec/encode and /codec/decode, with an admin or a codec key only', async () => {
    const payloads = [
      {
        metadata: { encoding: Buffer.from('json/plain').toString('base64') },
        data: Buffer.from('"hello"').toString('base64'),
      },
    ];
    const encoded = await call(url, 'POST', '/codec/encode', { key: codecKey, json: { payloads } });
    assert.equal(encoded.status, 200, encoded.text);
    const [ciphertext] = encoded.body.payloads as Array<{ metadata: Record<string, string>; data: string }>;
    assert.equal(Buffer.from(ciphertext!.metadata.encoding!, 'base64').toString(), ENCRYPTED_ENCODING);
    const decoded = await call(url, 'POST', '/codec/decode', { key: adminKey, json: encoded.body });
    assert.equal(decoded.status, 200, decoded.text);
    assert.deepEqual(decoded.body.payloads, payloads);

    assert.equal((await call(url, 'POST', '/codec/decode', { json: { payloads } })).status, 401);
    const revoker = (await createApiKey(ctx.pool, { name: 'revoker', scopes: ['revoke'] })).key;
    assert.equal((await call(url, 'POST', '/codec/decode', { key: revoker, json: { payloads } })).status, 403);
  });

  it('should refuse a malformed body and an encode for another namespace, naming the field', async () => {
    const bad = await call(url, 'POST', '/codec/decode', {
      key: codecKey,
      json: { payloads: [{ metadata: { encoding: 'not base64!' }, data: '' }] },
    });
    assert.equal(bad.status, 400, bad.text);
    assert.match(JSON.stringify(bad.body.errors), /payloads\.0\.metadata\.encoding/);
    const other = await call(url, 'POST', '/codec/encode', {
      key: codecKey,
      json: { payloads: [] },
      headers: { 'x-namespace': 'someone-else' },
    });
    assert.equal(other.status, 400, other.text);
    assert.equal(other.body.errors[0].path, 'x-namespace');
  });

  it("should answer the Web UI's CORS preflight for its origin only", async () => {
    const preflight = (origin: string) =>
      fetch(`${url}/codec/decode`, {
        method: 'OPTIONS',
        headers: {
          origin,
          'access-control-request-method': 'POST',
          'access-control-request-headers': 'content-type,x-namespace',
        },
      });
    const ui = await preflight('http://localhost:8233');
    assert.equal(ui.status, 204);
    assert.equal(ui.headers.get('access-control-allow-origin'), 'http://localhost:8233');
    assert.match(ui.headers.get('access-control-allow-methods') ?? '', /POST/);
    assert.match(ui.headers.get('access-control-allow-headers') ?? '', /x-namespace/);
    assert.match(ui.headers.get('access-control-allow-headers') ?? '', /content-type/);
    assert.equal(ui.headers.get('vary'), 'Origin', 'caches keep answers per origin');
    assert.equal(ui.headers.get('access-control-allow-credentials'), null, 'no credentials: the key is a header');
    const elsewhere = await preflight('https://evil.example');
    assert.equal(elsewhere.headers.get('access-control-allow-origin'), null, 'no CORS grant for another site');
    assert.equal(elsewhere.headers.get('access-control-allow-credentials'), null);
    assert.equal(elsewhere.headers.get('vary'), 'Origin');

    const post = await call(url, 'POST', '/codec/decode', {
      key: codecKey,
      json: { payloads: [] },
      headers: { origin: 'http://localhost:8233' },
    });
    assert.equal(post.headers.get('access-control-allow-origin'), 'http://localhost:8233');
    assert.equal(post.headers.get('access-control-allow-credentials'), null);

    // A refusal reaches the UI as what it is (a missing key, a bad body), not as a network error.
    for (const [status, options] of [
      [401, { json: { payloads: [] } }],
      [400, { key: codecKey, json: { payloads: 'none' } }],
    ] as const) {
      const refused = await call(url, 'POST', '/codec/decode', {
        ...options,
        headers: { origin: 'http://localhost:8233' },
      });
      assert.equal(refused.status, status, refused.text);
      assert.equal(refused.headers.get('access-control-allow-origin'), 'http://localhost:8233', `${status}`);
      assert.equal(refused.headers.get('vary'), 'Origin');
    }
  });

  it('should answer keyless only a loopback peer naming a loopback host from no page or an allowed one', async () => {
    const open = await createApiServer({
      warden: ctx.warden,
      verifier,
      logger: false,
      codec: { origins: ['http://localhost:8233'], keylessLoopback: true },
    });
    try {
      await open.listen({ host: '127.0.0.1', port: 0 });
      const address = open.server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      const openUrl = `http://127.0.0.1:${port}`;
      const answer = await call(openUrl, 'POST', '/codec/decode', { json: { payloads: [] } });
      assert.equal(answer.status, 200, answer.text);
      const fromUi = await call(openUrl, 'POST', '/codec/decode', {
        json: { payloads: [] },
        headers: { origin: 'http://localhost:8233' },
      });
      assert.equal(fromUi.status, 200, fromUi.text);

      const ask = (remoteAddress: string, headers: Record<string, string>, payload: unknown = { payloads: [] }) =>
        open.inject({
          method: 'POST',
          url: '/codec/decode',
          remoteAddress,
          headers: { host: `127.0.0.1:${port}`, 'content-type': 'application/json', ...headers },
          payload: typeof payload === 'string' ? payload : JSON.stringify(payload),
        });
      assert.equal((await ask('::ffff:127.0.0.1', {})).statusCode, 200, 'a mapped loopback peer is loopback');
      assert.equal((await ask('127.0.0.1', { host: `localhost:${port}` })).statusCode, 200);
      // Every case is asked, and every one answered otherwise than 401 named.
      const admitted: string[] = [];
      for (const [label, peer, headers] of [
        ['a private-network peer', '10.1.2.3', {}],
        ['a mapped private-network peer', '::ffff:10.1.2.3', {}],
        ['a rebound name in Host', '127.0.0.1', { host: `evil.example:${port}` }],
        ['another port in Host', '127.0.0.1', { host: `127.0.0.1:${port + 1}` }],
        ["another site's page", '127.0.0.1', { origin: 'https://evil.example' }],
        ['a proxy on this host', '127.0.0.1', { 'x-forwarded-for': '203.0.113.9' }],
        ['a proxy saying so in Forwarded', '127.0.0.1', { forwarded: 'for=203.0.113.9' }],
      ] as const) {
        const refused = await ask(peer, headers);
        if (refused.statusCode !== 401) admitted.push(`${label}: ${refused.statusCode}`);
      }
      // Refused before the body is read: a malformed body from afar is not even parsed.
      const unread = await ask('10.1.2.3', {}, '{not json');
      if (unread.statusCode !== 401) admitted.push(`a malformed body from afar: ${unread.statusCode}`);
      assert.deepEqual(admitted, []);
      // A remote caller with a key is a caller like any other.
      const keyed = await ask('10.1.2.3', { authorization: `Bearer ${codecKey}` });
      assert.equal(keyed.statusCode, 200, keyed.body);
    } finally {
      await open.close();
    }
  });

  it('should refuse payloads stored externally, naming the field, rather than drop their reference', async () => {
    const refused = await call(url, 'POST', '/codec/encode', {
      key: codecKey,
      json: { payloads: [{ metadata: {}, data: '', externalPayloads: [{ sizeBytes: '10' }] }] },
    });
    assert.equal(refused.status, 400, refused.text);
    assert.match(JSON.stringify(refused.body.errors), /payloads\.0\.externalPayloads/);
  });

  it("should keep the endpoint's unknown-key reports apart from the worker's", async () => {
    const forged = Array.from({ length: 120 }, (_, i) => ({
      metadata: {
        encoding: Buffer.from(ENCRYPTED_ENCODING).toString('base64'),
        [KEY_ID_METADATA]: Buffer.from(`forged-${i}`).toString('base64'),
      },
      data: Buffer.alloc(40).toString('base64'),
    }));
    const [elsewhere] = await new EncryptionCodec([randomBytes(32)]).encode([json('a key the worker lacks')]);
    await capturingStderr(async (written) => {
      const answer = await call(url, 'POST', '/codec/decode', { key: codecKey, json: { payloads: forged } });
      assert.equal(answer.status, 200, answer.text);
      // The worker's codec (this process's, for these settings) still has its whole report budget.
      await payloadCodecs(ctx.settings)[0]!.decode([elsewhere!]);
      assert.match(
        written(),
        new RegExp(`tokenwarden: a payload is encrypted with key ${meta(elsewhere!, KEY_ID_METADATA)}`),
      );
    });
  });
});

describe('a fleet learning a payload key', () => {
  let ctx: TestContext;
  let keylessWorker: RunningWorker;
  let rollout: Settings;

  before(async () => {
    ctx = await TestContext.create('payload_rollout');
    // A queue of its own, served only by a worker started before the fleet had any payload key.
    rollout = {
      ...ctx.settings,
      temporal: { ...ctx.settings.temporal, taskQueue: `${ctx.settings.temporal.taskQueue}-rollout` },
    };
    keylessWorker = await ctx.startWorker({ ...rollout, payloadKeys: [] });
  });
  after(async () => {
    await keylessWorker?.stop();
    await ctx?.close();
  });

  it(
    'should keep the reason of a revoke sent by a process that already holds the key but only decrypts',
    { timeout: 60_000 },
    async () => {
      const warden = await TokenWarden.connect({
        ...rollout,
        payloadKeys: [randomBytes(32)],
        payloadEncryptKeyId: DECRYPT_ONLY,
      });
      try {
        const issued = await warden.issue({ subject: 'usr_rollout', ttl: '1h' });
        await warden.revoke({ tokenId: issued.tokenId, reason: 'first rollout, phase one' });
        const done = (await ctx.client.workflow
          .getHandle(tokenWorkflowId(issued.tokenId))
          .result()) as TokenLifecycleResult;
        assert.equal(done.propagation, 'complete');
        const audit = await store.readAudit(ctx.pool, issued.tokenId);
        assert.ok(
          !audit.some((e) => e.kind === 'signal.malformed'),
          `audit kinds: ${audit.map((e) => e.kind).join(', ')}`,
        );
      } finally {
        await warden.close();
      }
    },
  );

  it(
    'should have a worker without keys report the key of an encrypted payload it meets',
    { timeout: 60_000 },
    async () => {
      const key = randomBytes(32);
      const warden = await TokenWarden.connect({ ...rollout, payloadKeys: [key] });
      try {
        await capturingStderr(async (written) => {
          const issued = await warden.issue({ subject: 'usr_rollout_early', ttl: '1h' });
          try {
            await waitUntil(
              () =>
                written().includes(`a payload is encrypted with key ${payloadKeyId(key)}, which is not configured`) ||
                undefined,
              'the keyless worker names the key it lacks',
            );
          } finally {
            await ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId)).terminate('test over');
          }
        });
      } finally {
        await warden.close();
      }
    },
  );
});
