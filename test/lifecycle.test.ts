/**
 * The token lifecycle on the real engine: real Temporal dev server, real PostgreSQL, real HTTP
 * receivers on loopback. Durations are seconds, configured per test context.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import {
  ApplicationFailure,
  WorkflowUpdateFailedError,
  WorkflowUpdateStage,
  type WorkflowHandle,
} from '@temporalio/client';
import { RECEIVER_UNAVAILABLE } from '../activities/propagation.js';
import { signalRevoke, startTokenWorkflow } from '../common/temporal.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { SEARCH_ATTRIBUTE, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { INVALID_OPERATOR_REQUEST, NOT_PROPAGATING } from '../workflows/lifecycle-state.js';
import {
  describeQuery,
  forceCompleteUpdate,
  retryPropagationUpdate,
  revokeSignal,
  type TokenLifecycleResult,
} from '../common/messages.js';
import proto from '@temporalio/proto';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { historyText, maybeRecordHistory, decodedHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';
import { retriedUpdate } from './support/updates.js';

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

/** The workflow's current details, as the Web UI reads them (the built-in metadata query). */
const currentDetails = async (handle: WorkflowHandle) =>
  (await handle.query<{ currentDetails?: string }>('__temporal_workflow_metadata')).currentDetails ?? '';

const propagationAttribute = async (handle: WorkflowHandle) =>
  (await handle.describe()).typedSearchAttributes.get(SEARCH_ATTRIBUTE.propagation);

const auditKinds = async (tokenId: string) => (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);

const propagationIs = (tokenId: string, state: string) => async () =>
  (await store.requireToken(ctx.pool, tokenId)).propagation === state;

/** What the reconciler does for an unfinished propagation whose workflow is gone: signal-with-start a new run. */
async function restartAsReconcilerDoes(tokenId: string): Promise<void> {
  const token = await store.requireToken(ctx.pool, tokenId);
  await signalRevoke(
    ctx.client,
    token,
    { reason: token.revokeReason!, actor: token.revokedBy!, initiatingEntity: token.initiatingEntity! },
    ctx.settings.temporal.taskQueue,
    ctx.settings.timing,
  );
}

/** An operator Update's rejection as the client sees it: the failure it carries. */
async function updateRejection(update: Promise<unknown>): Promise<ApplicationFailure> {
  const err = await update.then(
    () => assert.fail('the update was accepted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof WorkflowUpdateFailedError, String(err));
  assert.ok(err.cause instanceof ApplicationFailure, String(err.cause));
  return err.cause;
}

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

  it('should kill and reach every receiver from one workflow task and one activity, and complete in the next', async () => {
    await ensureWorker();
    const rs = [await addReceiver(), await addReceiver(), await addReceiver()];
    // Each receiver answers only when the test lets it: the three answers come at different times.
    const gates = rs.map(() => {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      return { promise, resolve };
    });
    rs.forEach((r, i) => (r.receiver.behaviour = () => ({ status: 204, after: gates[i]!.promise })));
    const issued = await ctx.warden.issue({ subject: 'usr_tasks', receivers: rs.map((r) => r.id), ttl: '1h' });
    const { EventType } = proto.temporal.api.enums.v1;
    // The first task must be done before the revoke arrives, or one task takes both (start and revoke).
    await waitUntil(
      async () =>
        ((await decodedHistory(handleOf(issued.tokenId))).events ?? []).some(
          (e) => e.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        ),
      'the first workflow task completed',
    );
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'task count' });
    for (const [i, r] of rs.entries()) {
      await waitUntil(() => r.receiver.requests.length === 1, `the POST to ${r.id}`);
      gates[i]!.resolve();
      await waitUntil(
        async () => (await store.listDeliveries(ctx.pool, issued.tokenId))[i]!.status === 'delivered',
        `${r.id} recorded delivered`,
      );
    }
    await result(issued.tokenId);

    const events = (await decodedHistory(handleOf(issued.tokenId))).events ?? [];
    const byTask = (type: number, taskCompletedId: number) =>
      events.filter((e) => {
        if (e.eventType !== type) return false;
        const attrs =
          e.markerRecordedEventAttributes ??
          e.activityTaskScheduledEventAttributes ??
          e.timerStartedEventAttributes ??
          e.timerCanceledEventAttributes ??
          e.upsertWorkflowSearchAttributesEventAttributes ??
          e.workflowExecutionCompletedEventAttributes;
        return Number(attrs?.workflowTaskCompletedEventId) === taskCompletedId;
      }).length;
    const taskIds = events
      .filter((e) => e.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
      .map((e) => Number(e.eventId));
    // The task after the revoke Signal records the kill (a local activity's marker) and schedules
    // the first attempt at every receiver (one activity) and the escalation timer; the next task
    // records completion (another marker) and completes the run.
    assert.equal(taskIds.length, 3, 'start, revoke, the attempts done');
    const revokeTask = taskIds[1]!;
    assert.ok(byTask(EventType.EVENT_TYPE_MARKER_RECORDED, revokeTask) >= 1, 'the kill is recorded in that task');
    assert.equal(byTask(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, revokeTask), 1);
    assert.equal(byTask(EventType.EVENT_TYPE_TIMER_STARTED, revokeTask), 1, 'the escalation timer');
    const lastTask = taskIds.at(-1)!;
    assert.equal(byTask(EventType.EVENT_TYPE_MARKER_RECORDED, lastTask), 1, 'completion recorded in the last task');
    assert.equal(byTask(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, lastTask), 1);
    // No timer restarted per confirmation: no later task starts or cancels one.
    for (const task of taskIds.slice(2)) {
      assert.equal(byTask(EventType.EVENT_TYPE_TIMER_STARTED, task), 0);
      assert.equal(byTask(EventType.EVENT_TYPE_TIMER_CANCELED, task), 0);
    }
    assert.deepEqual(
      events
        .filter((e) => e.eventType === EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
        .map((e) => e.activityTaskScheduledEventAttributes?.activityType?.name),
      ['deliverRevocationToAll'],
      'no store call through the server, one activity for every receiver',
    );
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

  it('should honour Retry-After after the first attempt, made for every receiver together', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = (n) => (n === 1 ? { status: 429, headers: { 'retry-after': '2' } } : { status: 204 });
    const issued = await ctx.warden.issue({ subject: 'usr_retry_after', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'first answer is 429' });
    await result(issued.tokenId);
    const reqs = a.receiver.requests;
    assert.equal(reqs.length, 2);
    // retryInitial is 200 ms and retryMax 1 s here: only Retry-After explains a gap of 2 s.
    assert.ok(reqs[1]!.at - reqs[0]!.at >= 1_900, `Retry-After honoured (gap ${reqs[1]!.at - reqs[0]!.at} ms)`);
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
      [a.id, ok.id].map((id) => stuck.deliveries.find((d) => d.receiverId === id)?.status),
      ['failed', 'delivered'],
    );
    assert.equal(a.receiver.requests.length, 1, 'a 400 is not retried by itself');
    await waitUntil(async () => (await handle.query(describeQuery)).phase === 'stuck', 'phase stuck');
    // The workflow's view is the store's: the rejected attempt is counted, with its answer.
    const view = await handle.query(describeQuery);
    const rejected = view.deliveries.find((d) => d.receiverId === a.id)!;
    assert.deepEqual([rejected.status, rejected.attempts, rejected.lastStatusCode], ['failed', 1, 400]);
    const row = stuck.deliveries.find((d) => d.receiverId === a.id)!;
    assert.deepEqual([rejected.attempts, rejected.lastStatusCode], [row.attempts, row.lastStatusCode]);
    const details = await currentDetails(handle);
    assert.match(details, /Propagation \*\*stuck\*\*/);
    assert.doesNotMatch(details, /pending/i);
    assert.match(details, new RegExp(`${a.id}\`: rejected after 1 attempt; last: receiver ${a.id} answered HTTP 400`));

    const noReason = await updateRejection(retriedUpdate(handle, retryPropagationUpdate, { args: [{ reason: '' }] }));
    assert.equal(noReason.nonRetryable, true, 'a rejected Update is not worth retrying');
    assert.equal(noReason.type, INVALID_OPERATOR_REQUEST);
    assert.match(noReason.message, /^reason: /);
    a.receiver.behaviour = () => ({ status: 204 });
    const retried = await retriedUpdate(handle, retryPropagationUpdate, {
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
    // Attempts made while the activity retried are read from the store when escalating.
    const stuck = await handle.query(describeQuery);
    assert.equal(stuck.phase, 'stuck');
    assert.ok(stuck.deliveries[0]!.attempts >= 1, `attempts at escalation: ${stuck.deliveries[0]!.attempts}`);
    assert.equal(stuck.deliveries[0]!.lastStatusCode, 503);
    assert.match(await currentDetails(handle), /Propagation \*\*stuck\*\*/);
    const stuckEvent = (await store.readAudit(ctx.pool, issued.tokenId)).find((e) => e.kind === 'propagation.stuck');
    assert.match(stuckEvent!.canonical, /"attempts":[1-9]/);

    const missing = await updateRejection(retriedUpdate(handle, forceCompleteUpdate, { args: [{} as never] }));
    assert.equal(missing.nonRetryable, true);
    assert.match(missing.message, /^reason: /);
    const forced = await retriedUpdate(handle, forceCompleteUpdate, {
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
    const details = await currentDetails(handle);
    // Who forced it and why stay in the final details.
    assert.match(
      details,
      /Propagation \*\*complete\*\*, forced by ops:dan \(receiver decommissioned\): 0 of 1 receivers confirmed, 1 forced/,
    );
    assert.doesNotMatch(details, /every receiver confirmed/);
    assert.equal((await handle.query(describeQuery)).phase, 'complete');
    await maybeRecordHistory(handle, 'escalate-force');
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
      await retriedUpdate(handle, forceCompleteUpdate, { args: [{ reason: 'receiver retired' }] });
      await waitUntil(
        async () => (await handle.describe()).status.name === 'COMPLETED',
        'the workflow to complete',
        15_000,
      );
      assert.equal((await slow.warden.show(issued.tokenId)).propagation, 'complete');
      await assert.rejects(
        retriedUpdate(handle, forceCompleteUpdate, { args: [{ reason: 'again' }] }),
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
    const text = historyText(await decodedHistory(handleOf(issued.tokenId))).join('\n');
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
    await maybeRecordHistory(handleOf(issued.tokenId), 'malformed-revoke');
  });
  it('should deliver again, never as a rejection, when the server ends a delivery after Retry-After: 0', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = (n) => (n <= 2 ? { status: 503, headers: { 'retry-after': '0' } } : { status: 204 });
    const issued = await ctx.warden.issue({ subject: 'usr_retry_after_0', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'transient receiver' });
    const done = await result(issued.tokenId);
    assert.equal(done.forced, false);
    assert.equal(a.receiver.requests.length, 3);
    assert.equal(a.receiver.acked().length, 1);
    assert.deepEqual((await ctx.warden.show(issued.tokenId)).deliveries[0]!.attempts, 3);
    const kinds = await auditKinds(issued.tokenId);
    assert.ok(!kinds.includes('propagation.stuck'), `a transient answer never escalates: ${kinds.join(',')}`);
  });

  it('should deliver again after a pause when a delivery activity ends with a failure of another type', async () => {
    // Fault at the activity boundary: the real attempt reaches the real receiver, then the activity
    // ends as a worker-side fault would end it (non-retryable, not the receiver's rejection).
    await worker?.stop();
    let calls = 0;
    const faulty = await ctx.startWorker(ctx.settings, {
      wrapActivities: (real) => ({
        ...real,
        async deliverRevocation(input) {
          calls++;
          try {
            return await real.deliverRevocation(input);
          } catch (err) {
            if (calls > 1) throw err;
            throw ApplicationFailure.create({
              message: `attempt ended by the worker: ${(err as Error).message}`,
              type: RECEIVER_UNAVAILABLE,
              nonRetryable: true,
            });
          }
        },
      }),
    });
    try {
      const a = await addReceiver();
      // The first attempt (made for every receiver together) gets a 503; the first one-by-one
      // attempt gets another, which the fault turns into that ending; the next one is delivered.
      a.receiver.behaviour = (n) => (n <= 2 ? { status: 503 } : { status: 204 });
      const issued = await ctx.warden.issue({ subject: 'usr_ended', receivers: [a.id], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'worker fault drill' });
      const done = await result(issued.tokenId);
      assert.equal(done.deliveries[0]!.status, 'delivered');
      assert.equal(done.deliveries[0]!.attempts, 3, 'the workflow reports the store row');
      assert.equal(calls, 2);
      assert.deepEqual(
        a.receiver.requests.map((r) => [r.answered, r.verified]),
        [
          [503, true],
          [503, true],
          [204, true],
        ],
      );
      assert.equal(new Set(a.receiver.requests.map((r) => r.headers['webhook-id'])).size, 1);
      const kinds = await auditKinds(issued.tokenId);
      assert.ok(!kinds.includes('propagation.stuck'), kinds.join(','));
      const text = historyText(await decodedHistory(handleOf(issued.tokenId))).join('\n');
      assert.match(text, new RegExp(`pause before delivering to ${a.id} again`), 'a durable pause, not a spin');
      await maybeRecordHistory(handleOf(issued.tokenId), 'delivery-ended-retried');
    } finally {
      await faulty.stop();
    }
  });

  it('should audit every escalation of a workflow restarted after it was terminated', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_two_escalations', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
    await waitUntil(propagationIs(issued.tokenId, 'stuck'), 'the first escalation');
    await retriedUpdate(handleOf(issued.tokenId), retryPropagationUpdate, { args: [{ reason: 'receiver restarted' }] });
    await waitUntil(propagationIs(issued.tokenId, 'pending'), 'propagation pending after the retry');
    await handleOf(issued.tokenId).terminate('drill: the worker fleet lost this run');

    await restartAsReconcilerDoes(issued.tokenId);
    await waitUntil(propagationIs(issued.tokenId, 'stuck'), 'the restarted run to escalate');
    const kinds = await auditKinds(issued.tokenId);
    assert.deepEqual(
      kinds.filter((k) => k.startsWith('propagation.')),
      ['propagation.stuck', 'propagation.retry-requested', 'propagation.pending', 'propagation.stuck'],
    );
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, issued.tokenId)), null);
    await retriedUpdate(handleOf(issued.tokenId), forceCompleteUpdate, { args: [{ reason: 'drill over' }] });
    await result(issued.tokenId);
  });

  it('should resume a restarted run where the store says: rejected deliveries wait, stuck stays stuck, the rest go on', async () => {
    await ensureWorker();
    const rejecting = await addReceiver();
    const retrying = await addReceiver();
    rejecting.receiver.behaviour = () => ({ status: 410 });
    retrying.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({
      subject: 'usr_restarted',
      receivers: [rejecting.id, retrying.id],
      ttl: '1h',
    });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'contract ended' });
    await waitUntil(propagationIs(issued.tokenId, 'stuck'), 'escalation on the 410');
    await handleOf(issued.tokenId).terminate('drill: the worker fleet lost this run');
    const firstRun = rejecting.receiver.requests.length;
    assert.equal(firstRun, 1);
    retrying.receiver.behaviour = () => ({ status: 200 });

    await restartAsReconcilerDoes(issued.tokenId);
    const handle = handleOf(issued.tokenId);
    const view = await waitUntil(async () => {
      const v = await handle.query(describeQuery);
      return v.deliveries.find((d) => d.receiverId === retrying.id)?.status === 'delivered' && v;
    }, 'the retryable delivery to go on in the new run');
    assert.equal(view.phase, 'stuck');
    assert.equal(view.propagation, 'stuck');
    const gone = view.deliveries.find((d) => d.receiverId === rejecting.id)!;
    assert.deepEqual([gone.status, gone.attempts, gone.lastStatusCode], ['failed', 1, 410]);
    assert.equal(await propagationAttribute(handle), 'stuck');
    const details = await currentDetails(handle);
    assert.match(details, /Propagation \*\*stuck\*\*: 1 of 2 receivers confirmed/);
    assert.match(details, new RegExp(`${rejecting.id}\`: rejected after 1 attempt`));

    // Only an operator sends the rejected delivery again.
    rejecting.receiver.behaviour = () => ({ status: 204 });
    const retried = await retriedUpdate(handle, retryPropagationUpdate, { args: [{ reason: 'endpoint restored' }] });
    assert.deepEqual(retried.retrying, [rejecting.id]);
    const done = await result(issued.tokenId);
    assert.equal(done.propagation, 'complete');
    assert.equal(rejecting.receiver.requests.length, 2, 'one attempt before the restart, one after the retry');
    // The new run did not even try the rejected delivery before the operator asked (the delivery
    // activity's own guard would have refused to send, hiding it from the receiver's count).
    const scheduledFor = (receiverId: string) => (history: Awaited<ReturnType<typeof handle.fetchHistory>>) =>
      (history.events ?? []).filter((e) => {
        const a = e.activityTaskScheduledEventAttributes;
        if (a?.activityType?.name !== 'deliverRevocation') return false;
        const data = a.input?.payloads?.[0]?.data;
        return data
          ? (JSON.parse(Buffer.from(data).toString('utf8')) as { receiverId: string }).receiverId === receiverId
          : false;
      }).length;
    assert.equal(scheduledFor(rejecting.id)(await decodedHistory(handle)), 1, 'only after the operator retry');
    const kinds = await auditKinds(issued.tokenId);
    assert.equal(kinds.filter((k) => k === 'propagation.stuck').length, 1, kinds.join(','));
    await maybeRecordHistory(handle, 'restart-adopts-stuck');
  });

  it("should propagate with the worker's timing, not the issuer's, and show it", async () => {
    // The issuing process has slow settings; the worker's fast ones must be the ones in force.
    const issuer = await TestContext.create('lifecycle_timing', {
      escalateAfterMs: 3_600_000,
      retryInitialMs: 30_000,
      retryMaxMs: 60_000,
    });
    const fastWorker = await issuer.startWorker({
      ...issuer.settings,
      timing: { escalateAfterMs: 1_000, retryInitialMs: 100, retryMaxMs: 400 },
    });
    try {
      const r = await TestReceiver.start();
      receivers.push(r);
      r.secret = (await issuer.warden.addReceiver({ id: 'slowpoke', url: r.url })).secret;
      r.behaviour = () => ({ status: 503 });
      const issued = await issuer.warden.issue({ subject: 'usr_timing', receivers: ['slowpoke'], ttl: '1h' });
      await issuer.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
      await waitUntil(() => r.requests.length >= 4, "retries at the worker's pace", 5_000);
      await waitUntil(
        async () => (await store.requireToken(issuer.pool, issued.tokenId)).propagation === 'stuck',
        "escalation after the worker's 1 s",
        5_000,
      );
      const handle = issuer.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      const view = await handle.query(describeQuery);
      assert.deepEqual(view.timing, {
        escalateAfterMs: 1_000,
        retryInitialMs: 100,
        retryMaxMs: 400,
        source: 'worker',
      });
      assert.match(
        await currentDetails(handle),
        /Timing \(from the worker\): escalate after 1 s; retries from 100 ms, doubling up to 400 ms\./,
      );
      await retriedUpdate(handle, forceCompleteUpdate, { args: [{ reason: 'drill over' }] });
    } finally {
      await fastWorker.stop();
      await issuer.close();
    }
  });

  it('should show the escalation deadline and the pending state while receivers retry', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = (n) => (n <= 3 ? { status: 503 } : { status: 204 });
    const issued = await ctx.warden.issue({ subject: 'usr_pending', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'rotation' });
    const handle = handleOf(issued.tokenId);
    const view = await waitUntil(async () => {
      const v = await handle.query(describeQuery);
      return v.phase === 'propagating' && v;
    }, 'phase propagating');
    assert.ok(view.escalateAt && Date.parse(view.escalateAt) > Date.now() - 1_000, String(view.escalateAt));
    assert.equal(view.timing?.source, 'worker');
    const details = await currentDetails(handle);
    assert.match(details, /Propagation \*\*pending\*\*: 0 of 1 receivers confirmed; escalates to stuck at /);
    await result(issued.tokenId);
    assert.match(await currentDetails(handle), /Propagation \*\*complete\*\*: every receiver confirmed\./);
    assert.equal((await handle.query(describeQuery)).deliveries[0]!.attempts, 4);
  });

  it('should refuse operator Updates on a live token with a non-retryable failure', async () => {
    await ensureWorker();
    const issued = await ctx.warden.issue({ subject: 'usr_alive', ttl: '1h' });
    const handle = handleOf(issued.tokenId);
    const refused = await updateRejection(retriedUpdate(handle, forceCompleteUpdate, { args: [{ reason: 'x' }] }));
    assert.equal(refused.nonRetryable, true);
    assert.equal(refused.type, NOT_PROPAGATING);
    assert.match(refused.message, /is not propagating a revocation \(phase active\)/);
    assert.match(await currentDetails(handle), /^\*\*active\*\* until /);
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'done' });
    await result(issued.tokenId);
  });

  it("should accept an operator's forceComplete while the workflow's kill is still committing", async () => {
    // The kill (a local activity) waits on a row lock the test holds: the workflow is killing, and
    // its task stays open until the kill returns (the worker heartbeats it, so the Update gets in).
    await worker?.stop();
    const a = await addReceiver();
    a.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_force_killing', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
    const lock = await ctx.sql.connect();
    try {
      await lock.query('BEGIN');
      await lock.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [issued.tokenId]);
      await ensureWorker();
      const handle = handleOf(issued.tokenId);
      await waitUntil(
        async () => (await handle.query(describeQuery)).phase === 'killing',
        'the workflow killing behind the lock',
      );
      const forcing = await handle.startUpdate(forceCompleteUpdate, {
        args: [{ reason: 'receiver retired' }],
        waitForStage: WorkflowUpdateStage.ACCEPTED,
      });
      // Still blocked: the kill has not committed while the Update was accepted.
      assert.equal((await ctx.warden.show(issued.tokenId)).propagationStartedAt, null);
      await lock.query('ROLLBACK');
      assert.deepEqual((await forcing.result()).forced, [a.id]);
      const done = await result(issued.tokenId);
      assert.equal(done.forced, true);
      await maybeRecordHistory(handle, 'force-while-killing');
    } finally {
      await lock.query('ROLLBACK').catch(() => {});
      lock.release();
    }
  });

  it('should continue as new when the server suggests it, even while asleep, and still revoke', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const issued = await ctx.warden.issue({ subject: 'usr_long_lived', receivers: [a.id], ttl: '1h' });
    const handle = handleOf(issued.tokenId);
    await waitUntil(async () => (await handle.query(describeQuery)).phase === 'active', 'the token asleep');
    const { runId: firstRunId } = await handle.describe();
    // Signals without a handler (e.g. a mistyped batch operation) only grow the history: with no
    // worker polling, each one is one event, and the server suggests continue-as-new past 4096.
    await worker!.stop();
    for (let sent = 0; sent < 4_200; sent += 200) {
      await Promise.all(Array.from({ length: 200 }, () => handle.signal('ping')));
    }
    await ensureWorker();
    await waitUntil(async () => (await handle.describe()).runId !== firstRunId, 'a new run', 30_000);
    const first = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId), firstRunId);
    assert.equal((await first.describe()).status.name, 'CONTINUED_AS_NEW');
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'after a long sleep' });
    const done = await result(issued.tokenId);
    assert.equal(done.propagation, 'complete');
    assert.equal(a.receiver.acked().length, 1);
    await maybeRecordHistory(first, 'continue-as-new', { gzip: true });
  });

  it('should wait for the database clock when the workflow reaches expiry first', async () => {
    await ensureWorker();
    const a = await addReceiver();
    const token = await store.insertToken(ctx.pool, {
      tokenId: newTokenId(),
      credentialId: newCredentialId(),
      subject: 'usr_clock',
      name: null,
      scopes: [],
      receivers: [a.id],
      ttlMs: 3_000,
      secretHash: randomBytes(32),
    });
    // The workflow believes expiry comes 2 s before the store does: a database clock 2 s behind.
    const early = new Date(Date.parse(token.expiresAt) - 2_000).toISOString();
    await startTokenWorkflow(
      ctx.client,
      { ...token, expiresAt: early },
      ctx.settings.temporal.taskQueue,
      ctx.settings.timing,
    );
    const done = await result(token.id);
    assert.equal(done.status, 'expired');
    const row = await store.requireToken(ctx.pool, token.id);
    assert.ok(Date.parse(row.revokedAt!) >= Date.parse(row.expiresAt), 'killed only once the store says expired');
    const text = historyText(await decodedHistory(handleOf(token.id))).join('\n');
    assert.match(text, /waiting for the database clock to reach expiry/);
    await maybeRecordHistory(handleOf(token.id), 'database-clock-wait');
  });

  it('should end as cancelled when the workflow is cancelled mid-propagation, leaving the store unfinished', async () => {
    await ensureWorker();
    const a = await addReceiver();
    a.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_cancel', receivers: [a.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'offboarding' });
    await waitUntil(() => a.receiver.requests.length >= 1, 'a delivery attempt');
    const handle = handleOf(issued.tokenId);
    await handle.cancel();
    await waitUntil(async () => (await handle.describe()).status.name === 'CANCELLED', 'the workflow to end cancelled');
    // The reconciler finishes what a closed workflow left unfinished.
    assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).propagation, 'pending');
    await maybeRecordHistory(handle, 'cancelled-mid-propagation');
  });
});
