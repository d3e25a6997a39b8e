/** The Temporal CLI dev server as a child process, and the namespace settings tokenwarden relies on. */
import { Connection } from '@temporalio/client';
import { encodeSearchAttributeIndexedValueType } from '@temporalio/common/lib/search-attributes.js';
import { msToTs, optionalTsToMs } from '@temporalio/common/lib/time.js';
import { SEARCH_ATTRIBUTE, SEARCH_ATTRIBUTE_CLI_TYPES } from '../common/names.js';
import { assertPortFree, ManagedChild, tcpAccepts, waitUntilReady } from './processes.js';

export interface DevServerOptions {
  cliPath: string;
  port: number;
  /** Omit for `--headless`. */
  uiPort?: number;
  /** SQLite file; omit for an in-memory server that forgets everything on exit. */
  dbFile?: string;
  /** Pragmas for the SQLite file, over SQLITE_PRAGMA_DEFAULTS (TOKENWARDEN_SQLITE_PRAGMAS). */
  sqlitePragmas?: Record<string, string>;
  namespace: string;
  logLevel?: 'debug' | 'info' | 'warn' | 'error' | 'never';
  extraArgs?: string[];
  /** Receives the server's own log lines (warnings by default). */
  log?: (line: string) => void;
}

export interface DevServer {
  address: string;
  stop(): Promise<void>;
}

/**
 * All persistence goes through one SQLite connection: WAL with synchronous=normal syncs at
 * checkpoints rather than on every commit. A power cut may lose the last commits, never the file.
 */
export const SQLITE_PRAGMA_DEFAULTS: Readonly<Record<string, string>> = { journal_mode: 'wal', synchronous: 'normal' };

/**
 * `name=value,name=value` (TOKENWARDEN_SQLITE_PRAGMAS) to pragmas. The server hands every pair to
 * SQLite as it is, and SQLite ignores a pragma it does not know: names and values are checked here.
 */
export function parseSqlitePragmas(text: string | undefined): Record<string, string> {
  const pragmas: Record<string, string> = {};
  for (const pair of (text ?? '')
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)) {
    const match = /^([a-z_]+)=(-?[a-z0-9_]+)$/i.exec(pair);
    if (!match || !SQLITE_PRAGMA_NAMES.includes(match[1]!.toLowerCase())) {
      throw new Error(
        `TOKENWARDEN_SQLITE_PRAGMAS must be name=value pairs, comma-separated, of ${SQLITE_PRAGMA_NAMES.join(', ')}; got ${JSON.stringify(pair)}`,
      );
    }
    pragmas[match[1]!.toLowerCase()] = match[2]!;
  }
  return pragmas;
}

/** Pragmas that tune the file's durability and speed; the others are no settings for a server's file. */
const SQLITE_PRAGMA_NAMES = [
  'journal_mode',
  'synchronous',
  'wal_autocheckpoint',
  'cache_size',
  'busy_timeout',
  'temp_store',
  'mmap_size',
];

export async function startDevServer(opts: DevServerOptions): Promise<DevServer> {
  await assertPortFree(
    opts.port,
    `port ${opts.port} is already in use: is another Temporal server running? set TOKENWARDEN_TEMPORAL_PORT`,
  );
  if (opts.uiPort !== undefined) {
    await assertPortFree(
      opts.uiPort,
      `port ${opts.uiPort} (Temporal Web UI) is already in use: set TOKENWARDEN_UI_PORT`,
    );
  }

  const args = ['server', 'start-dev', '--ip', '127.0.0.1', '--port', String(opts.port), '--namespace', opts.namespace];
  args.push('--log-level', opts.logLevel ?? 'warn');
  args.push(...(opts.uiPort === undefined ? ['--headless'] : ['--ui-port', String(opts.uiPort)]));
  for (const [name, type] of Object.entries(SEARCH_ATTRIBUTE_CLI_TYPES))
    args.push('--search-attribute', `${name}=${type}`);
  if (opts.dbFile) {
    args.push('--db-filename', opts.dbFile);
    for (const [name, value] of Object.entries({ ...SQLITE_PRAGMA_DEFAULTS, ...opts.sqlitePragmas }))
      args.push('--sqlite-pragma', `${name}=${value}`);
  }
  args.push(...(opts.extraArgs ?? []));

  const address = `127.0.0.1:${opts.port}`;
  const child = new ManagedChild('temporal dev server', opts.cliPath, args, { onLine: opts.log });
  const connection = await waitUntilReady(
    child,
    // The TCP check fails fast while the server is booting; a gRPC connect would wait out its timeout.
    async () => {
      await tcpAccepts(opts.port);
      return await Connection.connect({ address, connectTimeout: 2000 });
    },
    30_000,
  );
  await connection.close();

  return {
    address,
    // The server handles SIGTERM by stopping its services and closing the SQLite file.
    stop: () => child.stop('SIGTERM'),
  };
}

/**
 * Makes `namespace` fit for tokenwarden: registers any missing search attribute (the CLI registers
 * them only when it creates the namespace, so not for an existing SQLite file) and raises the
 * retention, because closed workflows' histories are the audit trail and the dev server keeps them 24 h.
 */
export async function ensureNamespaceReady(
  connection: Connection,
  namespace: string,
  retentionDays: number,
): Promise<void> {
  const { customAttributes } = await connection.operatorService.listSearchAttributes({ namespace });
  const missing: Record<string, number> = {};
  for (const key of Object.values(SEARCH_ATTRIBUTE)) {
    const wanted = encodeSearchAttributeIndexedValueType(key.type);
    if (wanted === undefined) throw new Error(`search attribute ${key.name} has unknown type ${key.type}`);
    const existing = customAttributes?.[key.name];
    if (existing === undefined || existing === null) missing[key.name] = wanted;
    else if (existing !== wanted) {
      throw new Error(
        `search attribute ${key.name} exists in namespace ${namespace} with another type than ${key.type}: remove it or use another namespace`,
      );
    }
  }
  if (Object.keys(missing).length > 0) {
    await connection.operatorService.addSearchAttributes({ namespace, searchAttributes: missing });
  }

  const wantedMs = retentionDays * 24 * 3600 * 1000;
  const { config } = await connection.workflowService.describeNamespace({ namespace });
  if ((optionalTsToMs(config?.workflowExecutionRetentionTtl) ?? 0) < wantedMs) {
    // Only the retention is set; the server leaves unset config fields as they are.
    await connection.workflowService.updateNamespace({
      namespace,
      config: { workflowExecutionRetentionTtl: msToTs(wantedMs) },
    });
  }
}
