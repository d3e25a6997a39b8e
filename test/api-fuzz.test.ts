/**
 * Property-based fuzzing of every API route's body, query and path parameters (fast-check): never a
 * 5xx, never a crash, and every 400 names the fields at fault.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { call, startApiHarness, type ApiAnswer, type ApiHarness } from './support/api.js';
import { TestContext } from './support/context.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('apifuzz');
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

const RUNS = Number(process.env.TOKENWARDEN_FUZZ_RUNS ?? 40);

/** A 4xx that says which field: problem details' `errors`, or the OAuth shape's description under /oauth/. */
function assertAnswered(res: ApiAnswer, what: string): void {
  assert.ok(res.status < 500, `${what}: ${res.status} ${res.text.slice(0, 300)}`);
  if (res.status === 400 || res.status === 413 || res.status === 415) {
    const errors = res.body?.errors as { in: string; path: string; message: string }[] | undefined;
    assert.ok(Array.isArray(errors) && errors.length > 0, `${what}: names a field: ${res.text.slice(0, 300)}`);
    for (const e of errors) assert.ok(e.in && e.path && e.message, `${what}: ${JSON.stringify(e)}`);
    if (res.body.error) assert.equal(res.body.error, 'invalid_request', what);
    else assert.equal(res.body.status, res.status, what);
  }
}

/** Field names the routes know, so generated objects hit real fields with wrong values, not only unknown ones. */
const FIELDS = [
  'subject',
  'ttl',
  'receivers',
  'scopes',
  'name',
  'reason',
  'actor',
  'initiatingEntity',
  'correlationId',
  'id',
  'url',
  'probeUrl',
  'secret',
  'token',
  'token_type_hint',
];

const fieldValue = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 20 }),
  fc.constantFrom(
    '1h',
    '0s',
    '-1',
    '99999d',
    'usr_fuzz',
    'http://127.0.0.1:1/',
    'http://169.254.169.254/',
    'admin',
    'tw_x',
    '\u0000',
    '__proto__',
  ),
);
const knownFieldObject = fc.dictionary(fc.constantFrom(...FIELDS, '__proto__', 'constructor'), fieldValue, {
  maxKeys: 6,
});

const jsonBody = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }).map((v) => ({ json: v })),
  knownFieldObject.map((v) => ({ json: v })),
  fc.string({ maxLength: 200 }).map((body) => ({ raw: { body, contentType: 'application/json' } })),
  fc.dictionary(fc.constantFrom(...FIELDS), fc.string({ maxLength: 30 }), { maxKeys: 5 }).map((form) => ({ form })),
  fc
    .tuple(
      fc.string({ maxLength: 100 }),
      fc.constantFrom('text/plain', 'application/xml', 'multipart/form-data', 'application/json; charset=latin1', ''),
    )
    .map(([body, contentType]) => ({ raw: { body, contentType } })),
);

const queryPart = fc.oneof(fc.constantFrom('subject', 'status', 'limit', 'cursor', 'x'), fc.string({ maxLength: 10 }));
const query = fc
  .array(
    fc.tuple(
      queryPart,
      fc.oneof(
        fc.string({ maxLength: 30 }),
        fc.constantFrom('active', '1', '1000', '1001', '0', '-1', '1e3', 'djE6dG9r'),
      ),
    ),
    { maxLength: 5 },
  )
  .map((pairs) =>
    pairs.length ? `?${pairs.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&')}` : '',
  );

const pathValue = fc.oneof(
  fc.string({ minLength: 1, maxLength: 60 }),
  fc.constantFrom('tok_0193aaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'rcv', '..', '%00', 'usr_x'),
);

describe('HTTP API fuzzing (fast-check)', () => {
  it('should never answer 5xx nor crash on random bodies, queries and path parameters of every route', async () => {
    const routes = api.server.routeTable;
    for (const route of routes) {
      // An admin key passes every route's scope check: the fuzzing reaches validation and handlers.
      const key = api.keys.admin;
      const withBody = route.method === 'POST' || route.method === 'PUT' || route.method === 'PATCH';
      await fc.assert(
        fc.asyncProperty(pathValue, query, withBody ? jsonBody : fc.constant({}), async (param, q, body) => {
          const path = route.url.replace(/:(\w+)/g, () => encodeURIComponent(param)) + q;
          const res = await call(api.url, route.method, path, { key, ...body });
          assertAnswered(res, `${route.method} ${path} ${JSON.stringify(body).slice(0, 200)}`);
        }),
        { numRuns: RUNS },
      );
    }
    // Still serving after all of it.
    const health = await call(api.url, 'GET', '/healthz');
    assert.equal(health.status, 200);
  });
});
