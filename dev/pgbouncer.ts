/**
 * PgBouncer in transaction mode in front of a PostgreSQL, as most production setups run it: each
 * transaction may land on another server connection, so nothing may rely on session state. Used by
 * the tests to prove the store does not; the binary is the distribution's (Debian: `pgbouncer`).
 */
import { execFileSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { chown, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { freePort, ManagedChild, waitUntilReady } from './processes.js';

export interface PgBouncer {
  /** Connection string of the pooled database (same database name and user as the server's). */
  databaseUrl: string;
  stop(): Promise<void>;
}

export interface PgBouncerOptions {
  /** The PostgreSQL to pool: a postgresql:// URL with user, password, host, port and database. */
  serverUrl: string;
  /** Server connections per database and user; 1 makes every client share one server session. */
  poolSize?: number;
  binary?: string;
}

/** The pgbouncer binary (TOKENWARDEN_PGBOUNCER, else on PATH or in sbin), or undefined. */
export function findPgBouncer(): string | undefined {
  const explicit = process.env.TOKENWARDEN_PGBOUNCER;
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean), '/usr/sbin', '/usr/local/sbin'];
  for (const candidate of explicit ? [explicit] : dirs.map((d) => path.join(d, 'pgbouncer'))) {
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not there: try the next
    }
  }
  return undefined;
}

// PgBouncer refuses to run as root: as root, it runs as the same user as the embedded PostgreSQL.
const RUN_AS = 'postgres';
const isRoot = process.getuid?.() === 0;

/** A value in PgBouncer's connection string, single-quoted; we need no escapes, so we allow none. */
function connValue(field: string, value: string): string {
  if (/['\\\s]/.test(value)) throw new Error(`pgbouncer: the server's ${field} holds a quote, backslash or space`);
  return `'${value}'`;
}

export async function startPgBouncer(opts: PgBouncerOptions): Promise<PgBouncer> {
  const binary = opts.binary ?? findPgBouncer();
  if (!binary) throw new Error('pgbouncer is not installed (Debian: apt-get install pgbouncer)');
  const server = new URL(opts.serverUrl);
  const database = decodeURIComponent(server.pathname.slice(1));
  // PgBouncer 1.18 takes bare database names only in its [databases] section.
  if (!/^\w+$/.test(database)) throw new Error(`pgbouncer: unsupported database name ${JSON.stringify(database)}`);
  const user = decodeURIComponent(server.username);
  const port = await freePort();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-pgbouncer-'));
  const ids = isRoot ? userIds(RUN_AS) : undefined;
  try {
    const serverConn = [
      `host=${connValue('host', server.hostname)}`,
      `port=${server.port || '5432'}`,
      `dbname=${connValue('database', database)}`,
      `user=${connValue('user', user)}`,
      `password=${connValue('password', decodeURIComponent(server.password))}`,
    ].join(' ');
    const ini = [
      '[databases]',
      `${database} = ${serverConn}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      // Loopback only, for tests: clients are not authenticated; PgBouncer logs in to the server.
      'auth_type = trust',
      `auth_file = ${path.join(dir, 'userlist.txt')}`,
      'pool_mode = transaction',
      `default_pool_size = ${opts.poolSize ?? 2}`,
      'max_client_conn = 200',
      'ignore_startup_parameters = extra_float_digits',
      'log_connections = 0',
      'log_disconnections = 0',
    ].join('\n');
    await writeFile(path.join(dir, 'pgbouncer.ini'), `${ini}\n`, { mode: 0o600 });
    await writeFile(path.join(dir, 'userlist.txt'), `${JSON.stringify(user)} ""\n`, { mode: 0o600 });
    if (ids) {
      for (const f of ['', 'pgbouncer.ini', 'userlist.txt']) await chown(path.join(dir, f), ids.uid, ids.gid);
    }
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }

  const child = new ManagedChild('pgbouncer', binary, [path.join(dir, 'pgbouncer.ini')], { cwd: dir, ...ids });
  const databaseUrl = `postgresql://${encodeURIComponent(user)}@127.0.0.1:${port}/${encodeURIComponent(database)}`;
  const stop = async () => {
    // SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients to leave).
    await child.stop('SIGTERM', 5_000);
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await waitUntilReady(
      child,
      async () => {
        const client = new pg.Client({ connectionString: databaseUrl });
        try {
          await client.connect();
          await client.query('SELECT 1');
        } finally {
          await client.end().catch(() => {});
        }
      },
      15_000,
    );
  } catch (err) {
    await stop();
    throw err;
  }
  return { databaseUrl, stop };
}

function userIds(name: string): { uid: number; gid: number } {
  const id = (flag: string) => Number(execFileSync('id', [flag, name], { encoding: 'utf8' }).trim());
  return { uid: id('-u'), gid: id('-g') };
}
