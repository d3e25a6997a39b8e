/**
 * Per-test-file context against the run's real services (started by dev/run-tests): its own
 * Postgres schema, its own task queue, a Temporal client, workers on demand, the library.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { Client, Connection } from '@temporalio/client';
import { DefaultLogger, NativeConnection, Runtime, type Worker } from '@temporalio/worker';
import pg from 'pg';
import type { StorePool } from '../../common/db.js';
import { DEFAULT_MAX_TTL_MS, WORKER_TUNING_DEFAULTS, type Settings } from '../../common/config.js';
import { createPool, migrate, quoteIdent } from '../../common/db.js';
import { TokenWarden } from '../../client/index.js';
import { createTokenWorker, type TokenWorkerOptions } from '../../worker/worker.js';
import { clientDataConverter } from '../../common/data-converter.js';
import { RECORDING_PAYLOAD_KEY } from './history.js';
import { LOGS_DIR, recordKeys, recordStoreMade, recordStoreSecrets, runLog } from './run-record.js';

function required(name: string): string {
  const value = process.env[name];
  if (!value)
    throw new Error(`${name} is not set: run the tests with \`npm test\`, which starts Temporal and PostgreSQL`);
  return value;
}

let quietRuntime: Runtime | undefined;

/** Services other than the run's shared ones, e.g. a Postgres or a Temporal server a test crashes. */
export interface ContextServices {
  databaseUrl?: string;
  temporalAddress?: string;
  namespace?: string;
}

export interface RunningWorker {
  worker: Worker;
  stop(): Promise<void>;
}

export class TestContext {
  private workers = new Set<RunningWorker>();
  private constructor(
    readonly settings: Settings,
    readonly pool: StorePool,
    /** Raw SQL in tests (assertions, fault injection): a pool whose search_path is this file's schema. */
    readonly sql: pg.Pool,
    readonly client: Client,
    readonly nativeConnection: NativeConnection,
    readonly warden: TokenWarden,
  ) {}

  static async create(
    label: string,
    timing: Partial<Settings['timing']> = {},
    services: ContextServices = {},
  ): Promise<TestContext> {
    // Quiet runtime: expected activity failures (fault injection) would otherwise fill the output.
    // In a recorded run every line from INFO up (workflow and activity logs, the SDK's failure lines
    // with their messages) goes to the run's logs, which the closing secret scan reads.
    quietRuntime ??= Runtime.install({ logger: LOGS_DIR ? runLogger() : new DefaultLogger('ERROR') });
    const databaseUrl = services.databaseUrl ?? required('TOKENWARDEN_TEST_DATABASE_URL');
    const address = services.temporalAddress ?? required('TOKENWARDEN_TEST_TEMPORAL_ADDRESS');
    const namespace = services.namespace ?? required('TOKENWARDEN_TEST_NAMESPACE');
    const schema = `test_${label}_${randomBytes(4).toString('hex')}`;
    await migrate(databaseUrl, schema);
    recordStoreMade(schema);
    const settings: Settings = {
      temporal: { connectionOptions: { address }, namespace, taskQueue: `tq-${schema}` },
      databaseUrl,
      databaseSchema: schema,
      dataDir: '/nonexistent',
      timing: { escalateAfterMs: 3_000, retryInitialMs: 200, retryMaxMs: 1_000, ...timing },
      expirySweepIntervalMs: 1_000,
      reconcileGraceMs: 0,
      masterKey: randomBytes(32),
      previousMasterKeys: [],
      // Every file's payloads are encrypted in Temporal, as the dev stack's are; recorded histories
      // with the corpus's key, so that replay can decode them.
      payloadKeys: [process.env.TOKENWARDEN_RECORD_HISTORIES ? RECORDING_PAYLOAD_KEY : randomBytes(32)],
      // Test receivers listen on loopback.
      receiverAllow: ['loopback'],
      maxTtlMs: DEFAULT_MAX_TTL_MS,
      // The tests' owner folders are made in the system's temporary folder.
      ownerDirRoot: os.tmpdir(),
      // TOKENWARDEN_TEST_CACHED_WORKFLOWS=0 replays every workflow task from the start: a way to run a
      // file's scenarios as a determinism check of the live code against itself.
      worker: process.env.TOKENWARDEN_TEST_CACHED_WORKFLOWS
        ? { ...WORKER_TUNING_DEFAULTS, cachedWorkflows: cachedWorkflows(process.env.TOKENWARDEN_TEST_CACHED_WORKFLOWS) }
        : WORKER_TUNING_DEFAULTS,
    };
    recordKeys(settings.payloadKeys, [settings.masterKey!, ...settings.previousMasterKeys]);
    const pool = createPool(databaseUrl, schema, 5);
    const sql = new pg.Pool({ connectionString: databaseUrl, max: 2, options: `-c search_path=${quoteIdent(schema)}` });
    // Fault-injection tests restart the database under it: an idle connection's end is no failure.
    sql.on('error', () => {});
    const client = new Client({
      connection: await Connection.connect({ address }),
      namespace,
      dataConverter: clientDataConverter(settings),
    });
    const nativeConnection = await NativeConnection.connect({ address });
    const warden = await TokenWarden.connect(settings);
    return new TestContext(settings, pool, sql, client, nativeConnection, warden);
  }

  /**
   * Starts a worker on this file's task queue with the run's pre-built workflow bundle; `settings`
   * of its own (e.g. timing that differs from the issuer's), `wrapActivities` to inject a fault at
   * the real activities' boundary.
   */
  async startWorker(
    settings: Settings = this.settings,
    opts: Pick<TokenWorkerOptions, 'wrapActivities' | 'maxHeartbeatThrottleMs'> = {},
  ): Promise<RunningWorker> {
    const bundlePath = process.env.TOKENWARDEN_TEST_WORKFLOW_BUNDLE;
    const worker = await createTokenWorker({
      connection: this.nativeConnection,
      client: this.client,
      pool: this.pool,
      settings,
      ...opts,
      ...(bundlePath ? { workflowBundle: { codePath: bundlePath } } : {}),
    });
    const running = worker.run();
    const handle: RunningWorker = {
      worker,
      stop: async () => {
        if (worker.getState() === 'RUNNING') worker.shutdown();
        await running;
        this.workers.delete(handle);
      },
    };
    this.workers.add(handle);
    return handle;
  }

  /**
   * The environment a `tokenwarden` child process needs to use this context's store and queue, with
   * this context's short timing.
   */
  childEnv(): Record<string, string> {
    const s = this.settings;
    return {
      TOKENWARDEN_ESCALATE_AFTER: `${s.timing.escalateAfterMs}ms`,
      TOKENWARDEN_RETRY_INITIAL: `${s.timing.retryInitialMs}ms`,
      TOKENWARDEN_RETRY_MAX: `${s.timing.retryMaxMs}ms`,
      PATH: process.env.PATH ?? '',
      DATABASE_URL: s.databaseUrl,
      TOKENWARDEN_DB_SCHEMA: s.databaseSchema,
      TOKENWARDEN_DATA_DIR: '/nonexistent',
      TEMPORAL_ADDRESS: s.temporal.connectionOptions.address!,
      TEMPORAL_NAMESPACE: s.temporal.namespace,
      TOKENWARDEN_TASK_QUEUE: s.temporal.taskQueue,
      TOKENWARDEN_MASTER_KEY: s.masterKey!.toString('base64'),
      TOKENWARDEN_PREVIOUS_MASTER_KEYS: s.previousMasterKeys.map((k) => k.toString('base64')).join(','),
      ...(s.payloadKeys.length
        ? { TOKENWARDEN_PAYLOAD_KEYS: s.payloadKeys.map((k) => k.toString('base64')).join(',') }
        : {}),
      TOKENWARDEN_RECEIVER_ALLOW: s.receiverAllow.join(','),
      ...(s.ownerDirRoot !== undefined ? { TOKENWARDEN_OWNER_DIR_ROOT: s.ownerDirRoot } : {}),
    };
  }

  /**
   * Stops everything the context started, then searches its store for leaked secrets and drops it
   * (kept when it could not be searched: the run's closing scan searches it). Every step runs even
   * when an earlier one failed; the failures are thrown together at the end.
   */
  async close(): Promise<void> {
    const errors: unknown[] = [];
    const step = async (fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    };
    for (const w of [...this.workers]) await step(() => w.stop());
    await step(() => this.warden.close());
    await step(() => this.client.connection.close());
    await step(() => this.nativeConnection.close());
    await step(async () => {
      const searched = await recordStoreSecrets(this.sql, this.settings.databaseSchema, {
        master: [this.settings.masterKey!, ...this.settings.previousMasterKeys],
        payload: this.settings.payloadKeys,
      });
      if (searched && !process.env.TOKENWARDEN_KEEP_TEST_SCHEMAS) {
        await this.sql.query(`DROP SCHEMA ${quoteIdent(this.settings.databaseSchema)} CASCADE`);
      }
    });
    // Even when the database is gone (a fault test failed while it was down), or a worker failed to
    // stop: open pools would keep the test process alive.
    await step(() => this.sql.end());
    await step(() => this.pool.end());
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, `closing the test context: ${errors.length} failures`);
  }
}

/** The in-process workers' logger of a recorded run: every entry to logs/, errors also to stderr. */
function runLogger(): DefaultLogger {
  const write = runLog(`in-process-${process.pid}`);
  const console = new DefaultLogger('ERROR');
  return new DefaultLogger('INFO', (entry) => {
    try {
      write(`${entry.level} ${entry.message} ${safeJson(entry.meta)}`);
    } catch {
      // A full disk must not fail the activity or workflow that logged; the scan then reads less.
    }
    if (entry.level === 'ERROR') console.log('ERROR', entry.message, entry.meta);
  });
}

const safeJson = (value: unknown): string => {
  try {
    return (
      JSON.stringify(value, (_k, v: unknown) =>
        v instanceof Error
          ? { name: v.name, message: v.message, stack: v.stack, cause: v.cause }
          : typeof v === 'bigint'
            ? String(v)
            : v,
      ) ?? ''
    );
  } catch {
    return String(value);
  }
};

function cachedWorkflows(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) {
    throw new Error(
      `TOKENWARDEN_TEST_CACHED_WORKFLOWS must be a whole number (0: no cache), not ${JSON.stringify(text)}`,
    );
  }
  return n;
}
