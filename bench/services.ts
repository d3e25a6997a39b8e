/**
 * What a benchmark needs, started the way `npm test` starts it (dev/services.ts), plus a freshly
 * migrated schema and a temp dir of its own.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createPool, migrate, quoteIdent } from '../common/db.js';
import { startThrowawayServices, type ThrowawayServices, type WorkflowBundleSource } from '../dev/services.js';

export interface BenchServices<B extends string> extends Omit<ThrowawayServices<B>, 'cliPath'> {
  /** A fresh schema, migrated; dropped on stop when the database is not ours (DATABASE_URL). */
  schema: string;
  tmpDir: string;
}

export async function startBenchServices<B extends string>(opts: {
  label: string;
  /** What to bundle, by name: compiled workflow entry files (and payload converters). */
  workflows: Record<B, WorkflowBundleSource>;
  /** Extra `temporal server start-dev` arguments. */
  serverArgs?: string[];
  log: (msg: string) => void;
}): Promise<BenchServices<B>> {
  const tmpDir = await mkdtemp(path.join(os.tmpdir(), `tokenwarden-bench-${opts.label}-`));
  // mkdtemp makes it 0700; as root, Postgres runs as the postgres user and must traverse it.
  await chmod(tmpDir, 0o711);
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
    const services = await startThrowawayServices({
      tmpDir,
      workflows: opts.workflows,
      ...(process.env.DATABASE_URL ? { databaseUrl: process.env.DATABASE_URL } : {}),
      ...(opts.serverArgs ? { serverArgs: opts.serverArgs } : {}),
      log: opts.log,
    });
    cleanups.push({ name: 'services', run: services.stop });
    const schema = `bench_${opts.label}_${randomBytes(4).toString('hex')}`;
    await migrate(services.databaseUrl, schema, opts.log);
    if (process.env.DATABASE_URL) {
      cleanups.push({ name: `schema ${schema}`, run: () => dropSchema(services.databaseUrl, schema) });
    }
    return {
      temporalAddress: services.temporalAddress,
      namespace: services.namespace,
      databaseUrl: services.databaseUrl,
      databaseKind: services.databaseKind,
      bundles: services.bundles,
      schema,
      tmpDir,
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
