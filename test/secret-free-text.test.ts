/**
 * Secrets in free text: the library, the HTTP API and the CLI refuse a reason or an actor shaped
 * like a secret on every operator message (field named, nothing changed); a raw Update with one is
 * refused by the workflow's validator (so it is never in history); a raw revoke Signal still
 * revokes, but its reason and actor are recorded redacted.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { WorkflowUpdateFailedError } from '@temporalio/client';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { InvalidInputError } from '../common/errors.js';
import { revokeSignal, suspendUpdate, type TokenLifecycleResult } from '../common/messages.js';
import * as store from '../common/store/index.js';
import { call, startApiHarness, type ApiHarness } from './support/api.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { historyText, decodedHistory } from './support/history.js';
import { newSecret, startToken } from './support/self-managing.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: RunningWorker;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('secrettext');
  worker = await ctx.startWorker();
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await worker?.stop();
  await ctx?.close();
});

const SIGNING_SECRET = 'whsec_' + 'B'.repeat(32);
const GITHUB_TOKEN = 'ghp_' + 'a1B2'.repeat(9);

/** What the store holds of a token, to see that a refusal changed nothing. */
async function snapshot(tokenId: string) {
  const token = await store.requireToken(ctx.pool, tokenId);
  const audit = await store.readAudit(ctx.pool, tokenId);
  return { status: token.status, expiresAt: token.expiresAt, suspendedAt: token.suspendedAt, audit: audit.length };
}

async function refusedNaming(field: string, attempt: Promise<unknown>, secret: string): Promise<void> {
  const err = await attempt.then(
    () => assert.fail(`accepted a secret-shaped ${field}`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof InvalidInputError, String(err));
  assert.deepEqual(
    err.fields.map((f) => f.path),
    [field],
  );
  assert.match(err.message, /looks like a secret/);
  assert.equal(err.message.includes(secret), false, 'the refusal does not echo the secret');
}

describe('a secret-shaped reason or actor', () => {
  it('should be refused by every operator call of the library, naming the field, with nothing changed', async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const before = await snapshot(t.tokenId);
    const historyBefore = (await decodedHistory(t.handle)).events?.length;
    const at = new Date(Date.now() + 3_600_000).toISOString();
    for (const [field, secret, text] of [
      ['actor', SIGNING_SECRET, `alice ${SIGNING_SECRET}`],
      ['actor', t.token, `bob with ${t.token}`],
      ['reason', GITHUB_TOKEN, `leaked ${GITHUB_TOKEN}`],
    ] as const) {
      const who = field === 'actor' ? { actor: text, reason: 'routine' } : { actor: 'alice', reason: text };
      const w = ctx.warden;
      await refusedNaming(field, w.revoke({ tokenId: t.tokenId, ...who }), secret);
      await refusedNaming(field, w.rotate(t.tokenId, who), secret);
      await refusedNaming(field, w.suspend(t.tokenId, who), secret);
      await refusedNaming(field, w.resume(t.tokenId, who), secret);
      await refusedNaming(field, w.scheduleRevoke(t.tokenId, { at, ...who }), secret);
      await refusedNaming(field, w.cancelScheduledRevoke(t.tokenId, who), secret);
      await refusedNaming(field, w.extend(t.tokenId, { ttl: '2h', ...who }), secret);
      await refusedNaming(field, w.shorten(t.tokenId, { ttl: '30m', ...who }), secret);
      await refusedNaming(field, w.reportSuspicious(t.tokenId, who), secret);
    }
    assert.deepEqual(await snapshot(t.tokenId), before);
    assert.equal((await decodedHistory(t.handle)).events?.length, historyBefore, 'nothing reached the workflow');
  });

  it('should be refused by the HTTP API (400, the body field named) and the CLI (exit 2)', async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const before = await snapshot(t.tokenId);
    for (const [path, body] of [
      [`/v1/tokens/${t.tokenId}/revoke`, { reason: 'routine', actor: `carol ${SIGNING_SECRET}` }],
      [`/v1/tokens/${t.tokenId}/suspend`, { reason: 'routine', actor: `carol ${SIGNING_SECRET}` }],
      [`/v1/tokens/${t.tokenId}/rotate`, { actor: `carol ${SIGNING_SECRET}` }],
      [`/v1/tokens/${t.tokenId}/expiry`, { ttl: '2h', mode: 'extend', reason: 'ok', actor: GITHUB_TOKEN }],
    ] as const) {
      const res = await call(api.url, 'POST', path, { key: api.keys.admin, json: body });
      assert.equal(res.status, 400, `${path}: ${res.text}`);
      assert.deepEqual(
        res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
        ['body actor'],
        res.text,
      );
      assert.equal(res.text.includes(SIGNING_SECRET) || res.text.includes(GITHUB_TOKEN), false);
    }
    for (const args of [
      ['revoke', t.tokenId, '--reason', 'routine', '--actor', `dave ${SIGNING_SECRET}`],
      ['suspend', t.tokenId, '--reason', 'routine', '--actor', `dave ${SIGNING_SECRET}`],
      ['extend', t.tokenId, '--ttl', '2h', '--reason', 'routine', '--actor', `dave ${SIGNING_SECRET}`],
      ['rotate', t.tokenId, '--actor', `dave ${SIGNING_SECRET}`, '--json'],
    ]) {
      const run = await runCli(args, ctx.childEnv());
      assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
      assert.match(run.stderr, /actor.*looks like a secret/, args.join(' '));
      assert.equal(run.stderr.includes(SIGNING_SECRET), false);
      assert.equal(run.stdout, '');
    }
    assert.deepEqual(await snapshot(t.tokenId), before);
  });

  it("should be refused by the workflow's validator when an Update is sent past the library, leaving no trace in history", async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    for (const request of [
      { reason: `found ${SIGNING_SECRET}`, actor: 'eve' },
      { reason: 'routine', actor: `eve ${t.token}` },
    ]) {
      const err = await retriedUpdate(t.handle, suspendUpdate, { args: [request] }).then(
        () => assert.fail('the update was accepted'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof WorkflowUpdateFailedError, String(err));
      assert.match(err.cause?.message ?? '', /^(reason|actor): looks like a secret/);
    }
    const text = historyText((await decodedHistory(t.handle)).events ?? []).join('\n');
    assert.equal(text.includes(SIGNING_SECRET) || text.includes(t.token), false, 'no secret in history');
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).suspendedAt, null);
  });

  it('should be redacted when a raw revoke Signal carries it: the token still dies, the kill and audit hold no secret', async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const other = newSecret().token;
    await t.handle.signal(revokeSignal, {
      reason: `pasted ${other} by mistake`,
      actor: `mallory ${SIGNING_SECRET}`,
      initiatingEntity: 'admin',
      correlationId: GITHUB_TOKEN,
    });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    const token = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal(token.revokeReason, '[redacted: a tokenwarden token]');
    assert.equal(token.revokedBy, '[redacted: a signing secret]');
    const events = (await decodedHistory(t.handle)).events ?? [];
    const scheduled = historyText(events.filter((e) => e.activityTaskScheduledEventAttributes)).join('\n');
    for (const secret of [other, SIGNING_SECRET, GITHUB_TOKEN]) {
      assert.equal(scheduled.includes(secret), false, 'no secret in any activity input');
    }
    const { rows } = await ctx.sql.query(
      `SELECT idempotency_key || ' ' || canonical AS line FROM audit_event WHERE token_id = $1
       UNION ALL SELECT body FROM delivery WHERE token_id = $1
       UNION ALL SELECT coalesce(revoke_reason, '') || ' ' || coalesce(revoked_by, '') FROM token WHERE id = $1`,
      [t.tokenId],
    );
    const recorded = rows.map((r: { line: string }) => r.line).join('\n');
    for (const secret of [other, SIGNING_SECRET, GITHUB_TOKEN]) {
      assert.equal(recorded.includes(secret), false, 'no secret in the store');
    }
  });
});

describe('an email address in a reason', () => {
  const EMAIL = 'jane.doe@example.com';

  it('should be refused by the library, the HTTP API and the CLI, naming reason, with nothing changed', async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const before = await snapshot(t.tokenId);
    const reason = `requested by ${EMAIL}`;
    for (const attempt of [
      ctx.warden.revoke({ tokenId: t.tokenId, reason }),
      ctx.warden.suspend(t.tokenId, { reason }),
      ctx.warden.reportSuspicious(t.tokenId, { reason }),
    ]) {
      const err = await attempt.then(
        () => assert.fail('accepted an email address in a reason'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof InvalidInputError, String(err));
      assert.deepEqual(
        err.fields.map((f) => f.path),
        ['reason'],
      );
      assert.match(err.message, /contains an email address/);
    }
    const res = await call(api.url, 'POST', `/v1/tokens/${t.tokenId}/revoke`, {
      key: api.keys.admin,
      json: { reason },
    });
    assert.equal(res.status, 400, res.text);
    assert.deepEqual(
      res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
      ['body reason'],
    );
    const run = await runCli(['revoke', t.tokenId, '--reason', reason], ctx.childEnv());
    assert.equal(run.code, 2, run.stderr);
    assert.match(run.stderr, /reason.*contains an email address/);
    // An operator id in a reason is fine.
    assert.equal(
      (await ctx.warden.suspend(t.tokenId, { reason: 'asked by usr_8f3a21 (ticket 4411)' })).tokenId,
      t.tokenId,
    );
    assert.equal((await snapshot(t.tokenId)).status, before.status);
  });

  it("should be refused by the workflow's validator past the library, and kept out of the audit data from a raw revoke Signal", async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const err = await retriedUpdate(t.handle, suspendUpdate, { args: [{ reason: `for ${EMAIL}`, actor: 'eve' }] }).then(
      () => assert.fail('the update was accepted'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof WorkflowUpdateFailedError, String(err));
    assert.match(err.cause?.message ?? '', /^reason: contains an email address/);

    await t.handle.signal(revokeSignal, { reason: `offboarded ${EMAIL}`, actor: 'hr-sync' });
    await t.handle.result();
    const token = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal(token.revokeReason, 'offboarded [an email address]');
    const audit = (await store.readAudit(ctx.pool, t.tokenId)).map((e) => e.canonical).join('\n');
    assert.equal(audit.includes(EMAIL), false, 'no address in the audit trail');
  });
});
