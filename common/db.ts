import path from 'node:path';
import pg from 'pg';
import { PACKAGE_ROOT } from './config.js';

/** A pool whose connections all use `schema` (one schema per deployment, one per test file). */
export function createPool(databaseUrl: string, schema: string, max = 10): pg.Pool {
  const pool = new pg.Pool({
    connectionString: databaseUrl,
    max,
    options: `-c search_path=${quoteIdent(schema)}`,
    application_name: 'tokenwarden',
  });
  // An idle connection dropped by the server (restart, failover) is discarded by the pool; without a
  // listener the 'error' event would crash the process. Queries in flight still fail to their caller.
  pool.on('error', (err) => console.warn(`tokenwarden: an idle database connection was closed: ${err.message}`));
  return pool;
}

export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

export const MIGRATIONS_DIR = path.join(PACKAGE_ROOT, 'migrations');

/**
 * Applies the numbered, forward-only SQL migrations to `schema` (created if missing), under
 * node-pg-migrate's advisory lock so concurrent starters wait for each other.
 */
export async function migrate(
  databaseUrl: string,
  schema: string,
  log: (msg: string) => void = () => {},
): Promise<string[]> {
  const { runner } = await import('node-pg-migrate');
  const applied = await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    migrationsTable: 'pgmigrations',
    schema,
    createSchema: true,
    checkOrder: true,
    singleTransaction: true,
    advisoryLockMode: 'wait',
    log: () => {},
    logger: { debug: () => {}, info: () => {}, warn: log, error: log },
  });
  return applied.map((m) => m.name);
}
