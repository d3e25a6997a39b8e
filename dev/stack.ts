/**
 * `tokenwarden start`: the whole stack in one process, persistent under the data folder. Temporal
 * (SQLite file) and Postgres keep their state across restarts, so sleeping token workflows and
 * their tokens survive a Ctrl-C.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import {
  auditKeyFile,
  loadApiSettings,
  loadSettings,
  masterKeyFile,
  PACKAGE_ROOT,
  payloadKeysFile,
  type StackFile,
} from '../common/config.js';
import { isLoopbackHost } from '../common/addresses.js';
import { migrate } from '../common/db.js';
import { DEFAULT_NAMESPACE } from '../common/names.js';
import { runWorkerProcess } from '../worker/worker.js';
import { startEmbeddedPostgres } from './postgres.js';
import { resolveTemporalCli } from './temporal-cli.js';
import { ensureNamespaceReady, parseSqlitePragmas, startDevServer } from './temporal-server.js';

export interface StackOptions {
  /** Defaults to TOKENWARDEN_DATA_DIR, else `.data/` at the package root (git-ignored). */
  dataDir?: string;
  temporalPort?: number;
  uiPort?: number;
  pgPort?: number;
  /** Run the in-process worker (default); without it, run `tokenwarden worker` processes yourself. */
  worker?: boolean;
  log?: (msg: string) => void;
}

/** Closed workflows' histories are the audit trail; the dev server would keep them only 24 h. */
const RETENTION_DAYS = 90;

export async function runStack(opts: StackOptions = {}): Promise<never> {
  const log = opts.log ?? ((msg: string) => console.log(msg));
  const dataDir = path.resolve(opts.dataDir ?? process.env.TOKENWARDEN_DATA_DIR ?? path.join(PACKAGE_ROOT, '.data'));
  const temporalPort = opts.temporalPort ?? envPort('TOKENWARDEN_TEMPORAL_PORT', 7233);
  const uiPort = opts.uiPort ?? envPort('TOKENWARDEN_UI_PORT', 8233);
  const pgPort = opts.pgPort ?? envPort('TOKENWARDEN_PG_PORT', 5433);
  const stackFile = path.join(dataDir, 'stack.json');

  // Everything started so far, stopped in reverse order. Signals arriving during startup are
  // handled too: whatever is still starting is killed by ManagedChild's exit hook.
  const running: Array<{ name: string; stop: () => Promise<void> }> = [];
  let wroteStackFile = false;
  let shuttingDown: Promise<never> | undefined;
  const shutdown = (code: number): Promise<never> =>
    (shuttingDown ??= (async () => {
      for (const { name, stop } of running.reverse()) {
        try {
          await stop();
        } catch (err) {
          console.error(`stopping ${name} failed: ${(err as Error).message}`);
          code ||= 1;
        }
      }
      if (wroteStackFile) await rm(stackFile, { force: true });
      process.exit(code);
    })());
  const onSignal = () => {
    if (shuttingDown) {
      // ManagedChild's exit hook SIGKILLs the servers; SQLite and Postgres recover on the next start.
      console.error('forced exit');
      if (wroteStackFile) rmSync(stackFile, { force: true });
      process.exit(130);
    }
    log('\nstopping (Ctrl-C again to force)…');
    void shutdown(0);
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, onSignal);

  try {
    await mkdir(dataDir, { recursive: true });
    const keyFile = await ensureMasterKey(dataDir, log);
    const payloadKeysPath = await ensurePayloadKeys(dataDir, log);
    // The Web UI decodes payloads through the stack's HTTP API (its codec endpoints).
    // Its UI cannot send a key: loopback callers need none (a key is still needed from elsewhere),
    // and only when the API listens on loopback, since keyless answers trust the TCP peer.
    const apiHost = loadApiSettings({ ...process.env, TOKENWARDEN_CODEC_KEYLESS: 'off' }).host;
    const apiSettings = loadApiSettings({
      TOKENWARDEN_CODEC_KEYLESS: isLoopbackHost(apiHost) ? 'loopback' : 'off',
      TOKENWARDEN_CODEC_ORIGINS: `http://localhost:${uiPort},http://127.0.0.1:${uiPort}`,
      ...process.env,
    });
    const codecEndpoint = `http://${apiHostForUrl(apiSettings.host)}:${apiSettings.port}/codec`;
    const auditKey = await ensureAuditKey(dataDir, log);

    const cliPath = await resolveTemporalCli(log);
    const namespace = DEFAULT_NAMESPACE;
    const temporal = await startDevServer({
      cliPath,
      port: temporalPort,
      uiPort,
      dbFile: path.join(dataDir, 'temporal.db'),
      sqlitePragmas: parseSqlitePragmas(process.env.TOKENWARDEN_SQLITE_PRAGMAS),
      namespace,
      log: (line) => console.error(`temporal: ${line}`),
      ...(apiSettings.port !== 0 ? { extraArgs: ['--ui-codec-endpoint', codecEndpoint] } : {}),
    });
    running.push({ name: 'the Temporal dev server', stop: temporal.stop });
    const connection = await Connection.connect({ address: temporal.address });
    try {
      await ensureNamespaceReady(connection, namespace, RETENTION_DAYS);
    } finally {
      await connection.close();
    }
    log(`Temporal dev server on ${temporal.address}, namespace ${namespace}; Web UI: http://localhost:${uiPort}`);

    let databaseUrl = process.env.DATABASE_URL;
    if (databaseUrl) {
      log('PostgreSQL: using DATABASE_URL');
    } else {
      const postgres = await startEmbeddedPostgres({ dataDir: path.join(dataDir, 'postgres'), port: pgPort, log });
      running.push({ name: 'PostgreSQL', stop: postgres.stop });
      databaseUrl = postgres.databaseUrl;
      log(`PostgreSQL on 127.0.0.1:${pgPort} (data in ${path.join(dataDir, 'postgres')})`);
    }

    const loaded = loadSettings({
      // Receivers on this machine (the walkthrough's) are the point of a dev stack.
      TOKENWARDEN_RECEIVER_ALLOW: 'loopback',
      // Policies' owner folders (rotated secrets, warnings) lie in the stack's data folder.
      TOKENWARDEN_OWNER_DIR_ROOT: path.join(dataDir, 'owner'),
      ...process.env,
      TOKENWARDEN_DATA_DIR: dataDir,
      DATABASE_URL: databaseUrl,
    });
    // The stack's own server, whatever TEMPORAL_ADDRESS or a Temporal profile may point at.
    const settings = {
      ...loaded,
      temporal: { ...loaded.temporal, connectionOptions: { address: temporal.address }, namespace },
    };
    const applied = await migrate(databaseUrl, settings.databaseSchema, log);
    if (applied.length > 0) log(`applied migrations: ${applied.join(', ')}`);

    // The HTTP API in this process; it stops first (the list is stopped in reverse), requests finishing.
    const { startApi } = await import('../client/api/main.js');
    const api = await startApi(settings, apiSettings);
    running.push({ name: 'the HTTP API', stop: api.close });
    log(`HTTP API on ${api.url} (create a key: npx tokenwarden apikey create ops --scope admin)`);

    const stack: StackFile = {
      databaseUrl,
      databaseSchema: settings.databaseSchema,
      temporalAddress: temporal.address,
      namespace,
      taskQueue: settings.temporal.taskQueue,
      ...(keyFile ? { masterKeyFile: keyFile } : {}),
      ...(payloadKeysPath ? { payloadKeysFile: payloadKeysPath } : {}),
      ...(auditKey ? { auditKeyFile: auditKey } : {}),
      pid: process.pid,
      receiverAllow: settings.receiverAllow,
      api: api.url,
      ...(settings.ownerDirRoot ? { ownerDirRoot: settings.ownerDirRoot } : {}),
    };
    // The URL carries the database password.
    await writeFile(stackFile, `${JSON.stringify(stack, null, 2)}\n`, { mode: 0o600 });
    wroteStackFile = true;

    if (opts.worker ?? true) {
      const worker = await runWorkerProcess(settings, { ensureSchedule: true });
      running.push({ name: 'the worker', stop: worker.shutdown });
      worker.done.then(
        () => {
          if (!shuttingDown) console.error('the worker stopped unexpectedly');
          return shutdown(shuttingDown ? 0 : 1);
        },
        (err: unknown) => {
          console.error(`the worker failed: ${(err as Error).stack ?? String(err)}`);
          return shutdown(1);
        },
      );
    } else {
      log('no worker in this process (--no-worker): start `tokenwarden worker` processes with `tokenwarden env`');
    }
    log(walkthrough(uiPort, api.url));
  } catch (err) {
    console.error((err as Error).message);
    return shutdown(1);
  }
  return new Promise<never>(() => {});
}

/**
 * 32 random bytes, created once; it encrypts receivers' signing secrets at rest. Returns the file
 * the stack's key is in, or undefined when it comes from TOKENWARDEN_MASTER_KEY.
 */
async function ensureMasterKey(dataDir: string, log: (msg: string) => void): Promise<string | undefined> {
  if (process.env.TOKENWARDEN_MASTER_KEY) return undefined;
  if (process.env.TOKENWARDEN_MASTER_KEY_FILE) return path.resolve(process.env.TOKENWARDEN_MASTER_KEY_FILE);
  const file = masterKeyFile(dataDir);
  if (existsSync(file)) return file;
  await writeFile(file, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
  log(`created the master key ${file} (back it up: receivers' secrets cannot be read without it)`);
  return file;
}

/**
 * The key that encrypts the stack's payloads in Temporal, created once (32 random bytes). Returns the
 * file the stack's keys are in, or undefined when they come from TOKENWARDEN_PAYLOAD_KEYS.
 */
async function ensurePayloadKeys(dataDir: string, log: (msg: string) => void): Promise<string | undefined> {
  if (process.env.TOKENWARDEN_PAYLOAD_KEYS) return undefined;
  if (process.env.TOKENWARDEN_PAYLOAD_KEYS_FILE) return path.resolve(process.env.TOKENWARDEN_PAYLOAD_KEYS_FILE);
  const file = payloadKeysFile(dataDir);
  if (existsSync(file)) return file;
  await writeFile(file, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
  log(`created the payload key ${file} (back it up: the workflows' histories cannot be read without it)`);
  return file;
}

/** A host as it goes into a URL: an IPv6 address in brackets, a wildcard as the loopback address. */
function apiHostForUrl(host: string): string {
  if (host === '0.0.0.0' || host === '::') return '127.0.0.1';
  return host.includes(':') ? `[${host}]` : host;
}

/**
 * An ed25519 seed, created once; it signs the audit checkpoints the reconciler writes. Returns the
 * file the stack's key is in, or undefined when it comes from TOKENWARDEN_AUDIT_KEY.
 */
async function ensureAuditKey(dataDir: string, log: (msg: string) => void): Promise<string | undefined> {
  if (process.env.TOKENWARDEN_AUDIT_KEY) return undefined;
  if (process.env.TOKENWARDEN_AUDIT_KEY_FILE) return path.resolve(process.env.TOKENWARDEN_AUDIT_KEY_FILE);
  const file = auditKeyFile(dataDir);
  if (existsSync(file)) return file;
  await writeFile(file, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
  log(`created the audit key ${file} (it signs the audit checkpoints; keep it apart from the database)`);
  return file;
}

function envPort(name: string, fallback: number): number {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  const port = Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw new Error(`${name} must be a port number (1-65535), got ${JSON.stringify(text)}`);
  return port;
}

function walkthrough(uiPort: number, apiUrl: string): string {
  return `
tokenwarden is running. Ctrl-C stops it; tokens and sleeping workflows survive a restart.
In another terminal:

  npx tokenwarden receiver add billing --url http://127.0.0.1:9000/revocations
  npx tokenwarden issue --subject usr_8f3a21 --receiver billing --ttl 30s
  npx tokenwarden show <token id>
  npx tokenwarden revoke <token id> --reason "left the company"
  npx tokenwarden list --subject usr_8f3a21

The HTTP API is on ${apiUrl}:

  KEY=$(npx tokenwarden apikey create ops --scope admin --json | jq -r .key)
  curl -s ${apiUrl}/v1/tokens -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \\
    -d '{"subject":"usr_8f3a21","ttl":"1h"}'

Each token is a workflow: http://localhost:${uiPort}/namespaces/${DEFAULT_NAMESPACE}/workflows
`;
}
