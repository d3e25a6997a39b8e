/** Crash points between the store and the workflows, healed by the reconciler (never by luck). */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { WORKFLOW_TYPE, RECONCILER_SCHEDULE_ID, tokenWorkflowId } from '../common/names.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { ensureReconcilerSchedule } from '../worker/worker.js';
import type { ReconcileInput, ReconcileReport, TokenLifecycleResult } from '../workflows/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('reconciler');
  worker = await ctx.startWorker();
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'audit-log', url: receiver.url })).secret;
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

async function reconcileNow(): Promise<ReconcileReport> {
  return ctx.client.workflow.execute(WORKFLOW_TYPE.reconcile, {
    workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
    taskQueue: ctx.settings.temporal.taskQueue,
    args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
  });
}

/** Step one of issuing without step two: the issuer died between the commit and the workflow start. */
const insertOnly = (ttlMs: number) =>
  store.insertToken(ctx.pool, {
    tokenId: newTokenId(),
    credentialId: newCredentialId(),
    subject: 'usr_reconcile',
    name: null,
    scopes: [],
    receivers: ['audit-log'],
    ttlMs,
    secretHash: randomBytes(32),
  });

describe('reconciler', () => {
  it('should heal a crash between the store kill and the signal', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_reconcile', receivers: ['audit-log'], ttl: '1h' });
    // The revoke path's first step only: dead in the store, the workflow never told.
    await store.killToken(ctx.pool, {
      tokenId: issued.tokenId,
      reason: 'crash drill',
      actor: 'admin',
      initiatingEntity: 'admin',
    });
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
    assert.equal((await handle.describe()).status.name, 'RUNNING');

    const report = await reconcileNow();
    assert.ok(report.signalled.includes(issued.tokenId));
    const done = (await handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    assert.equal(done.propagation, 'complete');
    const event = receiver.requests.map((r) => JSON.parse(r.body)).find((e) => e.token_id === issued.tokenId);
    assert.equal(event.reason, 'crash drill');

    const again = await reconcileNow();
    assert.ok(!again.signalled.includes(issued.tokenId), 'a healed token is left alone');
  });

  it('should start the workflow of a token whose issuer died before starting it', async () => {
    const token = await insertOnly(3_600_000);
    const report = await reconcileNow();
    assert.ok(report.started.includes(token.id));
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(token.id));
    assert.equal((await handle.describe()).status.name, 'RUNNING');
    assert.ok((await store.requireToken(ctx.pool, token.id)).workflowStartedAt);
    assert.ok(!(await reconcileNow()).started.includes(token.id));
  });

  it('should start the workflow from revoke itself when none runs for the token', async () => {
    const token = await insertOnly(3_600_000);
    const outcome = await ctx.warden.revoke({ tokenId: token.id, reason: 'never started' });
    assert.equal(outcome.changed, true);
    assert.equal(outcome.workflowSignalled, true);
    const done = (await ctx.client.workflow.getHandle(tokenWorkflowId(token.id)).result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    assert.equal(done.propagation, 'complete');
  });

  it('should kill an overdue token as expired and propagate it', async () => {
    const token = await insertOnly(1);
    await ctx.sql.query('SELECT pg_sleep(0.01)');
    const report = await reconcileNow();
    assert.ok(report.expired.includes(token.id));
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(token.id));
    const done = (await handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
    const shown = await store.requireToken(ctx.pool, token.id);
    // An expired token died at its expiry, by the system, whoever recorded it.
    assert.equal(shown.revokedBy, 'system');
    assert.equal(shown.revokedAt, shown.expiresAt);
    assert.equal(shown.propagation, 'complete');
  });

  for (const how of ['terminated', 'cancelled'] as const) {
    it(`should finish a propagation whose workflow was ${how} mid-way`, async () => {
      receiver.behaviour = () => ({ status: 503 });
      const issued = await ctx.warden.issue({ subject: 'usr_reconcile', receivers: ['audit-log'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: `${how} drill` });
      const eventOf = (r: { body: string }) => JSON.parse(r.body).token_id === issued.tokenId;
      await waitUntil(() => receiver.requests.some(eventOf), 'a first delivery attempt');
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      if (how === 'terminated') await handle.terminate('operator mistake');
      else await handle.cancel();
      await assert.rejects(handle.result());
      assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).propagation, 'pending');

      receiver.behaviour = () => ({ status: 204 });
      const report = await reconcileNow();
      assert.ok(report.restarted.includes(issued.tokenId), JSON.stringify(report));
      const done = (await ctx.client.workflow
        .getHandle(tokenWorkflowId(issued.tokenId))
        .result()) as TokenLifecycleResult;
      assert.equal(done.propagation, 'complete');
      assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).propagation, 'complete');
      assert.ok(!(await reconcileNow()).restarted.includes(issued.tokenId));
    });
  }

  it('should create its schedule once, every minute', async () => {
    await ensureReconcilerSchedule(ctx.client, ctx.settings);
    await ensureReconcilerSchedule(ctx.client, ctx.settings);
    const handle = ctx.client.schedule.getHandle(RECONCILER_SCHEDULE_ID);
    const described = await handle.describe();
    assert.equal(described.spec.intervals?.[0]?.every, 60_000);
    assert.equal(described.action.type, 'startWorkflow');
    await handle.delete();
  });
});
