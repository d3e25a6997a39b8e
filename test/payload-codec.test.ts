/**
 * Payload encryption: the codec itself (round trip, key roll, plaintext passing through, what it
 * cannot open left as it is), what Temporal stores (ciphertext only: no subject, reason or failure
 * message in the raw history), and the codec endpoints the Web UI calls (decode, encode, CORS, keys).
 * Real Temporal dev server, real PostgreSQL, the HTTP API on loopback.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Payload } from '@temporalio/common';
import { createApiServer, type ApiServer } from '../client/api/server.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { ENCRYPTED_ENCODING, EncryptionCodec, KEY_ID_METADATA, payloadKeyId } from '../common/payload-codec.js';
import { tokenWorkflowId } from '../common/names.js';
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
    const elsewhere = await preflight('https://evil.example');
    assert.equal(elsewhere.headers.get('access-control-allow-origin'), null, 'no CORS grant for another site');

    const post = await call(url, 'POST', '/codec/decode', {
      key: codecKey,
      json: { payloads: [] },
      headers: { origin: 'http://localhost:8233' },
    });
    assert.equal(post.headers.get('access-control-allow-origin'), 'http://localhost:8233');
  });

  it('should answer loopback callers without a key only where the stack opens it so', async () => {
    const open = await createApiServer({
      warden: ctx.warden,
      verifier,
      logger: false,
      codec: { origins: [], keylessLoopback: true },
    });
    try {
      await open.listen({ host: '127.0.0.1', port: 0 });
      const address = open.server.address();
      const openUrl = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
      const answer = await call(openUrl, 'POST', '/codec/decode', { json: { payloads: [] } });
      assert.equal(answer.status, 200, answer.text);
    } finally {
      await open.close();
    }
  });
});
