/**
 * The throwaway services of a test run or a benchmark (`npm test`, `npm run bench:*`): an in-memory
 * headless Temporal dev server on a random port, an embedded PostgreSQL in a temp dir (or the given
 * database), and pre-built workflow bundles, started together.
 */
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { bundleWorkflowCode, DefaultLogger } from '@temporalio/worker';
import { DEFAULT_NAMESPACE } from '../common/names.js';
import { startEmbeddedPostgres } from './postgres.js';
import { freePort } from './processes.js';
import { resolveTemporalCli } from './temporal-cli.js';
import { ensureNamespaceReady, startDevServer } from './temporal-server.js';

export interface WorkflowBundleSource {
  workflowsPath: string;
  payloadConverterPath?: string;
  failureConverterPath?: string;
}

export interface ThrowawayServices<B extends string> {
  /** The Temporal CLI that runs the dev server (tests start more servers with it). */
  cliPath: string;
  temporalAddress: string;
  namespace: string;
  databaseUrl: string;
  /** "DATABASE_URL" for an external database, else how the embedded one is configured. */
  databaseKind: string;
  bundles: Record<B, { code: string }>;
  /** Stops everything started here, in reverse order; reports every failure, not only the first. */
  stop(): Promise<void>;
}

export async function startThrowawayServices<B extends string>(opts: {
  /** The embedded PostgreSQL's cluster goes in `<tmpDir>/postgres`. */
  tmpDir: string;
  /** What to bundle, by name: compiled workflow entry files (and payload converters). */
  workflows: Record<B, WorkflowBundleSource>;
  /** Use this database instead of starting one. */
  databaseUrl?: string;
  /** Extra `temporal server start-dev` arguments. */
  serverArgs?: string[];
  log: (msg: string) => void;
  /** Receives every log line of the Temporal server and of the embedded PostgreSQL, by service. */
  serverLog?: (service: 'temporal' | 'postgres', line: string) => void;
}): Promise<ThrowawayServices<B>> {
  const cleanups: Array<{ name: string; run: () => Promise<void> }> = [];
  const stop = async () => {
    const failures: string[] = [];
    for (const { name, run } of cleanups.reverse()) {
      await run().catch((err: Error) => failures.push(`${name}: ${err.message}`));
    }
    cleanups.length = 0;
    if (failures.length > 0) throw new Error(`stopping the services failed: ${failures.join('; ')}`);
  };

  try {
    const cliPath = await resolveTemporalCli(opts.log);
    const namespace = DEFAULT_NAMESPACE;
    // The three are independent; starting them together saves a few seconds. Every start is awaited
    // (allSettled) so that those that succeeded are stopped when one fails.
    const [temporalResult, databaseResult, bundlesResult] = await Promise.allSettled([
      (async () => {
        const server = await startDevServer({
          cliPath,
          port: await freePort(),
          namespace,
          ...(opts.serverArgs?.length ? { extraArgs: opts.serverArgs } : {}),
          ...(opts.serverLog ? { log: (line: string) => opts.serverLog!('temporal', line) } : {}),
        });
        cleanups.push({ name: 'temporal dev server', run: server.stop });
        const connection = await Connection.connect({ address: server.address });
        try {
          await ensureNamespaceReady(connection, namespace, 1);
        } finally {
          await connection.close();
        }
        return server.address;
      })(),
      (async () => {
        if (opts.databaseUrl) return { url: opts.databaseUrl, kind: 'DATABASE_URL' };
        const postgres = await startEmbeddedPostgres({
          dataDir: path.join(opts.tmpDir, 'postgres'),
          port: await freePort(),
          log: opts.log,
          ...(opts.serverLog ? { serverLog: (line: string) => opts.serverLog!('postgres', line) } : {}),
          // A throwaway cluster: durability only costs time here.
          settings: { fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' },
        });
        cleanups.push({ name: 'postgres', run: postgres.stop });
        return { url: postgres.databaseUrl, kind: 'embedded (fsync=off, synchronous_commit=off)' };
      })(),
      (async () => {
        const entries = await Promise.all(
          Object.entries<WorkflowBundleSource>(opts.workflows).map(async ([name, source]) => {
            const { code } = await bundleWorkflowCode({ ...source, logger: new DefaultLogger('WARN') });
            return [name, { code }] as const;
          }),
        );
        return Object.fromEntries(entries) as Record<B, { code: string }>;
      })(),
    ]);
    const temporalAddress = valueOf(temporalResult);
    const database = valueOf(databaseResult);
    const bundles = valueOf(bundlesResult);
    return {
      cliPath,
      temporalAddress,
      namespace,
      databaseUrl: database.url,
      databaseKind: database.kind,
      bundles,
      stop,
    };
  } catch (err) {
    await stop().catch((cleanupErr: Error) => opts.log(cleanupErr.message));
    throw err;
  }
}

function valueOf<T>(result: PromiseSettledResult<T>): T {
  if (result.status === 'rejected') throw result.reason;
  return result.value;
}
