/**
 * Suspend/resume, scheduled revoke and expiry changes on the real engine: the store first, then the
 * workflow's state (search attributes, timers).
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure, WorkflowUpdateFailedError } from '@temporalio/client';
import proto from '@temporalio/proto';
import {
  cancelScheduledRevokeUpdate,
  changeExpiryUpdate,
  policyChangedSignal,
  describeQuery,
  resumeUpdate,
  scheduleRevokeUpdate,
  suspendUpdate,
  type TokenLifecycleResult,
} from '../common/messages.js';
import { SEARCH_ATTRIBUTE } from '../common/names.js';
import * as store from '../common/store/index.js';
import { INVALID_LIFECYCLE_REQUEST } from '../workflows/lifecycle-state.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { maybeRecordHistory, decodedHistory } from './support/history.js';
import { insertPolicy, isValid, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: RunningWorker;

before(async () => {
  ctx = await TestContext.create('suspend');
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

async function rejection(update: Promise<unknown>): Promise<ApplicationFailure> {
  const err = await update.then(
    () => assert.fail('the update was accepted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof WorkflowUpdateFailedError, String(err));
  assert.ok(err.cause instanceof ApplicationFailure, String(err.cause));
  return err.cause;
}

const scheduledColumns = async (tokenId: string) =>
  (
    await ctx.sql.query<{ at: Date | null; reason: string | null }>(
      'SELECT revoke_scheduled_at AS at, revoke_scheduled_reason AS reason FROM token WHERE id = $1',
      [tokenId],
    )
  ).rows[0]!;

describe('scheduled revoke', () => {
  it('should revoke at the instant with the reason given, initiated by an admin', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const at = new Date(Date.now() + 3_000).toISOString();
    const scheduled = await retriedUpdate(t.handle, scheduleRevokeUpdate, {
      args: [{ at, reason: 'contract ends', actor: 'alice' }],
    });
    assert.equal(scheduled.revokeAt, at);
    const columns = await scheduledColumns(t.tokenId);
    assert.equal(columns.at?.toISOString(), at);
    assert.equal(columns.reason, 'contract ends');

    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    const row = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal(row.revokeReason, 'contract ends');
    assert.equal(row.revokedBy, 'alice');
    assert.equal(row.initiatingEntity, 'admin');
    assert.ok(Date.parse(row.revokedAt!) >= Date.parse(at), 'not before the instant');
    await maybeRecordHistory(t.handle, 'scheduled-revoke');
  });

  it('should not revoke once the schedule is cancelled', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const at = new Date(Date.now() + 2_000).toISOString();
    await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at, reason: 'maybe' }] });
    const cancelled = await retriedUpdate(t.handle, cancelScheduledRevokeUpdate, { args: [{ reason: 'stays' }] });
    assert.equal(cancelled.revokeAt, null);
    assert.equal((await scheduledColumns(t.tokenId)).at, null);
    // Past the instant, by the workflow's own clock: a timer that had fired would have killed it.
    await waitUntil(() => Date.now() > Date.parse(at) + 1_500, 'past the cancelled instant', 10_000, 100);
    const view = await t.handle.query(describeQuery);
    assert.equal(view.phase, 'active');
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active');
  });

  it('should refuse an instant in the past, naming the field', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const refused = await rejection(
      retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at: '2001-01-01T00:00:00Z', reason: 'x' }] }),
    );
    assert.equal(refused.type, INVALID_LIFECYCLE_REQUEST);
    assert.match(refused.message, /^at:/);
  });
});

describe('suspend and resume', () => {
  it('should fail verification while suspended, keep the token alive, and pass again after resume', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    assert.equal(await isValid(ctx, t.token), true);
    const suspended = await retriedUpdate(t.handle, suspendUpdate, { args: [{ reason: 'incident 42', actor: 'bob' }] });
    assert.equal(suspended.suspended, true);
    assert.equal(await isValid(ctx, t.token), false, 'a suspended token fails verification');
    assert.equal((await t.handle.describe()).typedSearchAttributes.get(SEARCH_ATTRIBUTE.suspended), true);
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active', 'not dead');

    const resumed = await retriedUpdate(t.handle, resumeUpdate, { args: [{ reason: 'cleared' }] });
    assert.equal(resumed.suspended, false);
    assert.equal(await isValid(ctx, t.token), true);
    assert.equal((await t.handle.describe()).typedSearchAttributes.get(SEARCH_ATTRIBUTE.suspended), false);
    await maybeRecordHistory(t.handle, 'suspend-resume');
  });

  it('should still expire while suspended', async () => {
    const t = await startToken(ctx, { ttlMs: 3_000 });
    await retriedUpdate(t.handle, suspendUpdate, { args: [{ reason: 'incident' }] });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
  });

  it('should refuse a suspend without a reason', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const refused = await rejection(retriedUpdate(t.handle, suspendUpdate, { args: [{ reason: '' }] }));
    assert.match(refused.message, /^reason:/);
  });
});

describe('extend and shorten', () => {
  it('should move the expiry in the store and the timer, and expire at the new instant', async () => {
    const t = await startToken(ctx, { ttlMs: 2_000 });
    const extended = await retriedUpdate(t.handle, changeExpiryUpdate, {
      args: [{ ttlMs: 6_000, mode: 'extend', reason: 'one more run' }],
    });
    assert.ok(Date.parse(extended.expiresAt) > Date.parse(extended.previousExpiresAt));
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).expiresAt, extended.expiresAt);
    assert.equal((await t.handle.query(describeQuery)).expiresAt, extended.expiresAt);
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
    const row = await store.requireToken(ctx.pool, t.tokenId);
    assert.ok(Date.parse(row.revokedAt!) >= Date.parse(extended.expiresAt), 'expired at the new instant, not the old');
    await maybeRecordHistory(t.handle, 'change-expiry-extend');
  });

  it('should shorten and expire early', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const shortened = await retriedUpdate(t.handle, changeExpiryUpdate, {
      args: [{ ttlMs: 2_000, mode: 'shorten', reason: 'done early' }],
    });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
    assert.ok(
      Date.parse((await store.requireToken(ctx.pool, t.tokenId)).revokedAt!) < Date.parse(shortened.previousExpiresAt),
    );
  });

  it('should refuse an extension beyond the policy maximum, naming ttl and the limit', async () => {
    const policy = await insertPolicy(ctx, { name: 'short-lived', maxLifetimeMs: 60_000 });
    const t = await startToken(ctx, { ttlMs: 30_000, policy });
    const refused = await rejection(
      retriedUpdate(t.handle, changeExpiryUpdate, { args: [{ ttlMs: 3_600_000, mode: 'extend', reason: 'more' }] }),
    );
    assert.match(refused.message, /^ttl:/);
    assert.match(refused.message, /max lifetime: the expiry may be at most \d{4}-/);
    assert.equal((await t.handle.query(describeQuery)).phase, 'active');
  });

  it('should refuse an extension beyond the global maximum lifetime', async () => {
    const t = await startToken(ctx, { ttlMs: 30_000 });
    const refused = await rejection(
      retriedUpdate(t.handle, changeExpiryUpdate, {
        args: [{ ttlMs: ctx.settings.maxTtlMs + 86_400_000, mode: 'extend', reason: 'forever' }],
      }),
    );
    assert.match(refused.message, /^ttl: .*TOKENWARDEN_MAX_TTL/);
    const row = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal((await t.handle.query(describeQuery)).expiresAt, row.expiresAt, 'nothing moved');
  });

  it('should live on when a Signal handler step is refused', async () => {
    await worker.stop();
    const faulty = await ctx.startWorker(ctx.settings, {
      wrapActivities: (real) => ({
        ...real,
        applyPolicy: () =>
          Promise.reject(ApplicationFailure.nonRetryable('refused for the test', INVALID_LIFECYCLE_REQUEST)),
      }),
    });
    try {
      const t = await startToken(ctx, { ttlMs: 120_000 });
      await t.handle.signal(policyChangedSignal, {});
      // Until the workflow has taken the refusal in: a task completed after it (or the run closed).
      const { EventType } = proto.temporal.api.enums.v1;
      await waitUntil(async () => {
        const types = ((await decodedHistory(t.handle)).events ?? []).map((e) => e.eventType);
        const failed = types.indexOf(EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED);
        return (
          failed >= 0 &&
          (types.slice(failed).includes(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) ||
            (await t.handle.describe()).status.name !== 'RUNNING')
        );
      }, 'the refused step taken in');
      assert.equal((await t.handle.describe()).status.name, 'RUNNING');
      assert.equal((await t.handle.query(describeQuery)).phase, 'active');
    } finally {
      await faulty.stop();
      worker = await ctx.startWorker();
    }
  });

  it('should apply a changed policy: shorten to its max lifetime, revoke a scope it no longer allows', async () => {
    const snapshot = await insertPolicy(ctx, { name: 'tightening-2' });
    const shortened = await startToken(ctx, { ttlMs: 120_000, policy: snapshot });
    const revoked = await startToken(ctx, { ttlMs: 120_000, policy: snapshot, scopes: ['admin'] });
    await ctx.sql.query(
      "UPDATE policy SET max_lifetime_ms = 3000, allowed_scopes = '{read}', version = version + 1 WHERE name = $1",
      ['tightening-2'],
    );
    // The scope check comes first: only the token without the refused scope is shortened.
    await ctx.sql.query("UPDATE token SET scopes = '{read}' WHERE id = $1", [shortened.tokenId]);
    await shortened.handle.signal(policyChangedSignal, { policy: 'tightening-2' });
    await revoked.handle.signal(policyChangedSignal, { policy: 'tightening-2' });

    const dead = (await revoked.handle.result()) as TokenLifecycleResult;
    assert.equal(dead.status, 'revoked');
    const row = await store.requireToken(ctx.pool, revoked.tokenId);
    assert.equal(row.revokeReason, 'policy');
    assert.equal(row.initiatingEntity, 'policy');

    const expired = (await shortened.handle.result()) as TokenLifecycleResult;
    assert.equal(expired.status, 'expired', 'shortened to the max lifetime, then expired');
    await maybeRecordHistory(shortened.handle, 'policy-changed-shorten');
    await maybeRecordHistory(revoked.handle, 'policy-changed-revoke');
  });
});
