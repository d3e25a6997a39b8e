/**
 * Handlers against a slow store: a cancel (or a reschedule) of a scheduled revoke that is answered
 * with success is never followed by the old schedule's revoke; suspend and resume end as the store does.
 */
import assert from 'node:assert/strict';
import { setTimeout as delay } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import {
  cancelScheduledRevokeUpdate,
  describeQuery,
  policyChangedSignal,
  resumeUpdate,
  scheduleRevokeUpdate,
  suspendUpdate,
} from '../common/messages.js';
import { SEARCH_ATTRIBUTE } from '../common/names.js';
import * as store from '../common/store/index.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { maybeRecordHistory } from './support/history.js';
import { insertPolicy, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';
import { retriedUpdate } from './support/updates.js';

/** A store write of the schedule that takes this long (a lock wait, a retried write). */
const SLOW_WRITE_MS = 4_000;

/** The policy read of version 2 of `stale-read`: read, then answered late. */
const staleRead = { read: false, answered: false };

let ctx: TestContext;
let worker: RunningWorker;

before(async () => {
  ctx = await TestContext.create('suspend-schedule-race');
  worker = await ctx.startWorker(ctx.settings, {
    wrapActivities: (real) => ({
      ...real,
      setScheduledRevoke: async (input: Parameters<typeof real.setScheduledRevoke>[0]) => {
        if (input.reason === 'slow write') await delay(SLOW_WRITE_MS);
        return real.setScheduledRevoke(input);
      },
      applyPolicy: async (input: Parameters<typeof real.applyPolicy>[0]) => {
        const applied = await real.applyPolicy(input);
        if (applied.policy?.name === 'stale-read' && applied.policy.version === 2) {
          staleRead.read = true;
          // The older snapshot is answered after the newer one.
          await delay(SLOW_WRITE_MS);
          staleRead.answered = true;
        }
        return applied;
      },
      setSuspended: async (input: Parameters<typeof real.setSuspended>[0]) => {
        const changed = await real.setSuspended(input);
        // Committed in the store, answered late (a slow network back to the worker).
        if (input.reason === 'slow answer') await delay(SLOW_WRITE_MS);
        return changed;
      },
    }),
  });
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

/** The token is still alive in the store and in its workflow once the old instant is well past. */
async function assertAliveAfter(t: Awaited<ReturnType<typeof startToken>>, atIso: string): Promise<void> {
  await waitUntil(() => Date.now() > Date.parse(atIso) + 2_000, 'past the old instant', 15_000, 100);
  const row = await store.requireToken(ctx.pool, t.tokenId);
  assert.equal(row.status, 'active');
  const view = (await t.handle.query(describeQuery)) as { phase: string };
  assert.equal(view.phase, 'active');
}

describe('scheduled revoke against a slow store write', () => {
  it('should not revoke once a cancel has been answered, even if its store write was slow', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const at = new Date(Date.now() + 1_500).toISOString();
    await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at, reason: 'planned end' }] });
    const cancelled = await retriedUpdate(t.handle, cancelScheduledRevokeUpdate, { args: [{ reason: 'slow write' }] });
    assert.equal(cancelled.revokeAt, null);
    await assertAliveAfter(t, at);
    const audit = (await store.readAudit(ctx.pool, t.tokenId)).map((e) => e.kind);
    assert.ok(audit.includes('revoke.schedule-cancelled'), audit.join(','));
    await maybeRecordHistory(t.handle, 'scheduled-revoke-cancelled');
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
  });

  it('should not revoke at the old instant once a reschedule has been answered', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const at = new Date(Date.now() + 1_500).toISOString();
    await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at, reason: 'planned end' }] });
    const later = new Date(Date.now() + 60_000).toISOString();
    const moved = await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at: later, reason: 'slow write' }] });
    assert.equal(moved.revokeAt, later);
    await assertAliveAfter(t, at);
    const row = await ctx.sql.query('SELECT revoke_scheduled_at AS at FROM token WHERE id = $1', [t.tokenId]);
    assert.equal(new Date(row.rows[0].at as string).toISOString(), later);
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
  });
});

describe('scheduled revoke audit', () => {
  it('should audit each schedule and each cancel, also when they repeat the same instant and reason', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const at = new Date(Date.now() + 60_000).toISOString();
    for (let i = 0; i < 2; i++) {
      await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at, reason: 'planned end' }] });
      await retriedUpdate(t.handle, cancelScheduledRevokeUpdate, { args: [{ reason: 'keep it' }] });
    }
    const kinds = (await store.readAudit(ctx.pool, t.tokenId)).map((e) => e.kind);
    assert.equal(kinds.filter((k) => k === 'revoke.scheduled').length, 2, kinds.join(','));
    assert.equal(kinds.filter((k) => k === 'revoke.schedule-cancelled').length, 2, kinds.join(','));
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
  });
});

describe('policy changes answered out of order', () => {
  it('should never adopt an older policy snapshot that is answered after a newer one', async () => {
    const policy = await insertPolicy(ctx, { name: 'stale-read' });
    const t = await startToken(ctx, { ttlMs: 120_000, policy, scopes: ['admin'] });
    // Version 2 refuses the token's scope (a revoke), version 3 allows it again.
    await ctx.sql.query("UPDATE policy SET allowed_scopes = '{read}', version = 2 WHERE name = 'stale-read'");
    await t.handle.signal(policyChangedSignal, {});
    await waitUntil(() => staleRead.read, 'version 2 read');
    await ctx.sql.query("UPDATE policy SET allowed_scopes = NULL, version = 3 WHERE name = 'stale-read'");
    await t.handle.signal(policyChangedSignal, {});
    await waitUntil(() => staleRead.answered, 'version 2 answered late', 15_000);
    // An Update after both answers: the run has handled them by the time it is answered.
    const suspended = await retriedUpdate(t.handle, suspendUpdate, { args: [{ reason: 'after the policy reads' }] });
    assert.equal(suspended.suspended, true);
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active');
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
  });
});

describe('suspend and resume against a slow store answer', () => {
  it('should end resumed, as the store does, when a resume follows a suspend still being answered', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const suspending = await t.handle.startUpdate(suspendUpdate, {
      args: [{ reason: 'slow answer' }],
      waitForStage: 'ACCEPTED',
    });
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, t.tokenId)).suspendedAt !== null,
      'the suspension committed in the store',
    );
    const resumed = await retriedUpdate(t.handle, resumeUpdate, { args: [{ reason: 'cleared' }] });
    assert.equal(resumed.suspended, false);
    assert.equal((await suspending.result()).suspended, true);
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).suspendedAt, null);
    assert.equal((await t.handle.describe()).typedSearchAttributes.get(SEARCH_ATTRIBUTE.suspended), false);
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
  });
});
