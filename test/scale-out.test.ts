/**
 * Scaling out: two `tokenwarden worker` processes on one task queue share expiries and revocations;
 * every token dies once, every receiver gets each event once, and both processes did part of it.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { tokenWorkflowId } from '../common/names.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { inLanes, workflowResults } from './support/fault.js';
import { propagationProblems, readFacts, receiverProblems } from './support/invariants.js';
import { TestReceiver } from './support/receiver.js';
import { WorkerProcess } from './support/worker-process.js';

const TOKENS = 24;

let ctx: TestContext;
let receiver: TestReceiver;
const workers: WorkerProcess[] = [];

before(async () => {
  ctx = await TestContext.create('scaleout');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'shared', url: receiver.url })).secret;
});
after(async () => {
  for (const w of workers) await w.stop();
  await receiver?.close();
  await ctx?.close();
});

describe('two worker processes on one task queue', () => {
  it('should share the work: each token killed and delivered once, by both processes', async () => {
    // Small capacities, so that neither process can take everything while the other starts polling.
    const env = { ...ctx.childEnv(), TOKENWARDEN_WORKFLOW_TASK_SLOTS: '4', TOKENWARDEN_ACTIVITY_SLOTS: '4' };
    workers.push(...(await Promise.all([WorkerProcess.start(env, ctx.client), WorkerProcess.start(env, ctx.client)])));

    const issue = (ttl: string) => (i: number) =>
      ctx.warden.issue({ subject: `usr_scale_${i}`, receivers: ['shared'], ttl }).then((t) => t.tokenId);
    const indexes = Array.from({ length: TOKENS / 2 }, (_, i) => i);
    const expiring = await inLanes(indexes, 4, issue('3s'));
    const revoked = await inLanes(indexes, 4, issue('1h'));
    await inLanes(revoked, 4, (tokenId) => ctx.warden.revoke({ tokenId, reason: 'scale-out test' }));

    const tokenIds = [...expiring, ...revoked];
    await workflowResults(ctx.client, tokenIds, 120_000);
    const facts = await readFacts(ctx.pool, tokenIds);
    assert.deepEqual([...facts.flatMap(propagationProblems), ...receiverProblems('shared', receiver, tokenIds)], []);
    assert.deepEqual(
      facts.map((f) => f.status).sort(),
      [...expiring.map(() => 'expired'), ...revoked.map(() => 'revoked')].sort(),
    );

    // Who did the work: the SDK names each process `<pid>@<host>` in the tasks it started.
    const seen = { workflowTasks: new Set<string>(), activities: new Set<string>() };
    for (const tokenId of tokenIds) {
      const { events } = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)));
      for (const e of events ?? []) {
        const wft = e.workflowTaskStartedEventAttributes?.identity;
        if (wft) seen.workflowTasks.add(wft.split('@')[0]!);
        const activity = e.activityTaskStartedEventAttributes?.identity;
        if (activity) seen.activities.add(activity.split('@')[0]!);
      }
    }
    const pids = workers.map((w) => String(w.pid)).sort();
    assert.deepEqual([...seen.workflowTasks].sort(), pids, 'workflow tasks ran on both processes');
    assert.deepEqual([...seen.activities].sort(), pids, 'deliveries ran on both processes');
  });
});
