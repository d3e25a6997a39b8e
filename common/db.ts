import path from 'node:path';
import pg from 'pg';
import { PACKAGE_ROOT } from './config.js';
import { quoteIdent } from './identifiers.js';

/**
 * Schema-qualified names of the store's tables. Every statement names its schema itself: nothing
 * rides on session state (search_path, prepared statements), so the store works behind a
 * transaction-mode connection pooler such as PgBouncer.
 */
export interface Tables {
  schema: string;
  token: string;
  credential: string;
  receiver: string;
  delivery: string;
  audit_event: string;
  audit_checkpoint: string;
  audit_checkpoint_head: string;
  api_key: string;
}

export const tablesFor = (schema: string): Tables => {
  const q = quoteIdent(schema);
  return {
    schema,
    token: `${q}.token`,
    credential: `${q}.credential`,
    receiver: `${q}.receiver`,
    delivery: `${q}.delivery`,
    audit_event: `${q}.audit_event`,
    audit_checkpoint: `${q}.audit_checkpoint`,
    audit_checkpoint_head: `${q}.audit_checkpoint_head`,
    api_key: `${q}.api_key`,
  };
};

/** A pool that knows the schema its statements address. */
export type StorePool = pg.Pool & { readonly tables: Tables };
/** A connection checked out of a StorePool (for a transaction). */
export type StoreClient = pg.PoolClient & { readonly tables: Tables };
export type Queryable = StorePool | StoreClient;

export interface DatabaseTimeouts {
  /** Opening a connection (or waiting for a free one in the pool). */
  connectMs: number;
  /** One statement, from send to answer; a hung server costs at most this. */
  queryMs: number;
  /** Idle time before TCP keepalive probes start (the OS default is two hours). */
  keepAliveMs: number;
}

/** Below the activities' start-to-close timeouts (15 s for a delivery), far above any statement's time. */
export const DATABASE_TIMEOUTS: DatabaseTimeouts = { connectMs: 10_000, queryMs: 12_000, keepAliveMs: 10_000 };

/**
 * A pool for the store in `schema` (one schema per deployment, one per test file). `onIdleError`
 * hears of idle connections the server dropped (restart, failover); the pool discards them, and
 * without a listener the 'error' event would crash the process. The pool itself prints nothing:
 * processes pass a logger, a library's app decides. Queries in flight still fail to their caller.
 */
export function createPool(
  databaseUrl: string,
  schema: string,
  max = 10,
  onIdleError: (err: Error) => void = () => {},
  timeouts: Partial<DatabaseTimeouts> = {},
): StorePool {
  const t = { ...DATABASE_TIMEOUTS, ...timeouts };
  const pool = new pg.Pool({
    connectionString: databaseUrl,
    max,
    application_name: 'tokenwarden',
    connectionTimeoutMillis: t.connectMs,
    // Client-side (a statement_timeout would be a startup parameter, which poolers refuse): the
    // caller gets an error instead of waiting on a server that vanished without a reset.
    query_timeout: t.queryMs,
    keepAlive: true,
    keepAliveInitialDelayMillis: t.keepAliveMs,
  });
  pool.on('error', onIdleError);
  // A connection lost while checked out (between a transaction's statements) emits 'error' on its
  // client, which the pool listens to only while idle: the caller's next statement fails instead.
  pool.on('connect', (client) => client.on('error', () => {}));
  return Object.assign(pool, { tables: tablesFor(schema) });
}

/** Checks a connection out of the pool for a transaction; release it with `client.release()`. */
export async function checkout(pool: StorePool): Promise<StoreClient> {
  const client = await pool.connect();
  return Object.assign(client, { tables: pool.tables });
}

export { quoteIdent } from './identifiers.js';

export const MIGRATIONS_DIR = path.join(PACKAGE_ROOT, 'migrations');

/**
 * Applies the numbered, forward-only SQL migrations to `schema` (created if missing), under
 * node-pg-migrate's advisory lock so concurrent starters wait for each other. Migrations run on a
 * direct connection (they set search_path for the migration scripts).
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
