/**
 * `npm run bench:revoke [-- --tokens N --warmup W --server-defaults]`: what a tokenwarden revocation costs over the
 * Temporal floor beneath it, both measured in the same run on the same server (DESIGN §10).
 *  (a) revoke call: `warden.revoke()` against a raw Signal round trip to a bare running workflow;
 *  (b) revoke-to-delivered: revoke call start → the receiver has the event, against a bare workflow
 *      whose signal starts one activity that POSTs to the same receiver.
 * Prints the figures, a profile of where the time goes, then a final line with one JSON object.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import { TokenWarden } from '../client/index.js';
import { connectTemporal, signalRevoke } from '../common/temporal.js';
import { DEFAULT_MAX_TTL_MS, PACKAGE_ROOT, type Settings } from '../common/config.js';
import { createPool } from '../common/db.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { createTokenWorker, WORKFLOW_BUNDLE_OPTIONS } from '../worker/worker.js';
import type { RevokeRequest } from '../workflows/messages.js';
import { createFloorActivities } from './floor-activities.js';
import { deliverSignal, floorDelivery, pingSignal, signalSink } from './floor-workflows.js';
import { ArrivalReceiver } from './receiver.js';
import { startBenchServices } from './services.js';
import { ms, ratio, summarize, type LatencySummary } from './stats.js';
import { timeStatements } from './statement-timer.js';
import { historyMarks, stepMedians, type Mark } from './timeline.js';

const FLOOR_WORKFLOWS_PATH = path.join(PACKAGE_ROOT, 'dist', 'bench', 'floor-workflows.js');
const GOAL_RATIO = 1.5;
/**
 * The dev server has one history shard whose transfer-queue reader polls at most 20 times a second:
 * once tasks arrive faster than that (they do, back to back), each activity or workflow-task dispatch
 * waits up to 50 ms for the reader. That throttle would dominate both series and hide the work being
 * compared, and one revocation in real use never meets it; `--server-defaults` keeps it.
 */
const UNTHROTTLED_SERVER_ARGS = ['--dynamic-config-value', 'history.transferProcessorMaxPollRPS=10000'];
const WAIT_MS = 30_000;
const SETUP_CONCURRENCY = 4;
const RECEIVER_ID = 'bench-receiver';
/** Statements store.killToken() sends between BEGIN and COMMIT when it kills a token with receivers. */
const KILL_STATEMENTS = 7;
/** The payload of every signal in this benchmark: what warden.revoke() sends for this reason. */
const REVOKE: RevokeRequest = { reason: 'benchmark', actor: 'admin', initiatingEntity: 'admin' };

const say = (msg: string) => process.stderr.write(`[bench:revoke] ${msg}\n`);

interface Options {
  tokens: number;
  warmup: number;
  serverDefaults: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: { tokens: { type: 'string' }, warmup: { type: 'string' }, 'server-defaults': { type: 'boolean' } },
  });
  const int = (text: string, name: string, min: number) => {
    if (!/^\d+$/.test(text) || Number(text) < min)
      throw new Error(`${name} must be an integer ≥ ${min}, got ${JSON.stringify(text)}`);
    return Number(text);
  };
  return {
    tokens:
      values.tokens !== undefined
        ? int(values.tokens, '--tokens', 1)
        : int(process.env.BENCH_TOKENS ?? '200', 'BENCH_TOKENS', 1),
    warmup: int(values.warmup ?? '10', '--warmup', 0),
    serverDefaults: values['server-defaults'] ?? false,
  };
}

/** Latencies in ms, one entry per measured iteration. */
interface Samples {
  revokeCall: number[];
  signalFloor: number[];
  revokeToDelivered: number[];
  deliveryFloor: number[];
  // The profile: TokenWarden.revoke()'s two steps timed apart, and what they compare to.
  killTransaction: number[];
  signalWithStart: number[];
  bareSignalWithStart: number[];
  pgRoundTrip: number[];
  pgEmptyKillShape: number[];
  /** Of each kill: the time spent in Node between its statements (total minus the statements). */
  killBetweenStatements: number[];
}

/** A measured run whose history is read afterwards for the step breakdown (epoch ms). */
interface TimedRun {
  workflowId: string;
  callStart: number;
  arrival: number;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const iterations = options.warmup + options.tokens;

  // Ctrl-C stops the measurement and still stops everything started (the SDK would only stop workers).
  const halt = new AbortController();
  const halted = new Promise<never>((_, reject) =>
    halt.signal.addEventListener('abort', () => reject(halt.signal.reason)),
  );
  halted.catch(() => {});
  const onSignal = () => {
    if (halt.signal.aborted) process.exit(130);
    say('interrupted: stopping (Ctrl-C again to force)');
    halt.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  Runtime.install({ logger: new DefaultLogger('WARN'), shutdownSignals: [] });

  /** Resolves with `promise`, or rejects on timeout, Ctrl-C or a worker that stopped. */
  const waitFor = async <T>(promise: Promise<T>, what: string): Promise<T> => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: nothing after ${WAIT_MS} ms`)), WAIT_MS);
    });
    try {
      return await Promise.race([promise, halted, timeout]);
    } finally {
      clearTimeout(timer);
    }
  };

  const teardown: Array<{ name: string; stop: () => Promise<void> }> = [];
  let final: Record<string, unknown> | undefined;
  try {
    const started = performance.now();
    const services = await startBenchServices({
      label: 'revoke',
      workflows: { token: WORKFLOW_BUNDLE_OPTIONS, floor: { workflowsPath: FLOOR_WORKFLOWS_PATH } },
      serverArgs: options.serverDefaults ? [] : UNTHROTTLED_SERVER_ARGS,
      log: say,
    });
    teardown.push({ name: 'services', stop: services.stop });
    const receiver = await ArrivalReceiver.start(say);
    teardown.push({ name: 'receiver', stop: () => receiver.close() });

    const tag = services.schema.slice(-8);
    const settings: Settings = {
      temporal: {
        connectionOptions: { address: services.temporalAddress },
        namespace: services.namespace,
        taskQueue: `bench-revoke-${tag}`,
      },
      databaseUrl: services.databaseUrl,
      databaseSchema: services.schema,
      dataDir: services.tmpDir,
      // Production defaults; they only matter on a failed delivery, which would fail the benchmark.
      timing: { escalateAfterMs: 3_600_000, retryInitialMs: 1_000, retryMaxMs: 600_000 },
      reconcileGraceMs: 60_000,
      masterKey: randomBytes(32),
      previousMasterKeys: [],
      receiverAllow: ['loopback'],
      maxTtlMs: DEFAULT_MAX_TTL_MS,
    };
    const floorQueue = `bench-floor-${tag}`;

    // Two workers in this process on one connection, each with its own pre-built bundle.
    const client = await connectTemporal(settings);
    teardown.push({ name: 'temporal client', stop: () => client.connection.close() });
    const connection = await NativeConnection.connect({ address: services.temporalAddress });
    teardown.push({ name: 'worker connection', stop: () => connection.close() });
    const workerPool = createPool(settings.databaseUrl, settings.databaseSchema);
    teardown.push({ name: 'worker pool', stop: () => workerPool.end() });
    const tokenWorker = await createTokenWorker({
      connection,
      client,
      pool: workerPool,
      settings,
      workflowBundle: services.bundles.token,
    });
    const floorWorker = await Worker.create({
      connection,
      namespace: settings.temporal.namespace,
      taskQueue: floorQueue,
      workflowBundle: services.bundles.floor,
      activities: createFloorActivities({ receiverUrl: receiver.url }),
    });
    for (const [name, worker] of [
      ['token worker', tokenWorker],
      ['floor worker', floorWorker],
    ] as const) {
      const running = worker.run();
      void running.then(
        () => halt.abort(new Error(`the ${name} stopped`)),
        (err: Error) => halt.abort(new Error(`the ${name} failed: ${err.message}`)),
      );
      teardown.push({
        name,
        stop: async () => {
          if (worker.getState() === 'RUNNING') worker.shutdown();
          await running;
        },
      });
    }

    const warden = await TokenWarden.connect(settings);
    teardown.push({ name: 'warden', stop: () => warden.close() });
    await warden.addReceiver({ id: RECEIVER_ID, url: receiver.url });

    // Everything each series will touch exists and is idle before the first measurement.
    const revokeTokens = await mapLimited(iterations, (i) => issueToken(warden, `usr_bench_a${i}`));
    const profileTokens = await mapLimited(iterations, (i) => issueToken(warden, `usr_bench_b${i}`));
    const startFloor = (workflow: typeof signalSink | typeof floorDelivery, prefix: string) =>
      mapLimited(iterations, async (i) => {
        const handle = await client.workflow.start(workflow, {
          workflowId: `${prefix}-${tag}-${i}`,
          taskQueue: floorQueue,
        });
        return handle.workflowId;
      });
    const signalSinks = await startFloor(signalSink, 'signal-sink');
    const bareSinks = await startFloor(signalSink, 'sws-sink');
    const floorDeliveries = await startFloor(floorDelivery, 'floor-delivery');
    const everyWorkflow = [
      ...revokeTokens.map(tokenWorkflowId),
      ...profileTokens.map(tokenWorkflowId),
      ...signalSinks,
      ...bareSinks,
      ...floorDeliveries,
    ];
    await mapLimited(everyWorkflow.length, (i) =>
      waitFor(waitUntilIdle(client, everyWorkflow[i]!, halt.signal), `workflow ${everyWorkflow[i]} to go idle`),
    );
    say(
      `ready in ${((performance.now() - started) / 1000).toFixed(1)} s: Temporal on ${services.temporalAddress}, ` +
        `PostgreSQL ${services.databaseKind}, ${revokeTokens.length + profileTokens.length} tokens issued, ` +
        `${signalSinks.length + bareSinks.length + floorDeliveries.length} floor workflows started`,
    );

    const samples: Samples = {
      revokeCall: [],
      signalFloor: [],
      revokeToDelivered: [],
      deliveryFloor: [],
      killTransaction: [],
      signalWithStart: [],
      bareSignalWithStart: [],
      pgRoundTrip: [],
      pgEmptyKillShape: [],
      killBetweenStatements: [],
    };
    /** Per statement of store.killToken(), its time in each measured kill. */
    const killStatements = new Map<string, number[]>();
    let statementsOfThisKill = new Map<string, number>();
    const killPool = timeStatements(warden.pool, (statement, took) => {
      statementsOfThisKill.set(statement, (statementsOfThisKill.get(statement) ?? 0) + took);
    });
    const revokeRuns: TimedRun[] = [];
    const floorRuns: TimedRun[] = [];
    const wall = (t: number) => performance.timeOrigin + t;
    /** Waits for the workflow to complete, so that the next measurement starts on a quiet system. */
    const quiet = (workflowId: string) =>
      waitFor(client.workflow.getHandle(workflowId).result(), `workflow ${workflowId} to complete`);

    // Every iteration measures each series once; the order rotates by one each iteration, so no series
    // always comes first (or always follows the same one), and drift over the run affects all alike.
    const series: Array<(i: number, measured: boolean) => Promise<void>> = [
      async function revokeCall(i, measured) {
        const tokenId = revokeTokens[i]!;
        const t0 = performance.now();
        const outcome = await warden.revoke({ tokenId, reason: REVOKE.reason });
        const t1 = performance.now();
        if (!outcome.changed || !outcome.workflowSignalled) {
          throw new Error(
            `revoking ${tokenId} did not kill and signal it: ${outcome.warning ?? 'it was already dead'}`,
          );
        }
        const arrival = await waitFor(receiver.arrivalOf(tokenId, WAIT_MS), `the event of ${tokenId}`);
        await quiet(tokenWorkflowId(tokenId));
        if (!measured) return;
        samples.revokeCall.push(t1 - t0);
        samples.revokeToDelivered.push(arrival.at - t0);
        revokeRuns.push({ workflowId: tokenWorkflowId(tokenId), callStart: wall(t0), arrival: wall(arrival.at) });
      },
      async function signalFloor(i, measured) {
        const handle = client.workflow.getHandle(signalSinks[i]!);
        const t0 = performance.now();
        await handle.signal(pingSignal, REVOKE);
        const t1 = performance.now();
        await quiet(handle.workflowId);
        if (measured) samples.signalFloor.push(t1 - t0);
      },
      async function deliveryFloor(i, measured) {
        const handle = client.workflow.getHandle(floorDeliveries[i]!);
        const floorId = `floor_${tag}_${i}`;
        const t0 = performance.now();
        await handle.signal(deliverSignal, { eventId: `evt_${floorId}`, tokenId: floorId });
        const arrival = await waitFor(receiver.arrivalOf(floorId, WAIT_MS), `the event of ${floorId}`);
        await quiet(handle.workflowId);
        if (!measured) return;
        samples.deliveryFloor.push(arrival.at - t0);
        floorRuns.push({ workflowId: handle.workflowId, callStart: wall(t0), arrival: wall(arrival.at) });
      },
      // Profile: the two steps of TokenWarden.revoke(), called the way it calls them, timed apart.
      async function revokeSteps(i, measured) {
        const tokenId = profileTokens[i]!;
        statementsOfThisKill = new Map();
        const t0 = performance.now();
        const kill = await store.killToken(killPool, { tokenId, ...REVOKE });
        const t1 = performance.now();
        const t = kill.token;
        await signalRevoke(
          client,
          t,
          { reason: t.revokeReason!, actor: t.revokedBy!, initiatingEntity: t.initiatingEntity ?? 'admin' },
          settings.temporal.taskQueue,
          settings.timing,
        );
        const t2 = performance.now();
        // Round trips on the same pool without the kill's work: one, then the kill's shape (a pooled
        // transaction of 9 statements: BEGIN, 7 statements, COMMIT), to read the kill in round trips.
        const q0 = performance.now();
        await warden.pool.query('SELECT 1');
        const q1 = performance.now();
        await store.inTransaction(warden.pool, async (db) => {
          for (let k = 0; k < KILL_STATEMENTS; k++) await db.query('SELECT 1');
        });
        const q2 = performance.now();
        if (!kill.changed) throw new Error(`killing ${tokenId} changed nothing: it was already dead`);
        await waitFor(receiver.arrivalOf(tokenId, WAIT_MS), `the event of ${tokenId}`);
        await quiet(tokenWorkflowId(tokenId));
        if (!measured) return;
        samples.killTransaction.push(t1 - t0);
        samples.signalWithStart.push(t2 - t1);
        samples.pgRoundTrip.push(q1 - q0);
        samples.pgEmptyKillShape.push(q2 - q1);
        let inStatements = 0;
        for (const [statement, took] of statementsOfThisKill) {
          killStatements.set(statement, killStatements.get(statement) ?? []);
          killStatements.get(statement)!.push(took);
          inStatements += took;
        }
        samples.killBetweenStatements.push(t1 - t0 - inStatements);
      },
      // Profile: signal-with-start itself, on a bare running workflow with minimal start options.
      async function bareSignalWithStart(i, measured) {
        const workflowId = bareSinks[i]!;
        const t0 = performance.now();
        await client.workflow.signalWithStart(signalSink, {
          workflowId,
          taskQueue: floorQueue,
          signal: pingSignal,
          signalArgs: [REVOKE],
        });
        const t1 = performance.now();
        await quiet(workflowId);
        if (measured) samples.bareSignalWithStart.push(t1 - t0);
      },
    ];

    // Other processes on the machine skew every series alike (they are interleaved), but they add noise.
    const loadBefore = os.loadavg()[0]!;
    const measureStarted = performance.now();
    for (let i = 0; i < iterations; i++) {
      halt.signal.throwIfAborted();
      const measured = i >= options.warmup;
      for (let k = 0; k < series.length; k++) await series[(i + k) % series.length]!(i, measured);
      if ((i + 1) % 50 === 0 || i + 1 === iterations) say(`${i + 1}/${iterations} iterations`);
    }
    const measureSeconds = (performance.now() - measureStarted) / 1000;
    const loadAfter = os.loadavg()[0]!;

    // The step breakdown of (b), from each measured run's history (read after the timed part).
    const timelines = async (runs: TimedRun[], firstLabel: string) => {
      const histories = await mapLimited(runs.length, (i) =>
        client.workflow.getHandle(runs[i]!.workflowId).fetchHistory(),
      );
      return stepMedians(
        runs.map((run, i): Mark[] => [
          { label: firstLabel, at: run.callStart },
          ...historyMarks(histories[i]!).filter((m) => m.at < run.arrival),
          { label: 'event at the receiver', at: run.arrival },
        ]),
      );
    };
    const revokeSteps = await timelines(revokeRuns, 'revoke call starts');
    const floorSteps = await timelines(floorRuns, 'signal call starts');

    const figure = {
      revokeCall: summarize(samples.revokeCall),
      signalFloor: summarize(samples.signalFloor),
      revokeToDelivered: summarize(samples.revokeToDelivered),
      deliveryFloor: summarize(samples.deliveryFloor),
      killTransaction: summarize(samples.killTransaction),
      signalWithStart: summarize(samples.signalWithStart),
      bareSignalWithStart: summarize(samples.bareSignalWithStart),
      pgRoundTrip: summarize(samples.pgRoundTrip),
      pgEmptyKillShape: summarize(samples.pgEmptyKillShape),
      killBetweenStatements: summarize(samples.killBetweenStatements),
    };
    const killStatementP50s = [...killStatements].map(([statement, took]) => ({
      statement,
      p50Ms: summarize(took).p50Ms,
    }));
    const compare = (value: LatencySummary, floor: LatencySummary) => {
      const p50 = ratio(value.p50Ms, floor.p50Ms);
      const p99 = ratio(value.p99Ms, floor.p99Ms);
      return { p50, p99, goalMet: p50 <= GOAL_RATIO && p99 <= GOAL_RATIO };
    };
    const revokeCallRatio = compare(figure.revokeCall, figure.signalFloor);
    const deliveredRatio = compare(figure.revokeToDelivered, figure.deliveryFloor);

    const line = (name: string, s: LatencySummary) =>
      `  ${name.padEnd(44)} p50 ${fmt(s.p50Ms)}  p99 ${fmt(s.p99Ms)}  (min ${fmt(s.minMs)}, max ${fmt(s.maxMs)})`;
    const verdict = (r: { p50: number; p99: number; goalMet: boolean }) =>
      `  ${'ratio'.padEnd(44)} p50 ×${r.p50.toFixed(2)}     p99 ×${r.p99.toFixed(2)}     goal ≤ ${GOAL_RATIO}: ${r.goalMet ? 'met' : 'NOT met'}`;
    const out = (text = '') => process.stdout.write(`${text}\n`);
    out(
      `revoke benchmark: n=${options.tokens} per series (+${options.warmup} warm-up), ${series.length} series interleaved in rotating order`,
    );
    out(
      `  node ${process.version}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? 'unknown'}), PostgreSQL ${services.databaseKind}`,
    );
    out(
      `  Temporal dev server in memory, ${options.serverDefaults ? 'as npm test starts it' : `with ${UNTHROTTLED_SERVER_ARGS.join(' ')}`}`,
    );
    out(
      `  measuring took ${measureSeconds.toFixed(1)} s; 1-min load average ${loadBefore.toFixed(2)} before, ` +
        `${loadAfter.toFixed(2)} after; receiver saw ${receiver.repeats} repeated event(s)`,
    );
    out();
    out('(a) revoke call latency');
    out(line('warden.revoke()', figure.revokeCall));
    out(line('floor: handle.signal() to a bare workflow', figure.signalFloor));
    out(verdict(revokeCallRatio));
    out();
    out('(b) revoke-to-delivered');
    out(line('revoke call start → event at the receiver', figure.revokeToDelivered));
    out(line('floor: signal start → its activity’s POST', figure.deliveryFloor));
    out(verdict(deliveredRatio));
    out();
    out('profile of (a): the store kill and signal-with-start, timed apart (separate tokens, same iterations)');
    out(line('store.killToken() transaction', figure.killTransaction));
    out(line('signalRevoke(): signalWithStart, token options', figure.signalWithStart));
    out(line('signalWithStart to a bare workflow', figure.bareSignalWithStart));
    out(line('one PostgreSQL round trip (SELECT 1)', figure.pgRoundTrip));
    out(line(`BEGIN + ${KILL_STATEMENTS} × SELECT 1 + COMMIT (the kill's shape)`, figure.pgEmptyKillShape));
    out('  store.killToken(), statement by statement (p50, as the client sees it):');
    for (const s of killStatementP50s) out(`    ${s.statement.padEnd(62)} ${fmt(s.p50Ms)}`);
    out(`    ${'in Node between statements'.padEnd(62)} ${fmt(figure.killBetweenStatements.p50Ms)}`);
    out();
    out('profile of (b): median of each step (history times are the server’s clock)');
    for (const s of revokeSteps) out(`  ${s.step.padEnd(64)} ${fmt(s.p50Ms)}`);
    out('  floor:');
    for (const s of floorSteps) out(`  ${s.step.padEnd(64)} ${fmt(s.p50Ms)}`);
    out();

    final = {
      bench: 'revoke',
      date: new Date().toISOString(),
      n: options.tokens,
      warmup: options.warmup,
      order: 'interleaved, rotating; each measurement starts after the previous workflow completed',
      revokeCall: figure.revokeCall,
      signalFloor: figure.signalFloor,
      revokeCallRatio,
      revokeToDelivered: figure.revokeToDelivered,
      deliveryFloor: figure.deliveryFloor,
      revokeToDeliveredRatio: deliveredRatio,
      goalRatio: GOAL_RATIO,
      goalMet: { revokeCall: revokeCallRatio.goalMet, revokeToDelivered: deliveredRatio.goalMet },
      profile: {
        killTransaction: figure.killTransaction,
        signalWithStart: figure.signalWithStart,
        bareSignalWithStart: figure.bareSignalWithStart,
        pgRoundTrip: figure.pgRoundTrip,
        pgEmptyKillShape: figure.pgEmptyKillShape,
        killStatementsP50Ms: Object.fromEntries(killStatementP50s.map((s) => [s.statement, s.p50Ms])),
        killBetweenStatements: figure.killBetweenStatements,
        revokeToDeliveredStepsP50Ms: Object.fromEntries(revokeSteps.map((s) => [s.step, s.p50Ms])),
        deliveryFloorStepsP50Ms: Object.fromEntries(floorSteps.map((s) => [s.step, s.p50Ms])),
      },
      receiverRepeats: receiver.repeats,
      node: process.version,
      cpus: os.cpus().length,
      loadAverage1m: { before: Math.round(loadBefore * 100) / 100, after: Math.round(loadAfter * 100) / 100 },
      platform: `${process.platform} ${process.arch}`,
      postgres: services.databaseKind,
      temporal: `dev server (Temporal CLI), in memory, ${options.serverDefaults ? 'defaults' : UNTHROTTLED_SERVER_ARGS[1]}`,
    };
  } finally {
    const failures: string[] = [];
    for (const { name, stop } of teardown.reverse()) {
      await stop().catch((err: Error) => failures.push(`${name}: ${err.message}`));
    }
    if (failures.length > 0) {
      // Figures already printed stay valid; the exit code says that something was left behind.
      say(`stopping failed: ${failures.join('; ')}`);
      process.exitCode = 1;
    }
  }
  process.stdout.write(`${JSON.stringify(final)}\n`);
}

async function issueToken(warden: TokenWarden, subject: string): Promise<string> {
  const issued = await warden.issue({ subject, receivers: [RECEIVER_ID], ttl: '1h' });
  return issued.tokenId;
}

/** Until the workflow has no task or activity pending (its first task done, now waiting). */
async function waitUntilIdle(client: Client, workflowId: string, signal: AbortSignal): Promise<void> {
  const handle: WorkflowHandle = client.workflow.getHandle(workflowId);
  for (;;) {
    const { raw } = await handle.describe();
    if (!raw.pendingWorkflowTask && !raw.pendingActivities?.length) return;
    signal.throwIfAborted();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** fn(0 … count-1) with at most SETUP_CONCURRENCY at a time (setup only, never in a timed part). */
async function mapLimited<T>(count: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const results = new Array<T>(count);
  let next = 0;
  const lanes = Array.from({ length: Math.min(SETUP_CONCURRENCY, count) }, async () => {
    while (next < count) {
      const i = next++;
      results[i] = await fn(i);
    }
  });
  await Promise.all(lanes);
  return results;
}

const fmt = (value: number) => `${ms(value).toFixed(2).padStart(8)} ms`;

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
