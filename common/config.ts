import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type * as EnvConfig from '@temporalio/envconfig';
import type { NativeConnectionOptions } from '@temporalio/worker';
import { z } from 'zod';
import { DEFAULT_NAMESPACE, DEFAULT_TASK_QUEUE, type PropagationTiming } from './names.js';
import { formatDuration, parseDuration, DURATION_HINT } from './durations.js';
import { ConfigError } from './errors.js';
import { isLoopbackHost, RECEIVER_ALLOWANCES, type ReceiverAllowance } from './addresses.js';
import { DECRYPT_ONLY, payloadKeyId } from './payload-key-id.js';

/** The package root (this file lives in dist/common/). */
export const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Settings extends StoreSettings {
  temporal: { connectionOptions: NativeConnectionOptions; namespace: string; taskQueue: string };
}

/** Every setting but Temporal's: enough for callers of the store alone (list, show, receivers, migrate). */
export interface StoreSettings {
  databaseUrl: string;
  /** Postgres schema holding tokenwarden's tables. */
  databaseSchema: string;
  dataDir: string;
  timing: PropagationTiming;
  /** How often each worker process records the deaths of tokens past their expiry (worker/expiry-sweeper.ts). */
  expirySweepIntervalMs: number;
  /** How long a store fact may go unhealed before the reconciler acts on it. */
  reconcileGraceMs: number;
  /** Key that encrypts receivers' signing secrets at rest; undefined when not configured. */
  masterKey: Buffer | undefined;
  /** Earlier master keys, kept to decrypt secrets not yet re-encrypted by `receiver rekey`. */
  previousMasterKeys: Buffer[];
  /**
   * Keys that encrypt what tokenwarden stores in Temporal (common/payload-codec.ts): the first
   * encrypts (unless payloadEncryptKeyId names another), all decrypt. Empty: payloads go to Temporal
   * in plaintext.
   */
  payloadKeys: Buffer[];
  /**
   * Which payload key encrypts (TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID): a configured key's id, or `none`
   * (decrypt only, while every process learns a first key); unset: the first key.
   */
  payloadEncryptKeyId?: string;
  /** The ed25519 private key (its 32-byte seed) that signs audit checkpoints; undefined when not configured. */
  auditKey?: Buffer | undefined;
  /** Where auditKey was read: env (TOKENWARDEN_AUDIT_KEY), file (TOKENWARDEN_AUDIT_KEY_FILE) or data dir (audit.key). */
  auditKeySource?: AuditKeySource | undefined;
  /** The raw ed25519 public key that checks checkpoints where the signing key is not given (an auditor). */
  auditPublicKey?: Buffer | undefined;
  /** Public keys of earlier audit signing keys: checkpoints they signed still check, and link (a key roll). */
  auditPreviousPublicKeys?: Buffer[];
  /** The least time between two audit checkpoints the reconciler writes (TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL). */
  auditCheckpointIntervalMs?: number;
  /** Address ranges receivers may use besides public ones (the dev stack allows loopback). */
  receiverAllow: ReceiverAllowance[];
  /** The longest lifetime a token may be issued with (TOKENWARDEN_MAX_TTL). */
  maxTtlMs: number;
  /** A rotation's grace when neither the request nor the token's policy sets one (TOKENWARDEN_DEFAULT_GRACE; 10 min). */
  defaultGraceMs?: number;
  /**
   * The folder every policy's owner folder must lie in (TOKENWARDEN_OWNER_DIR_ROOT; the dev stack's
   * `<data dir>/owner` for its own store). Unset: owner folders are refused.
   */
  ownerDirRoot?: string;
  /** host:port where a worker serves Prometheus metrics (`/metrics`); none when unset. */
  metricsAddress?: string;
  /** A worker's capacity (TOKENWARDEN_WORKFLOW_TASK_SLOTS, …); defaults in WORKER_TUNING_DEFAULTS. */
  worker: WorkerTuning;
}

/** What one worker process takes on at once, and what it keeps. */
export interface WorkerTuning {
  /** Workflow tasks run at once (they share the workflow threads). */
  workflowTaskSlots: number;
  workflowTaskPollers: number;
  /** Activities (deliveries) at once: each mostly waits on a receiver. */
  activitySlots: number;
  activityPollers: number;
  /** Local activities (the kill, completion, store reads) at once. */
  localActivitySlots: number;
  /**
   * Workflows kept in memory between tasks; an evicted one is replayed from its history when it wakes.
   * Unset: the SDK sizes the cache from the heap limit (TOKENWARDEN_CACHED_WORKFLOWS overrides it).
   */
  cachedWorkflows?: number | undefined;
  /** How long a workflow's next task waits for this worker before any worker may take it. */
  stickyTimeoutMs: number;
  /** Threads running workflow code. */
  workflowThreads: number;
  /** Database connections of the worker's pool. */
  dbPoolSize: number;
}

/**
 * Defaults for 2 cores with 10,000 sleeping tokens and a 1,000-token expiry wave; the measured
 * figures are in docs/benchmarks.md, "Scale". Each has an environment variable.
 */
export const WORKER_TUNING_DEFAULTS: WorkerTuning = {
  workflowTaskSlots: 40,
  workflowTaskPollers: 10,
  activitySlots: 100,
  activityPollers: 10,
  localActivitySlots: 40,
  // The SDK's 10 s made half of a 1,000-token wave's tasks time out on the busy worker's sticky queue
  // and go round again (delivered 38-45 s after expiry); with 60 s, none did (21 s). The price: tasks
  // already on a crashed worker's sticky queue wait up to this long; later ones go to the shared
  // queue once the server has seen no sticky poll for 10 s (temporalio/temporal#2811).
  stickyTimeoutMs: 60_000,
  // Two threads measured no better on 2 cores (23.6 s against 20.9 s with one).
  workflowThreads: 1,
  // A quarter of the activity slots: an activity holds a connection only for a statement, never
  // across a POST; 100 would take all of PostgreSQL's default max_connections from one worker.
  dbPoolSize: 25,
};

const WORKER_TUNING_ENV: Record<keyof WorkerTuning, string> = {
  workflowTaskSlots: 'TOKENWARDEN_WORKFLOW_TASK_SLOTS',
  workflowTaskPollers: 'TOKENWARDEN_WORKFLOW_TASK_POLLERS',
  activitySlots: 'TOKENWARDEN_ACTIVITY_SLOTS',
  activityPollers: 'TOKENWARDEN_ACTIVITY_POLLERS',
  localActivitySlots: 'TOKENWARDEN_LOCAL_ACTIVITY_SLOTS',
  cachedWorkflows: 'TOKENWARDEN_CACHED_WORKFLOWS',
  stickyTimeoutMs: 'TOKENWARDEN_STICKY_TIMEOUT',
  workflowThreads: 'TOKENWARDEN_WORKFLOW_THREADS',
  dbPoolSize: 'TOKENWARDEN_DB_POOL',
};

const count = (name: string, min: number, max: number, why = '') =>
  z
    .string()
    .regex(/^\d+$/, `${name} must be a whole number`)
    .transform(Number)
    .refine((n) => n >= min && n <= max, `${name} must be between ${min} and ${max}${why}`)
    .optional();

/** What `tokenwarden start` writes into the data folder so that CLI calls find the running stack. */
export interface StackFile {
  databaseUrl: string;
  databaseSchema: string;
  temporalAddress: string;
  namespace: string;
  taskQueue: string;
  /** Where the stack's master key is; absent when the stack got it from TOKENWARDEN_MASTER_KEY. */
  masterKeyFile?: string;
  /** Where the stack's payload keys are; absent when the stack got them from TOKENWARDEN_PAYLOAD_KEYS. */
  payloadKeysFile?: string;
  /** Where the stack's audit key is; absent when the stack got it from TOKENWARDEN_AUDIT_KEY. */
  auditKeyFile?: string;
  /** The stack's process: a file left behind by a killed stack is ignored. */
  pid: number;
  /** Receivers' address ranges the stack allows; clients of its store apply them too. */
  receiverAllow?: ReceiverAllowance[];
  /** The stack's HTTP API, e.g. http://127.0.0.1:8380. */
  api?: string;
  /** The root of policies' owner folders the stack uses; clients of its store apply it too. */
  ownerDirRoot?: string;
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

/** How often the reconciler signs the audit chains' heads at most (TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL's default). */
export const DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS = 15 * 60_000;

/** One year, as peers cap tokens (TOKENWARDEN_MAX_TTL's default). */
export const DEFAULT_MAX_TTL_MS = 365 * 86_400_000;
/** The longest TOKENWARDEN_MAX_TTL may be: keeps every expiry a date PostgreSQL, JS and Temporal agree on. */
export const MAX_TTL_CEILING_MS = 3650 * 86_400_000;

/** A comma-separated list of 32-byte base64 keys (empty: none); an error names positions, never key material. */
function base64KeyList(name: string, what: string) {
  return z
    .string()
    .default('')
    .transform((text, ctx) => {
      const keys = text
        .split(',')
        .map((k) => k.trim())
        .filter(Boolean);
      const bad = keys.map((k, i) => (isMasterKey(k) ? -1 : i + 1)).filter((i) => i > 0);
      if (bad.length > 0) {
        ctx.addIssue({
          code: 'custom',
          message: `${name} must be comma-separated ${what}, base64-encoded (key ${bad.join(', ')} is not)`,
        });
        return z.NEVER;
      }
      return keys.map((k) => Buffer.from(k, 'base64'));
    });
}

const envSchema = z.object({
  DATABASE_URL: z.url({ protocol: /^postgres(ql)?$/, error: 'DATABASE_URL must be a postgres:// URL' }).optional(),
  TOKENWARDEN_DB_SCHEMA: z
    .string()
    .regex(/^[a-z_][a-z0-9_]{0,62}$/, 'TOKENWARDEN_DB_SCHEMA must be a lowercase SQL identifier')
    .optional(),
  TOKENWARDEN_DATA_DIR: z.string().min(1).optional(),
  TOKENWARDEN_TASK_QUEUE: z.string().min(1).optional(),
  TOKENWARDEN_MASTER_KEY: z
    .string()
    .refine(isMasterKey, 'TOKENWARDEN_MASTER_KEY must be 32 bytes, base64-encoded')
    .optional(),
  TOKENWARDEN_PREVIOUS_MASTER_KEYS: base64KeyList('TOKENWARDEN_PREVIOUS_MASTER_KEYS', 'keys of 32 bytes'),
  TOKENWARDEN_RECEIVER_ALLOW: z
    .string()
    .transform((text, ctx) => {
      const ranges = text
        .split(',')
        .map((r) => r.trim())
        .filter(Boolean);
      const unknown = ranges.filter((r) => !(RECEIVER_ALLOWANCES as readonly string[]).includes(r));
      if (unknown.length > 0) {
        ctx.addIssue({
          code: 'custom',
          message: `TOKENWARDEN_RECEIVER_ALLOW must list ${RECEIVER_ALLOWANCES.join(' and/or ')}, comma-separated; got ${JSON.stringify(unknown.join(','))}`,
        });
        return z.NEVER;
      }
      return [...new Set(ranges)] as ReceiverAllowance[];
    })
    .optional(),
  TOKENWARDEN_MASTER_KEY_FILE: z.string().min(1).optional(),
  TOKENWARDEN_PAYLOAD_KEYS: z
    .string()
    .transform((text, ctx) => {
      const keys = parseKeyList(text);
      if (keys === undefined || keys.length === 0) {
        ctx.addIssue({ code: 'custom', message: PAYLOAD_KEYS_HINT('TOKENWARDEN_PAYLOAD_KEYS', text) });
        return z.NEVER;
      }
      return keys;
    })
    .optional(),
  TOKENWARDEN_PAYLOAD_KEYS_FILE: z.string().min(1).optional(),
  TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID: z
    .string()
    .regex(
      /^([0-9a-f]{16}|none)$/,
      'TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID must be a payload key id (16 hex digits, as the worker logs it at start) or none',
    )
    .optional(),
  TOKENWARDEN_AUDIT_KEY: z
    .string()
    .refine(isMasterKey, 'TOKENWARDEN_AUDIT_KEY must be an ed25519 private key: its 32-byte seed, base64-encoded')
    .optional(),
  TOKENWARDEN_AUDIT_KEY_FILE: z.string().min(1).optional(),
  TOKENWARDEN_AUDIT_PUBLIC_KEY: z
    .string()
    .refine(isMasterKey, 'TOKENWARDEN_AUDIT_PUBLIC_KEY must be a raw ed25519 public key: 32 bytes, base64-encoded')
    .optional(),
  TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS: base64KeyList(
    'TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS',
    'raw ed25519 public keys of 32 bytes',
  ),
  TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL: duration(
    'TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL',
    formatDuration(DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS),
  ).refine((ms) => ms >= 1_000, 'TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL must be at least 1s'),
  TOKENWARDEN_DEFAULT_GRACE: duration('TOKENWARDEN_DEFAULT_GRACE', '10m'),
  TOKENWARDEN_OWNER_DIR_ROOT: z
    .string()
    .refine((d) => path.isAbsolute(d), 'TOKENWARDEN_OWNER_DIR_ROOT must be an absolute path')
    .optional(),
  TOKENWARDEN_MAX_TTL: duration('TOKENWARDEN_MAX_TTL', formatDuration(DEFAULT_MAX_TTL_MS)).refine(
    (ms) => ms <= MAX_TTL_CEILING_MS,
    `TOKENWARDEN_MAX_TTL must be at most ${formatDuration(MAX_TTL_CEILING_MS)}`,
  ),
  TOKENWARDEN_ESCALATE_AFTER: duration('TOKENWARDEN_ESCALATE_AFTER', '1h'),
  TOKENWARDEN_RETRY_INITIAL: duration('TOKENWARDEN_RETRY_INITIAL', '1s'),
  TOKENWARDEN_RETRY_MAX: duration('TOKENWARDEN_RETRY_MAX', '10m'),
  // Node's timers hold at most ~24.8 days (a longer one fires at once): an hour is the sensible most.
  TOKENWARDEN_EXPIRY_SWEEP_INTERVAL: duration('TOKENWARDEN_EXPIRY_SWEEP_INTERVAL', '1s').refine(
    (ms) => ms >= 50 && ms <= 3_600_000,
    'TOKENWARDEN_EXPIRY_SWEEP_INTERVAL must be from 50ms to 1h',
  ),
  TOKENWARDEN_RECONCILE_GRACE: duration('TOKENWARDEN_RECONCILE_GRACE', '1m'),
  // The SDK needs two workflow task slots whenever workflows are cached.
  TOKENWARDEN_WORKFLOW_TASK_SLOTS: count('TOKENWARDEN_WORKFLOW_TASK_SLOTS', 2, 1000),
  // The SDK needs at least two pollers of each kind (one sticky, one normal for workflows).
  TOKENWARDEN_WORKFLOW_TASK_POLLERS: count('TOKENWARDEN_WORKFLOW_TASK_POLLERS', 2, 100),
  TOKENWARDEN_ACTIVITY_SLOTS: count('TOKENWARDEN_ACTIVITY_SLOTS', 1, 10_000),
  TOKENWARDEN_ACTIVITY_POLLERS: count('TOKENWARDEN_ACTIVITY_POLLERS', 1, 100),
  TOKENWARDEN_LOCAL_ACTIVITY_SLOTS: count('TOKENWARDEN_LOCAL_ACTIVITY_SLOTS', 1, 1000),
  TOKENWARDEN_CACHED_WORKFLOWS: count('TOKENWARDEN_CACHED_WORKFLOWS', 0, 1_000_000),
  // A workflow's task waits this long for a worker that died before any other worker may take it.
  TOKENWARDEN_STICKY_TIMEOUT: duration(
    'TOKENWARDEN_STICKY_TIMEOUT',
    formatDuration(WORKER_TUNING_DEFAULTS.stickyTimeoutMs),
  ).refine((ms) => ms >= 1_000 && ms <= 300_000, 'TOKENWARDEN_STICKY_TIMEOUT must be from 1s to 5m'),
  TOKENWARDEN_WORKFLOW_THREADS: count('TOKENWARDEN_WORKFLOW_THREADS', 1, 64),
  TOKENWARDEN_DB_POOL: count(
    'TOKENWARDEN_DB_POOL',
    1,
    100,
    ": PostgreSQL's default max_connections is 100, and every worker and app has its own pool",
  ),
  TOKENWARDEN_METRICS_ADDRESS: z
    .string()
    .regex(
      /^(\[[0-9a-fA-F:]+\]|[^\s:[\]]+):\d{1,5}$/,
      'TOKENWARDEN_METRICS_ADDRESS must be host:port, e.g. 127.0.0.1:9464',
    )
    .optional(),
});

/** Where the HTTP API listens (`tokenwarden api`, and the dev stack's API). */
export interface ApiSettings {
  host: string;
  port: number;
  /** Introspection also looks up tokens of another format (imported ones); see the verifier's `foreignTokens`. */
  foreignTokens: boolean;
  /** The codec endpoints: the browser origins allowed (the Web UI's) and whether loopback callers need no key. */
  codec: { origins: string[]; keylessLoopback: boolean };
}

/** The Web UI of a local dev server (`temporal server start-dev` serves it on 8233). */
export const DEFAULT_CODEC_ORIGINS = ['http://localhost:8233', 'http://127.0.0.1:8233'];

const apiEnvSchema = z.object({
  TOKENWARDEN_API_HOST: z
    .string()
    .regex(/^(\[[0-9a-fA-F:]+\]|[^\s:[\]/]+)$/, 'TOKENWARDEN_API_HOST must be a host name or address, e.g. 127.0.0.1')
    .default('127.0.0.1'),
  TOKENWARDEN_API_PORT: z
    .string()
    .default('8380')
    .refine(
      (text) => /^\d{1,5}$/.test(text) && Number(text) <= 65535,
      'TOKENWARDEN_API_PORT must be a port number (0-65535)',
    )
    .transform(Number),
  TOKENWARDEN_FOREIGN_TOKENS: z
    .enum(['true', 'false'], { error: 'TOKENWARDEN_FOREIGN_TOKENS must be true or false' })
    .default('false')
    .transform((text) => text === 'true'),
  TOKENWARDEN_CODEC_ORIGINS: z
    .string()
    .transform((text, ctx) => {
      const origins = text
        .split(',')
        .map((o) => o.trim())
        .filter(Boolean);
      const bad = origins.filter((o) => !isOrigin(o));
      if (bad.length > 0) {
        ctx.addIssue({
          code: 'custom',
          message: `TOKENWARDEN_CODEC_ORIGINS must list origins like http://localhost:8233 (scheme, host and port, no path), comma-separated; got ${JSON.stringify(bad.join(','))}`,
        });
        return z.NEVER;
      }
      return origins;
    })
    .optional(),
  TOKENWARDEN_CODEC_KEYLESS: z
    .enum(['loopback', 'off'], { error: 'TOKENWARDEN_CODEC_KEYLESS must be loopback or off' })
    .default('off'),
});

/** `scheme://host[:port]` exactly as a browser sends it in the Origin header. */
function isOrigin(text: string): boolean {
  try {
    const url = new URL(text);
    return (url.protocol === 'http:' || url.protocol === 'https:') && url.origin === text;
  } catch {
    return false;
  }
}

/** The API's address from TOKENWARDEN_API_HOST (default 127.0.0.1) and TOKENWARDEN_API_PORT (default 8380). */
export function loadApiSettings(env: NodeJS.ProcessEnv = process.env): ApiSettings {
  const parsed = apiEnvSchema.safeParse(env);
  if (!parsed.success) {
    throw new ConfigError(
      `invalid configuration: ${parsed.error.issues.map((i) => `${String(i.path[0] ?? '')}: ${i.message}`).join('; ')}`,
    );
  }
  const host = parsed.data.TOKENWARDEN_API_HOST.replace(/^\[(.*)\]$/, '$1');
  // Keyless answers trust the TCP peer: on a non-loopback address a proxy or a neighbour would be that peer.
  if (parsed.data.TOKENWARDEN_CODEC_KEYLESS === 'loopback' && !isLoopbackHost(host)) {
    throw new ConfigError(
      `invalid configuration: TOKENWARDEN_CODEC_KEYLESS: loopback needs TOKENWARDEN_API_HOST to be a loopback address (got ${host})`,
    );
  }
  return {
    host,
    port: parsed.data.TOKENWARDEN_API_PORT,
    foreignTokens: parsed.data.TOKENWARDEN_FOREIGN_TOKENS,
    codec: {
      origins: parsed.data.TOKENWARDEN_CODEC_ORIGINS ?? DEFAULT_CODEC_ORIGINS,
      keylessLoopback: parsed.data.TOKENWARDEN_CODEC_KEYLESS === 'loopback',
    },
  };
}

/** Comma-separated base64 keys of 32 bytes; undefined when one is not (the message names positions, never key material). */
function parseKeyList(text: string): Buffer[] | undefined {
  const keys = text
    .split(',')
    .map((k) => k.trim())
    .filter(Boolean);
  return keys.every(isMasterKey) ? keys.map((k) => Buffer.from(k, 'base64')) : undefined;
}

const PAYLOAD_KEYS_HINT = (what: string, text: string): string => {
  const keys = text
    .split(',')
    .map((k) => k.trim())
    .filter(Boolean);
  const bad = keys.map((k, i) => (isMasterKey(k) ? -1 : i + 1)).filter((i) => i > 0);
  return `${what} must be one or more comma-separated keys of 32 bytes, base64-encoded, the first one encrypting${
    keys.length === 0 ? ' (it is empty)' : bad.length ? ` (key ${bad.join(', ')} is not)` : ''
  }`;
};

function isMasterKey(text: string): boolean {
  return Buffer.from(text, 'base64').length === 32;
}

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

export const DEFAULT_DB_SCHEMA = 'tokenwarden';

export const masterKeyFile = (dataDir: string) => path.join(dataDir, 'master.key');
/** The dev stack's payload keys (one per line or comma-separated, base64; the first encrypts). */
export const payloadKeysFile = (dataDir: string) => path.join(dataDir, 'payload.keys');
export type AuditKeySource = 'env' | 'file' | 'data dir';

/** Where the dev stack keeps the key that signs audit checkpoints (base64 of the ed25519 seed). */
export const auditKeyFile = (dataDir: string) => path.join(dataDir, 'audit.key');

/**
 * The one config loader. Temporal connection settings follow the SDK's envconfig conventions
 * (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_*, TEMPORAL_PROFILE and the
 * TOML config file); everything else is TOKENWARDEN_* or DATABASE_URL. When DATABASE_URL is unset,
 * the dev stack started by `tokenwarden start` is used if one is running from this checkout.
 */
export function loadSettings(env: NodeJS.ProcessEnv = process.env): Settings {
  const { settings, stack, taskQueue } = loadFromEnvironment(env);
  return { ...settings, temporal: temporalSettings(env, stack, taskQueue) };
}

/** The settings without Temporal's, which are then neither read nor checked. */
export function loadStoreSettings(env: NodeJS.ProcessEnv = process.env): StoreSettings {
  return loadFromEnvironment(env).settings;
}

// Required on first use: the SDK module is loaded by callers that talk to Temporal only.
const requireModule = createRequire(import.meta.url);

function temporalSettings(
  env: NodeJS.ProcessEnv,
  stack: StackFile | undefined,
  taskQueue: string | undefined,
): Settings['temporal'] {
  const { loadClientConnectConfig } = requireModule('@temporalio/envconfig') as typeof EnvConfig;
  let connect;
  try {
    connect = loadClientConnectConfig({ overrideEnvVars: stringEnv(env) });
  } catch (err) {
    throw new ConfigError(`invalid Temporal client configuration: ${(err as Error).message}`);
  }
  const connectionOptions: NativeConnectionOptions = { ...connect.connectionOptions };
  // The stack's task queue goes with its Temporal server, never alone.
  const stackTemporal = connectionOptions.address ? undefined : stack;
  connectionOptions.address ??= stack?.temporalAddress ?? 'localhost:7233';
  return {
    connectionOptions,
    namespace: connect.namespace ?? stack?.namespace ?? DEFAULT_NAMESPACE,
    taskQueue: taskQueue ?? stackTemporal?.taskQueue ?? DEFAULT_TASK_QUEUE,
  };
}

/** The store's settings, the running dev stack (if any) and TOKENWARDEN_TASK_QUEUE, checked. */
function loadFromEnvironment(env: NodeJS.ProcessEnv): {
  settings: StoreSettings;
  stack: StackFile | undefined;
  taskQueue: string | undefined;
} {
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

  // The stack's schema goes with its database, never alone.
  const stackDatabase = e.DATABASE_URL ? undefined : stack;

  const workflowTaskSlots = e.TOKENWARDEN_WORKFLOW_TASK_SLOTS ?? WORKER_TUNING_DEFAULTS.workflowTaskSlots;
  const activitySlots = e.TOKENWARDEN_ACTIVITY_SLOTS ?? WORKER_TUNING_DEFAULTS.activitySlots;
  // Unset, the pollers follow fewer slots down (as the SDK's own default does); set, they must fit.
  const worker: WorkerTuning = {
    workflowTaskSlots,
    workflowTaskPollers:
      e.TOKENWARDEN_WORKFLOW_TASK_POLLERS ?? Math.min(WORKER_TUNING_DEFAULTS.workflowTaskPollers, workflowTaskSlots),
    activitySlots,
    activityPollers: e.TOKENWARDEN_ACTIVITY_POLLERS ?? Math.min(WORKER_TUNING_DEFAULTS.activityPollers, activitySlots),
    localActivitySlots: e.TOKENWARDEN_LOCAL_ACTIVITY_SLOTS ?? WORKER_TUNING_DEFAULTS.localActivitySlots,
    ...(e.TOKENWARDEN_CACHED_WORKFLOWS === undefined ? {} : { cachedWorkflows: e.TOKENWARDEN_CACHED_WORKFLOWS }),
    stickyTimeoutMs: e.TOKENWARDEN_STICKY_TIMEOUT,
    workflowThreads: e.TOKENWARDEN_WORKFLOW_THREADS ?? WORKER_TUNING_DEFAULTS.workflowThreads,
    dbPoolSize: e.TOKENWARDEN_DB_POOL ?? WORKER_TUNING_DEFAULTS.dbPoolSize,
  };
  // Each of the SDK's pollers takes a slot before it polls: pollers beyond the slots would never poll.
  for (const [pollers, slots] of [
    ['workflowTaskPollers', 'workflowTaskSlots'],
    ['activityPollers', 'activitySlots'],
  ] as const) {
    if (worker[pollers] > worker[slots]) {
      throw new ConfigError(
        `invalid configuration: ${WORKER_TUNING_ENV[pollers]} (${worker[pollers]}) must not exceed ${WORKER_TUNING_ENV[slots]} (${worker[slots]}): each poller takes a slot before it polls`,
      );
    }
  }

  let masterKey: Buffer | undefined;
  if (e.TOKENWARDEN_MASTER_KEY) masterKey = Buffer.from(e.TOKENWARDEN_MASTER_KEY, 'base64');
  else if (e.TOKENWARDEN_MASTER_KEY_FILE) masterKey = readMasterKeyFile(e.TOKENWARDEN_MASTER_KEY_FILE);
  else if (existsSync(masterKeyFile(dataDir))) masterKey = readMasterKeyFile(masterKeyFile(dataDir));

  let payloadKeys: Buffer[] = [];
  if (e.TOKENWARDEN_PAYLOAD_KEYS) payloadKeys = e.TOKENWARDEN_PAYLOAD_KEYS;
  else if (e.TOKENWARDEN_PAYLOAD_KEYS_FILE) payloadKeys = readPayloadKeysFile(e.TOKENWARDEN_PAYLOAD_KEYS_FILE);
  else if (existsSync(payloadKeysFile(dataDir))) payloadKeys = readPayloadKeysFile(payloadKeysFile(dataDir));
  const payloadEncryptKeyId = e.TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID;
  if (payloadEncryptKeyId !== undefined && payloadEncryptKeyId !== DECRYPT_ONLY) {
    const ids = payloadKeys.map(payloadKeyId);
    if (!ids.includes(payloadEncryptKeyId)) {
      throw new ConfigError(
        `invalid configuration: TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID: ${payloadEncryptKeyId} is not the id of a configured payload key (${
          ids.length ? `configured: ${ids.join(', ')}` : 'none is configured'
        })`,
      );
    }
  }
  let auditKey: Buffer | undefined;
  let auditKeySource: AuditKeySource | undefined;
  if (e.TOKENWARDEN_AUDIT_KEY) [auditKey, auditKeySource] = [Buffer.from(e.TOKENWARDEN_AUDIT_KEY, 'base64'), 'env'];
  else if (e.TOKENWARDEN_AUDIT_KEY_FILE)
    [auditKey, auditKeySource] = [readAuditKeyFile(e.TOKENWARDEN_AUDIT_KEY_FILE), 'file'];
  else if (existsSync(auditKeyFile(dataDir)))
    [auditKey, auditKeySource] = [readAuditKeyFile(auditKeyFile(dataDir)), 'data dir'];

  const settings: StoreSettings = {
    databaseUrl,
    databaseSchema: e.TOKENWARDEN_DB_SCHEMA ?? stackDatabase?.databaseSchema ?? DEFAULT_DB_SCHEMA,
    dataDir,
    timing: {
      escalateAfterMs: e.TOKENWARDEN_ESCALATE_AFTER,
      retryInitialMs: e.TOKENWARDEN_RETRY_INITIAL,
      retryMaxMs: e.TOKENWARDEN_RETRY_MAX,
    },
    expirySweepIntervalMs: e.TOKENWARDEN_EXPIRY_SWEEP_INTERVAL,
    reconcileGraceMs: e.TOKENWARDEN_RECONCILE_GRACE,
    masterKey,
    previousMasterKeys: e.TOKENWARDEN_PREVIOUS_MASTER_KEYS,
    payloadKeys,
    ...(payloadEncryptKeyId !== undefined ? { payloadEncryptKeyId } : {}),
    auditKey,
    auditKeySource,
    ...(e.TOKENWARDEN_AUDIT_PUBLIC_KEY
      ? { auditPublicKey: Buffer.from(e.TOKENWARDEN_AUDIT_PUBLIC_KEY, 'base64') }
      : {}),
    auditPreviousPublicKeys: e.TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS,
    auditCheckpointIntervalMs: e.TOKENWARDEN_AUDIT_CHECKPOINT_INTERVAL,
    // The dev stack's own allowance applies to whoever uses its store, unless set explicitly.
    receiverAllow:
      e.TOKENWARDEN_RECEIVER_ALLOW ?? (stack && databaseUrl === stack.databaseUrl ? (stack.receiverAllow ?? []) : []),
    maxTtlMs: e.TOKENWARDEN_MAX_TTL,
    defaultGraceMs: e.TOKENWARDEN_DEFAULT_GRACE,
    // As the receivers' allowance: the dev stack's own root for its own store, unless set explicitly.
    ...(e.TOKENWARDEN_OWNER_DIR_ROOT
      ? { ownerDirRoot: path.resolve(e.TOKENWARDEN_OWNER_DIR_ROOT) }
      : stack && databaseUrl === stack.databaseUrl
        ? { ownerDirRoot: stack.ownerDirRoot ?? path.join(dataDir, 'owner') }
        : {}),
    ...(e.TOKENWARDEN_METRICS_ADDRESS ? { metricsAddress: e.TOKENWARDEN_METRICS_ADDRESS } : {}),
    worker,
  };
  return { settings, stack, taskQueue: e.TOKENWARDEN_TASK_QUEUE };
}

export { WORKER_TUNING_ENV };

/** A master key file holds the key in base64 (what `tokenwarden start` writes). */
function readMasterKeyFile(file: string): Buffer {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(
      `TOKENWARDEN_MASTER_KEY_FILE: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`,
    );
  }
  const key = Buffer.from(text.trim(), 'base64');
  if (key.length !== 32) throw new ConfigError(`the master key in ${file} must be 32 bytes, base64-encoded`);
  return key;
}

/** A payload keys file: keys in base64, one per line or comma-separated, the first one encrypting. */
function readPayloadKeysFile(file: string): Buffer[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(
      `TOKENWARDEN_PAYLOAD_KEYS_FILE: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`,
    );
  }
  const list = text.replace(/\s+/g, ',');
  const keys = parseKeyList(list);
  if (keys === undefined || keys.length === 0)
    throw new ConfigError(PAYLOAD_KEYS_HINT(`the payload keys file ${file}`, list));
  return keys;
}

/** An audit key file holds the ed25519 seed in base64 (what `tokenwarden start` writes). */
function readAuditKeyFile(file: string): Buffer {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(
      `TOKENWARDEN_AUDIT_KEY_FILE: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`,
    );
  }
  const key = Buffer.from(text.trim(), 'base64');
  if (key.length !== 32)
    throw new ConfigError(`the audit key in ${file} must be a 32-byte ed25519 seed, base64-encoded`);
  return key;
}

function stringEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;
  return out;
}
