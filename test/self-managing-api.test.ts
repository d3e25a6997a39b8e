/**
 * The self-managing routes of the HTTP API on loopback, against the real store and Temporal: admin
 * scope only, field-level problem details, policies set/shown/applied, issue under a policy, and
 * the path of each token message to the token's workflow.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { SIGNAL, tokenWorkflowId } from '../common/names.js';
import { call, startApiHarness, type ApiAnswer, type ApiHarness } from './support/api.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('smapi');
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

const TOKEN_ID = 'tok_0193aaaaaaaaaaaaaaaaaaaaaaaaaaaa';

/** Every self-managing route, with a well-formed body. */
const ROUTES: [string, string, unknown][] = [
  ['POST', `/v1/tokens/${TOKEN_ID}/rotate`, {}],
  ['POST', `/v1/tokens/${TOKEN_ID}/suspicious`, { reason: 'r' }],
  ['POST', `/v1/tokens/${TOKEN_ID}/suspend`, { reason: 'r' }],
  ['POST', `/v1/tokens/${TOKEN_ID}/resume`, { reason: 'r' }],
  ['POST', `/v1/tokens/${TOKEN_ID}/scheduled-revoke`, { at: '2099-01-01T00:00:00Z', reason: 'r' }],
  ['DELETE', `/v1/tokens/${TOKEN_ID}/scheduled-revoke`, { reason: 'r' }],
  ['POST', `/v1/tokens/${TOKEN_ID}/expiry`, { ttl: '1h', mode: 'extend', reason: 'r' }],
  ['PUT', '/v1/policies/p1', { maxTtl: '1h' }],
  ['GET', '/v1/policies/p1', undefined],
  ['POST', '/v1/policies/p1/apply', { dryRun: true }],
];

const admin = (method: string, path: string, body?: unknown) =>
  call(api.url, method, path, { key: api.keys.admin, ...(body !== undefined ? { json: body } : {}) });

/** A 400 problem naming exactly these fields (`in path`). */
function invalid(res: ApiAnswer, fields: string[]): void {
  assert.equal(res.status, 400, res.text);
  assert.match(res.headers.get('content-type') ?? '', /application\/problem\+json/);
  assert.equal(res.body.type, 'urn:tokenwarden:problem:invalid-input');
  assert.deepEqual(
    res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
    fields,
    res.text,
  );
}

async function signals(tokenId: string, name: string): Promise<number> {
  const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)));
  return (history.events ?? []).filter((e) => e.workflowExecutionSignaledEventAttributes?.signalName === name).length;
}

describe('HTTP API: self-managing routes', () => {
  it('should be admin-only: 401 without a valid key, 403 with an introspect or revoke key', async () => {
    const registered = api.server.routeTable.map((r) => `${r.method} ${r.url}`);
    for (const [method, path, body] of ROUTES) {
      const pattern = path.replace(TOKEN_ID, ':id').replace('/p1', '/:name');
      assert.ok(registered.includes(`${method} ${pattern}`), `${method} ${pattern} registered`);
      const entry = api.server.routeTable.find((r) => r.method === method && r.url === pattern)!;
      assert.deepEqual(entry.scopes, ['admin']);
      const json = body !== undefined ? { json: body } : {};
      for (const key of [undefined, 'twk_nothing']) {
        const res = await call(api.url, method, path, { ...(key ? { key } : {}), ...json });
        assert.equal(res.status, 401, `${method} ${path}: ${res.text}`);
      }
      for (const key of [api.keys.introspect, api.keys.revoke]) {
        const res = await call(api.url, method, path, { key, ...json });
        assert.equal(res.status, 403, `${method} ${path}: ${res.text}`);
      }
    }
  });

  it('should answer field-level problems for bad parameters and bodies', async () => {
    invalid(await admin('POST', '/v1/tokens/tok_nope/rotate', {}), ['params id']);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/rotate`, { grace: 'soon' }), ['body grace']);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/rotate`, { token: 'tw_x' }), ['body (root)']);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/suspicious`, { reason: 'r', evidence: 'x'.repeat(9000) }), [
      'body evidence',
    ]);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/suspend`, {}), ['body reason']);
    invalid(
      await admin('POST', `/v1/tokens/${TOKEN_ID}/scheduled-revoke`, { at: '2001-01-01T00:00:00Z', reason: 'r' }),
      ['body at'],
    );
    invalid(await admin('DELETE', `/v1/tokens/${TOKEN_ID}/scheduled-revoke`, { reason: '' }), ['body reason']);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/expiry`, { ttl: '1h', mode: 'later', reason: 'r' }), [
      'body mode',
    ]);
    invalid(await admin('POST', `/v1/tokens/${TOKEN_ID}/expiry`, { ttl: '9999d', mode: 'extend', reason: 'r' }), [
      'body ttl',
    ]);
    invalid(await admin('PUT', '/v1/policies/Bad!', {}), ['params name']);
    invalid(await admin('PUT', '/v1/policies/p1', { maxTtl: 'soon', scopes: ['a b'] }), [
      'body maxTtl',
      'body scopes.0',
    ]);
    invalid(await admin('PUT', '/v1/policies/p1', { rotateEvery: '1d' }), ['body rotateEvery']);
    invalid(await admin('POST', '/v1/policies/p1/apply', { rate: -1 }), ['body rate']);
    // An unknown token or policy: 404.
    assert.equal((await admin('POST', `/v1/tokens/${TOKEN_ID}/suspend`, { reason: 'r' })).status, 404);
    assert.equal((await admin('GET', '/v1/policies/absent')).status, 404);
    const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM policy`);
    assert.equal(rows[0].n, 0, 'no policy written');
  });

  it('should set, show and dry-run a policy, refuse an out-of-policy issue naming the field, and apply', async () => {
    const put = await admin('PUT', '/v1/policies/p1', { maxTtl: '1h', scopes: ['read'] });
    assert.equal(put.status, 200, put.text);
    assert.equal(put.body.version, 1);
    assert.deepEqual((await admin('GET', '/v1/policies/p1')).body, put.body);

    const counts = async () => (await ctx.sql.query(`SELECT count(*)::int AS n FROM token`)).rows[0].n;
    const before = await counts();
    invalid(await admin('POST', '/v1/tokens', { subject: 'usr_api_pol', ttl: '2h', policy: 'p1' }), ['body ttl']);
    invalid(await admin('POST', '/v1/tokens', { subject: 'usr_api_pol', ttl: '1h', policy: 'p1', scopes: ['write'] }), [
      'body scopes',
    ]);
    assert.equal(await counts(), before, 'nothing issued');

    const issued = await admin('POST', '/v1/tokens', {
      subject: 'usr_api_pol',
      ttl: '1h',
      policy: 'p1',
      scopes: ['read'],
    });
    assert.equal(issued.status, 201, issued.text);
    assert.equal((await admin('PUT', '/v1/policies/p1', { maxTtl: '10m', scopes: ['read'] })).body.version, 2);
    const dry = await admin('POST', '/v1/policies/p1/apply', { dryRun: true });
    assert.equal(dry.status, 200, dry.text);
    assert.deepEqual(
      dry.body.shorten.map((f: { tokenId: string }) => f.tokenId),
      [issued.body.tokenId],
    );
    assert.equal(await signals(issued.body.tokenId, SIGNAL.policyChanged), 0);
    const applied = await admin('POST', '/v1/policies/p1/apply', {});
    assert.equal(applied.status, 200, applied.text);
    assert.equal(applied.body.signalled, 1);
    assert.equal(await signals(issued.body.tokenId, SIGNAL.policyChanged), 1);
  });

  it('should refuse a secret in suspicious evidence or reason, naming the field, before anything is signalled', async () => {
    const issued = await admin('POST', '/v1/tokens', { subject: 'usr_api_sus_secret', ttl: '1h' });
    const tokenId = issued.body.tokenId as string;
    const leaked = issued.body.token as string;
    invalid(
      await admin('POST', `/v1/tokens/${tokenId}/suspicious`, {
        reason: 'replayed request',
        evidence: { request: { headers: { authorization: `Bearer ${leaked}` } } },
      }),
      ['body evidence.request.headers.authorization'],
    );
    invalid(
      await admin('POST', `/v1/tokens/${tokenId}/suspicious`, {
        reason: 'r',
        evidence: { lines: ['ok', `key=whsec_${'A'.repeat(32)}`] },
      }),
      ['body evidence.lines.1'],
    );
    invalid(await admin('POST', `/v1/tokens/${tokenId}/suspicious`, { reason: `leaked ${leaked}` }), ['body reason']);
    const refused = await admin('POST', `/v1/tokens/${tokenId}/suspicious`, {
      reason: 'r',
      evidence: { authorization: `Bearer ${leaked}` },
    });
    assert.equal(refused.text.includes(leaked), false, 'the refusal does not echo the secret');
    await assert.rejects(
      ctx.warden.reportSuspicious(tokenId, { reason: 'r', evidence: { auth: [`Bearer ${leaked}`] } }),
      (err: Error & { fields?: Array<{ path: string }> }) =>
        err.fields?.[0]?.path === 'evidence.auth.0' && !err.message.includes(leaked),
    );
    assert.equal(await signals(tokenId, SIGNAL.reportSuspicious), 0, 'nothing reached the workflow');
  });

  it("should send a suspicious-activity report to the token's workflow (202), with the API key as the actor", async () => {
    const issued = await admin('POST', '/v1/tokens', { subject: 'usr_api_sus', ttl: '1h' });
    const res = await admin('POST', `/v1/tokens/${issued.body.tokenId}/suspicious`, {
      reason: 'impossible travel',
      evidence: { from: ['DE', 'BR'], minutes: 3 },
      actor: 'soc-analyst',
    });
    assert.equal(res.status, 202, res.text);
    assert.equal(res.body.action, 'revoke', 'no policy: revoke');
    const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(issued.body.tokenId)));
    const signalled = (history.events ?? []).find(
      (e) => e.workflowExecutionSignaledEventAttributes?.signalName === SIGNAL.reportSuspicious,
    );
    assert.ok(signalled, 'the report is in the workflow history');
    const payload = signalled.workflowExecutionSignaledEventAttributes!.input!.payloads![0]!;
    const report = JSON.parse(Buffer.from(payload.data!).toString('utf8'));
    assert.match(report.actor, /^apikey:\S+ \(test-admin\) for soc-analyst$/);
    assert.deepEqual(report.evidence, { from: ['DE', 'BR'], minutes: 3 });
    assert.equal(report.reportId, res.body.reportId);
  });

  it('should refuse token messages for a dead token as a conflict with its state (409), naming the id, before Temporal is asked', async () => {
    const issued = await admin('POST', '/v1/tokens', { subject: 'usr_api_dead', ttl: '1h' });
    await admin('POST', `/v1/tokens/${issued.body.tokenId}/revoke`, { reason: 'gone' });
    const id = issued.body.tokenId;
    for (const [method, path, body] of ROUTES.filter(([, p]) => p.includes(TOKEN_ID))) {
      const res = await admin(method, path.replace(TOKEN_ID, id), body);
      assert.equal(res.status, 409, `${method} ${path}: ${res.text}`);
      assert.equal(res.body.type, 'urn:tokenwarden:problem:token-state-conflict');
      assert.match(res.body.detail, new RegExp(`token ${id} is revoked`));
    }
  });
});
