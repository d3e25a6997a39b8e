/** Crash points between the store and the workflows, healed by the reconciler (never by luck). */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError } from '@temporalio/client';
import { ApplicationFailure, defaultPayloadConverter } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import {
  createReconcilerActivities,
  type ReconcilePageInput,
  type ReconcilePageResult,
} from '../activities/reconciler.js';
import { createPool } from '../common/db.js';
import { revocationEventId } from '../common/ids.js';
import {
  WORKFLOW_TYPE,
  RECONCILER_SCHEDULE_ID,
  RECONCILER_WORKFLOW_ID,
  tokenWorkflowId,
  type ReconcileSet,
} from '../common/names.js';
import * as store from '../common/store/index.js';
import { ensureReconcilerSchedule } from '../worker/worker.js';
import {
  emptyReconcileReport,
  type ReconcileInput,
  type ReconcileReport,
  type TokenLifecycleResult,
  type TokenWorkflowInput,
} from '../common/messages.js';
import { md } from '../workflows/lifecycle-state.js';
import { describeReconcileReport, RECONCILE_REPORT_SAMPLE } from '../workflows/reconciler.js';
import { insertTokenRow } from './support/tokens.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';
import { WedgingWorker } from './support/wedging.js';

const CRASHING_ISSUER = fileURLToPath(new URL('./support/crashing-issuer.js', import.meta.url));

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;
/** Answers 400: its propagations stay stuck, their workflows waiting for an operator (no retries). */
let rejecting: TestReceiver;

before(async () => {
  ctx = await TestContext.create('reconciler');
  worker = await ctx.startWorker();
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'audit-log', url: receiver.url })).secret;
  rejecting = await TestReceiver.start();
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await rejecting?.close();
  await ctx?.close();
});

/** One pass, started directly; a pass that could not heal every row fails (its report in the failure). */
async function reconcileNow(input: Omit<ReconcileInput, 'version'> = {}): Promise<ReconcileReport> {
  return ctx.client.workflow.execute(WORKFLOW_TYPE.reconcile, {
    workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
    taskQueue: ctx.settings.temporal.taskQueue,
    args: [{ version: 1, graceMs: 0, ...input } satisfies ReconcileInput],
  });
}

/** The report a failed pass carries in its failure. */
async function failedPassReport(pass: Promise<ReconcileReport>): Promise<ReconcileReport> {
  const failure = await pass.then(
    () => assert.fail('the pass should fail'),
    (err: unknown) => err,
  );
  assert.ok(failure instanceof WorkflowFailedError, String(failure));
  const cause = failure.cause;
  assert.ok(cause instanceof ApplicationFailure && cause.type === 'ReconcilePassIncomplete', String(cause));
  return cause.details?.[0] as ReconcileReport;
}

/** Fault injection in the store: rows matching `when` (a condition on OLD) refuse every update. */
async function refusingUpdates<T>(when: string, body: () => Promise<T>): Promise<T> {
  await ctx.sql.query(`CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'injected fault on %', OLD.id; END $$`);
  await ctx.sql.query(
    `CREATE TRIGGER refuse_update BEFORE UPDATE ON token FOR EACH ROW WHEN (${when}) EXECUTE FUNCTION refuse_update()`,
  );
  try {
    return await body();
  } finally {
    await ctx.sql.query('DROP TRIGGER refuse_update ON token');
    await ctx.sql.query('DROP FUNCTION refuse_update()');
  }
}

/** The set of each reconcilePage activity a run scheduled, in order. */
async function pagesOfRun(workflowId: string, runId: string): Promise<ReconcileSet[]> {
  const history = await decodedHistory(ctx.client.workflow.getHandle(workflowId, runId));
  return (history.events ?? []).flatMap((e) => {
    const payload = e.activityTaskScheduledEventAttributes?.input?.payloads?.[0];
    return payload ? [defaultPayloadConverter.fromPayload<ReconcilePageInput>(payload).set] : [];
  });
}

/** Step one of issuing without step two: the issuer died between the commit and the workflow start. */
const insertOnly = (ttlMs: number, receivers = ['audit-log']) =>
  insertTokenRow(ctx.pool, { subject: 'usr_reconcile', receivers, ttlMs });

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

  it("should start (and signal-with-start) the workflow of a token under a policy with the policy's snapshot", async () => {
    await ctx.warden.setPolicy('reconciled', { maxTtl: '2h' });
    const live = await insertOnly(3_600_000);
    const dead = await insertOnly(3_600_000);
    await ctx.sql.query(`UPDATE token SET policy = 'reconciled', policy_version = 1 WHERE id = ANY($1)`, [
      [live.id, dead.id],
    ]);
    await store.killToken(ctx.pool, { tokenId: dead.id, reason: 'drill', actor: 'admin', initiatingEntity: 'admin' });
    const report = await reconcileNow();
    assert.ok(report.started.includes(live.id), JSON.stringify(report));
    assert.ok(report.signalled.includes(dead.id), JSON.stringify(report));
    for (const token of [live, dead]) {
      const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(token.id)));
      const payload = history.events![0]!.workflowExecutionStartedEventAttributes!.input!.payloads![0]!;
      const input = defaultPayloadConverter.fromPayload<TokenWorkflowInput>(payload);
      assert.equal(input.policy?.name, 'reconciled', `the run of ${token.id} knows its policy`);
      assert.equal(input.policy?.maxLifetimeMs, 2 * 3_600_000);
    }
  });

  it('should record the start of a token whose issuer crashed before writing its started mark', async () => {
    const child = spawn(process.execPath, [CRASHING_ISSUER, 'usr_crashed_issuer'], {
      env: ctx.childEnv(),
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let stdout = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    const [, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
    assert.equal(signal, 'SIGKILL');
    const tokenId = stdout.trim();
    assert.match(tokenId, /^tok_[0-9a-f]{32}$/);
    const before = await store.requireToken(ctx.pool, tokenId);
    assert.equal(before.valid, true);
    assert.equal(before.workflowStartedAt, null, 'the mark was still pending when the issuer died');
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(tokenId));
    const { runId } = await handle.describe();

    const report = await reconcileNow();
    assert.ok(report.started.includes(tokenId), JSON.stringify(report));
    assert.ok((await store.requireToken(ctx.pool, tokenId)).workflowStartedAt);
    const after = await handle.describe();
    assert.equal(after.runId, runId, 'the running workflow was kept, not replaced');
    assert.equal(after.status.name, 'RUNNING');
    assert.ok(!(await reconcileNow()).started.includes(tokenId));
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

  it("should kill overdue rows in one statement per page, then tell each one's workflow", async () => {
    const tokens = [await insertOnly(1), await insertOnly(1), await insertOnly(1), await insertOnly(1)];
    await ctx.sql.query('SELECT pg_sleep(0.01)');
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 2);
    let statements = 0;
    pool.on('connect', (client) => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown;
      client.query = ((...args: unknown[]) => (statements++, query(...args))) as typeof client.query;
    });
    const { reconcilePage } = createReconcilerActivities({ pool, client: ctx.client, settings: ctx.settings });
    const page = (afterId: string | null): Promise<ReconcilePageResult> => {
      const input: ReconcilePageInput = { set: 'overdue', afterId, batchSize: 3, graceMs: 0, sampleSize: 20 };
      return new MockActivityEnvironment({ heartbeatTimeoutMs: 30_000 }).run(reconcilePage, input);
    };
    const reports: ReconcileReport[] = [];
    const statementsPerPage: number[] = [];
    try {
      let afterId: string | null = null;
      do {
        statements = 0;
        const result: ReconcilePageResult = await page(afterId);
        statementsPerPage.push(statements);
        reports.push(result.report);
        afterId = result.nextAfterId;
      } while (afterId !== null);
    } finally {
      await pool.end();
    }
    assert.deepEqual(statementsPerPage, [1, 1], 'one kill statement per page of 3 rows');
    const expired = reports.flatMap((r) => r.expired);
    const signalled = reports.flatMap((r) => r.signalled);
    for (const token of tokens) {
      assert.ok(expired.includes(token.id) && signalled.includes(token.id), JSON.stringify(reports));
      const done = (await ctx.client.workflow.getHandle(tokenWorkflowId(token.id)).result()) as TokenLifecycleResult;
      assert.equal(done.status, 'expired');
      assert.equal(done.propagation, 'complete');
    }
  });

  for (const how of ['terminated', 'cancelled'] as const) {
    it(`should finish a propagation whose workflow was ${how} mid-way, delivering the event exactly once`, async () => {
      receiver.behaviour = () => ({ status: 503 });
      const issued = await ctx.warden.issue({ subject: 'usr_reconcile', receivers: ['audit-log'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: `${how} drill` });
      const ofToken = () => receiver.requests.filter((r) => JSON.parse(r.body).token_id === issued.tokenId);
      await waitUntil(() => ofToken().length >= 1, 'a first delivery attempt');
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

      // Across both runs: one logical event, the same bytes every time, accepted once.
      const requests = ofToken();
      const { rows } = await ctx.sql.query('SELECT body FROM delivery WHERE token_id = $1', [issued.tokenId]);
      assert.equal(rows.length, 1, 'one outbox row');
      assert.ok(requests.length >= 2, 'attempts before and after the restart');
      assert.deepEqual(
        new Set(requests.map((r) => r.headers['webhook-id'])),
        new Set([revocationEventId(issued.tokenId)]),
      );
      assert.ok(
        requests.every((r) => r.body === rows[0].body),
        'every attempt sent the outbox body verbatim',
      );
      assert.ok(requests.every((r) => r.verified));
      assert.equal(requests.filter((r) => r.answered === 204).length, 1, 'accepted exactly once');
      const [delivery] = await store.listDeliveries(ctx.pool, issued.tokenId);
      assert.equal(delivery!.status, 'delivered');
    });
  }

  it('should page past propagations that stay stuck with running workflows, in runs that reach every set', async () => {
    // 12 propagations legitimately stuck (their receiver rejects; their workflows wait for an
    // operator), read 5 rows per page: the one whose workflow died sits past the first page.
    rejecting.behaviour = () => ({ status: 400 });
    rejecting.secret = (await ctx.warden.addReceiver({ id: 'rejecting', url: rejecting.url })).secret;
    const tokenIds: string[] = [];
    for (let i = 0; i < 12; i++) {
      const issued = await ctx.warden.issue({ subject: 'usr_paging', receivers: ['rejecting'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'paging drill' });
      tokenIds.push(issued.tokenId);
    }
    await waitUntil(async () => {
      const { rows } = await ctx.sql.query(
        `SELECT count(*)::int AS n FROM token WHERE id = ANY($1) AND propagation = 'stuck' AND propagation_started_at IS NOT NULL`,
        [tokenIds],
      );
      return rows[0].n === 12;
    }, 'every propagation stuck, taken over by its workflow');
    const { rows: ordered } = await ctx.sql.query(
      `SELECT id FROM token WHERE id = ANY($1) ORDER BY propagation_started_at, id`,
      [tokenIds],
    );
    const dead = ordered[7].id as string;
    await ctx.client.workflow.getHandle(tokenWorkflowId(dead)).terminate('operator mistake');

    // An orphan behind them in the last set: one run's budget (one page of each set) cannot reach the
    // end of the stuck propagations, and must not hold up the orphan.
    const orphan = await insertOnly(3_600_000);
    const pass = await ctx.client.workflow.start(WORKFLOW_TYPE.reconcile, {
      workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
      taskQueue: ctx.settings.temporal.taskQueue,
      args: [{ version: 1, graceMs: 0, batchSize: 5, setBudgetMs: 0 } satisfies ReconcileInput],
    });
    const report = (await pass.result()) as ReconcileReport;
    assert.deepEqual(
      report.restarted.filter((id) => tokenIds.includes(id)),
      [dead],
    );
    assert.ok(report.started.includes(orphan.id), JSON.stringify(report));
    assert.equal((await ctx.client.workflow.getHandle(tokenWorkflowId(dead)).describe()).status.name, 'RUNNING');

    const firstRun = await pagesOfRun(pass.workflowId, pass.firstExecutionRunId);
    assert.equal(firstRun.filter((set) => set === 'unfinished').length, 1, `first run: ${firstRun.join(', ')}`);
    assert.ok(firstRun.includes('unstarted'), `the orphan was adopted in the first run: ${firstRun.join(', ')}`);
  });

  it('should walk only the sets that hold rows: a quiet pass schedules no page', async () => {
    const pass = async (graceMs: number) => {
      const handle = await ctx.client.workflow.start(WORKFLOW_TYPE.reconcile, {
        workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
        taskQueue: ctx.settings.temporal.taskQueue,
        args: [{ version: 1, graceMs } satisfies ReconcileInput],
      });
      await handle.result();
      return pagesOfRun(handle.workflowId, handle.firstExecutionRunId);
    };
    // With a grace of ten years, no row of any set is old enough: nothing to walk.
    assert.deepEqual(await pass(10 * 365 * 86_400_000), []);
    // An orphan (its workflow never started): only its set is walked.
    await insertOnly(3_600_000);
    const { rows } = await ctx.sql.query(
      `SELECT count(*) FILTER (WHERE status = 'active' AND expires_at <= now())::int AS overdue,
              count(*) FILTER (WHERE status <> 'active' AND propagation IN ('pending', 'stuck'))::int AS unfinished
         FROM token`,
    );
    const walked = await pass(0);
    assert.ok(walked.includes('unstarted'), walked.join(', '));
    // Sets earlier tests left empty get no page (the check runs at the pass's start).
    if (rows[0].overdue === 0) assert.ok(!walked.includes('overdue'), walked.join(', '));
    if (rows[0].unfinished === 0) assert.ok(!walked.includes('unfinished'), walked.join(', '));
  });

  it('should report every row in its counts and only the first few ids and errors', async () => {
    const many = RECONCILE_REPORT_SAMPLE + 3;
    const healable: string[] = [];
    const broken: string[] = [];
    for (let i = 0; i < many; i++) healable.push((await insertOnly(3_600_000)).id);
    for (let i = 0; i < many; i++) broken.push((await insertOnly(3_600_000)).id);
    const report = await refusingUpdates(`OLD.id IN (${broken.map((id) => `'${id}'`).join(', ')})`, () =>
      failedPassReport(reconcileNow({ batchSize: 10 })),
    );
    assert.equal(report.counts.errors, many);
    assert.equal(report.errors.length, RECONCILE_REPORT_SAMPLE);
    assert.ok(report.errors.every((e) => broken.includes(e.tokenId) && /injected fault/.test(e.error)));
    assert.ok(report.counts.started >= many, JSON.stringify(report.counts));
    assert.equal(report.started.length, RECONCILE_REPORT_SAMPLE);
    for (const id of healable) assert.ok((await store.requireToken(ctx.pool, id)).workflowStartedAt, id);
    await reconcileNow();
  });

  it('should fail the pass, after healing every other row, when a row cannot be healed', async () => {
    const tokens = [await insertOnly(3_600_000), await insertOnly(3_600_000), await insertOnly(3_600_000)];
    const broken = tokens[1]!.id;
    // This row refuses every update (here: recording its workflow start).
    // Two rows a page: the broken row is on the first page, the last row on the second.
    const report = await refusingUpdates(`OLD.id = '${broken}'`, () =>
      failedPassReport(reconcileNow({ batchSize: 2 })),
    );
    assert.deepEqual(
      report.errors.map((e) => e.tokenId),
      [broken],
    );
    assert.match(report.errors[0]!.error, /injected fault/);
    assert.ok(report.started.includes(tokens[0]!.id) && report.started.includes(tokens[2]!.id), JSON.stringify(report));
    assert.ok((await reconcileNow()).started.includes(broken));
    assert.ok((await store.requireToken(ctx.pool, broken)).workflowStartedAt);
  });

  it('should say what it healed in its result and current details, as the Web UI shows them', async () => {
    const orphan = await insertOnly(3_600_000);
    const pass = await ctx.client.workflow.start(WORKFLOW_TYPE.reconcile, {
      workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
      taskQueue: ctx.settings.temporal.taskQueue,
      args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
    });
    const report = (await pass.result()) as ReconcileReport;
    assert.equal(Object.keys(report)[0], 'summary', 'the first thing the UI shows of the result');
    assert.ok(report.started.includes(orphan.id), JSON.stringify(report));
    assert.match(
      report.summary ?? '',
      new RegExp(`^Healed \\d+ token\\(s\\)\\. .*workflow started: ${report.counts.started} \\(`),
    );
    if (report.counts.started <= 3) assert.ok(report.summary?.includes(orphan.id), report.summary);
    const metadata = await pass.query<{ currentDetails?: string }>('__temporal_workflow_metadata');
    // The same words, markdown-escaped (row errors quote other systems' text).
    assert.equal(metadata.currentDetails, md(report.summary ?? ''));
    assert.match(metadata.currentDetails ?? '', /tok\\_/, 'escaped for the markdown the UI renders');

    // A failed pass carries its summary in the failure's details: what it healed and what it could not.
    const broken = await insertOnly(3_600_000);
    const failed = await refusingUpdates(`OLD.id = '${broken.id}'`, () => failedPassReport(reconcileNow()));
    assert.match(
      failed.summary ?? '',
      new RegExp(`Not healed, retried next pass: 1 \\(${broken.id}: .*injected fault`),
    );
    await reconcileNow();
  });

  it('should word a report: counts of every kind, the first few ids, errors and the checkpoint', () => {
    const report = emptyReconcileReport();
    report.counts.expired = 5;
    report.expired.push('tok_e1', 'tok_e2', 'tok_e3', 'tok_e4', 'tok_e5');
    report.counts.restarted = 1;
    report.restarted.push('tok_r1');
    report.counts.wedged = 1;
    report.wedged.push('tok_w1');
    report.counts.errors = 4;
    report.errors.push(
      ...['tok_x1', 'tok_x2', 'tok_x3', 'tok_x4'].map((tokenId) => ({
        tokenId,
        error: `deadlock on ${tokenId}\nat stack`,
      })),
    );
    report.auditCheckpoint = { written: true, seq: 7, chains: 3, events: 42, digest: 'ab'.repeat(32) };
    assert.equal(
      describeReconcileReport(report),
      'Healed 6 token(s). overdue, killed as expired: 5 (tok_e1, tok_e2, tok_e3 and 2 more); ' +
        'propagation restarted: 1 (tok_r1). ' +
        'Stuck, needs an operator (its workflow cannot make progress): 1 (tok_w1). ' +
        'Not healed, retried next pass: 4 (tok_x1: deadlock on tok_x1; tok_x2: deadlock on tok_x2; tok_x3: deadlock on tok_x3; and 1 more). ' +
        'Audit checkpoint 7 signed (3 chains, 42 events).',
    );
    assert.equal(
      describeReconcileReport({ ...emptyReconcileReport(), auditCheckpoint: { written: false, skipped: 'recent' } }),
      'Nothing healed. Audit checkpoint not written (recent).',
    );
  });

  it('should resume a page after the rows its last heartbeat recorded', async () => {
    const tokens = [await insertOnly(3_600_000), await insertOnly(3_600_000), await insertOnly(3_600_000)];
    const prior = emptyReconcileReport();
    prior.started.push('tok_before');
    prior.counts.started = 1;
    // A retry of an attempt that had handled 2 rows of a 3-row page, the second being tokens[0].
    const env = new MockActivityEnvironment({
      heartbeatDetails: { lastId: tokens[0]!.id, handled: 2, report: prior },
      heartbeatTimeoutMs: 30_000,
    });
    const beats: unknown[] = [];
    env.on('heartbeat', (d: unknown) => beats.push(d));
    const { reconcilePage } = createReconcilerActivities({
      pool: ctx.pool,
      client: ctx.client,
      settings: ctx.settings,
    });
    const input: ReconcilePageInput = { set: 'unstarted', afterId: null, batchSize: 3, graceMs: 0, sampleSize: 20 };
    const result: ReconcilePageResult = await env.run(reconcilePage, input);
    assert.deepEqual(result.report.started, ['tok_before', tokens[1]!.id]);
    assert.equal(result.report.counts.started, 2);
    assert.equal(result.nextAfterId, tokens[1]!.id, 'the page is full: the next one starts after its last row');
    assert.ok((await store.requireToken(ctx.pool, tokens[1]!.id)).workflowStartedAt);
    assert.equal((await store.requireToken(ctx.pool, tokens[2]!.id)).workflowStartedAt, null, 'not on this page');
    assert.ok(beats.length >= 1);
    await reconcileNow();
  });

  describe('a propagation whose workflow runs but cannot make progress', () => {
    let wedging: WedgingWorker | undefined;
    before(async () => {
      wedging = await WedgingWorker.start(ctx);
    });
    after(async () => {
      await wedging?.stop();
    });

    it('should be marked stuck, audited once per occurrence and reported', async () => {
      const untold = await wedging!.wedgedToken('audit-log', 'before the workflow took over');
      const unfinished = await wedging!.wedgedToken('audit-log', 'after the workflow took over');
      await wedging!.waitWedged([untold, unfinished]);
      const stuckEvents = async (tokenId: string) =>
        (await store.readAudit(ctx.pool, tokenId))
          .filter((e) => e.kind === 'propagation.stuck')
          .map((e) => JSON.parse(e.canonical).data);

      const report = await reconcileNow();
      for (const tokenId of [untold, unfinished]) {
        assert.ok(report.wedged.includes(tokenId), JSON.stringify(report));
        assert.ok(!report.signalled.includes(tokenId) && !report.restarted.includes(tokenId));
        assert.equal((await store.requireToken(ctx.pool, tokenId)).propagation, 'stuck');
        const [event, ...more] = await stuckEvents(tokenId);
        assert.equal(more.length, 0);
        assert.match(event.cause, /workflow tasks keep failing/);
        assert.match(event.taskFailure, /this workflow task always fails/);
      }

      // Still wedged on the next pass: reported again, but the same occurrence is audited once.
      const again = await reconcileNow();
      for (const tokenId of [untold, unfinished]) {
        assert.ok(again.wedged.includes(tokenId));
        assert.equal((await stuckEvents(tokenId)).length, 1);
      }

      // The operator's remedy: end the wedged run; the reconciler starts a healthy one, which finishes.
      for (const tokenId of [untold, unfinished]) {
        await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).terminate('wedged');
      }
      const healed = await reconcileNow();
      assert.ok(healed.signalled.includes(untold), JSON.stringify(healed));
      assert.ok(healed.restarted.includes(unfinished), JSON.stringify(healed));
      for (const tokenId of [untold, unfinished]) {
        const done = (await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).result()) as TokenLifecycleResult;
        assert.equal(done.propagation, 'complete');
      }
    });

    it('should be surfaced, not signalled again and again, when it has nothing to propagate', async () => {
      const tokenId = await wedging!.wedgedToken(null, 'before the workflow took over');
      await wedging!.waitWedged([tokenId]);
      assert.equal((await store.requireToken(ctx.pool, tokenId)).propagation, 'complete', 'no receivers');
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(tokenId));
      const signals = async () =>
        ((await decodedHistory(handle)).events ?? []).filter((e) => e.workflowExecutionSignaledEventAttributes).length;
      const before = await signals();
      const wedgedEvents = async () =>
        (await store.readAudit(ctx.pool, tokenId)).filter((e) => e.kind === 'workflow.wedged');

      for (let pass = 0; pass < 2; pass++) {
        const report = await reconcileNow();
        assert.ok(report.wedged.includes(tokenId), JSON.stringify(report));
        assert.ok(!report.signalled.includes(tokenId), JSON.stringify(report));
      }
      assert.equal(await signals(), before, 'no signal sent to a workflow that cannot take it in');
      const [event, ...more] = await wedgedEvents();
      assert.equal(more.length, 0, 'one audit per occurrence');
      assert.match(JSON.parse(event!.canonical).data.taskFailure, /this workflow task always fails/);
      assert.equal((await store.requireToken(ctx.pool, tokenId)).propagation, 'complete');

      await handle.terminate('wedged');
      assert.ok((await reconcileNow()).signalled.includes(tokenId), 'a healthy run is started once it ended');
    });

    it('should not restart a propagation whose workflow completed after its row was read', async () => {
      // A wedged row ahead of it in the unfinished set, locked by this test, holds the page after it was read.
      const ahead = await wedging!.wedgedToken('audit-log', 'after the workflow took over');
      await wedging!.waitWedged([ahead]);
      receiver.behaviour = () => ({ status: 503 });
      const issued = await ctx.warden.issue({ subject: 'usr_reconcile', receivers: ['audit-log'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'stale row drill' });
      await waitUntil(
        () => receiver.requests.some((r) => JSON.parse(r.body).token_id === issued.tokenId),
        'a first delivery attempt',
      );
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      const { runId } = await handle.describe();

      const locker = await ctx.sql.connect();
      try {
        await locker.query('BEGIN');
        await locker.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [ahead]);
        const lockerPid = (await locker.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
        const pass = reconcileNow({ batchSize: 1000 });
        await waitUntil(
          async () =>
            (await ctx.sql.query('SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))', [lockerPid]))
              .rowCount === 1,
          'the pass to wait on the row ahead',
        );
        receiver.behaviour = () => ({ status: 204 });
        const done = (await handle.result()) as TokenLifecycleResult;
        assert.equal(done.propagation, 'complete');
        await locker.query('ROLLBACK');
        const report = await pass;
        assert.ok(report.wedged.includes(ahead), JSON.stringify(report));
        assert.ok(!report.restarted.includes(issued.tokenId), JSON.stringify(report));
      } finally {
        await locker.query('ROLLBACK').catch(() => undefined);
        locker.release();
        receiver.behaviour = () => ({ status: 204 });
      }
      const finished = await handle.describe();
      assert.equal(finished.runId, runId, 'no new run');
      assert.equal(finished.status.name, 'COMPLETED');
      await ctx.client.workflow.getHandle(tokenWorkflowId(ahead)).terminate('wedged');
    });
  });

  it('should run from its schedule: a triggered run heals a row', async () => {
    // A schedule left by an earlier deployment (another task queue) is brought up to date.
    const earlier = { ...ctx.settings, temporal: { ...ctx.settings.temporal, taskQueue: 'tq-earlier-release' } };
    await ensureReconcilerSchedule(ctx.client, earlier);
    await ensureReconcilerSchedule(ctx.client, ctx.settings);
    const handle = ctx.client.schedule.getHandle(RECONCILER_SCHEDULE_ID);
    try {
      const described = await handle.describe();
      assert.equal(described.spec.intervals?.[0]?.every, 60_000);
      assert.equal(described.action.type, 'startWorkflow');
      assert.equal(described.action.taskQueue, ctx.settings.temporal.taskQueue);
      assert.equal(described.action.workflowRunTimeout, 15 * 60_000, 'a pass that cannot finish ends');

      const token = await insertOnly(3_600_000);
      await handle.trigger();
      await waitUntil(
        async () => (await store.requireToken(ctx.pool, token.id)).workflowStartedAt !== null,
        'a schedule-triggered pass to start the workflow',
        30_000,
      );
      const runs = (await handle.describe()).info.recentActions;
      assert.ok(runs.length >= 1, 'the schedule started a run');
      assert.ok(runs.every((a) => a.action.workflow.workflowId.startsWith(RECONCILER_WORKFLOW_ID)));
    } finally {
      await handle.delete();
    }
  });
});
