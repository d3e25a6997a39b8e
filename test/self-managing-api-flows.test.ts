/**
 * End to end through the library and the HTTP API with the workflow's handlers and a worker:
 * rotate (the raw token to the caller, its hash in the store), suspend/resume, scheduled revoke and
 * its cancel, extend/shorten, suspicious report, policy apply — each reaching the store through
 * the token's workflow. Needs the workflow's self-managing handlers and activities (workflows/,
 * activities/self-managing.ts) and the store's functions for them (migrations/0015).
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startApi } from '../client/api/main.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { tokenWorkflowId } from '../common/names.js';
import { hashToken, isWellFormedToken } from '../common/secrets.js';
import { call, startApiHarness, type ApiHarness } from './support/api.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('smflow');
  await ctx.startWorker();
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

const admin = (method: string, path: string, body?: unknown) =>
  call(api.url, method, path, { key: api.keys.admin, ...(body !== undefined ? { json: body } : {}) });

async function credentials(tokenId: string) {
  const { rows } = await ctx.sql.query(
    `SELECT id, state, secret_hash, valid_until FROM credential WHERE token_id = $1 ORDER BY created_at, id`,
    [tokenId],
  );
  return rows as { id: string; state: string; secret_hash: Buffer; valid_until: Date | null }[];
}

describe('self-managing flows through the library and the API', () => {
  it('should rotate: the new token returned once, its hash current in the store, the old one previous for the grace', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_flow', ttl: '1h' });
    const rotated = await ctx.warden.rotate(issued.tokenId, { grace: '5m', reason: 'monthly' });
    assert.ok(isWellFormedToken(rotated.token));
    const creds = await credentials(issued.tokenId);
    const current = creds.find((c) => c.state === 'current')!;
    assert.equal(current.id, rotated.credentialId);
    assert.deepEqual(current.secret_hash, hashToken(rotated.token));
    const previous = creds.find((c) => c.state === 'previous')!;
    assert.equal(previous.valid_until!.toISOString(), rotated.previousValidUntil);
    const graceMs = Date.parse(rotated.previousValidUntil!) - Date.now();
    assert.ok(graceMs > 4 * 60_000 && graceMs <= 5 * 60_000 + 1_000, `grace ${graceMs} ms`);
    // The raw token is nowhere in the workflow's history.
    const history = JSON.stringify(
      await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId))),
    );
    assert.ok(!history.includes(rotated.token));

    const res = await admin('POST', `/v1/tokens/${issued.tokenId}/rotate`, { grace: '0' });
    assert.equal(res.status, 200, res.text);
    assert.equal(res.headers.get('cache-control'), 'no-store');
    assert.ok(isWellFormedToken(res.body.token));
  });

  it('should suspend and resume, schedule and cancel a revocation, extend and shorten, through the workflow', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_flow', ttl: '1h' });
    const id = issued.tokenId;
    const row = async () => (await ctx.sql.query(`SELECT * FROM token WHERE id = $1`, [id])).rows[0];

    const suspended = await admin('POST', `/v1/tokens/${id}/suspend`, { reason: 'investigating' });
    assert.equal(suspended.status, 200, suspended.text);
    assert.equal(suspended.body.suspended, true);
    assert.ok((await row()).suspended_at);
    const resumed = await ctx.warden.resume(id, { reason: 'cleared' });
    assert.equal(resumed.suspended, false);
    assert.equal((await row()).suspended_at, null);

    const at = new Date(Date.now() + 3_600_000 * 0.5).toISOString();
    const scheduled = await admin('POST', `/v1/tokens/${id}/scheduled-revoke`, { at, reason: 'contract ends' });
    assert.equal(scheduled.status, 200, scheduled.text);
    assert.equal((await row()).revoke_scheduled_at.toISOString(), at);
    const cancelled = await admin('DELETE', `/v1/tokens/${id}/scheduled-revoke`, { reason: 'extended' });
    assert.equal(cancelled.status, 200, cancelled.text);
    assert.equal((await row()).revoke_scheduled_at, null);

    const extended = await admin('POST', `/v1/tokens/${id}/expiry`, { ttl: '2h', mode: 'extend', reason: 'more' });
    assert.equal(extended.status, 200, extended.text);
    assert.equal((await row()).expires_at.toISOString(), extended.body.expiresAt);
    const shortened = await ctx.warden.shorten(id, { ttl: '10m', reason: 'less' });
    assert.equal((await row()).expires_at.toISOString(), shortened.expiresAt);
    const refused = await admin('POST', `/v1/tokens/${id}/expiry`, { ttl: '1h', mode: 'shorten', reason: 'x' });
    assert.equal(refused.status, 400, refused.text);
    assert.equal(refused.body.errors[0].path, 'ttl');
  });

  it('should revoke on a suspicious report without a policy', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_flow', ttl: '1h' });
    await ctx.warden.reportSuspicious(issued.tokenId, { reason: 'odd', evidence: { ip: '203.0.113.9' } });
    await waitUntil(async () => (await ctx.warden.show(issued.tokenId)).status === 'revoked', 'revoked');
  });

  it('should apply a policy as its dry run said: the listed tokens shortened or revoked, the rest untouched', async () => {
    await ctx.warden.setPolicy('flow', { maxTtl: '2h', scopes: ['read', 'admin'] });
    const long = await ctx.warden.issue({ subject: 'usr_flow_p', ttl: '90m', scopes: ['read'], policy: 'flow' });
    const admin = await ctx.warden.issue({ subject: 'usr_flow_p', ttl: '10m', scopes: ['admin'], policy: 'flow' });
    const fine = await ctx.warden.issue({ subject: 'usr_flow_p', ttl: '10m', scopes: ['read'], policy: 'flow' });
    await ctx.warden.setPolicy('flow', { maxTtl: '30m', scopes: ['read'] });
    const dry = await ctx.warden.applyPolicy('flow', { dryRun: true });
    assert.deepEqual(
      dry.shorten.map((f) => f.tokenId),
      [long.tokenId],
    );
    assert.deepEqual(
      dry.revoke.map((f) => [f.tokenId, f.reason]),
      [[admin.tokenId, 'policy']],
    );
    const fineBefore = await ctx.warden.show(fine.tokenId);

    const applied = await ctx.warden.applyPolicy('flow');
    assert.equal(applied.signalled, 3);
    await waitUntil(async () => (await ctx.warden.show(admin.tokenId)).status === 'revoked', 'the admin token revoked');
    assert.equal((await ctx.warden.show(admin.tokenId)).revokeReason, 'policy');
    await waitUntil(
      async () => (await ctx.warden.show(long.tokenId)).expiresAt === dry.shorten[0]!.newExpiresAt,
      "the long token shortened to the dry run's expiry",
    );
    const fineAfter = await ctx.warden.show(fine.tokenId);
    assert.equal(fineAfter.status, 'active');
    assert.equal(fineAfter.expiresAt, fineBefore.expiresAt);
  });

  it("should tell the token's workflow at once when the API's introspection detects a reused credential", async () => {
    // The API as `tokenwarden api` runs it (its own verifier); no reconciler runs in this test.
    const running = await startApi(ctx.settings, {
      host: '127.0.0.1',
      port: 0,
      foreignTokens: false,
      codec: { origins: [], keylessLoopback: false },
    });
    try {
      const issued = await ctx.warden.issue({ subject: 'usr_flow_reuse', ttl: '1h' });
      // No grace: the old credential is past it at once, so presenting it is reuse.
      await ctx.warden.rotate(issued.tokenId, { grace: 0, reason: 'leak drill' });
      const answer = await call(running.url, 'POST', '/oauth/introspect', {
        key: api.keys.introspect,
        form: { token: issued.token },
      });
      assert.equal(answer.status, 200, answer.text);
      assert.equal(answer.body.active, false);
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      await waitUntil(
        async () => (await handle.describe()).status.name === 'COMPLETED',
        "the token's workflow told of the kill and done",
      );
      const done = await ctx.warden.show(issued.tokenId);
      assert.equal(done.status, 'revoked');
      assert.equal(done.revokeReason, 'reuse_detected');
    } finally {
      await running.close();
    }
  });
});
