/**
 * The token lifecycle on the real engine: real Temporal dev server, real PostgreSQL, real HTTP
 * receivers on loopback. Durations are seconds, configured per test context.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { WorkflowUpdateFailedError } from '@temporalio/client';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import {
  describeQuery,
  forceCompleteUpdate,
  retryPropagationUpdate,
  revokeSignal,
  type TokenLifecycleResult,
} from '../workflows/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { historyText, maybeRecordHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker | undefined;
const receivers: TestReceiver[] = [];
let counter = 0;

before(async () => {
  ctx = await TestContext.create('lifecycle');
});
after(async () => {
  await worker?.stop();
  for (const r of receivers) await r.close();
  await ctx?.close();
});

async function ensureWorker(): Promise<void> {
  if (!worker || worker.worker.getState() !== 'RUNNING') worker = await ctx.startWorker();
}

/** A real receiver registered under a fresh id; its secret comes from the library, shown once. */
async function addReceiver(): Promise<{ id: string; receiver: TestReceiver }> {
  const receiver = await TestReceiver.start();
  receivers.push(receiver);
  const id = `rcv-${++counter}`;
  const added = await ctx.warden.addReceiver({ id, url: receiver.url });
  receiver.secret = added.secret;
  return { id, receiver };
}

const handleOf = (tokenId: string) => ctx.client.workflow.getHandle(tokenWorkflowId(tokenId));

const result = (tokenId: string) => handleOf(tokenId).result() as Promise<TokenLifecycleResult>;

describe('token lifecycle', () => {
  it('should expire at expires_at and tell every receiver once, with the same webhook-id on retries', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const b = await addReceiver();
    b.receiver.behaviour = (n) => (n <= 2 ? { status: 503 } : { status: 200 });
    const issued = await ctx.warden.issue({ subject: 'usr_expiry', receivers: [a.id, b.id], ttl: '2s' });

    const done = await result(issued.tokenId);
    assert.equal(done.status, 'expired');
    assert.equal(done.propagation, 'complete');

    const shown = await ctx.warden.show(issued.tokenId);
    assert.equal(shown.status, 'expired');
    assert.equal(shown.revokeReason, 'expired');
    assert.equal(shown.propagation, 'complete');
    assert.ok(Date.parse(shown.revokedAt!) >= Date.parse(shown.expiresAt), 'killed at or after expires_at');
    assert.deepEqual(
      shown.deliveries.map((d) => [d.receiverId, d.status, d.attempts]),
      [
        [a.id, 'delivered', 1],
        [b.id, 'delivered', 3],
      ],
    );

    assert.equal(a.receiver.requests.length, 1);
    assert.equal(b.receiver.requests.length, 3);
    const all = [...a.receiver.requests, ...b.receiver.requests];
    assert.ok(
      all.every((r) => r.verified),
      'every attempt carries a valid Standard Webhooks signature',
    );
    assert.equal(new Set(all.map((r) => r.headers['webhook-id'])).size, 1, 'one logical event');
    assert.equal(new Set(all.map((r) => r.body)).size, 1, 'the same body on every attempt');
    const event = JSON.parse(all[0]!.body);
    assert.equal(event.type, 'token.expired');
    assert.equal(event.token_id, issued.tokenId);
    assert.deepEqual(event.sub_id, { format: 'opaque', id: 'usr_expiry' });
    assert.equal(event.initiating_entity, 'system');
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, issued.tokenId)), null);
    await maybeRecordHistory(handleOf(issued.tokenId), 'expire-deliver');
  });

  it('should return from revoke only once the store says revoked, and be idempotent', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const issued = await ctx.warden.issue({ subject: 'usr_revoke', receivers: [a.id], ttl: '1h' });
    assert.equal((await ctx.warden.show(issued.tokenId)).valid, true);

    const first = await ctx.warden.revoke({
      tokenId: issued.tokenId,
      reason: 'left the company',
      actor: 'admin:alice',
    });
    const row = await store.requireToken(ctx.pool, issued.tokenId);
    assert.equal(row.status, 'revoked');
    assert.equal(row.valid, false);
    assert.equal(first.changed, true);
    assert.equal(first.workflowSignalled, true);

    const second = await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'again', actor: 'admin:bob' });
    assert.equal(second.changed, false);
    assert.equal(second.revokedAt, first.revokedAt);
    assert.equal(second.reason, 'left the company');
    assert.equal(second.revokedBy, 'admin:alice');

    const done = await result(issued.tokenId);
    assert.equal(done.status, 'revoked');
    assert.equal(a.receiver.requests.length, 1);
    const event = JSON.parse(a.receiver.requests[0]!.body);
    assert.equal(event.type, 'token.revoked');
    assert.equal(event.reason, 'left the company');
    assert.equal(event.actor, 'admin:alice');
    const kinds = (await store.readAudit(ctx.pool, issued.tokenId)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.revoked', 'delivery.delivered', 'propagation.complete']);
  });

  it('should be dead in the store at once with no worker running, and propagate once a worker starts', async () => {
    await worker?.stop();
    const a = await addReceiver();
    const issued = await ctx.warden.issue({ subject: 'usr_noworker', receivers: [a.id], ttl: '1h' });
    const outcome = await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'key leaked' });
    assert.equal(outcome.workflowSignalled, true);
    assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).valid, false);
    assert.equal(a.receiver.requests.length, 0);
    assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).propagation, 'pending');

    await ensureWorker();
    const done = await result(issued.tokenId);
    assert.equal(done.propagation, 'complete');
    assert.equal(a.receiver.acked().length, 1);
  });

  it('should deliver to a receiver that fails 3 times, recording every attempt, and honour Retry-After', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = (n) =>
      n === 1
        ? { status: 500 }
        : n === 2
          ? { drop: true }
          : n === 3
            ? { status: 429, headers: { 'retry-after': '2' } }
            : { status: 202 };
    const issued = await ctx.warden.issue({ subject: 'usr_flaky', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'rotation of staff' });
    await result(issued.tokenId);
    const [d] = (await ctx.warden.show(issued.tokenId)).deliveries;
    assert.equal(d!.status, 'delivered');
    assert.equal(d!.attempts, 4);
    assert.equal(d!.lastStatusCode, 202);
    const reqs = a.receiver.requests;
    assert.equal(reqs.length, 4);
    // retryMax is 1 s in this context, so only Retry-After can explain a gap of 2 s.
    assert.ok(reqs[3]!.at - reqs[2]!.at >= 1_900, `Retry-After honoured (gap ${reqs[3]!.at - reqs[2]!.at} ms)`);
  });

  it('should mark propagation stuck on a 400 while the token stays revoked, and complete after retryPropagation', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const ok = await addReceiver();
    a.receiver.behaviour = () => ({ status: 400 });
    const issued = await ctx.warden.issue({ subject: 'usr_stuck', receivers: [a.id, ok.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'contract ended' });
    const handle = handleOf(issued.tokenId);

    await waitUntil(
      async () => (await store.requireToken(ctx.pool, issued.tokenId)).propagation === 'stuck',
      'propagation stuck',
    );
    const stuck = await ctx.warden.show(issued.tokenId);
    assert.equal(stuck.status, 'revoked');
    assert.equal(stuck.valid, false);
    assert.deepEqual(
      stuck.deliveries.map((d) => d.status),
      ['failed', 'delivered'],
    );
    assert.equal(a.receiver.requests.length, 1, 'a 400 is not retried by itself');
    assert.equal((await handle.query(describeQuery)).phase, 'stuck');

    await assert.rejects(
      handle.executeUpdate(retryPropagationUpdate, { args: [{ reason: '' }] }),
      WorkflowUpdateFailedError,
    );
    a.receiver.behaviour = () => ({ status: 204 });
    const retried = await handle.executeUpdate(retryPropagationUpdate, {
      args: [{ reason: 'receiver fixed', actor: 'ops:carol' }],
    });
    assert.deepEqual(retried.retrying, [a.id]);

    const done = await result(issued.tokenId);
    assert.equal(done.propagation, 'complete');
    assert.equal(done.forced, false);
    assert.equal(a.receiver.acked().length, 1);
    const kinds = (await store.readAudit(ctx.pool, issued.tokenId)).map((e) => e.kind);
    assert.ok(kinds.includes('propagation.stuck') && kinds.includes('propagation.retry-requested'), kinds.join(','));
    assert.equal(kinds.at(-1), 'propagation.complete');
    await maybeRecordHistory(handle, 'revoke-stuck-retry');
  });

  it('should escalate a receiver that keeps failing after the deadline and let an operator force completion', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_force', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, issued.tokenId)).propagation === 'stuck',
      'escalation to stuck',
    );
    const before = a.receiver.requests.length;
    await waitUntil(() => a.receiver.requests.length > before, 'retries to continue while stuck');

    const handle = handleOf(issued.tokenId);
    await assert.rejects(handle.executeUpdate(forceCompleteUpdate, { args: [{} as never] }), WorkflowUpdateFailedError);
    const forced = await handle.executeUpdate(forceCompleteUpdate, {
      args: [{ reason: 'receiver decommissioned', actor: 'ops:dan' }],
    });
    assert.deepEqual(forced.forced, [a.id]);
    const done = await result(issued.tokenId);
    assert.equal(done.forced, true);
    const shown = await ctx.warden.show(issued.tokenId);
    assert.equal(shown.propagation, 'complete');
    assert.equal(shown.deliveries[0]!.status, 'forced');
    const forcedEvent = (await store.readAudit(ctx.pool, issued.tokenId)).find((e) => e.kind === 'propagation.forced');
    assert.match(forcedEvent!.canonical, /receiver decommissioned/);
  });

  it('should complete at once when an operator forces completion before escalation', async () => {
    // Escalation an hour away: only the forced completion can end this workflow within the test.
    const slow = await TestContext.create('lifecycle_slow', { escalateAfterMs: 3_600_000 });
    const slowWorker = await slow.startWorker();
    try {
      const r = await TestReceiver.start();
      receivers.push(r);
      r.secret = (await slow.warden.addReceiver({ id: 'flaky', url: r.url })).secret;
      r.behaviour = () => ({ status: 503 });
      const issued = await slow.warden.issue({ subject: 'usr_force_early', receivers: ['flaky'], ttl: '1h' });
      await slow.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
      await waitUntil(() => r.requests.length >= 1, 'a first delivery attempt');
      const handle = slow.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      await handle.executeUpdate(forceCompleteUpdate, { args: [{ reason: 'receiver retired' }] });
      await waitUntil(
        async () => (await handle.describe()).status.name === 'COMPLETED',
        'the workflow to complete',
        15_000,
      );
      assert.equal((await slow.warden.show(issued.tokenId)).propagation, 'complete');
      await assert.rejects(
        handle.executeUpdate(forceCompleteUpdate, { args: [{ reason: 'again' }] }),
        'nothing left to force once complete',
      );
    } finally {
      await slowWorker.stop();
      await slow.close();
    }
  });

  it('should finish propagation on a new worker after the first one stops mid-delivery', async () => {
    await ensureWorker();
    const a = await addReceiver();
    let release = false;
    a.receiver.behaviour = () => (release ? { status: 200 } : { status: 200, delayMs: 1500 });
    const issued = await ctx.warden.issue({ subject: 'usr_crash', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'worker crash drill' });
    await waitUntil(() => a.receiver.requests.length >= 1, 'the first delivery attempt to be in flight');
    await worker!.stop();
    release = true;
    await ensureWorker();
    const done = await result(issued.tokenId);
    assert.equal(done.propagation, 'complete');
    assert.ok(a.receiver.acked().length >= 1);
    assert.equal(new Set(a.receiver.requests.map((r) => r.headers['webhook-id'])).size, 1);
    assert.equal((await ctx.warden.show(issued.tokenId)).deliveries[0]!.status, 'delivered');
  });

  it('should keep the raw token out of workflow history', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const issued = await ctx.warden.issue({ subject: 'usr_secret', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'done' });
    await result(issued.tokenId);
    const text = historyText(await handleOf(issued.tokenId).fetchHistory()).join('\n');
    assert.ok(text.includes(issued.tokenId), 'the check reads the history (token id present)');
    assert.ok(!text.includes(issued.token), 'raw token in history');
    assert.ok(!text.includes(issued.token.split('_')[1]!), 'raw token body in history');
    assert.ok(!text.includes(a.receiver.secret!.slice(6)), 'receiver signing secret in history');
  });

  it('should revoke on a bare Temporal signal, even a malformed one, with reason unspecified', async () => {
    await ensureWorker();
    const issued = await ctx.warden.issue({ subject: 'usr_signal', ttl: '1h' });
    await handleOf(issued.tokenId).signal(revokeSignal, 'not an object' as never);
    const done = await result(issued.tokenId);
    assert.equal(done.status, 'revoked');
    const row = await store.requireToken(ctx.pool, issued.tokenId);
    assert.equal(row.revokeReason, 'unspecified');
    const kinds = (await store.readAudit(ctx.pool, issued.tokenId)).map((e) => e.kind);
    assert.ok(kinds.includes('signal.malformed'), kinds.join(','));
  });
});
