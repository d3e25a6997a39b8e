/**
 * A long-lived token on the real engine, served by a `tokenwarden worker` process (as production
 * runs it): automatic rotations keep every secret out of history and out of the worker's output;
 * thousands of messages make the workflow continue as new, carrying its state, and it keeps working.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  describeQuery,
  policyChangedSignal,
  scheduleRevokeUpdate,
  type TokenLifecycleResult,
} from '../common/messages.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { maybeRecordHistory, decodedHistory } from './support/history.js';
import { SecretScan } from './support/secret-scan.js';
import { insertPolicy, isValid, ownerFolder, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';
import { WorkerProcess } from './support/worker-process.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: WorkerProcess;

before(async () => {
  ctx = await TestContext.create('longlife');
  worker = await WorkerProcess.start(ctx.childEnv(), ctx.client);
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

const runsOf = async (workflowId: string): Promise<string[]> => {
  const runs: string[] = [];
  for await (const w of ctx.client.workflow.list({ query: `WorkflowId = '${workflowId}'` })) runs.push(w.runId);
  return runs;
};

describe('long life', () => {
  it('should rotate automatically with no secret in any history or in the worker output', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, { name: 'rotate-often', rotateEveryMs: 1_000, graceMs: 200, ownerDir: dir });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    const secrets = await waitUntil(
      () => {
        const files = readdirSync(dir).filter((f) => f.startsWith(`${t.tokenId}.cred_`));
        return files.length >= 3 && files;
      },
      'three automatic rotations',
      30_000,
    );
    const tokens = secrets.map((f) => (JSON.parse(readFileSync(path.join(dir, f), 'utf8')) as { token: string }).token);
    // The latest delivered secret works (the rotation after it may already have happened: one of the last two).
    const valid = await Promise.all(tokens.map((s) => isValid(ctx, s)));
    assert.ok(valid.some(Boolean), 'a delivered secret is valid');

    const scan = new SecretScan();
    scan.addToken('the issued token', t.token);
    tokens.forEach((s, i) => scan.addToken(`rotation ${i + 1}`, s));
    const runs = await runsOf(t.handle.workflowId);
    assert.ok(runs.length >= 3, `each rotation continues as new (${runs.length} runs)`);
    for (const runId of runs) {
      const history = await decodedHistory(ctx.client.workflow.getHandle(t.handle.workflowId, runId));
      scan.search(`run ${runId}`, JSON.stringify(history));
    }
    scan.searchOutput('the worker process', worker.output.join('\n'));
    assert.deepEqual(scan.hits(), [], scan.summary());
  });

  it('should keep working through continue-as-new under thousands of messages', async () => {
    const t = await startToken(ctx, { ttlMs: 600_000 });
    const first = (await t.handle.describe()).runId;
    const far = Date.now() + 3_600_000;
    const updates = 300;
    const signals = 2_000;
    let nextUpdate = 0;
    let nextSignal = 0;
    const started = Date.now();
    await Promise.all([
      // The server admits at most 10 Updates in flight per workflow: 8 callers at once.
      ...Array.from({ length: 8 }, async () => {
        while (nextUpdate < updates) {
          const n = nextUpdate++;
          await retriedUpdate(t.handle, scheduleRevokeUpdate, {
            args: [{ at: new Date(far + n * 1000).toISOString(), reason: `schedule ${n}` }],
          });
        }
      }),
      ...Array.from({ length: 16 }, async () => {
        while (nextSignal < signals) {
          nextSignal++;
          await t.handle.signal(policyChangedSignal, {});
        }
      }),
    ]);
    console.log(`${updates} updates and ${signals} signals in ${Date.now() - started} ms`);
    // Every handler ran (each policyChanged reads the policy in an activity) before the last run went on.
    await waitUntil(async () => (await runsOf(t.handle.workflowId)).length >= 2, 'continue-as-new', 60_000, 500);
    const runs = await runsOf(t.handle.workflowId);
    assert.ok(runs.length >= 2, `continued as new (${runs.length} runs)`);
    assert.notEqual((await t.handle.describe()).runId, first);
    assert.equal((await t.handle.query(describeQuery)).phase, 'active');

    // The carried state still works: a schedule close by revokes on time.
    const at = new Date(Date.now() + 2_000).toISOString();
    await retriedUpdate(t.handle, scheduleRevokeUpdate, { args: [{ at, reason: 'after the load' }] });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).revokeReason, 'after the load');
    await maybeRecordHistory(t.handle, 'long-life-after-continue-as-new', { gzip: true });
  });
});
