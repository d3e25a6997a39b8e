/**
 * `tokenwarden/verifier`: checks tokens in a service. Loads `pg` and Node only (a test holds it to
 * that). Answers come from the store (DESIGN §2); positive answers are cached briefly and dropped
 * the moment the store announces a kill or a change of their token on its NOTIFY channels. While
 * those channels are not heard, nothing is served from cache.
 */
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import { quoteIdent } from '../common/identifiers.js';
import { CHANGE_CHANNEL, KILL_CHANNEL } from '../common/names.js';
import { hashToken, isForeignToken, isWellFormedToken } from '../common/secrets.js';
import { recordTokenUse } from '../common/store/last-use.js';
import { credentialLookupSql, killReusedCredential, type CredentialLookupRow } from '../common/store/verification.js';

export interface VerifierOptions {
  databaseUrl: string;
  /** The store's schema (default 'tokenwarden'). */
  schema?: string;
  /** How long a positive answer may be served from cache (default 5000; 0 disables the cache). Never past the token's expiry. */
  cacheTtlMs?: number;
  /**
   * At most one last-use write per token per interval (default 60000), in this process and in the
   * store; for a token whose policy has an idle timeout, at most a tenth of that.
   */
  lastUseIntervalMs?: number;
  /** Connections of the lookup pool (default 10). The listener has its own connection on top. */
  poolSize?: number;
  /** Hears what goes wrong in the background: a lost listener, a failed last-use write. Never a token. */
  onError?: (err: Error) => void;
  /**
   * The listener's database URL when `databaseUrl` goes through a transaction-mode pooler
   * (PgBouncer): LISTEN needs a session of its own, i.e. a direct or session-mode connection.
   */
  listenUrl?: string;
  /**
   * Told when the store announces the death of one of this schema's tokens (revoked, or expired by
   * the sweep or its workflow), after its cached answers are dropped: e.g. to close its sessions.
   */
  onKilled?: (tokenId: string) => void;
  /**
   * Told when the store announces a change that leaves the token alive (a suspend or resume, a
   * rotation, a credential's end of grace, an expiry change), after its cached answers are dropped:
   * e.g. to re-check the sessions of that token.
   */
  onChanged?: (tokenId: string) => void;
  /**
   * Told when a verify here found a credential reused (revoked, or previous past its grace, while its
   * token was active) and killed that token: e.g. to signal the token's workflow at once (the
   * reconciler tells it otherwise).
   */
  onReuseDetected?: (tokenId: string) => void;
  /** Shown in pg_stat_activity (default 'tokenwarden-verifier'; the listener adds ':listener'). */
  applicationName?: string;
  /** Cached answers kept at most (default 10000; the oldest go first). */
  maxCacheEntries?: number;
  /** How often the listener's connection is checked with a `SELECT 1` (default 5000). */
  heartbeatIntervalMs?: number;
  /** A heartbeat, LISTEN or connect slower than this counts the listener as lost (default 3000). */
  heartbeatTimeoutMs?: number;
  /** First and longest wait before the listener reconnects (defaults 100 and 5000); doubles in between. */
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  /** A lookup slower than this fails (default 5000): verify() rejects instead of waiting on a dead server. */
  queryTimeoutMs?: number;
  /**
   * Looks tokens up with a named prepared statement, planned once per connection (default false):
   * a cache miss costs about half. Only on direct or session-mode connections, or behind a pooler
   * that tracks protocol-level prepared statements (PgBouncer >= 1.21 with max_prepared_statements).
   */
  prepare?: boolean;
  /**
   * Also looks up strings of another format (default false): tokens imported with `tokenwarden
   * import` keep the format they were born with and are known by their hash only. Such a string is
   * looked up when it is 16 to 4096 printable ASCII characters and does not start with `tw_` (a
   * `tw_` string is always checked offline first). Costs one query per unknown string, garbage included.
   */
  foreignTokens?: boolean;
}

export type Verification =
  | {
      active: true;
      tokenId: string;
      subject: string;
      scopes: string[];
      expiresAt: string;
      issuedAt: string;
      credentialId: string;
    }
  | { active: false };

export type ActiveVerification = Extract<Verification, { active: true }>;

export interface VerifierStats {
  /** Answers served from cache. */
  cacheHits: number;
  /** Well-formed tokens looked up in the store (concurrent lookups of one token share one query). */
  lookups: number;
  /** Lookup queries sent. */
  queries: number;
  cacheEntries: number;
  /** Kills heard for this schema's tokens. */
  kills: number;
  /** Changes heard for this schema's tokens that left them alive (suspend, resume, rotation, end of grace, expiry). */
  changes: number;
  /** Reused credentials presented (each kills its token, once). */
  reuseDetected: number;
  /** Times the listener connected and LISTENed (1 after a clean start). */
  listenerConnects: number;
  lastUseWrites: number;
  /** Last-use writes the store skipped (another verifier wrote within the interval). */
  lastUseThrottled: number;
  /** Last-use writes dropped because too many were queued. */
  lastUseDropped: number;
}

export interface Verifier {
  /**
   * `{ active: false }` for malformed, unknown, revoked, expired and suspended tokens alike, and for
   * credentials that are pending, revoked or past their grace. Rejects when the store is unreachable.
   */
  verify(rawToken: string): Promise<Verification>;
  close(): Promise<void>;
  /** True while the kill and change channels are heard: only then are answers served from cache. */
  readonly listening: boolean;
  /**
   * Drops a token this process knows is dead (its own revoke returned), exactly as hearing its kill
   * would: its next verify here refuses it, whenever the NOTIFY arrives.
   */
  forget(tokenId: string): void;
  stats(): VerifierStats;
}

/** A verifier option that is missing, of the wrong type or out of range. */
export class VerifierOptionError extends TypeError {
  constructor(
    readonly option: string,
    message: string,
  ) {
    super(`createVerifier: option ${option} ${message}`);
    this.name = 'VerifierOptionError';
  }
}

/** The store could not answer (unreachable, timed out): the caller must not take the token as valid. */
export class VerifierUnavailableError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VerifierUnavailableError';
  }
}

const INACTIVE: Verification = Object.freeze({ active: false as const });

/** Last-use writes in flight at once, and queued at most: they never crowd out lookups. */
const LAST_USE_CONCURRENCY = 2;
const LAST_USE_QUEUE_MAX = 1_000;
/** Tokens whose last write time is remembered at most (the oldest are forgotten: at worst one extra, SQL-throttled write). */
const LAST_USE_MEMORY_MAX = 100_000;

const NUMBER_OPTIONS = {
  cacheTtlMs: { min: 0, fallback: 5_000 },
  lastUseIntervalMs: { min: 1, fallback: 60_000 },
  poolSize: { min: 1, max: 1_000, fallback: 10 },
  maxCacheEntries: { min: 1, fallback: 10_000 },
  heartbeatIntervalMs: { min: 10, fallback: 5_000 },
  heartbeatTimeoutMs: { min: 10, fallback: 3_000 },
  reconnectInitialMs: { min: 1, fallback: 100 },
  reconnectMaxMs: { min: 1, fallback: 5_000 },
  queryTimeoutMs: { min: 1, fallback: 5_000 },
} as const satisfies Record<string, { min: number; max?: number; fallback: number }>;
type NumberOption = keyof typeof NUMBER_OPTIONS;
const STRING_OPTIONS = ['databaseUrl', 'schema', 'listenUrl', 'applicationName'] as const;
const FUNCTION_OPTIONS = ['onError', 'onKilled', 'onChanged', 'onReuseDetected'] as const;
const KNOWN_OPTIONS = new Set<string>([
  ...Object.keys(NUMBER_OPTIONS),
  ...STRING_OPTIONS,
  ...FUNCTION_OPTIONS,
  'prepare',
  'foreignTokens',
]);

type ResolvedOptions = Record<NumberOption, number> & {
  databaseUrl: string;
  listenUrl: string;
  schema: string;
  applicationName: string;
  onError: (err: Error) => void;
  onKilled: ((tokenId: string) => void) | undefined;
  onChanged: ((tokenId: string) => void) | undefined;
  onReuseDetected: ((tokenId: string) => void) | undefined;
  prepare: boolean;
  foreignTokens: boolean;
};

const describe = (value: unknown) =>
  typeof value === 'string' ? JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value) : String(value);

/** Validated by hand (no zod: this entry point loads pg and Node only). URLs are never echoed: they may hold a password. */
function resolveOptions(input: unknown): ResolvedOptions {
  if (typeof input !== 'object' || input === null) {
    throw new VerifierOptionError('databaseUrl', 'is required: pass { databaseUrl: "postgres://…" }');
  }
  const o = input as Record<string, unknown>;
  for (const name of Object.keys(o)) {
    if (!KNOWN_OPTIONS.has(name) && o[name] !== undefined) {
      throw new VerifierOptionError(name, `is not an option (known: ${[...KNOWN_OPTIONS].join(', ')})`);
    }
  }
  const url = (name: 'databaseUrl' | 'listenUrl') => {
    const value = o[name];
    if (typeof value !== 'string' || !/^postgres(ql)?:\/\//.test(value)) {
      throw new VerifierOptionError(
        name,
        `must be a postgres:// or postgresql:// URL, got ${typeof value === 'string' ? 'another string' : describe(value)}`,
      );
    }
    return value;
  };
  const text = (name: 'schema' | 'applicationName', fallback: string) => {
    const value = o[name] ?? fallback;
    if (typeof value !== 'string' || value.length === 0 || value.length > 63 || value.includes('\0')) {
      throw new VerifierOptionError(name, `must be a name of 1 to 63 characters, got ${describe(value)}`);
    }
    return value;
  };
  const fn = (name: (typeof FUNCTION_OPTIONS)[number]) => {
    const value = o[name];
    if (value !== undefined && typeof value !== 'function') {
      throw new VerifierOptionError(name, `must be a function, got ${typeof value}`);
    }
    return value as ((arg: never) => void) | undefined;
  };
  const numbers = {} as Record<NumberOption, number>;
  for (const [name, rule] of Object.entries(NUMBER_OPTIONS) as [
    NumberOption,
    (typeof NUMBER_OPTIONS)[NumberOption],
  ][]) {
    const value = o[name] ?? rule.fallback;
    const max = 'max' in rule ? rule.max : Number.MAX_SAFE_INTEGER;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < rule.min || value > max) {
      const range = 'max' in rule ? `from ${rule.min} to ${rule.max}` : `≥ ${rule.min}`;
      throw new VerifierOptionError(
        name,
        `must be a whole number ${range}${name === 'poolSize' ? '' : ' (milliseconds)'}, got ${describe(value)}`,
      );
    }
    numbers[name] = value;
  }
  if (numbers.reconnectMaxMs < numbers.reconnectInitialMs) {
    throw new VerifierOptionError(
      'reconnectMaxMs',
      `must be at least reconnectInitialMs (${numbers.reconnectInitialMs})`,
    );
  }
  for (const name of ['prepare', 'foreignTokens'] as const) {
    if (o[name] !== undefined && typeof o[name] !== 'boolean') {
      throw new VerifierOptionError(name, `must be true or false, got ${describe(o[name])}`);
    }
  }
  const databaseUrl = url('databaseUrl');
  return {
    ...numbers,
    databaseUrl,
    listenUrl: o.listenUrl === undefined ? databaseUrl : url('listenUrl'),
    schema: text('schema', 'tokenwarden'),
    applicationName: text('applicationName', 'tokenwarden-verifier'),
    onError: (fn('onError') as ((err: Error) => void) | undefined) ?? (() => {}),
    onKilled: fn('onKilled') as ((tokenId: string) => void) | undefined,
    onChanged: fn('onChanged') as ((tokenId: string) => void) | undefined,
    onReuseDetected: fn('onReuseDetected') as ((tokenId: string) => void) | undefined,
    prepare: o.prepare === true,
    foreignTokens: o.foreignTokens === true,
  };
}

/** A positive answer, or the refusal a kill left in its place (a kill is final: the token never lives again). */
interface CacheEntry {
  verification: Verification;
  tokenId: string;
  /** The token's last-use interval (see Found). */
  useIntervalMs: number;
  /** performance.now() after which the entry is not served. */
  until: number;
}

interface Found {
  verification: ActiveVerification;
  /** Time left until expiry, or the end of a previous credential's grace, on the database clock when the query ran. */
  remainingMs: number;
  /** performance.now() when the query was sent: cache lifetimes count from there. */
  sentAt: number;
  /** lastUseIntervalMs, or a tenth of the token's policy's idle timeout when that is shorter. */
  useIntervalMs: number;
}

/** A lookup's outcome: valid, a token known dead (revoked or expired: final), or undefined (unknown, suspended, not accepted). */
type Answer = Found | { deadTokenId: string } | undefined;

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const asError = (err: unknown) => (err instanceof Error ? err : new Error(String(err)));

class TokenVerifier implements Verifier {
  readonly #o: ResolvedOptions;
  readonly #pool: pg.Pool;
  readonly #lookupSql: string;
  /** Positive answers by the token's hash (base64); the raw token is never kept. */
  readonly #cache = new Map<string, CacheEntry>();
  /** The cache keys of each token, to drop them all on its kill. */
  readonly #keysOfToken = new Map<string, Set<string>>();
  /** Lookups in flight by hash, with the epoch they started in: joined only within that epoch. */
  readonly #inFlight = new Map<string, { epoch: number; answer: Promise<Answer> }>();
  /**
   * Bumped by every kill heard and every listener loss or (re)connect. An answer is cached only when
   * the epoch is the one captured before its query: a kill (or a deafness) in between may have made
   * it stale.
   */
  #epoch = 0;
  #listening = false;
  #closed = false;
  #listener: pg.Client | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #heartbeatInFlight = false;
  #reconnect: NodeJS.Timeout | undefined;
  #backoffMs: number;
  /** performance.now() of each token's last queued last-use write, oldest first. */
  readonly #lastUseAt = new Map<string, number>();
  /** Tokens whose last use is to be written, with their interval. */
  readonly #lastUseQueue = new Map<string, number>();
  #lastUseInFlight = 0;
  #lastUseIdle: Array<() => void> = [];
  readonly #stats: Omit<VerifierStats, 'cacheEntries'> = {
    cacheHits: 0,
    lookups: 0,
    queries: 0,
    kills: 0,
    changes: 0,
    reuseDetected: 0,
    listenerConnects: 0,
    lastUseWrites: 0,
    lastUseThrottled: 0,
    lastUseDropped: 0,
  };

  constructor(options: ResolvedOptions) {
    this.#o = options;
    this.#backoffMs = options.reconnectInitialMs;
    this.#lookupSql = credentialLookupSql(options.schema);
    this.#pool = new pg.Pool({
      connectionString: options.databaseUrl,
      max: options.poolSize,
      application_name: options.applicationName,
      connectionTimeoutMillis: options.queryTimeoutMs,
      query_timeout: options.queryTimeoutMs,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    });
    // An idle connection the server dropped is discarded by the pool; without a listener it would crash the process.
    this.#pool.on('error', (err) => this.#report(err));
    this.#pool.on('connect', (client) => client.on('error', () => {}));
  }

  get listening(): boolean {
    return this.#listening;
  }

  stats(): VerifierStats {
    return { ...this.#stats, cacheEntries: this.#cache.size };
  }

  async verify(rawToken: string): Promise<Verification> {
    if (this.#closed) throw new Error('verify() after close(): this verifier is closed');
    // Offline first: garbage never reaches the database (unless foreign formats are looked up).
    if (typeof rawToken !== 'string') return INACTIVE;
    if (!isWellFormedToken(rawToken) && !(this.#o.foreignTokens && isForeignToken(rawToken))) return INACTIVE;
    const hash = hashToken(rawToken);
    const key = hash.toString('base64');
    if (this.#listening) {
      const hit = this.#cache.get(key);
      if (hit) {
        if (hit.until > performance.now()) {
          this.#stats.cacheHits++;
          if (hit.verification.active) this.#noteUse(hit.tokenId, hit.useIntervalMs);
          return hit.verification;
        }
        this.#forget(key, hit.tokenId);
      }
    }
    this.#stats.lookups++;
    // Captured before the query: see #epoch.
    const epoch = this.#epoch;
    const cacheable = this.#listening && this.#o.cacheTtlMs > 0;
    // Sharing a lookup in flight is a cache of its answer: only when answers may be cached (the kill
    // channel heard, a TTL), else a verify begun after a kill could get an answer read before it.
    let pending = cacheable ? this.#inFlight.get(key) : undefined;
    if (!pending || pending.epoch !== epoch) {
      const started = { epoch, answer: this.#query(hash) };
      if (cacheable) {
        const done = () => {
          if (this.#inFlight.get(key) === started) this.#inFlight.delete(key);
        };
        started.answer.then(done, done);
        this.#inFlight.set(key, started);
      }
      pending = started;
    }
    const found = await pending.answer;
    if (!found) return INACTIVE;
    if ('deadTokenId' in found) {
      if (cacheable && this.#listening) this.#putRefusal(key, found.deadTokenId);
      return INACTIVE;
    }
    if (cacheable && this.#listening && this.#epoch === epoch) this.#put(key, found);
    this.#noteUse(found.verification.tokenId, found.useIntervalMs);
    return found.verification;
  }

  async #query(hash: Buffer): Promise<Answer> {
    this.#stats.queries++;
    const sentAt = performance.now();
    let rows: CredentialLookupRow[];
    try {
      ({ rows } = await this.#pool.query<CredentialLookupRow>(
        this.#o.prepare
          ? { name: 'tokenwarden_verify', text: this.#lookupSql, values: [hash] }
          : { text: this.#lookupSql, values: [hash] },
      ));
    } catch (err) {
      // pg's messages never carry bind parameters: neither the token nor its hash is in them.
      throw new VerifierUnavailableError(`the token store did not answer: ${asError(err).message}`, { cause: err });
    }
    const row = rows[0];
    if (!row) return undefined;
    if (row.reused) {
      await this.#killReused(row.credential_id);
      return undefined;
    }
    if (row.dead) return { deadTokenId: row.token_id };
    if (!row.valid) return undefined;
    const verification: ActiveVerification = Object.freeze({
      active: true as const,
      tokenId: row.token_id,
      subject: row.subject,
      scopes: Object.freeze([...row.scopes]) as string[],
      expiresAt: row.expires_at.toISOString(),
      issuedAt: row.issued_at.toISOString(),
      credentialId: row.credential_id,
    });
    // An idle deadline must see uses: never throttled past a tenth of the idle timeout.
    const useIntervalMs = Math.max(1, Math.min(this.#o.lastUseIntervalMs, row.use_interval_cap_ms ?? Infinity));
    return { verification, remainingMs: row.remaining_ms, sentAt, useIntervalMs };
  }

  /** Reuse detection: the store kills that token (idempotent); the answer is a refusal whatever happens. */
  async #killReused(credentialId: string): Promise<void> {
    this.#stats.reuseDetected++;
    let outcome: Awaited<ReturnType<typeof killReusedCredential>>;
    try {
      outcome = await killReusedCredential(this.#pool, this.#o.schema, credentialId);
    } catch (err) {
      this.#report(new Error(`killing a token whose credential was reused failed: ${asError(err).message}`));
      return;
    }
    if (!outcome) return;
    this.forget(outcome.tokenId);
    if (!outcome.killed || !this.#o.onReuseDetected) return;
    try {
      this.#o.onReuseDetected(outcome.tokenId);
    } catch (err) {
      this.#report(asError(err));
    }
  }

  #put(key: string, found: Found): void {
    const until = found.sentAt + Math.min(this.#o.cacheTtlMs, found.remainingMs);
    if (until <= performance.now()) return;
    const tokenId = found.verification.tokenId;
    this.#cache.delete(key);
    while (this.#cache.size >= this.#o.maxCacheEntries) {
      const [oldestKey, oldest] = this.#cache.entries().next().value as [string, CacheEntry];
      this.#forget(oldestKey, oldest.tokenId);
    }
    this.#cache.set(key, { verification: found.verification, tokenId, until, useIntervalMs: found.useIntervalMs });
    let keys = this.#keysOfToken.get(tokenId);
    if (!keys) this.#keysOfToken.set(tokenId, (keys = new Set()));
    keys.add(key);
  }

  /** A dead token's refusal, kept until evicted: death is final, so no notification can make it stale. */
  #putRefusal(key: string, tokenId: string): void {
    this.#cache.delete(key);
    while (this.#cache.size >= this.#o.maxCacheEntries) {
      const [oldestKey, oldest] = this.#cache.entries().next().value as [string, CacheEntry];
      this.#forget(oldestKey, oldest.tokenId);
    }
    this.#cache.set(key, { verification: INACTIVE, tokenId, until: Infinity, useIntervalMs: 0 });
  }

  #forget(key: string, tokenId: string): void {
    this.#cache.delete(key);
    const keys = this.#keysOfToken.get(tokenId);
    keys?.delete(key);
    if (keys?.size === 0) this.#keysOfToken.delete(tokenId);
  }

  /** The store announced a change of this token (a kill, a suspend, a rotation…): its next verify asks the store. */
  #dropAnswers(tokenId: string): void {
    for (const key of this.#keysOfToken.get(tokenId) ?? []) this.#cache.delete(key);
    this.#keysOfToken.delete(tokenId);
  }

  /** A token known dead: its cached answers become refusals, its next verify refuses without a query. */
  #dropToken(tokenId: string): void {
    for (const key of this.#keysOfToken.get(tokenId) ?? []) {
      this.#cache.set(key, { verification: INACTIVE, tokenId, until: Infinity, useIntervalMs: 0 });
    }
    this.#keysOfToken.delete(tokenId);
  }

  #dropAll(): void {
    this.#cache.clear();
    this.#keysOfToken.clear();
  }

  // ---- The kill channel ----

  /** Connects, LISTENs, and only then serves from cache, starting empty (kills may have been missed before). */
  async connectListener(): Promise<void> {
    this.#reconnect = undefined;
    if (this.#closed) return;
    const client = new pg.Client({
      connectionString: this.#o.listenUrl,
      application_name: `${this.#o.applicationName}:listener`,
      connectionTimeoutMillis: this.#o.heartbeatTimeoutMs,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    });
    this.#listener = client;
    client.on('error', (err) => this.#lost(client, err));
    client.on('end', () => this.#lost(client, new Error('the kill listener connection ended')));
    client.on('notification', (n) => this.#heard(n));
    try {
      await client.connect();
      await withTimeout(
        client.query(`LISTEN ${quoteIdent(KILL_CHANNEL)}; LISTEN ${quoteIdent(CHANGE_CHANNEL)}`),
        this.#o.heartbeatTimeoutMs,
        'LISTEN',
      );
    } catch (err) {
      this.#lost(client, asError(err));
      return;
    }
    if (this.#listener !== client || this.#closed) return;
    this.#epoch++;
    this.#dropAll();
    this.#listening = true;
    this.#stats.listenerConnects++;
    this.#backoffMs = this.#o.reconnectInitialMs;
    this.#heartbeat = setInterval(() => this.#beat(client), this.#o.heartbeatIntervalMs);
    this.#heartbeat.unref();
  }

  forget(tokenId: string): void {
    this.#epoch++;
    this.#dropToken(tokenId);
  }

  #heard(n: pg.Notification): void {
    const killed = n.channel === KILL_CHANNEL;
    if ((!killed && n.channel !== CHANGE_CHANNEL) || !n.payload) return;
    // `<schema>:<tokenId>`: token ids hold no colon, a schema name may.
    const at = n.payload.lastIndexOf(':');
    if (n.payload.slice(0, at) !== this.#o.schema) return;
    const tokenId = n.payload.slice(at + 1);
    this.#epoch++;
    // Dropped, not turned into refusals: the next lookup says whether the token is dead.
    this.#dropAnswers(tokenId);
    if (killed) this.#stats.kills++;
    else this.#stats.changes++;
    const tell = killed ? this.#o.onKilled : this.#o.onChanged;
    if (tell) {
      try {
        tell(tokenId);
      } catch (err) {
        this.#report(asError(err));
      }
    }
  }

  #beat(client: pg.Client): void {
    if (this.#heartbeatInFlight || this.#listener !== client) return;
    this.#heartbeatInFlight = true;
    withTimeout(client.query('SELECT 1'), this.#o.heartbeatTimeoutMs, 'the kill listener heartbeat')
      .then(
        () => {},
        (err: unknown) => this.#lost(client, asError(err)),
      )
      .finally(() => (this.#heartbeatInFlight = false));
    this.#pruneLastUse();
  }

  /** The listener is gone: stop serving from cache at once, drop the connection, reconnect with backoff. */
  #lost(client: pg.Client, err: Error): void {
    if (this.#listener !== client) return;
    this.#listener = undefined;
    this.#listening = false;
    this.#epoch++;
    this.#dropAll();
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    this.#heartbeatInFlight = false;
    // A server that went silent never answers end(): the socket is destroyed instead.
    (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
    client.end().catch(() => {});
    if (this.#closed) return;
    this.#report(
      new Error(`kill listener lost, serving nothing from cache until it is back: ${err.message}`, { cause: err }),
    );
    // Jittered, so many verifiers do not reconnect in step after a database restart.
    const delay = this.#backoffMs * (0.5 + Math.random() / 2);
    this.#backoffMs = Math.min(this.#o.reconnectMaxMs, this.#backoffMs * 2);
    this.#reconnect = setTimeout(() => void this.connectListener(), delay);
    this.#reconnect.unref();
  }

  // ---- Last use ----

  /** At most one queued write per token per interval; never awaited by verify, bounded in number. */
  #noteUse(tokenId: string, intervalMs: number): void {
    const now = performance.now();
    const last = this.#lastUseAt.get(tokenId);
    if (last !== undefined && now - last < intervalMs) return;
    if (this.#lastUseQueue.has(tokenId)) return;
    if (this.#lastUseQueue.size >= LAST_USE_QUEUE_MAX) {
      this.#stats.lastUseDropped++;
      return;
    }
    // Re-inserted so the map stays in time order, for pruning from its head.
    this.#lastUseAt.delete(tokenId);
    this.#lastUseAt.set(tokenId, now);
    if (this.#lastUseAt.size > LAST_USE_MEMORY_MAX) this.#lastUseAt.delete(this.#lastUseAt.keys().next().value!);
    this.#lastUseQueue.set(tokenId, intervalMs);
    this.#pumpLastUse();
  }

  #pumpLastUse(): void {
    while (!this.#closed && this.#lastUseInFlight < LAST_USE_CONCURRENCY && this.#lastUseQueue.size > 0) {
      const [tokenId, intervalMs] = this.#lastUseQueue.entries().next().value!;
      this.#lastUseQueue.delete(tokenId);
      this.#lastUseInFlight++;
      void recordTokenUse(this.#pool, this.#o.schema, tokenId, intervalMs)
        .then(
          (written) => void (written ? this.#stats.lastUseWrites++ : this.#stats.lastUseThrottled++),
          (err: unknown) => this.#report(new Error(`recording a token's last use failed: ${asError(err).message}`)),
        )
        .then(() => {
          this.#lastUseInFlight--;
          this.#pumpLastUse();
          if (this.#lastUseInFlight === 0) for (const resolve of this.#lastUseIdle.splice(0)) resolve();
        });
    }
  }

  #pruneLastUse(): void {
    const horizon = performance.now() - this.#o.lastUseIntervalMs;
    for (const [tokenId, at] of this.#lastUseAt) {
      if (at >= horizon) break;
      this.#lastUseAt.delete(tokenId);
    }
  }

  #report(err: Error): void {
    try {
      this.#o.onError(err);
    } catch {
      // An app's handler that throws must not break the verifier.
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#listening = false;
    this.#dropAll();
    clearInterval(this.#heartbeat);
    clearTimeout(this.#reconnect);
    const listener = this.#listener;
    this.#listener = undefined;
    this.#lastUseQueue.clear();
    if (this.#lastUseInFlight > 0) await new Promise<void>((resolve) => this.#lastUseIdle.push(resolve));
    await Promise.all([
      listener
        ? withTimeout(listener.end(), this.#o.heartbeatTimeoutMs, 'closing the listener').catch(() => {})
        : undefined,
      this.#pool.end(),
    ]);
  }
}

/**
 * A verifier for the store at `databaseUrl`. Resolves once the listener's first attempt is over:
 * listening, or (the database unreachable) still trying in the background, with every answer from
 * the store meanwhile. Throws VerifierOptionError naming a bad option.
 */
export async function createVerifier(options: VerifierOptions): Promise<Verifier> {
  const verifier = new TokenVerifier(resolveOptions(options));
  await verifier.connectListener();
  return verifier;
}
