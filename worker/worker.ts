/** Worker process: one pg pool, one Temporal client, the activities built once, graceful shutdown. */
import path from 'node:path';
import v8 from 'node:v8';
import { isGrpcServiceError, ScheduleAlreadyRunning, ScheduleOverlapPolicy, type Client } from '@temporalio/client';
import { encodeSearchAttributeIndexedValueType } from '@temporalio/common/lib/search-attributes.js';
import proto from '@temporalio/proto';
import { DefaultLogger, NativeConnection, Runtime, Worker, type WorkflowBundleOption } from '@temporalio/worker';
import type { StorePool } from '../common/db.js';
import { PACKAGE_ROOT, type Settings } from '../common/config.js';
import { createPool } from '../common/db.js';
import {
  RECONCILER_SCHEDULE_ID,
  RECONCILER_WORKFLOW_ID,
  SEARCH_ATTRIBUTE,
  SEARCH_ATTRIBUTE_CLI_TYPES,
  WORKFLOW_TYPE,
} from '../common/names.js';
import { ConfigError } from '../common/errors.js';
import { createActivities, type Activities } from '../activities/index.js';
import { connectTemporal } from '../common/temporal.js';
import {
  describePayloadEncryption,
  FAILURE_CONVERTER_PATH,
  PAYLOAD_CONVERTER_PATH,
  workerDataConverter,
} from '../common/data-converter.js';
import type { ReconcileInput } from '../common/messages.js';
import { startExpirySweeper } from './expiry-sweeper.js';

export const WORKFLOWS_PATH = path.join(PACKAGE_ROOT, 'dist', 'workflows', 'index.js');
export { PAYLOAD_CONVERTER_PATH };
/** What `bundleWorkflowCode` needs to build the bundle a token worker runs. */
export const WORKFLOW_BUNDLE_OPTIONS = {
  workflowsPath: WORKFLOWS_PATH,
  payloadConverterPath: PAYLOAD_CONVERTER_PATH,
  failureConverterPath: FAILURE_CONVERTER_PATH,
};

/**
 * How long a stopping worker (SIGTERM in a rolling deploy) lets running activities finish before it
 * cancels them: longer than one delivery attempt (10 s HTTP timeout, then its outcome is recorded),
 * so a deploy never cuts a POST short and never records an attempt that did not happen.
 */
export const SHUTDOWN_GRACE_MS = 15_000;
/** After this, a worker that still has not drained gives up (its process exits with an error). */
export const SHUTDOWN_FORCE_MS = 25_000;

export interface TokenWorkerOptions {
  connection: NativeConnection;
  client: Client;
  pool: StorePool;
  settings: Settings;
  /** A pre-built bundle (tests, production); otherwise the workflows are bundled at start. */
  workflowBundle?: WorkflowBundleOption;
  /** Wraps the activities (fault-injection tests). */
  wrapActivities?: (real: Activities) => Activities;
  /** How often at most heartbeats reach the server (tests: a cancellation reaches an attempt sooner). */
  maxHeartbeatThrottleMs?: number;
}

export async function createTokenWorker(opts: TokenWorkerOptions): Promise<Worker> {
  const { settings } = opts;
  return Worker.create({
    connection: opts.connection,
    namespace: settings.temporal.namespace,
    taskQueue: settings.temporal.taskQueue,
    ...(opts.workflowBundle ? { workflowBundle: opts.workflowBundle } : { workflowsPath: WORKFLOWS_PATH }),
    dataConverter: workerDataConverter(settings),
    activities: (opts.wrapActivities ?? ((real) => real))(
      createActivities({ pool: opts.pool, client: opts.client, settings }),
    ),
    shutdownGraceTime: SHUTDOWN_GRACE_MS,
    shutdownForceTime: SHUTDOWN_FORCE_MS,
    ...(opts.maxHeartbeatThrottleMs !== undefined ? { maxHeartbeatThrottleInterval: opts.maxHeartbeatThrottleMs } : {}),
    ...tuningOptions(settings.worker),
  });
}

/** The most workflows a worker caches unless TOKENWARDEN_CACHED_WORKFLOWS says otherwise. */
export const CACHED_WORKFLOWS_CAP = 2000;

/**
 * The SDK's own default (about 600 workflows per GiB of heap above 200 MiB), capped: with a 4 GiB
 * heap it is about 2,300, and 10,000 sleeping tokens then held 1.56 GiB RSS (1.66 GiB at the peak
 * of a wave); with 2,000 they held 1.42 GiB (1.47 GiB), and a 1,000-token wave still fits.
 */
export function defaultCachedWorkflows(): number {
  const heapMiB = v8.getHeapStatistics().heap_size_limit / 1024 / 1024;
  return Math.min(CACHED_WORKFLOWS_CAP, Math.max(10, Math.floor(((heapMiB - 200) * 600) / 1024)));
}

/**
 * The worker's capacity as the SDK's options (see WORKER_TUNING_DEFAULTS for why these values).
 * Pollers go in as poller behaviours: SDK 1.24 ignores maxConcurrent{Workflow,Activity}TaskPolls.
 */
export function tuningOptions(t: Settings['worker']) {
  return {
    maxConcurrentWorkflowTaskExecutions: t.workflowTaskSlots,
    workflowTaskPollerBehavior: { type: 'simple-maximum', maximum: t.workflowTaskPollers } as const,
    maxConcurrentActivityTaskExecutions: t.activitySlots,
    activityTaskPollerBehavior: { type: 'simple-maximum', maximum: t.activityPollers } as const,
    maxConcurrentLocalActivityExecutions: t.localActivitySlots,
    maxCachedWorkflows: t.cachedWorkflows ?? defaultCachedWorkflows(),
    stickyQueueScheduleToStartTimeout: t.stickyTimeoutMs,
    workflowThreadPoolSize: t.workflowThreads,
  };
}

/** The reconciler Schedule: every minute, one run at a time. Creating it twice is harmless. */
export async function ensureReconcilerSchedule(client: Client, settings: Settings): Promise<void> {
  const action = {
    type: 'startWorkflow' as const,
    workflowType: WORKFLOW_TYPE.reconcile,
    workflowId: RECONCILER_WORKFLOW_ID,
    taskQueue: settings.temporal.taskQueue,
    args: [{ version: 1 } satisfies ReconcileInput],
    // Overlap SKIP means a pass that can never finish (e.g. an incompatible deploy) would block every
    // later one: a run stuck this long is ended and the next pass starts. A healthy run ends well
    // before (each set walks at most its budget per run, then the pass continues as new).
    workflowRunTimeout: '15m',
    staticSummary: 'Reconcile the token store with the token workflows',
  };
  try {
    await client.schedule.create({
      scheduleId: RECONCILER_SCHEDULE_ID,
      spec: { intervals: [{ every: '1m' }] },
      action,
      policies: { overlap: ScheduleOverlapPolicy.SKIP, catchupWindow: '1m' },
      state: { note: 'Heals crashes between the central store and the token workflows.' },
    });
  } catch (err) {
    if (!(err instanceof ScheduleAlreadyRunning)) throw err;
    // A schedule created by an earlier release: bring its action up to date (task queue, timeout).
    await client.schedule.getHandle(RECONCILER_SCHEDULE_ID).update((current) => ({ ...current, action }));
  }
}

/** gRPC status codes that mean "this caller may not list search attributes" (some hosted setups). */
const GRPC_PERMISSION_DENIED = 7;
const GRPC_UNIMPLEMENTED = 12;

/**
 * Refuses to start against a namespace missing one of tokenwarden's search attributes, or holding one
 * under another type: a workflow upserting it then fails its task on every retry. Says what to create,
 * and how. A server that does not let this caller list them is trusted, with a warning; any other
 * error (unreachable, deadline) is thrown.
 */
export async function checkSearchAttributes(client: Client, namespace: string): Promise<void> {
  let registered: Record<string, proto.temporal.api.enums.v1.IndexedValueType>;
  try {
    const answer = await client.connection.operatorService.listSearchAttributes({ namespace });
    registered = { ...(answer.customAttributes ?? {}), ...(answer.systemAttributes ?? {}) };
  } catch (err) {
    if (!(isGrpcServiceError(err) && (err.code === GRPC_PERMISSION_DENIED || err.code === GRPC_UNIMPLEMENTED))) {
      throw err;
    }
    console.warn(
      `tokenwarden: could not list the search attributes of namespace ${namespace} (${err.message}); make sure ${Object.values(
        SEARCH_ATTRIBUTE,
      )
        .map((k) => `${k.name} (${SEARCH_ATTRIBUTE_CLI_TYPES[k.name]})`)
        .join(', ')} are registered`,
    );
    return;
  }
  const keys = Object.values(SEARCH_ATTRIBUTE);
  const missing = keys.filter((k) => !(k.name in registered));
  const mistyped = keys.filter(
    (k) => k.name in registered && registered[k.name] !== encodeSearchAttributeIndexedValueType(k.type),
  );
  const problems = [
    ...(missing.length > 0 ? [`lacks the search attribute(s) ${missing.map((k) => k.name).join(', ')}`] : []),
    ...mistyped.map(
      (k) =>
        `has ${k.name} registered as ${typeName(registered[k.name]!)} where tokenwarden writes ${SEARCH_ATTRIBUTE_CLI_TYPES[k.name]} (remove it, then create it with that type)`,
    ),
  ];
  if (problems.length > 0) {
    throw new ConfigError(
      `namespace ${namespace} ${problems.join('; ')}; register them first:\n${[...missing, ...mistyped]
        .map(
          (k) =>
            `  temporal operator search-attribute create --namespace ${namespace} --name ${k.name} --type ${SEARCH_ATTRIBUTE_CLI_TYPES[k.name]}`,
        )
        .join('\n')}`,
    );
  }
}

/** `KEYWORD_LIST` for INDEXED_VALUE_TYPE_KEYWORD_LIST, as the server names a registered type. */
const typeName = (type: proto.temporal.api.enums.v1.IndexedValueType): string =>
  (proto.temporal.api.enums.v1.IndexedValueType[type] ?? String(type)).replace(/^INDEXED_VALUE_TYPE_/, '');

/**
 * Runs a worker and the expiry sweep until shutdown (SIGINT/SIGTERM are handled by the SDK's
 * Runtime). With `ensureSchedule`, also creates the reconciler Schedule and triggers one pass right away.
 */
export async function runWorkerProcess(
  settings: Settings,
  opts: { ensureSchedule: boolean },
): Promise<{ shutdown(): Promise<void>; done: Promise<void> }> {
  // Warnings and errors only: the SDK's INFO lines (and the bundler's output) drown what matters.
  Runtime.install({
    logger: new DefaultLogger('WARN'),
    ...(settings.metricsAddress
      ? { telemetryOptions: { metrics: { prometheus: { bindAddress: settings.metricsAddress } } } }
      : {}),
  });
  const pool = createPool(settings.databaseUrl, settings.databaseSchema, settings.worker.dbPoolSize, (err) =>
    console.warn(`tokenwarden: an idle database connection was closed: ${err.message}`),
  );
  const client = await connectTemporal(settings);
  await checkSearchAttributes(client, settings.temporal.namespace);
  const connection = await NativeConnection.connect(settings.temporal.connectionOptions);
  const worker = await createTokenWorker({ connection, client, pool, settings });
  // Key ids only: a fleet mid-roll (processes encrypting with different keys) shows in the logs.
  console.error(`tokenwarden worker: ${describePayloadEncryption(settings)}`);
  if (opts.ensureSchedule) {
    await ensureReconcilerSchedule(client, settings);
    await client.schedule.getHandle(RECONCILER_SCHEDULE_ID).trigger(ScheduleOverlapPolicy.SKIP);
  }
  const sweeper = startExpirySweeper({
    pool,
    intervalMs: settings.expirySweepIntervalMs,
    logger: Runtime.instance().logger,
    meter: Runtime.instance().metricMeter,
  });
  const done = worker.run().finally(async () => {
    await sweeper.stop();
    await connection.close();
    await client.connection.close();
    await pool.end();
  });
  return {
    async shutdown() {
      if (worker.getState() === 'RUNNING') worker.shutdown();
      await done;
    },
    done,
  };
}
