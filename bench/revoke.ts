/**
 * `npm run bench:revoke [-- --tokens N --warmup W --server-defaults]`: what a tokenwarden revocation costs over the
 * Temporal floor beneath it, both measured in the same run on the same server (DESIGN §10).
 *  (a) revoke call: `warden.revoke()` against a raw Signal round trip to a bare running workflow;
 *  (b) revoke-to-delivered: revoke call start → the receiver has the event, against a bare workflow
 *      whose signal starts one activity that POSTs to the same receiver.
 * The series are in bench/revoke-series.ts, the figures in bench/revoke-report.ts: printed with a
 * profile of where the time goes, then a final line with one JSON object.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import { TokenWarden } from '../client/index.js';
import { connectTemporal } from '../common/temporal.js';
import { DEFAULT_MAX_TTL_MS, WORKER_TUNING_DEFAULTS, PACKAGE_ROOT, type Settings } from '../common/config.js';
import { createPool } from '../common/db.js';
import { tokenWorkflowId } from '../common/names.js';
import { createTokenWorker, WORKFLOW_BUNDLE_OPTIONS } from '../worker/worker.js';
import { createFloorActivities } from './floor-activities.js';
import { floorDelivery, signalSink } from './floor-workflows.js';
import { ArrivalReceiver } from './receiver.js';
import { reportRevokeBenchmark } from './revoke-report.js';
import { revokeSeries } from './revoke-series.js';
import { startBenchServices } from './services.js';
import { mapLimited, waitUntilIdle } from './workflows.js';

const FLOOR_WORKFLOWS_PATH = path.join(PACKAGE_ROOT, 'dist', 'bench', 'floor-workflows.js');
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

type Teardown = Array<{ name: string; stop: () => Promise<void> }>;

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

  const teardown: Teardown = [];
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
      expirySweepIntervalMs: 1_000,
      reconcileGraceMs: 60_000,
      masterKey: randomBytes(32),
      previousMasterKeys: [],
      payloadKeys: [],
      receiverAllow: ['loopback'],
      maxTtlMs: DEFAULT_MAX_TTL_MS,
      worker: WORKER_TUNING_DEFAULTS,
    };
    const floorQueue = `bench-floor-${tag}`;

    // Two workers in this process on one connection, each with its own pre-built bundle.
    const client = await connectTemporal(settings);
    teardown.push({ name: 'temporal client', stop: () => client.connection.close() });
    const connection = await NativeConnection.connect({ address: services.temporalAddress });
    teardown.push({ name: 'worker connection', stop: () => connection.close() });
    const workerPool = createPool(settings.databaseUrl, settings.databaseSchema);
    teardown.push({ name: 'worker pool', stop: () => workerPool.end() });
    runWorker(
      'token worker',
      await createTokenWorker({
        connection,
        client,
        pool: workerPool,
        settings,
        workflowBundle: services.bundles.token,
      }),
      halt,
      teardown,
    );
    runWorker(
      'floor worker',
      await Worker.create({
        connection,
        namespace: settings.temporal.namespace,
        taskQueue: floorQueue,
        workflowBundle: services.bundles.floor,
        activities: createFloorActivities({ receiverUrl: receiver.url }),
      }),
      halt,
      teardown,
    );

    const warden = await TokenWarden.connect(settings);
    teardown.push({ name: 'warden', stop: () => warden.close() });
    await warden.addReceiver({ id: RECEIVER_ID, url: receiver.url });

    // Everything each series will touch exists and is idle before the first measurement.
    const issue = (subject: string) =>
      warden.issue({ subject, receivers: [RECEIVER_ID], ttl: '1h' }).then((issued) => issued.tokenId);
    const revokeTokens = await mapLimited(iterations, SETUP_CONCURRENCY, (i) => issue(`usr_bench_a${i}`));
    const profileTokens = await mapLimited(iterations, SETUP_CONCURRENCY, (i) => issue(`usr_bench_b${i}`));
    const startFloor = (workflow: typeof signalSink | typeof floorDelivery, prefix: string) =>
      mapLimited(iterations, SETUP_CONCURRENCY, async (i) => {
        const handle = await client.workflow.start(workflow, {
          workflowId: `${prefix}-${tag}-${i}`,
          taskQueue: floorQueue,
        });
        return handle.workflowId;
      });
    const signalSinks = await startFloor(signalSink, 'signal-sink');
    const floorDeliveries = await startFloor(floorDelivery, 'floor-delivery');
    const everyWorkflow = [
      ...revokeTokens.map(tokenWorkflowId),
      ...profileTokens.map(tokenWorkflowId),
      ...signalSinks,
      ...floorDeliveries,
    ];
    await mapLimited(everyWorkflow.length, SETUP_CONCURRENCY, (i) =>
      waitFor(waitUntilIdle(client, everyWorkflow[i]!, halt.signal), `workflow ${everyWorkflow[i]} to go idle`),
    );
    say(
      `ready in ${((performance.now() - started) / 1000).toFixed(1)} s: Temporal on ${services.temporalAddress}, ` +
        `PostgreSQL ${services.databaseKind}, ${revokeTokens.length + profileTokens.length} tokens issued, ` +
        `${signalSinks.length + floorDeliveries.length} floor workflows started`,
    );

    const { series, measurements } = revokeSeries({
      warden,
      client,
      receiver,
      revokeTokens,
      profileTokens,
      signalSinks,
      floorDeliveries,
      tag,
      waitFor,
      waitMs: WAIT_MS,
    });
    // Every iteration measures each series once; the order rotates by one each iteration, so no series
    // always comes first (or always follows the same one), and drift over the run affects all alike.
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

    final = await reportRevokeBenchmark(
      client,
      measurements,
      {
        tokens: options.tokens,
        warmup: options.warmup,
        seriesCount: series.length,
        measureSeconds,
        loadBefore,
        loadAfter,
        receiverRepeats: receiver.repeats,
        node: process.version,
        cpus: os.cpus().length,
        cpuModel: os.cpus()[0]?.model ?? 'unknown',
        platform: `${process.platform} ${process.arch}`,
        postgres: services.databaseKind,
        temporal: options.serverDefaults ? 'as npm test starts it' : `with ${UNTHROTTLED_SERVER_ARGS.join(' ')}`,
      },
      (text = '') => process.stdout.write(`${text}\n`),
    );
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

/** Runs a worker until teardown; a worker that stops on its own halts the benchmark. */
function runWorker(name: string, worker: Worker, halt: AbortController, teardown: Teardown): void {
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

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
