/** The HTTP API on loopback against the real store and Temporal: auth, every endpoint, RFC 7009, problem details, logs. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { TokenWarden } from '../client/index.js';
import { createApiServer } from '../client/api/server.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { hashToken } from '../common/secrets.js';
import { createApiKey, revokeApiKey } from '../common/store/api-keys.js';
import { freePort } from '../dev/processes.js';
import { call, startApiHarness, type ApiHarness } from './support/api.js';
import { TestContext } from './support/context.js';
import { TcpProxy } from './support/tcp-proxy.js';
import { insertTokenRow } from './support/tokens.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('api');
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

const TOKEN_ID = 'tok_0193aaaaaaaaaaaaaaaaaaaaaaaaaaaa';

/** A route's URL with its parameters filled with well-formed values. */
const concrete = (url: string) =>
  url.replace(':id', url.includes('receivers') ? 'rcv-x' : TOKEN_ID).replace(':subject', 'usr_x');

const sampleBody = (method: string, url: string) =>
  method !== 'POST'
    ? {}
    : url.startsWith('/oauth/')
      ? { form: { token: 'tw_nothing' } }
      : { json: { reason: 'r', subject: 'usr_x', ttl: '1h', id: 'x', url: 'http://127.0.0.1:1/' } };

describe('HTTP API: authentication and scopes on every route', () => {
  it('should answer 401 without, with a malformed, an unknown or a revoked key, and 403 with a key of another scope', async () => {
    const table = api.server.routeTable.filter((r) => r.scopes);
    assert.ok(table.length >= 10, `routes with scopes: ${table.map((r) => `${r.method} ${r.url}`).join(', ')}`);
    const revoked = await createApiKey(ctx.pool, { name: 'gone', scopes: ['admin'] });
    await revokeApiKey(ctx.pool, revoked.id);
    const unknown = `twk_${'0'.repeat(32)}_${'f'.repeat(64)}`;
    const wrongSecret = revoked.key.slice(0, -4) + 'abcd';
    for (const route of table) {
      const what = `${route.method} ${route.url}`;
      const path = concrete(route.url);
      for (const key of [undefined, 'not-a-key', unknown, revoked.key, wrongSecret, 'basic']) {
        // `basic`: the right admin key under another scheme.
        const auth = key === 'basic' ? { headers: { authorization: `Basic ${api.keys.admin}` } } : key ? { key } : {};
        const res = await call(api.url, route.method, path, { ...auth, ...sampleBody(route.method, route.url) });
        assert.equal(res.status, 401, `${what} with ${key ? 'a bad key' : 'no key'}: ${res.text}`);
        assert.match(res.headers.get('www-authenticate') ?? '', /^Bearer/, what);
        assert.doesNotMatch(res.text, /revoked|unknown|malformed|secret/i, `${what}: the body says nothing more`);
      }
      const others = (['introspect', 'revoke'] as const).filter((s) => !route.scopes!.includes(s));
      for (const scope of others) {
        const res = await call(api.url, route.method, path, {
          key: api.keys[scope],
          ...sampleBody(route.method, route.url),
        });
        assert.equal(res.status, 403, `${what} with a ${scope} key: ${res.text}`);
      }
    }
    // The same request with a key of the right scope passes authentication.
    const ok = await call(api.url, 'GET', '/v1/tokens', { key: api.keys.admin });
    assert.equal(ok.status, 200, ok.text);
  });

  it('should refuse a key revoked while the server runs within the key cache time', async () => {
    const key = await createApiKey(ctx.pool, { name: 'soon-gone', scopes: ['admin'] });
    assert.equal((await call(api.url, 'GET', '/v1/tokens', { key: key.key })).status, 200);
    await revokeApiKey(ctx.pool, key.id);
    await waitUntil(
      async () => (await call(api.url, 'GET', '/v1/tokens', { key: key.key })).status === 401,
      'the revoked key refused',
      3_000,
    );
  });

  it('should make public only /healthz, /openapi.json and the codec preflights, and refuse to register a route that declares neither', async () => {
    const open = api.server.routeTable.filter((r) => !r.scopes).map((r) => `${r.method} ${r.url}`);
    // A browser's CORS preflight carries no key by design; it answers headers, never data.
    assert.deepEqual(open.sort(), [
      'GET /healthz',
      'GET /openapi.json',
      'OPTIONS /codec/decode',
      'OPTIONS /codec/encode',
    ]);
    const head = await call(api.url, 'HEAD', '/v1/tokens');
    assert.equal(head.status, 401, 'HEAD of an admin route');
    const fresh = await createApiServer({ warden: ctx.warden, verifier, logger: false });
    try {
      assert.throws(() => fresh.get('/v1/forgotten', async () => 'open'), /declares neither scopes nor public/);
    } finally {
      await fresh.close();
    }
  });

  it('should serve /healthz and /openapi.json without a key, the document listing every route', async () => {
    const health = await call(api.url, 'GET', '/healthz');
    assert.equal(health.status, 200, health.text);
    assert.deepEqual(health.body, {
      status: 'ok',
      temporal: { reachable: true },
      postgres: { reachable: true },
      verifier: { listening: true },
    });
    const doc = await call(api.url, 'GET', '/openapi.json');
    assert.equal(doc.status, 200);
    assert.equal(doc.body.openapi, '3.1.0');
    for (const route of api.server.routeTable.filter((r) => r.url !== '/openapi.json')) {
      const path = route.url.replace(/:(\w+)/g, '{$1}');
      assert.ok(doc.body.paths[path]?.[route.method.toLowerCase()], `${route.method} ${path} documented`);
    }
    const issue = doc.body.paths['/v1/tokens'].post;
    assert.ok(issue.requestBody.content['application/json'].schema.properties.subject, 'the issue body schema');
    assert.ok(doc.body.paths['/v1/receivers'].post.requestBody, 'the receiver body schema');
  });
});

describe('HTTP API: tokens', () => {
  it('should issue (raw token once), show, and revoke with the delivery state, idempotently', async () => {
    await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'api-rcv', url: 'http://127.0.0.1:9/hook' },
    });
    const issued = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      json: { subject: 'usr_api', ttl: '1h', scopes: ['read', 'write'], receivers: ['api-rcv'], name: 'ci' },
    });
    assert.equal(issued.status, 201, issued.text);
    assert.equal(issued.headers.get('cache-control'), 'no-store');
    const { tokenId, token } = issued.body as { tokenId: string; token: string };
    assert.match(token, /^tw_/);

    const shown = await call(api.url, 'GET', `/v1/tokens/${tokenId}`, { key: api.keys.admin });
    assert.equal(shown.status, 200, shown.text);
    assert.equal(shown.body.status, 'active');
    assert.deepEqual(shown.body.scopes, ['read', 'write']);
    assert.ok(!shown.text.includes(token), 'show never returns the raw token');

    const revoked = await call(api.url, 'POST', `/v1/tokens/${tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'left the company' },
    });
    assert.equal(revoked.status, 200, revoked.text);
    assert.equal(revoked.body.status, 'revoked');
    assert.equal(revoked.body.changed, true);
    assert.match(revoked.body.revokedBy, /^apikey:key_[0-9a-f]{32} \(test-admin\)$/);
    assert.deepEqual(
      revoked.body.deliveries.map((d: { receiverId: string }) => d.receiverId),
      ['api-rcv'],
      'the outbox row written by the kill',
    );
    const { rows } = await ctx.sql.query('SELECT status FROM token WHERE id = $1', [tokenId]);
    assert.equal(rows[0].status, 'revoked', 'dead in the store when the answer came');

    const again = await call(api.url, 'POST', `/v1/tokens/${tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'twice' },
    });
    assert.equal(again.status, 200);
    assert.equal(again.body.changed, false);
    assert.equal(again.body.reason, 'left the company', "the first revocation's facts");
  });

  it("should page through a subject's tokens with an opaque cursor, newest first, each once", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push((await ctx.warden.issue({ subject: 'usr_pages', ttl: '1h' })).tokenId);
    const seen: string[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const query: string = `?subject=usr_pages&limit=2${cursor ? `&cursor=${cursor}` : ''}`;
      const page = await call(api.url, 'GET', `/v1/tokens${query}`, { key: api.keys.admin });
      assert.equal(page.status, 200, page.text);
      assert.ok(page.body.tokens.length <= 2);
      seen.push(...page.body.tokens.map((t: { id: string }) => t.id));
      cursor = page.body.next;
      if (cursor) assert.doesNotMatch(cursor, /tok_/, 'the cursor is opaque');
      pages++;
    } while (cursor);
    assert.equal(pages, 3);
    assert.deepEqual(seen, [...ids].reverse());
    // A token issued meanwhile does not shift later pages (keyset, not offset).
    const first = await call(api.url, 'GET', '/v1/tokens?subject=usr_pages&limit=2', { key: api.keys.admin });
    await ctx.warden.issue({ subject: 'usr_pages', ttl: '1h' });
    const second = await call(api.url, 'GET', `/v1/tokens?subject=usr_pages&limit=2&cursor=${first.body.next}`, {
      key: api.keys.admin,
    });
    assert.deepEqual(
      second.body.tokens.map((t: { id: string }) => t.id),
      [ids[2], ids[1]],
    );
    const revoked = await call(api.url, 'GET', '/v1/tokens?subject=usr_pages&status=revoked', { key: api.keys.admin });
    assert.deepEqual(revoked.body, { tokens: [], next: null });
    // A cursor with anything appended to the id it carries is not one of ours.
    const decoded = Buffer.from(first.body.next as string, 'base64url').toString('utf8');
    const forged = Buffer.from(`${decoded}:more`).toString('base64url');
    const refused = await call(api.url, 'GET', `/v1/tokens?subject=usr_pages&cursor=${forged}`, {
      key: api.keys.admin,
    });
    assert.equal(refused.status, 400, refused.text);
  });

  it('should answer problem details naming the field, 404 for an unknown token, 500 without internals', async () => {
    const bad = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      json: { subject: 'a@b.example', ttl: 'forever', scopes: ['a b'] },
    });
    assert.equal(bad.status, 400);
    assert.equal(bad.headers.get('content-type'), 'application/problem+json; charset=utf-8');
    assert.equal(bad.body.type, 'urn:tokenwarden:problem:invalid-input');
    assert.equal(bad.body.instance, '/v1/tokens');
    assert.deepEqual(bad.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`).sort(), [
      'body scopes.0',
      'body subject',
      'body ttl',
    ]);
    for (const key of ['type', 'title', 'status', 'detail', 'instance']) assert.ok(key in bad.body, key);

    const unknownReceiver = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      json: { subject: 'usr_x', ttl: '1h', receivers: ['nope'] },
    });
    assert.equal(unknownReceiver.status, 400, unknownReceiver.text);
    assert.deepEqual(
      unknownReceiver.body.errors.map((e: { path: string }) => e.path),
      ['receivers'],
      'a library error names its field',
    );

    const query = await call(api.url, 'GET', '/v1/tokens?limit=0&status=dead&cursor=zzz', { key: api.keys.admin });
    assert.equal(query.status, 400);
    assert.deepEqual(query.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`).sort(), [
      'query cursor',
      'query limit',
      'query status',
    ]);
    const param = await call(api.url, 'GET', '/v1/tokens/tok_nope', { key: api.keys.admin });
    assert.equal(param.status, 400);
    assert.deepEqual(
      param.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
      ['params id'],
    );

    const missing = await call(api.url, 'GET', `/v1/tokens/${TOKEN_ID}`, { key: api.keys.admin });
    assert.equal(missing.status, 404);
    assert.equal(missing.body.type, 'urn:tokenwarden:problem:not-found');
    const missingRevoke = await call(api.url, 'POST', `/v1/tokens/${TOKEN_ID}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'x' },
    });
    assert.equal(missingRevoke.status, 404, missingRevoke.text);

    const json = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      raw: { body: '{"subject": tw_', contentType: 'application/json' },
    });
    assert.equal(json.status, 400);
    assert.deepEqual(json.body.errors, [{ in: 'body', path: '(body)', message: 'not valid JSON' }]);
    assert.doesNotMatch(json.text, /tw_/, 'the body is not quoted back');

    const route = await call(api.url, 'GET', '/v1/nothing', { key: api.keys.admin });
    assert.equal(route.status, 404);
    assert.equal(route.headers.get('content-type'), 'application/problem+json; charset=utf-8');

    // The store unreachable: a 500 problem that names nothing inside.
    const deadStore = await TokenWarden.connect({
      ...ctx.settings,
      databaseUrl: `postgres://x:secretpw@127.0.0.1:${await freePort()}/x`,
    });
    const server = await createApiServer({ warden: deadStore, verifier, logger: false });
    try {
      await server.listen({ host: '127.0.0.1', port: 0 });
      const port = (server.server.address() as { port: number }).port;
      const failed = await call(`http://127.0.0.1:${port}`, 'GET', '/healthz');
      assert.equal(failed.status, 503);
      assert.deepEqual(failed.body, {
        status: 'unavailable',
        temporal: { reachable: true },
        postgres: { reachable: false },
        verifier: { listening: true },
      });
      // Without a reachable store no key can be checked: 500, not 401, and nothing of the cause.
      const internal = await call(`http://127.0.0.1:${port}`, 'GET', '/v1/tokens', { key: api.keys.admin });
      assert.equal(internal.status, 500, internal.text);
      assert.equal(internal.body.detail, 'the request could not be completed; see the server log');
      assert.doesNotMatch(internal.text, /ECONNREFUSED|secretpw|127\.0\.0\.1|at /);
    } finally {
      await server.close();
      await deadStore.close();
    }
  });

  it('should report Temporal unreachable on /healthz with 503, PostgreSQL still reachable, and a deaf verifier', async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const warden = await TokenWarden.connect({
      ...ctx.settings,
      temporal: { ...ctx.settings.temporal, connectionOptions: { address } },
    });
    // Its listener cannot connect: introspection still answers from the store, uncached.
    const deaf = await createVerifier({
      databaseUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      listenUrl: `postgres://nobody@127.0.0.1:${await freePort()}/none`,
      onError: () => {},
    });
    const server = await createApiServer({ warden, verifier: deaf, logger: false });
    try {
      await server.listen({ host: '127.0.0.1', port: 0 });
      const port = (server.server.address() as { port: number }).port;
      const res = await call(`http://127.0.0.1:${port}`, 'GET', '/healthz');
      assert.equal(res.status, 503);
      assert.deepEqual(res.body, {
        status: 'unavailable',
        temporal: { reachable: false },
        postgres: { reachable: true },
        verifier: { listening: false },
      });
    } finally {
      await server.close();
      await deaf.close();
      await warden.close();
    }
  });
});

describe('HTTP API: receivers', () => {
  it('should register (secret once), list, show, remove, and refuse what the library refuses', async () => {
    const added = await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'crud-rcv', url: 'http://127.0.0.1:9/x' },
    });
    assert.equal(added.status, 201, added.text);
    assert.match(added.body.secret, /^whsec_/);
    const listed = await call(api.url, 'GET', '/v1/receivers', { key: api.keys.admin });
    const mine = listed.body.receivers.find((r: { id: string }) => r.id === 'crud-rcv');
    assert.equal(mine.url, 'http://127.0.0.1:9/x');
    assert.ok(!listed.text.includes(added.body.secret), 'never the secret again');
    const one = await call(api.url, 'GET', '/v1/receivers/crud-rcv', { key: api.keys.admin });
    assert.equal(one.status, 200);
    assert.ok(!one.text.includes('whsec_'));
    const dup = await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'crud-rcv', url: 'http://127.0.0.1:9/x' },
    });
    assert.equal(dup.status, 400);
    assert.deepEqual(
      dup.body.errors.map((e: { path: string }) => e.path),
      ['id'],
    );
    const metadata = await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'meta', url: 'http://169.254.169.254/' },
    });
    assert.equal(metadata.status, 400);
    assert.deepEqual(
      metadata.body.errors.map((e: { path: string }) => e.path),
      ['url'],
    );
    // Fields of the library's receiver schema flow through: a probe URL in, and back out.
    const probed = await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'probed-rcv', url: 'http://127.0.0.1:9/x', probeUrl: 'http://127.0.0.1:9/probe' },
    });
    assert.equal(probed.status, 201, probed.text);
    assert.equal(probed.body.probeUrl, 'http://127.0.0.1:9/probe');
    const shownProbe = await call(api.url, 'GET', '/v1/receivers/probed-rcv', { key: api.keys.admin });
    assert.equal(shownProbe.body.probeUrl, 'http://127.0.0.1:9/probe');
    const badProbe = await call(api.url, 'POST', '/v1/receivers', {
      key: api.keys.admin,
      json: { id: 'bad-probe', url: 'http://127.0.0.1:9/x', probeUrl: 'http://169.254.169.254/' },
    });
    assert.deepEqual(
      badProbe.body.errors.map((e: { path: string }) => e.path),
      ['probeUrl'],
    );
    const removed = await call(api.url, 'DELETE', '/v1/receivers/crud-rcv', { key: api.keys.admin });
    assert.equal(removed.status, 200, removed.text);
    assert.ok(removed.body.removedAt);
    assert.equal((await call(api.url, 'GET', '/v1/receivers/crud-rcv', { key: api.keys.admin })).status, 404);
    assert.equal((await call(api.url, 'DELETE', '/v1/receivers/no-such', { key: api.keys.admin })).status, 404);
  });
});

describe('HTTP API: RFC 7009 revocation', () => {
  it('should revoke a token by its string, audited as coming over RFC 7009 with the key as actor', async () => {
    const { tokenId, token } = await ctx.warden.issue({ subject: 'usr_7009', ttl: '1h' });
    const res = await call(api.url, 'POST', '/oauth/revoke', {
      key: api.keys.revoke,
      form: { token, token_type_hint: 'access_token' },
    });
    assert.equal(res.status, 200, res.text);
    assert.equal(res.text, '');
    const { rows } = await ctx.sql.query(
      'SELECT status, revoked_by, revoke_reason, initiating_entity FROM token WHERE id = $1',
      [tokenId],
    );
    assert.equal(rows[0].status, 'revoked');
    assert.match(rows[0].revoked_by, /^apikey:key_[0-9a-f]{32} \(test-revoke\)$/);
    assert.equal(rows[0].revoke_reason, 'revoked through the RFC 7009 endpoint');
    assert.equal(rows[0].initiating_entity, 'user');
    // Again, and with an admin key: still 200, the first revocation kept.
    const again = await call(api.url, 'POST', '/oauth/revoke', { key: api.keys.admin, form: { token } });
    assert.equal(again.status, 200);
  });

  it('should revoke an imported token of another format by its string', async () => {
    const foreign = `ghp_${'Q7x'.repeat(12)}`;
    const record = await insertTokenRow(ctx.pool, { subject: 'usr_7009_imported', secretHash: hashToken(foreign) });
    const res = await call(api.url, 'POST', '/oauth/revoke', { key: api.keys.revoke, form: { token: foreign } });
    assert.equal(res.status, 200, res.text);
    const { rows } = await ctx.sql.query('SELECT status FROM token WHERE id = $1', [record.id]);
    assert.equal(rows[0].status, 'revoked');
  });

  it('should answer 200 for unknown, malformed and unknown-hint tokens, 400 invalid_request without a token', async () => {
    const { tokenId, token } = await ctx.warden.issue({ subject: 'usr_7009b', ttl: '1h' });
    const lookalike = token.slice(0, -8) + 'AAAAAAAA';
    for (const form of <Record<string, string>[]>[
      { token: 'tw_unknown_000000' },
      { token: lookalike },
      { token: '' },
      { token: 'x'.repeat(4000) },
      { token: 'x'.repeat(5000) },
      { token: 'tw_whatever', token_type_hint: 'no_such_hint' },
    ]) {
      const res = await call(api.url, 'POST', '/oauth/revoke', { key: api.keys.revoke, form });
      assert.equal(res.status, 200, `${JSON.stringify(form).slice(0, 60)}: ${res.text}`);
    }
    const { rows } = await ctx.sql.query('SELECT status FROM token WHERE id = $1', [tokenId]);
    assert.equal(rows[0].status, 'active', 'a lookalike revokes nothing');
    const missing = await call(api.url, 'POST', '/oauth/revoke', {
      key: api.keys.revoke,
      form: { token_type_hint: 'access_token' },
    });
    assert.equal(missing.status, 400);
    assert.equal(missing.body.error, 'invalid_request');
    assert.match(missing.body.error_description, /^token: /);
    assert.equal(missing.headers.get('content-type'), 'application/json; charset=utf-8');
    const noKey = await call(api.url, 'POST', '/oauth/revoke', { form: { token } });
    assert.equal(noKey.status, 401);
    assert.equal(noKey.body.error, 'invalid_client');
    const wrongScope = await call(api.url, 'POST', '/oauth/revoke', { key: api.keys.introspect, form: { token } });
    assert.equal(wrongScope.status, 403);
    assert.equal(wrongScope.body.error, 'insufficient_scope');
    assert.equal((await ctx.sql.query('SELECT status FROM token WHERE id = $1', [tokenId])).rows[0].status, 'active');
  });
});

describe('HTTP API: request logs', () => {
  it('should log each request without a token, a key or an Authorization header', async () => {
    const issued = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      json: { subject: 'usr_logs', ttl: '1h' },
    });
    const token = issued.body.token as string;
    await call(api.url, 'POST', '/oauth/introspect', { key: api.keys.introspect, form: { token } });
    await call(api.url, 'POST', '/oauth/revoke', { key: api.keys.revoke, form: { token } });
    await call(api.url, 'POST', `/v1/tokens/${issued.body.tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'logs' },
    });
    // Where a careless server would echo it: a query string, a JSON parse error, a bad field's value.
    await call(api.url, 'GET', `/v1/tokens?token=${token}`, { key: api.keys.admin });
    await call(api.url, 'GET', `/v1/tokens/${token}`, { key: api.keys.admin });
    await call(api.url, 'POST', `/oauth/revoke/${token}`, { key: api.keys.revoke });
    await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      raw: { body: `{"subject":"${token}`, contentType: 'application/json' },
    });
    await call(api.url, 'POST', '/v1/tokens', { key: api.keys.admin, json: { subject: token, ttl: token } });
    await call(api.url, 'GET', '/v1/tokens', { key: `${api.keys.admin}x` });

    const log = api.log.text;
    assert.match(log, /"statusCode":201/, 'requests are logged');
    assert.match(log, /"route":"\/oauth\/revoke"/);
    assert.match(log, /"route":"\/v1\/tokens\/:id"/);
    for (const secret of [
      token,
      token.slice(3, 30),
      ...Object.values(api.keys),
      ...Object.values(api.keys).map((k) => k.slice(-64)),
    ]) {
      assert.ok(!log.includes(secret), `the log holds a secret (${secret.slice(0, 6)}…)`);
    }
    assert.doesNotMatch(log, /authorization|bearer/i);
  });
});

describe('HTTP API: RFC 7662 introspection', () => {
  const introspect = (token: string, key = api.keys.introspect) =>
    call(api.url, 'POST', '/oauth/introspect', { key, form: { token } });

  it('should answer active with its claims, then inactive once revoked over the API, through the verifier', async () => {
    const issued = await call(api.url, 'POST', '/v1/tokens', {
      key: api.keys.admin,
      json: { subject: 'usr_7662', ttl: '1h', scopes: ['read', 'write'] },
    });
    const { tokenId, token } = issued.body as { tokenId: string; token: string };
    const before = Math.floor(Date.now() / 1000);
    const active = await introspect(token);
    assert.equal(active.status, 200, active.text);
    assert.equal(active.headers.get('cache-control'), 'no-store');
    const expiresAt = Math.floor(new Date(issued.body.expiresAt).getTime() / 1000);
    assert.deepEqual(active.body, {
      active: true,
      scope: 'read write',
      sub: 'usr_7662',
      exp: expiresAt,
      iat: active.body.iat,
      jti: tokenId,
      token_type: 'Bearer',
    });
    assert.ok(Math.abs(active.body.iat - before) <= 2, `iat in seconds: ${active.body.iat}`);
    // The answer is cached now (5 s): only the kill's NOTIFY can turn it within the 1 s below.
    assert.equal((await introspect(token)).body.active, true);
    const hits = verifier.stats().cacheHits;
    assert.ok(hits > 0, 'served from the verifier cache');

    const revoked = await call(api.url, 'POST', `/v1/tokens/${tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'introspection test' },
    });
    assert.equal(revoked.status, 200);
    await waitUntil(
      async () => (await introspect(token)).text === '{"active":false}',
      'introspection says inactive',
      1_000,
      10,
    );
  });

  it('should answer inactive to an introspection sent right after a revoke over the same API returned, before any NOTIFY', async () => {
    // This API's verifier hears the kill channel through a proxy that holds the NOTIFYs back: only
    // the API's own revoke paths can turn its cached answers.
    const proxy = await TcpProxy.start(TcpProxy.targetOf(ctx.settings.databaseUrl));
    const held = await createVerifier({
      databaseUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      listenUrl: proxy.url(ctx.settings.databaseUrl),
      heartbeatIntervalMs: 600_000,
    });
    const deaf = await startApiHarness(ctx, held);
    try {
      await waitUntil(() => held.listening, 'the verifier listening');
      proxy.hold();
      for (let i = 0; i < 6; i++) {
        const { tokenId, token } = await ctx.warden.issue({ subject: 'usr_7662race', ttl: '1h' });
        const ask = () => call(deaf.url, 'POST', '/oauth/introspect', { key: deaf.keys.introspect, form: { token } });
        assert.equal((await ask()).body.active, true);
        assert.equal((await ask()).body.active, true, 'now cached');
        const revoked =
          i % 2 === 0
            ? await call(deaf.url, 'POST', `/v1/tokens/${tokenId}/revoke`, {
                key: deaf.keys.admin,
                json: { reason: 'race' },
              })
            : await call(deaf.url, 'POST', '/oauth/revoke', { key: deaf.keys.revoke, form: { token } });
        assert.equal(revoked.status, 200, revoked.text);
        const after = await ask();
        assert.equal(after.text, '{"active":false}', `round ${i}: introspected right after the revoke returned`);
        assert.match(after.headers.get('content-type') ?? '', /^application\/json/, 'RFC 7662 §2.2: application/json');
      }
      assert.equal(held.listening, true, 'the NOTIFYs were held, the listener not lost');
    } finally {
      proxy.release();
      await deaf.close();
      await held.close();
      await proxy.close();
    }
  });

  it('should answer exactly {"active":false} for unknown, malformed, revoked and expired tokens alike', async () => {
    const { token: revoked, tokenId } = await ctx.warden.issue({ subject: 'usr_7662b', ttl: '1h' });
    await ctx.warden.revoke({ tokenId, reason: 'dead' });
    const { token: expiring } = await ctx.warden.issue({ subject: 'usr_7662b', ttl: '1s' });
    const { token: live } = await ctx.warden.issue({ subject: 'usr_7662b', ttl: '1h' });
    const unknown = live.slice(0, 3) + 'A'.repeat(live.length - 10) + live.slice(-7);
    await waitUntil(
      async () =>
        (await ctx.sql.query(`SELECT 1 FROM token WHERE subject = 'usr_7662b' AND expires_at <= now()`)).rowCount! > 0,
      'the 1 s token expired',
      5_000,
    );
    for (const token of [revoked, expiring, unknown, 'tw_abc', '', 'x'.repeat(4096), live.slice(0, -1)]) {
      const res = await introspect(token);
      assert.equal(res.status, 200, res.text);
      assert.equal(res.text, '{"active":false}', `${token.slice(0, 12)}…`);
    }
    assert.equal((await introspect(live)).body.active, true, 'a live token next to them is active');
    const admin = await introspect(live, api.keys.admin);
    assert.equal(admin.body.active, true, 'admin implies introspect');
  });

  it('should refuse wrong credentials and a missing token in the OAuth error shape', async () => {
    const { token } = await ctx.warden.issue({ subject: 'usr_7662c', ttl: '1h' });
    const none = await call(api.url, 'POST', '/oauth/introspect', { form: { token } });
    assert.equal(none.status, 401);
    assert.deepEqual(none.body.error, 'invalid_client');
    assert.match(none.headers.get('www-authenticate') ?? '', /^Bearer/);
    assert.ok(!none.text.includes('active'), 'nothing about the token');
    const wrong = await introspect(token, `twk_${'1'.repeat(32)}_${'2'.repeat(64)}`);
    assert.equal(wrong.status, 401);
    const scope = await introspect(token, api.keys.revoke);
    assert.equal(scope.status, 403);
    assert.equal(scope.body.error, 'insufficient_scope');
    const missing = await call(api.url, 'POST', '/oauth/introspect', {
      key: api.keys.introspect,
      form: { token_type_hint: 'access_token' },
    });
    assert.equal(missing.status, 400);
    assert.equal(missing.body.error, 'invalid_request');
    assert.deepEqual(
      missing.body.errors.map((e: { path: string }) => e.path),
      ['token'],
    );
  });
});

describe('HTTP API: offboarding a subject', () => {
  it('should kill every active token of the subject across receivers, report them, and be harmless twice', async () => {
    for (const id of ['off-a', 'off-b']) {
      const added = await call(api.url, 'POST', '/v1/receivers', {
        key: api.keys.admin,
        json: { id, url: `http://127.0.0.1:9/${id}` },
      });
      assert.equal(added.status, 201, added.text);
    }
    const active = [
      (await ctx.warden.issue({ subject: 'usr_off', ttl: '1h', receivers: ['off-a'] })).tokenId,
      (await ctx.warden.issue({ subject: 'usr_off', ttl: '1h', receivers: ['off-a', 'off-b'] })).tokenId,
      (await ctx.warden.issue({ subject: 'usr_off', ttl: '1h' })).tokenId,
    ];
    const dead = (await ctx.warden.issue({ subject: 'usr_off', ttl: '1h' })).tokenId;
    await ctx.warden.revoke({ tokenId: dead, reason: 'earlier' });
    const other = (await ctx.warden.issue({ subject: 'usr_stays', ttl: '1h' })).tokenId;

    const res = await call(api.url, 'POST', '/v1/subjects/usr_off/revoke', {
      key: api.keys.admin,
      json: { reason: 'account closed' },
    });
    assert.equal(res.status, 200, res.text);
    assert.equal(res.body.subject, 'usr_off');
    assert.deepEqual([...res.body.revoked].sort(), [...active].sort());
    assert.ok(res.body.alreadyDead.includes(dead), res.text);
    const { rows } = await ctx.sql.query(
      `SELECT id, status, revoked_by FROM token WHERE subject IN ('usr_off', 'usr_stays') ORDER BY id`,
    );
    for (const row of rows) {
      if (row.id === other) assert.equal(row.status, 'active', 'another subject keeps its token');
      else assert.equal(row.status, 'revoked', row.id);
      if (active.includes(row.id)) assert.match(row.revoked_by, /^apikey:key_[0-9a-f]{32} \(test-admin\)/);
    }
    const { rows: outbox } = await ctx.sql.query(
      `SELECT token_id, receiver_id FROM delivery WHERE token_id = ANY ($1) ORDER BY token_id, receiver_id`,
      [active],
    );
    assert.equal(outbox.length, 3, 'one delivery per token and receiver');

    const again = await call(api.url, 'POST', '/v1/subjects/usr_off/revoke', {
      key: api.keys.admin,
      json: { reason: 'again' },
    });
    assert.equal(again.status, 200, again.text);
    assert.deepEqual(again.body.revoked, []);
    assert.deepEqual([...again.body.alreadyDead].sort(), [...active, dead].sort());
  });

  it('should refuse an email as subject and a missing reason, naming them', async () => {
    const res = await call(api.url, 'POST', '/v1/subjects/a@b.example/revoke', { key: api.keys.admin, json: {} });
    assert.equal(res.status, 400);
    assert.deepEqual(res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`).sort(), [
      'params subject',
    ]);
    const noReason = await call(api.url, 'POST', '/v1/subjects/usr_x/revoke', { key: api.keys.admin, json: {} });
    assert.equal(noReason.status, 400);
    assert.deepEqual(
      noReason.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
      ['body reason'],
    );
  });
});

describe('HTTP API: what callers cannot do', () => {
  it('should record the API key as the actor, a claimed actor only after it', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_forge', ttl: '1h' });
    const res = await call(api.url, 'POST', `/v1/tokens/${tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason: 'forge', actor: 'user:ceo', initiatingEntity: 'user' },
    });
    assert.equal(res.status, 200, res.text);
    assert.match(res.body.revokedBy, /^apikey:key_[0-9a-f]{32} \(test-admin\) for user:ceo$/);
  });

  it('should never echo a token put in a field or a path, and answer a malformed URL with a problem', async () => {
    const { token } = await ctx.warden.issue({ subject: 'usr_echo', ttl: '1h' });
    const answers = [
      await call(api.url, 'POST', '/v1/tokens', { key: api.keys.admin, json: { subject: 'usr_echo', ttl: token } }),
      await call(api.url, 'GET', `/v1/nothing/${token}`, { key: api.keys.admin }),
      await call(api.url, 'GET', `/v1/tokens/${token}`, { key: api.keys.admin }),
    ];
    for (const res of answers) {
      assert.ok(res.status >= 400 && res.status < 500, `${res.status} ${res.text}`);
      assert.ok(!res.text.includes(token.slice(3, 20)), `no token in ${res.text}`);
    }
    assert.match(answers[0]!.text, /ttl/);
    const bad = await call(api.url, 'GET', '/v1/tokens/%E0%A4%A', { key: api.keys.admin });
    assert.equal(bad.status, 400, bad.text);
    assert.match(bad.headers.get('content-type') ?? '', /application\/problem\+json/);
    assert.match(bad.text, /percent-encoded/);
  });
});
