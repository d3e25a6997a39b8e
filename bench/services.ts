/**
 * What a benchmark needs, started by the benchmark itself the way `npm test` starts it
 * (dev/run-tests.ts): an in-memory headless Temporal dev server on a random port, an embedded
 * PostgreSQL in a temp dir (or DATABASE_URL), a freshly migrated schema, and pre-built workflow bundles.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { bundleWorkflowCode, DefaultLogger } from '@temporalio/worker';
import { createPool, migrate, quoteIdent } from '../common/db.js';
import { DEFAULT_NAMESPACE } from '../common/names.js';
import { startEmbeddedPostgres } from '../dev/postgres.js';
import { freePort } from '../dev/processes.js';
import { resolveTemporalCli } from '../dev/temporal-cli.js';
import { ensureNamespaceReady, startDevServer } from '../dev/temporal-server.js';

export interface BenchServices<B extends string> {
  temporalAddress: string;
  namespace: string;
  databaseUrl: string;
  /** A fresh schema, migrated; dropped on stop when the database is not ours (DATABASE_URL). */
  schema: string;
  /** Where the embedded Postgres lives: the external database's, or "embedded …". */
  databaseKind: string;
  tmpDir: string;
  bundles: Record<B, { code: string }>;
  /** Stops everything started here, in reverse order; reports every failure, not only the first. */
  stop(): Promise<void>;
}

export async function startBenchServices<B extends string>(opts: {
  label: string;
  /** Workflow entry files (compiled .js) to bundle, by name. */
  workflows: Record<B, string>;
  /** Extra `temporal server start-dev` arguments. */
  serverArgs?: string[];
  log: (msg: string) => void;
}): Promise<BenchServices<B>> {
  const tmpDir = await mkdtemp(path.join(os.tmpdir(), `tokenwarden-bench-${opts.label}-`));
  const cleanups: Array<{ name: string; run: () => Promise<void> }> = [
    { name: 'temp dir', run: () => rm(tmpDir, { recursive: true, force: true }) },
  ];
  const stop = async () => {
    const failures: string[] = [];
    for (const { name, run } of cleanups.reverse()) {
      await run().catch((err: Error) => failures.push(`${name}: ${err.message}`));
    }
    if (failures.length > 0) throw new Error(`stopping the benchmark's services failed: ${failures.join('; ')}`);
  };

  try {
    const cliPath = await resolveTemporalCli(opts.log);
    const namespace = DEFAULT_NAMESPACE;
    // The three are independent; starting them together saves a few seconds (as in run-tests).
    const [temporalResult, databaseResult, bundlesResult] = await Promise.allSettled([
      (async () => {
        const server = await startDevServer({
          cliPath,
          port: await freePort(),
          namespace,
          ...(opts.serverArgs?.length ? { extraArgs: opts.serverArgs } : {}),
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
        if (process.env.DATABASE_URL) return { url: process.env.DATABASE_URL, kind: 'DATABASE_URL' };
        const postgres = await startEmbeddedPostgres({
          dataDir: path.join(tmpDir, 'postgres'),
          port: await freePort(),
          log: opts.log,
          // The same throwaway settings as the test run; the dev server's store is in memory too.
          settings: { fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' },
        });
        cleanups.push({ name: 'postgres', run: postgres.stop });
        return { url: postgres.databaseUrl, kind: 'embedded (fsync=off, synchronous_commit=off)' };
      })(),
      (async () => {
        const entries = await Promise.all(
          Object.entries<string>(opts.workflows).map(async ([name, workflowsPath]) => {
            const { code } = await bundleWorkflowCode({ workflowsPath, logger: new DefaultLogger('WARN') });
            return [name, { code }] as const;
          }),
        );
        return Object.fromEntries(entries) as Record<B, { code: string }>;
      })(),
    ]);
    const temporalAddress = valueOf(temporalResult);
    const database = valueOf(databaseResult);
    const bundles = valueOf(bundlesResult);

    const schema = `bench_${opts.label}_${randomBytes(4).toString('hex')}`;
    await migrate(database.url, schema, opts.log);
    if (process.env.DATABASE_URL) {
      cleanups.push({ name: `schema ${schema}`, run: () => dropSchema(database.url, schema) });
    }
    return {
      temporalAddress,
      namespace,
      databaseUrl: database.url,
      schema,
      databaseKind: database.kind,
      tmpDir,
      bundles,
      stop,
    };
  } catch (err) {
    await stop().catch((cleanupErr: Error) => opts.log(cleanupErr.message));
    throw err;
  }
}

async function dropSchema(databaseUrl: string, schema: string): Promise<void> {
  const pool = createPool(databaseUrl, schema, 1);
  try {
    await pool.query(`DROP SCHEMA ${quoteIdent(schema)} CASCADE`);
  } finally {
    await pool.end();
  }
}

/** Every start is awaited (allSettled) so that those that succeeded are stopped when one fails. */
function valueOf<T>(result: PromiseSettledResult<T>): T {
  if (result.status === 'rejected') throw result.reason;
  return result.value;
}
