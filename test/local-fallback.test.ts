/**
 * A local store call that cannot finish (the token's row locked by someone else) gives up after its
 * schedule-to-close timeout and goes through the server as an ordinary activity: the workflow task
 * is not held open (and the history does not grow) for as long as the store stays blocked.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import proto from '@temporalio/proto';
import { tokenWorkflowId } from '../common/names.js';
import { revokeSignal, type TokenLifecycleResult } from '../common/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { maybeRecordHistory, decodedHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';

const { EventType } = proto.temporal.api.enums.v1;

let ctx: TestContext;
let worker: RunningWorker | undefined;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('fallback');
  worker = await ctx.startWorker();
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

describe('a local store call that cannot finish', () => {
  it('should go through the server as an ordinary activity, then revoke once the row is free', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_fallback', receivers: ['billing'], ttl: '1h' });
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
    const lock = await ctx.sql.connect();
    try {
      await lock.query('BEGIN');
      await lock.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [issued.tokenId]);
      // A bare Signal (the library would block on the row too): the workflow's own kill waits.
      await handle.signal(revokeSignal, { reason: 'row locked', actor: 'test' });
      const scheduled = async () =>
        ((await decodedHistory(handle)).events ?? []).some(
          (e) =>
            e.eventType === EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED &&
            e.activityTaskScheduledEventAttributes?.activityType?.name === 'killAndLoad',
        );
      await waitUntil(scheduled, 'the kill scheduled as an ordinary activity', 90_000, 500);
      const events = (await decodedHistory(handle)).events ?? [];
      // About 30 s of a held task (a heartbeat every 8 s), not an ever-growing history.
      assert.ok(events.length < 60, `${events.length} events`);
      assert.equal((await ctx.warden.show(issued.tokenId)).status, 'active', 'still blocked');
      await lock.query('ROLLBACK');
      const done = (await handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'revoked');
      assert.deepEqual(
        done.deliveries.map((d) => d.status),
        ['delivered'],
      );
      assert.equal(receiver.requests.length, 1);
      await maybeRecordHistory(handle, 'local-kill-fallback');
    } finally {
      await lock.query('ROLLBACK').catch(() => {});
      lock.release();
    }
  });
});
