import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadClientConnectConfig } from '@temporalio/envconfig';
import type { NativeConnectionOptions } from '@temporalio/worker';
import { z } from 'zod';
import { DEFAULT_NAMESPACE, DEFAULT_TASK_QUEUE, type PropagationTiming } from './names.js';
import { parseDuration, DURATION_HINT } from './durations.js';
import { ConfigError } from './errors.js';

/** The package root (this file lives in dist/common/). */
export const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Settings {
  temporal: { connectionOptions: NativeConnectionOptions; namespace: string; taskQueue: string };
  databaseUrl: string;
  /** Postgres schema holding tokenwarden's tables. */
  databaseSchema: string;
  dataDir: string;
  timing: PropagationTiming;
  /** How long a store fact may go unhealed before the reconciler acts on it. */
  reconcileGraceMs: number;
  /** Key that encrypts receivers' signing secrets at rest; undefined when not configured. */
  masterKey: Buffer | undefined;
  /** host:port where a worker serves Prometheus metrics (`/metrics`); none when unset. */
  metricsAddress?: string;
}

/** What `tokenwarden start` writes into the data folder so that CLI calls find the running stack. */
export interface StackFile {
  databaseUrl: string;
  temporalAddress: string;
  namespace: string;
  /** The stack's process: a file left behind by a killed stack is ignored. */
  pid: number;
}

const duration = (name: string, fallback: string) =>
  z
    .string()
    .default(fallback)
    .transform((text, ctx) => {
      const ms = parseDuration(text);
      if (ms === undefined) {
        ctx.addIssue({ code: 'custom', message: `${name} must be ${DURATION_HINT}, got ${JSON.stringify(text)}` });
        return z.NEVER;
      }
      return ms;
    });

const envSchema = z.object({
  DATABASE_URL: z.url({ protocol: /^postgres(ql)?$/, error: 'DATABASE_URL must be a postgres:// URL' }).optional(),
  TOKENWARDEN_DB_SCHEMA: z
    .string()
    .regex(/^[a-z_][a-z0-9_]{0,62}$/, 'TOKENWARDEN_DB_SCHEMA must be a lowercase SQL identifier')
    .default('tokenwarden'),
  TOKENWARDEN_DATA_DIR: z.string().min(1).optional(),
  TOKENWARDEN_TASK_QUEUE: z.string().min(1).default(DEFAULT_TASK_QUEUE),
  TOKENWARDEN_MASTER_KEY: z
    .string()
    .refine((v) => Buffer.from(v, 'base64').length === 32, 'TOKENWARDEN_MASTER_KEY must be 32 bytes, base64-encoded')
    .optional(),
  TOKENWARDEN_ESCALATE_AFTER: duration('TOKENWARDEN_ESCALATE_AFTER', '1h'),
  TOKENWARDEN_RETRY_INITIAL: duration('TOKENWARDEN_RETRY_INITIAL', '1s'),
  TOKENWARDEN_RETRY_MAX: duration('TOKENWARDEN_RETRY_MAX', '10m'),
  TOKENWARDEN_RECONCILE_GRACE: duration('TOKENWARDEN_RECONCILE_GRACE', '1m'),
  TOKENWARDEN_METRICS_ADDRESS: z
    .string()
    .regex(
      /^(\[[0-9a-fA-F:]+\]|[^\s:[\]]+):\d{1,5}$/,
      'TOKENWARDEN_METRICS_ADDRESS must be host:port, e.g. 127.0.0.1:9464',
    )
    .optional(),
});

export function readStackFile(dataDir: string): StackFile | undefined {
  const file = path.join(dataDir, 'stack.json');
  if (!existsSync(file)) return undefined;
  const stack = JSON.parse(readFileSync(file, 'utf8')) as StackFile;
  return isAlive(stack.pid) ? stack : undefined;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export const masterKeyFile = (dataDir: string) => path.join(dataDir, 'master.key');

/**
 * The one config loader. Temporal connection settings follow the SDK's envconfig conventions
 * (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_*, TEMPORAL_PROFILE and the
 * TOML config file); everything else is TOKENWARDEN_* or DATABASE_URL. When DATABASE_URL is unset,
 * the dev stack started by `tokenwarden start` is used if one is running from this checkout.
 */
export function loadSettings(env: NodeJS.ProcessEnv = process.env): Settings {
  const parsed = envSchema.safeParse(env);
  if (!parsed.success) {
    throw new ConfigError(
      `invalid configuration: ${parsed.error.issues.map((i) => `${String(i.path[0] ?? '')}: ${i.message}`).join('; ')}`,
    );
  }
  const e = parsed.data;
  const dataDir = path.resolve(e.TOKENWARDEN_DATA_DIR ?? path.join(PACKAGE_ROOT, '.data'));
  const stack = readStackFile(dataDir);

  const databaseUrl = e.DATABASE_URL ?? stack?.databaseUrl;
  if (!databaseUrl) {
    throw new ConfigError(
      'DATABASE_URL is not set and no dev stack is running from this checkout: set DATABASE_URL=postgres://… or run `npm start`',
    );
  }

  let connect;
  try {
    connect = loadClientConnectConfig({ overrideEnvVars: stringEnv(env) });
  } catch (err) {
    throw new ConfigError(`invalid Temporal client configuration: ${(err as Error).message}`);
  }
  const connectionOptions: NativeConnectionOptions = { ...connect.connectionOptions };
  connectionOptions.address ??= stack?.temporalAddress ?? 'localhost:7233';
  const namespace = connect.namespace ?? stack?.namespace ?? DEFAULT_NAMESPACE;

  let masterKey: Buffer | undefined;
  if (e.TOKENWARDEN_MASTER_KEY) masterKey = Buffer.from(e.TOKENWARDEN_MASTER_KEY, 'base64');
  else if (existsSync(masterKeyFile(dataDir))) {
    masterKey = Buffer.from(readFileSync(masterKeyFile(dataDir), 'utf8').trim(), 'base64');
  }

  return {
    temporal: { connectionOptions, namespace, taskQueue: e.TOKENWARDEN_TASK_QUEUE },
    databaseUrl,
    databaseSchema: e.TOKENWARDEN_DB_SCHEMA,
    dataDir,
    timing: {
      escalateAfterMs: e.TOKENWARDEN_ESCALATE_AFTER,
      retryInitialMs: e.TOKENWARDEN_RETRY_INITIAL,
      retryMaxMs: e.TOKENWARDEN_RETRY_MAX,
    },
    reconcileGraceMs: e.TOKENWARDEN_RECONCILE_GRACE,
    masterKey,
    ...(e.TOKENWARDEN_METRICS_ADDRESS ? { metricsAddress: e.TOKENWARDEN_METRICS_ADDRESS } : {}),
  };
}

function stringEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;
  return out;
}
