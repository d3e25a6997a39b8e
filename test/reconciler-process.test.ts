/**
 * The reconciler on a real worker process: what it counts in the worker's metrics, the process's
 * expiry sweep, and a pass whose worker is SIGKILLed mid-page retrying the lost page on a fresh
 * worker within the heartbeat timeout.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError } from '@temporalio/client';
import type { ApplicationFailure } from '@temporalio/common';
import { tsToMs } from '@temporalio/common/lib/time.js';
import { PACKAGE_ROOT } from '../common/config.js';
import { EXPIRY_SWEEP_METRIC, RECONCILER_METRIC, WORKFLOW_TYPE, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { freePort } from '../dev/processes.js';
import type { ReconcileInput, ReconcileReport } from '../common/messages.js';
import { insertTokenRow } from './support/tokens.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { runOutput } from './support/run-record.js';
import { waitUntil } from './support/wait.js';
import { WedgingWorker } from './support/wedging.js';

let ctx: TestContext;
let receiver: TestReceiver;
let wedging: WedgingWorker;
let child: ChildProcess;
let childExited: Promise<unknown>;
const childOutput: string[] = [];
let metricsUrl: string;
let worker: RunningWorker | undefined;

before(async () => {
  ctx = await TestContext.create('reconcilerproc');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'audit-log', url: receiver.url })).secret;
  wedging = await WedgingWorker.start(ctx);
  const metricsAddress = `127.0.0.1:${await freePort()}`;
  metricsUrl = `http://${metricsAddress}/metrics`;
  // The only worker on the file's task queue until the crash test starts a fresh one.
  child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'worker', '--no-schedule'], {
    env: { ...ctx.childEnv(), TOKENWARDEN_METRICS_ADDRESS: metricsAddress },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const log = runOutput('worker');
  const keep = (chunk: Buffer) => {
    childOutput.push(chunk.toString());
    log(chunk);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  childExited = new Promise((resolve) => child.once('exit', resolve));
});
after(async () => {
  child?.kill('SIGKILL');
  await childExited;
  await worker?.stop();
  await wedging?.stop();
  await receiver?.close();
  await ctx?.close();
});

const insertOnly = (ttlMs: number) => insertTokenRow(ctx.pool, { subject: 'usr_reconcile', ttlMs });

const startPass = () =>
  ctx.client.workflow.start(WORKFLOW_TYPE.reconcile, {
    workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
    taskQueue: ctx.settings.temporal.taskQueue,
    args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
  });

/** Sum of a counter's samples in Prometheus text format whose labels include `labels`. */
function counter(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    const match = /^(\w+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match || (match[1] !== name && match[1] !== `${name}_total`)) continue;
    const have = match[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => have.includes(`${k}="${v}"`))) sum += Number(match[3]);
  }
  return sum;
}

describe('reconciler on a worker process', () => {
  it('should count healed rows, rows it cannot heal and wedged propagations in the metrics', async (t) => {
    const wedged = await wedging.wedgedToken('audit-log', 'after the workflow took over');
    await wedging.waitWedged([wedged]);
    const healable = await insertOnly(3_600_000);
    const broken = await insertOnly(3_600_000);
    await ctx.sql.query(`CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'injected fault on %', OLD.id; END $$`);
    await ctx.sql.query(
      `CREATE TRIGGER refuse_update BEFORE UPDATE ON token FOR EACH ROW WHEN (OLD.id = '${broken.id}') EXECUTE FUNCTION refuse_update()`,
    );
    try {
      const failure = await (await startPass()).result().then(
        () => assert.fail('the pass should fail'),
        (err: unknown) => err,
      );
      assert.ok(failure instanceof WorkflowFailedError, `${String(failure)}\n${childOutput.join('')}`);
      const report = (failure.cause as ApplicationFailure).details?.[0] as ReconcileReport;
      assert.deepEqual(
        report.errors.map((e) => e.tokenId),
        [broken.id],
      );
      assert.ok(report.wedged.includes(wedged) && report.started.includes(healable.id), JSON.stringify(report));
    } finally {
      await ctx.sql.query('DROP TRIGGER refuse_update ON token');
      await ctx.sql.query('DROP FUNCTION refuse_update()');
    }
    const text = await (await fetch(metricsUrl)).text();
    t.diagnostic(
      text
        .split('\n')
        .filter((line) => line.startsWith('tokenwarden_'))
        .join('\n'),
    );
    assert.ok(counter(text, RECONCILER_METRIC.wedged) >= 1, text);
    assert.ok(counter(text, RECONCILER_METRIC.errors, { set: 'unstarted' }) >= 1, text);
    assert.ok(counter(text, RECONCILER_METRIC.healed, { action: 'started' }) >= 1, text);
    assert.ok((await store.requireToken(ctx.pool, healable.id)).workflowStartedAt);
  });

  it('should record expired tokens dead from its expiry sweep, with no pass and no workflow, and count them', async () => {
    const expired = await insertOnly(300);
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, expired.id)).status === 'expired',
      'the sweep to record the death',
      10_000,
    );
    const row = await store.requireToken(ctx.pool, expired.id);
    assert.equal(row.revokedAt, row.expiresAt);
    assert.equal(row.propagationStartedAt, null, 'no workflow took over');
    await waitUntil(
      async () => counter(await (await fetch(metricsUrl)).text(), EXPIRY_SWEEP_METRIC.swept) >= 1,
      'the sweep counted in the metrics',
    );
  });

  it('should retry the lost page within a minute when its worker process is SIGKILLed mid-pass', async (t) => {
    const orphan = await insertOnly(3_600_000);
    // A long lock on the row holds the pass in the middle of its unstarted page (recording the start
    // of the orphan's workflow): a pass in flight.
    const locker = await ctx.sql.connect();
    try {
      await locker.query('BEGIN');
      await locker.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [orphan.id]);
      const lockerPid = (await locker.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
      const pass = await startPass();
      await waitUntil(
        async () =>
          (await ctx.sql.query('SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))', [lockerPid]))
            .rowCount === 1,
        'the pass to wait on the locked row',
        90_000,
      );
      const killedAt = Date.now();
      child.kill('SIGKILL');
      await childExited;
      await locker.query('ROLLBACK');

      // The dead worker's own statement commits once the lock is released (PostgreSQL finishes a
      // statement whose client died), so the row heals at once whatever the pass does: the retry of
      // the lost page must come within a minute (heartbeat timeout 30 s; the 2-minute start-to-close
      // timeout alone would retry it about two minutes after the attempt began).
      worker = await ctx.startWorker();
      const firstRun = ctx.client.workflow.getHandle(pass.workflowId, pass.firstExecutionRunId);
      const retriedStart = async () =>
        ((await decodedHistory(firstRun)).events ?? []).find(
          (e) => (e.activityTaskStartedEventAttributes?.attempt ?? 0) >= 2,
        );
      await waitUntil(async () => (await retriedStart()) !== undefined, 'the lost page to be retried', 150_000, 500);
      const retryMs = tsToMs((await retriedStart())!.eventTime) - killedAt;
      t.diagnostic(`the lost page was retried ${(retryMs / 1000).toFixed(1)} s after the worker process was SIGKILLed`);
      assert.ok(retryMs < 60_000, `retried after ${retryMs} ms`);

      const report = (await pass.result()) as ReconcileReport;
      assert.deepEqual(report.errors, [], JSON.stringify(report));
      assert.ok((await store.requireToken(ctx.pool, orphan.id)).workflowStartedAt, 'the orphan adopted');
      const described = await ctx.client.workflow.getHandle(tokenWorkflowId(orphan.id)).describe();
      assert.equal(described.status.name, 'RUNNING');
    } finally {
      locker.release();
    }
  });
});
