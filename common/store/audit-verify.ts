/**
 * Verification of the audit trail, and the signed checkpoints that make a chain deleted or rewritten
 * whole detectable. Every chain is recomputed from its stored canonical text, streamed in keyset
 * batches (never every row in memory); a checkpoint signs the digest of every chain's head.
 */
import { createHash, createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { checkout, quoteIdent, type Queryable, type StorePool } from '../db.js';
import { ConfigError } from '../errors.js';
import type { AuditCheckpointOutcome } from '../messages.js';

export type { AuditCheckpointOutcome } from '../messages.js';

/** Rows one query of the verifier reads at most. */
export const AUDIT_VERIFY_BATCH = 1000;
/** Broken chains a report names at most: a trail broken wholesale must not fill memory (all are counted). */
export const AUDIT_BROKEN_NAMED = 1000;
/** Checkpoints whose heads are kept: the latest, and the one before it while a verifier may still read it. */
export const AUDIT_CHECKPOINT_HEADS_KEPT = 2;

// ---------------------------------------------------------------- keys

/** The key that signs checkpoints (the worker's) or only checks them (an auditor's public key). */
export interface AuditKey {
  keyId: string;
  publicKey: KeyObject;
  privateKey?: KeyObject;
}

// DER prefixes of an ed25519 PKCS#8 private key and SPKI public key (RFC 8410), before the 32 raw bytes.
const PKCS8_ED25519 = Buffer.from('302e020100300506032b657004220420', 'hex');
const SPKI_ED25519 = Buffer.from('302a300506032b6570032100', 'hex');

/** 'ed25519:' and the first 16 hex digits of SHA-256 of the raw public key. */
const keyIdOf = (publicKey: KeyObject) =>
  `ed25519:${createHash('sha256').update(rawPublicKey(publicKey)).digest('hex').slice(0, 16)}`;

export function rawPublicKey(publicKey: KeyObject): Buffer {
  return publicKey.export({ format: 'der', type: 'spki' }).subarray(SPKI_ED25519.length);
}

/** The signing key from its 32-byte seed (TOKENWARDEN_AUDIT_KEY). */
export function auditSigningKey(seed: Buffer): AuditKey {
  const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_ED25519, seed]), format: 'der', type: 'pkcs8' });
  const publicKey = createPublicKey(privateKey);
  return { keyId: keyIdOf(publicKey), publicKey, privateKey };
}

/** A key that checks checkpoints only, from the raw public key (TOKENWARDEN_AUDIT_PUBLIC_KEY). */
export function auditCheckingKey(raw: Buffer): AuditKey {
  const publicKey = createPublicKey({ key: Buffer.concat([SPKI_ED25519, raw]), format: 'der', type: 'spki' });
  return { keyId: keyIdOf(publicKey), publicKey };
}

/** The names of the settings a key came from, for messages. */
const SIGNING_KEY_ORIGIN = {
  env: 'TOKENWARDEN_AUDIT_KEY',
  file: 'TOKENWARDEN_AUDIT_KEY_FILE',
  'data dir': 'audit.key in TOKENWARDEN_DATA_DIR',
} as const;

/**
 * The key checkpoints are verified with, and where it came from: a pinned public key
 * (TOKENWARDEN_AUDIT_PUBLIC_KEY) wins, since a signing key found on the host is what a forger would
 * have replaced; the two disagreeing is a configuration error, never a silent choice.
 */
export function auditVerifyKeyFrom(settings: {
  auditKey?: Buffer | undefined;
  auditKeySource?: keyof typeof SIGNING_KEY_ORIGIN | undefined;
  auditPublicKey?: Buffer | undefined;
}): { key: AuditKey; source: string } | undefined {
  const signing = settings.auditKey ? auditSigningKey(settings.auditKey) : undefined;
  const signingOrigin = settings.auditKeySource ? SIGNING_KEY_ORIGIN[settings.auditKeySource] : 'settings.auditKey';
  if (settings.auditPublicKey) {
    const pinned = auditCheckingKey(settings.auditPublicKey);
    if (signing && signing.keyId !== pinned.keyId) {
      throw new ConfigError(
        `TOKENWARDEN_AUDIT_PUBLIC_KEY (${pinned.keyId}) is not the public half of the signing key from ${signingOrigin} (${signing.keyId}): ` +
          'unset one of them (an auditor pins the public key and needs no signing key)',
      );
    }
    return { key: pinned, source: 'env (TOKENWARDEN_AUDIT_PUBLIC_KEY)' };
  }
  if (!signing) return undefined;
  const where = settings.auditKeySource ?? 'settings';
  return { key: signing, source: `${where} (${signingOrigin})` };
}

// ---------------------------------------------------------------- canonical text

/** JSON with object keys sorted (RFC 8785 for the strings and integers a checkpoint holds). */
function canonical(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
  entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonical(v)}`).join(',')}}`;
}

const sha256 = (text: string | Buffer) => createHash('sha256').update(text).digest('hex');

/** What a checkpoint signs. */
export interface CheckpointStatement {
  v: 1;
  seq: number;
  /** The database's time when the heads were read (ISO, milliseconds). */
  at: string;
  keyId: string;
  /** Chains (tokens with events) and events (the sum of their last seqs) the heads cover. */
  chains: number;
  events: number;
  /** SHA-256 of the lines `<token id> <last seq> <last hash hex>\n`, in token id order. */
  headsDigest: string;
  /** SHA-256 of the previous checkpoint's statement; null for the first. */
  previous: string | null;
}

/** One line of the heads digest. */
const headLine = (h: ChainHead) => `${h.tokenId} ${h.seq} ${h.hash}\n`;

interface ChainHead {
  tokenId: string;
  seq: number;
  hash: string;
}

/** Sums a stream of heads, in token id order, into the figures a statement signs. */
class HeadsDigest {
  readonly #hash = createHash('sha256');
  chains = 0;
  events = 0;
  #last: string | undefined;
  add(head: ChainHead): void {
    // Keyset pages compare ids in SQL and the merge in JS: the two orders must agree.
    if (this.#last !== undefined && !(this.#last < head.tokenId)) {
      throw new Error(`audit heads out of order (${this.#last} before ${head.tokenId}): token ids must sort bytewise`);
    }
    this.#last = head.tokenId;
    this.#hash.update(headLine(head));
    this.chains++;
    this.events += head.seq;
  }
  digest(): string {
    return this.#hash.digest('hex');
  }
}

// ---------------------------------------------------------------- streams

interface AuditRow {
  tokenId: string;
  seq: number;
  kind: string;
  canonical: string;
  hash: string;
  prevHash: string | null;
}

/** Every audit event (or one token's) in (token id, seq) order, one keyset page at a time. */
async function* auditRows(db: Queryable, batch: number, tokenId?: string): AsyncGenerator<AuditRow> {
  const t = db.tables;
  let after: [string, number] = [tokenId ?? '', 0];
  for (;;) {
    const { rows } = await db.query(
      `SELECT token_id, seq, kind, canonical, hash, prev_hash FROM ${t.audit_event}
        WHERE (token_id, seq) > ($1, $2) ${tokenId !== undefined ? 'AND token_id = $1' : ''}
        ORDER BY token_id, seq LIMIT $3`,
      [after[0], after[1], batch],
    );
    for (const r of rows) {
      yield {
        tokenId: r.token_id as string,
        seq: r.seq as number,
        kind: r.kind as string,
        canonical: r.canonical as string,
        hash: (r.hash as Buffer).toString('hex'),
        prevHash: r.prev_hash ? (r.prev_hash as Buffer).toString('hex') : null,
      };
    }
    if (rows.length < batch) return;
    const last = rows[rows.length - 1]!;
    after = [last.token_id as string, last.seq as number];
  }
}

/** A checkpoint's heads in token id order, one keyset page at a time. */
async function* checkpointHeads(db: Queryable, checkpointSeq: number, batch: number): AsyncGenerator<ChainHead> {
  const t = db.tables;
  let after = '';
  for (;;) {
    const { rows } = await db.query(
      `SELECT token_id, seq, hash FROM ${t.audit_checkpoint_head}
        WHERE checkpoint_seq = $1 AND token_id > $2 ORDER BY token_id LIMIT $3`,
      [checkpointSeq, after, batch],
    );
    for (const r of rows) {
      yield { tokenId: r.token_id as string, seq: r.seq as number, hash: (r.hash as Buffer).toString('hex') };
    }
    if (rows.length < batch) return;
    after = rows[rows.length - 1]!.token_id as string;
  }
}

/** The token row's facts its chain also records (never changed after issue or kill). */
interface TokenFacts {
  tokenId: string;
  subject: string;
  receivers: string[];
  status: string;
  revokedAt: string | null;
  revokedBy: string | null;
  revokeReason: string | null;
}

/** Token rows (or one token's) in id order, one keyset page at a time. */
async function* tokenFacts(db: Queryable, batch: number, tokenId?: string): AsyncGenerator<TokenFacts> {
  const t = db.tables;
  let after = '';
  for (;;) {
    const { rows } = await db.query(
      `SELECT id, subject, receivers, status, ${quoteIdent(t.schema)}.iso_time(revoked_at) AS revoked_at, revoked_by, revoke_reason
         FROM ${t.token} WHERE id > $1 ${tokenId !== undefined ? 'AND id = $3' : ''} ORDER BY id LIMIT $2`,
      tokenId !== undefined ? [after, batch, tokenId] : [after, batch],
    );
    for (const r of rows) {
      yield tokenRowFacts(r.id as string, r);
    }
    if (rows.length < batch) return;
    after = rows[rows.length - 1]!.id as string;
  }
}

interface CheckpointRow {
  seq: number;
  createdAt: Date;
  keyId: string;
  statement: string;
  signature: Buffer;
}

async function* checkpointRows(db: Queryable, batch: number): AsyncGenerator<CheckpointRow> {
  const t = db.tables;
  let after = 0;
  for (;;) {
    const { rows } = await db.query(
      `SELECT seq, created_at, key_id, statement, signature FROM ${t.audit_checkpoint}
        WHERE seq > $1 ORDER BY seq LIMIT $2`,
      [after, batch],
    );
    for (const r of rows) {
      yield {
        seq: r.seq as number,
        createdAt: r.created_at as Date,
        keyId: r.key_id as string,
        statement: r.statement as string,
        signature: r.signature as Buffer,
      };
    }
    if (rows.length < batch) return;
    after = rows[rows.length - 1]!.seq as number;
  }
}

/** An async iterator one can look ahead in by one item. */
class Lookahead<T> {
  #next: IteratorResult<T> | undefined;
  constructor(private readonly source: AsyncIterator<T>) {}
  async peek(): Promise<T | undefined> {
    this.#next ??= await this.source.next();
    return this.#next.done ? undefined : this.#next.value;
  }
  async take(): Promise<T | undefined> {
    const value = await this.peek();
    this.#next = undefined;
    return value;
  }
}

// ---------------------------------------------------------------- verification

/**
 * How a chain is broken at `seq`. edited: the stored text or a column no longer is what was written
 * (or a row was rewritten with a fresh hash, so the next one no longer links to it); deleted: events
 * are missing (a gap, the chain's end, or the whole chain); inserted: events that were never appended
 * in that place; checkpoint-mismatch: the chain is consistent but not the one a signed checkpoint saw;
 * row-mismatch: the chain is intact but the token row (subject, receivers, status, revocation) says otherwise.
 */
export type AuditBreak = 'edited' | 'deleted' | 'inserted' | 'checkpoint-mismatch' | 'row-mismatch';

/** The first broken link of one token's chain. */
export interface BrokenAuditLink {
  tokenId: string;
  seq: number;
  problem: AuditBreak;
  detail: string;
}

export interface CheckpointProblem {
  checkpoint: number;
  /**
   * signature: forged or altered; unknown-key: signed by another key; sequence: one missing or
   * replaced; heads: its head rows altered or gone; checkpoint-missing: events old enough to be
   * signed but no checkpoint at all; checkpoint-stale: events old enough to be signed that the latest
   * does not cover (a fault only with `strict`); anchor: the expected checkpoint is not in the sequence.
   */
  problem: 'signature' | 'unknown-key' | 'sequence' | 'heads' | 'checkpoint-missing' | 'checkpoint-stale' | 'anchor';
  detail: string;
}

/** A checkpoint as reports name it: its statement without the version and the link. */
export type AuditCheckpointSummary = Omit<CheckpointStatement, 'v' | 'previous'>;

export interface AuditVerifyReport {
  /** No broken link and no checkpoint problem. */
  ok: boolean;
  /** Only this token's chain was recomputed (its checkpoint head still compared). */
  tokenId?: string;
  chains: number;
  events: number;
  /** The first broken link of each broken chain, in token id order: the first AUDIT_BROKEN_NAMED. */
  broken: BrokenAuditLink[];
  /** How many chains are broken, named or not. */
  brokenChains: number;
  /** The key checkpoints were checked with and where it came from; null without one. */
  key: { keyId: string; source: string } | null;
  /** The checkpoint the chains were compared with (the latest), when one was checked. */
  checkpoint: AuditCheckpointSummary | null;
  /** Checkpoints whose signature and place in the sequence were checked. */
  checkpointsChecked: number;
  checkpointProblems: CheckpointProblem[];
  /** What was not checked, and why (no key, no checkpoint yet). */
  warnings: string[];
}

export interface AuditVerifyOptions {
  tokenId?: string;
  batchSize?: number;
  /** The key checkpoints must be signed by; without one they are not checked (a warning says so). */
  key?: AuditKey | undefined;
  /** Where `key` came from (env, file, data dir), reported back. */
  keySource?: string;
  /** How many broken chains the report names at most (all are counted); AUDIT_BROKEN_NAMED by default. */
  namedBroken?: number;
  /** Earlier keys (TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS): checkpoints they signed check too. */
  previousKeys?: AuditKey[];
  /**
   * How old (database clock) an event may be before a checkpoint must cover it: the writer's
   * interval plus a pass and a margin. Without it, uncovered events are not looked at.
   */
  staleAfterMs?: number;
  /** Uncovered old events fail the check rather than warn. */
  strict?: boolean;
  /** A checkpoint recorded elsewhere (a previous run, a pass's result) that must still be in the sequence. */
  expectCheckpoint?: { seq: number; digest: string };
}

/** What a chain says of the facts its token row also holds: its issue and its kill. */
interface ChainFacts {
  issued?: { seq: number; subject?: unknown; receivers?: unknown };
  kill?: { seq: number; kind: string; reason?: unknown; actor?: unknown; occurredAt?: unknown; receivers?: unknown };
  lastSeq: number;
}

const KILL_KINDS: Record<string, string> = { 'token.revoked': 'revoked', 'token.expired': 'expired' };

function noteFacts(facts: ChainFacts, seq: number, kind: unknown, data: unknown): void {
  const d = (typeof data === 'object' && data !== null ? data : {}) as Record<string, unknown>;
  if (kind === 'token.issued') facts.issued = { seq, subject: d.subject, receivers: d.receivers };
  else if (typeof kind === 'string' && KILL_KINDS[kind]) {
    facts.kill = { seq, kind, reason: d.reason, actor: d.actor, occurredAt: d.occurredAt, receivers: d.receivers };
  }
}

const sameList = (a: unknown, b: string[]) =>
  Array.isArray(a) && a.length === b.length && a.every((v, i) => v === b[i]);

/**
 * Where the token row contradicts its chain (the row is what verifiers, filters and the export's
 * selection read): the seq of the event it contradicts and how; undefined when they agree.
 */
function rowMismatch(facts: ChainFacts, row: TokenFacts): { seq: number; detail: string } | undefined {
  const { issued, kill } = facts;
  if (issued && issued.subject !== row.subject) {
    return { seq: issued.seq, detail: 'the token row names another subject than its issue event' };
  }
  if (issued && Array.isArray(issued.receivers) && !sameList(issued.receivers, row.receivers)) {
    return { seq: issued.seq, detail: 'the token row names other receivers than its issue event' };
  }
  if (!kill) {
    return row.status === 'active'
      ? undefined
      : { seq: facts.lastSeq + 1, detail: `the token row says ${row.status}, but its chain records no kill` };
  }
  const differs = [
    row.status !== KILL_KINDS[kill.kind] && 'status',
    kill.occurredAt !== undefined && row.revokedAt !== kill.occurredAt && 'revoked_at',
    kill.actor !== undefined && row.revokedBy !== kill.actor && 'revoked_by',
    kill.reason !== undefined && row.revokeReason !== kill.reason && 'revoke_reason',
    Array.isArray(kill.receivers) && !sameList(kill.receivers, row.receivers) && 'receivers',
  ].filter((f): f is string => f !== false);
  return differs.length === 0
    ? undefined
    : { seq: kill.seq, detail: `the token row's ${differs.join(', ')} disagree(s) with its ${kill.kind} event` };
}

/** One token's chain as it is walked, event by event. */
class ChainWalk {
  readonly facts: ChainFacts = { lastSeq: 0 };
  /** Events after the checkpoint's head (all when it has none), and the oldest one's `at`. */
  uncovered = 0;
  oldestUncoveredAt: string | undefined;
  events = 0;
  #prev: { seq: number; hash: string } | null = null;
  /** Each accepted event's hash and seq, to recognise a link that skips inserted events. */
  readonly #seqOfHash = new Map<string, number>();
  /** The stored hash at the checkpoint head's seq, once walked past it. */
  #hashAtHead: string | undefined;
  broken: BrokenAuditLink | undefined;

  constructor(
    readonly tokenId: string,
    readonly head: (ChainHead & { checkpoint: number }) | undefined,
  ) {}

  #break(seq: number, problem: AuditBreak, detail: string): void {
    this.broken = { tokenId: this.tokenId, seq, problem, detail };
  }

  add(row: AuditRow): void {
    this.events++;
    if (this.broken) return;
    if (this.head && row.seq === this.head.seq) this.#hashAtHead = row.hash;
    let body: { tokenId?: unknown; seq?: unknown; kind?: unknown; prevHash?: unknown; data?: unknown };
    try {
      body = JSON.parse(row.canonical) as typeof body;
    } catch {
      return this.#break(row.seq, 'edited', 'its stored text is not JSON: it was changed after it was written');
    }
    if (sha256(row.canonical) !== row.hash) {
      return this.#break(row.seq, 'edited', 'its stored text does not hash to its stored hash: it was changed');
    }
    const prev = this.#prev;
    const expectedSeq = (prev?.seq ?? 0) + 1;
    const expectedPrev = prev?.hash ?? null;
    const linkedSeq = typeof body.prevHash === 'string' ? this.#seqOfHash.get(body.prevHash) : undefined;
    if (body.seq !== expectedSeq || body.prevHash !== expectedPrev) {
      if (linkedSeq !== undefined && prev && linkedSeq < prev.seq) {
        const inserted = prev.seq - linkedSeq;
        return this.#break(
          linkedSeq + 1,
          'inserted',
          `the event stored at seq ${row.seq} was appended after seq ${linkedSeq}: the ${inserted} event(s) stored between them were inserted`,
        );
      }
      if (typeof body.seq === 'number' && body.seq > expectedSeq) {
        const missing = body.seq - expectedSeq;
        return this.#break(
          expectedSeq,
          'deleted',
          `the event stored at seq ${row.seq} was appended as seq ${body.seq}: ${missing} event(s) before it were deleted`,
        );
      }
      if (prev && body.seq === expectedSeq) {
        return this.#break(
          prev.seq,
          'edited',
          `the event at seq ${row.seq} does not link to the stored seq ${prev.seq}: that event was rewritten`,
        );
      }
      return this.#break(row.seq, 'edited', `its text says seq ${String(body.seq)}, out of place in the chain`);
    }
    if (
      row.seq !== body.seq ||
      row.prevHash !== body.prevHash ||
      row.kind !== body.kind ||
      body.tokenId !== this.tokenId
    ) {
      return this.#break(
        row.seq,
        'edited',
        'a stored column (seq, prev_hash, kind or token) disagrees with its hashed text',
      );
    }
    this.#prev = { seq: row.seq, hash: row.hash };
    this.#seqOfHash.set(row.hash, row.seq);
    this.facts.lastSeq = row.seq;
    noteFacts(this.facts, row.seq, body.kind, body.data);
    const at = (body as { at?: unknown }).at;
    if ((!this.head || row.seq > this.head.seq) && typeof at === 'string') {
      this.uncovered++;
      if (this.oldestUncoveredAt === undefined || at < this.oldestUncoveredAt) this.oldestUncoveredAt = at;
    }
  }

  /** After the last event: is the chain still the one the checkpoint signed? */
  finish(): BrokenAuditLink | undefined {
    if (this.broken || !this.head) return this.broken;
    const last = this.#prev?.seq ?? 0;
    if (last < this.head.seq) {
      this.#break(
        last + 1,
        'deleted',
        `the chain ends at seq ${last}, but checkpoint #${this.head.checkpoint} signed it up to seq ${this.head.seq}: its last event(s) were deleted`,
      );
    } else if (this.#hashAtHead !== this.head.hash) {
      this.#break(
        this.head.seq,
        'checkpoint-mismatch',
        `the event at seq ${this.head.seq} is not the one checkpoint #${this.head.checkpoint} signed: the chain was rewritten`,
      );
    }
    return this.broken;
  }
}

/**
 * Recomputes every chain (or one token's) from its stored text, and checks the signed checkpoints:
 * every checkpoint's signature and its link to the one before, then the latest one's heads against
 * the chains (a chain deleted or rewritten whole, or its last events deleted, is caught).
 */
export async function verifyAuditTrail(db: Queryable, options: AuditVerifyOptions = {}): Promise<AuditVerifyReport> {
  const batch = options.batchSize ?? AUDIT_VERIFY_BATCH;
  const report: AuditVerifyReport = {
    ok: true,
    ...(options.tokenId !== undefined ? { tokenId: options.tokenId } : {}),
    chains: 0,
    events: 0,
    broken: [],
    brokenChains: 0,
    key: options.key ? { keyId: options.key.keyId, source: options.keySource ?? 'given' } : null,
    checkpoint: null,
    checkpointsChecked: 0,
    checkpointProblems: [],
    warnings: [],
  };

  const { rows: clock } = await db.query(`SELECT now() AS now`);
  const now = clock[0].now as Date;
  const latest = options.key
    ? await checkCheckpoints(
        db,
        [options.key, ...(options.previousKeys ?? [])],
        batch,
        report,
        options.expectCheckpoint,
      )
    : undefined;
  if (!options.key) {
    report.warnings.push(
      'checkpoints not checked: no audit key configured (TOKENWARDEN_AUDIT_KEY or TOKENWARDEN_AUDIT_PUBLIC_KEY); a chain deleted or rewritten whole would go unnoticed',
    );
  } else if (report.checkpointsChecked === 0) {
    report.warnings.push(
      'no checkpoint yet: a chain deleted or rewritten whole would go unnoticed (the reconciler writes them)',
    );
  }

  const broken = new BrokenChains(options.namedBroken ?? AUDIT_BROKEN_NAMED);
  const heads = new Lookahead(latest ? checkpointHeads(db, latest.statement.seq, batch) : (async function* () {})());
  const digest = new HeadsDigest();
  const concerned = (tokenId: string) => options.tokenId === undefined || tokenId === options.tokenId;
  const headOf = async (tokenId: string) => {
    const head = await heads.peek();
    if (!head || head.tokenId !== tokenId) return undefined;
    await heads.take();
    digest.add(head);
    return { ...head, checkpoint: latest!.statement.seq };
  };
  /** Heads before `tokenId` (all that remain when undefined) name chains that are gone. */
  const chainsGoneBefore = async (tokenId: string | undefined) => {
    for (
      let head = await heads.peek();
      head && (tokenId === undefined || head.tokenId < tokenId);
      head = await heads.peek()
    ) {
      await heads.take();
      digest.add(head);
      if (concerned(head.tokenId)) {
        broken.add({
          tokenId: head.tokenId,
          seq: 1,
          problem: 'deleted',
          detail: `the whole chain is gone: checkpoint #${latest!.statement.seq} signed ${head.seq} event(s) of it`,
        });
      }
    }
  };
  const tokenRows = new Lookahead(tokenFacts(db, batch, options.tokenId));
  const rowOf = async (tokenId: string) => {
    for (let row = await tokenRows.peek(); row && row.tokenId < tokenId; row = await tokenRows.peek()) {
      await tokenRows.take();
    }
    const row = await tokenRows.peek();
    return row?.tokenId === tokenId ? row : undefined;
  };
  let uncovered = 0;
  let oldestUncoveredAt: string | undefined;
  const finish = async (walk: ChainWalk) => {
    report.chains++;
    report.events += walk.events;
    uncovered += walk.uncovered;
    if (walk.oldestUncoveredAt && (!oldestUncoveredAt || walk.oldestUncoveredAt < oldestUncoveredAt))
      oldestUncoveredAt = walk.oldestUncoveredAt;
    const chainBreak = walk.finish();
    if (chainBreak) return broken.add(chainBreak);
    const row = await rowOf(walk.tokenId);
    // Row and chain were read at different moments: a kill committed in between is no tampering.
    const mismatch = row && rowMismatch(walk.facts, row) && (await recheckRow(db, walk.tokenId));
    if (mismatch) broken.add({ tokenId: walk.tokenId, problem: 'row-mismatch', ...mismatch });
  };

  let walk: ChainWalk | undefined;
  let lastTokenId: string | undefined;
  for await (const row of auditRows(db, batch, options.tokenId)) {
    if (walk?.tokenId !== row.tokenId) {
      if (walk) await finish(walk);
      if (lastTokenId !== undefined && !(lastTokenId < row.tokenId)) {
        throw new Error(
          `audit events out of order (${lastTokenId} before ${row.tokenId}): token ids must sort bytewise`,
        );
      }
      lastTokenId = row.tokenId;
      await chainsGoneBefore(row.tokenId);
      walk = new ChainWalk(row.tokenId, await headOf(row.tokenId));
    }
    walk.add(row);
  }
  if (walk) await finish(walk);
  await chainsGoneBefore(undefined);

  let superseded = false;
  if (latest) {
    const signed = latest.statement;
    if (digest.digest() !== signed.headsDigest || digest.chains !== signed.chains || digest.events !== signed.events) {
      // The writer prunes heads AUDIT_CHECKPOINT_HEADS_KEPT checkpoints back: two written during a long
      // walk deleted the heads being read, which is no tampering (checkpoint rows cannot be deleted).
      const { rows: newest } = await db.query(`SELECT max(seq) AS seq FROM ${db.tables.audit_checkpoint}`);
      const newestSeq = (newest[0]?.seq as number | null) ?? 0;
      if (newestSeq >= signed.seq + AUDIT_CHECKPOINT_HEADS_KEPT) {
        superseded = true;
        report.warnings.push(
          `checkpoint #${signed.seq} was superseded during verification (the latest is #${newestSeq}) and its heads pruned: its heads were not compared; re-run`,
        );
      } else
        report.checkpointProblems.push({
          checkpoint: signed.seq,
          problem: 'heads',
          detail:
            `its stored heads (${digest.chains} chain(s), ${digest.events} event(s)) are not the ones it signed ` +
            `(${signed.chains} chain(s), ${signed.events} event(s)): they were altered, or a later checkpoint was deleted`,
        });
    }
  }

  // The reconciler signs within its interval and a pass of any change: older events it has not
  // signed mean it is down, or that the checkpoints covering them were deleted (a rollback).
  if (
    options.key &&
    !superseded &&
    options.staleAfterMs !== undefined &&
    oldestUncoveredAt !== undefined &&
    Date.parse(oldestUncoveredAt) <= now.getTime() - options.staleAfterMs
  ) {
    const age = `${uncovered} event(s) since ${oldestUncoveredAt}`;
    if (report.checkpointsChecked === 0) {
      report.checkpointProblems.push({
        checkpoint: 0,
        problem: 'checkpoint-missing',
        detail: `${age} and no checkpoint at all: every checkpoint was deleted, or none was ever written (is the reconciler running with the audit key?)`,
      });
    } else {
      const detail = `${age} are not covered by checkpoint #${report.checkpoint?.seq ?? '?'}: the reconciler is not signing, or later checkpoints were deleted`;
      if (options.strict) {
        report.checkpointProblems.push({
          checkpoint: report.checkpoint?.seq ?? 0,
          problem: 'checkpoint-stale',
          detail,
        });
      } else report.warnings.push(`checkpoint-stale: ${detail}`);
    }
  }

  await findTokensWithoutChain(db, options.tokenId, latest?.statement.seq, broken);
  report.broken = broken.named.sort((a, b) => (a.tokenId < b.tokenId ? -1 : a.tokenId > b.tokenId ? 1 : 0));
  report.brokenChains = broken.count;
  report.ok = broken.count === 0 && report.checkpointProblems.length === 0;
  return report;
}

/** One token's row and its chain's issue and kill events, read in one statement: do they still disagree? */
async function recheckRow(db: Queryable, tokenId: string): Promise<{ seq: number; detail: string } | undefined> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT t.id, t.subject, t.receivers, t.status, ${quoteIdent(t.schema)}.iso_time(t.revoked_at) AS revoked_at,
            t.revoked_by, t.revoke_reason,
            (SELECT array_agg(a.canonical ORDER BY a.seq) FROM ${t.audit_event} a
              WHERE a.token_id = t.id AND a.kind = ANY ($2::text[])) AS events,
            (SELECT max(a.seq) FROM ${t.audit_event} a WHERE a.token_id = t.id) AS last_seq
       FROM ${t.token} t WHERE t.id = $1`,
    [tokenId, ['token.issued', ...Object.keys(KILL_KINDS)]],
  );
  const r = rows[0];
  if (!r) return undefined;
  const facts: ChainFacts = { lastSeq: (r.last_seq as number | null) ?? 0 };
  for (const text of (r.events as string[] | null) ?? []) {
    let body: { seq: number; kind: unknown; data: unknown };
    try {
      body = JSON.parse(text) as typeof body;
    } catch {
      continue; // Edited since the walk read it: the next verify names it.
    }
    noteFacts(facts, body.seq, body.kind, body.data);
  }
  return rowMismatch(facts, tokenRowFacts(tokenId, r));
}

/**
 * Every token is issued with its first event in one statement: a token without any lost its whole
 * chain (also one created after the latest checkpoint). The first 1,000 are named.
 */
async function findTokensWithoutChain(
  db: Queryable,
  tokenId: string | undefined,
  latestCheckpoint: number | undefined,
  broken: BrokenChains,
) {
  const t = db.tables;
  // A token with a head in the latest checkpoint was already named, from that head.
  const { rows } = await db.query(
    `SELECT k.id, count(*) OVER () AS total FROM ${t.token} k
      WHERE NOT EXISTS (SELECT 1 FROM ${t.audit_event} a WHERE a.token_id = k.id)
        AND NOT EXISTS (SELECT 1 FROM ${t.audit_checkpoint_head} h WHERE h.checkpoint_seq = $1 AND h.token_id = k.id)
        ${tokenId !== undefined ? 'AND k.id = $2' : ''}
      ORDER BY k.id LIMIT ${broken.limit}`,
    tokenId !== undefined ? [latestCheckpoint ?? 0, tokenId] : [latestCheckpoint ?? 0],
  );
  for (const r of rows) {
    broken.add({
      tokenId: r.id as string,
      seq: 1,
      problem: 'deleted',
      detail: 'the token has no audit event at all: its whole chain was deleted',
    });
  }
  broken.countUnnamed(Number(rows[0]?.total ?? 0) - rows.length);
}

/** Broken chains: every one counted, the first `limit` (by token id, mostly) named. */
class BrokenChains {
  readonly named: BrokenAuditLink[] = [];
  readonly #namedIds = new Set<string>();
  count = 0;
  constructor(readonly limit: number) {}
  add(broken: BrokenAuditLink): void {
    if (this.#namedIds.has(broken.tokenId)) return;
    this.count++;
    if (this.named.length >= this.limit) return;
    this.named.push(broken);
    this.#namedIds.add(broken.tokenId);
  }
  countUnnamed(n: number): void {
    this.count += Math.max(0, n);
  }
}

interface CheckedCheckpoint {
  statement: CheckpointStatement;
  statementDigest: string;
}

/**
 * Checks every checkpoint's signature, that its columns say what it signed, and that it names the
 * one before it; returns the latest checkpoint when it checks out: the one to compare the chains with.
 */
async function checkCheckpoints(
  db: Queryable,
  keys: AuditKey[],
  batch: number,
  report: AuditVerifyReport,
  expected?: { seq: number; digest: string },
): Promise<CheckedCheckpoint | undefined> {
  let anchorSeen = false;
  let previous: CheckedCheckpoint | undefined;
  let previousSeq = 0;
  let latest: CheckedCheckpoint | undefined;
  for await (const row of checkpointRows(db, batch)) {
    report.checkpointsChecked++;
    const problem = (kind: CheckpointProblem['problem'], detail: string) =>
      report.checkpointProblems.push({ checkpoint: row.seq, problem: kind, detail });
    const checked = checkCheckpoint(row, keys, problem);
    if (row.seq !== previousSeq + 1) {
      problem('sequence', `it follows checkpoint #${previousSeq}: checkpoint(s) in between were deleted`);
    } else if (checked && previous && checked.statement.previous !== previous.statementDigest) {
      problem('sequence', `it does not name checkpoint #${previousSeq} as the one before it: one of them was replaced`);
    } else if (checked && !previous && previousSeq === 0 && checked.statement.previous !== null) {
      problem('sequence', 'the first checkpoint names one before it');
    }
    if (expected && row.seq === expected.seq) {
      anchorSeen = true;
      if (sha256(row.statement) !== expected.digest) {
        problem('anchor', `its digest is not the expected ${expected.digest}: it was replaced`);
      }
    }
    previousSeq = row.seq;
    previous = checked;
    latest = checked;
  }
  if (expected && !anchorSeen) {
    report.checkpointProblems.push({
      checkpoint: expected.seq,
      problem: 'anchor',
      detail: `the expected checkpoint #${expected.seq} is not in the sequence (${previousSeq} checkpoint(s)): it was deleted`,
    });
  }
  if (latest) {
    const s = latest.statement;
    report.checkpoint = {
      seq: s.seq,
      at: s.at,
      keyId: s.keyId,
      chains: s.chains,
      events: s.events,
      headsDigest: s.headsDigest,
    };
  }
  return latest;
}

/** Checks one checkpoint with the key of its key id among `keys` (the current one first). */
function checkCheckpoint(
  row: CheckpointRow,
  keys: AuditKey[],
  problem: (kind: CheckpointProblem['problem'], detail: string) => void,
): CheckedCheckpoint | undefined {
  const key = keys.find((k) => k.keyId === row.keyId);
  if (!key) {
    problem(
      'unknown-key',
      `signed by ${row.keyId}, neither the configured key ${keys[0]?.keyId ?? '(none)'} nor one of TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS`,
    );
    return undefined;
  }
  if (!verify(null, Buffer.from(row.statement, 'utf8'), key.publicKey, row.signature)) {
    problem('signature', 'its signature does not match its statement: it was forged or altered');
    return undefined;
  }
  const statement = JSON.parse(row.statement) as CheckpointStatement;
  if (statement.seq !== row.seq || statement.keyId !== row.keyId || statement.at !== row.createdAt.toISOString()) {
    problem('signature', 'its columns (seq, created_at, key_id) disagree with its signed statement');
    return undefined;
  }
  return { statement, statementDigest: sha256(row.statement) };
}

// ---------------------------------------------------------------- writing a checkpoint

/** A checkpoint would sign over chains that no longer extend the previous checkpoint's heads. */
export class AuditTamperedError extends Error {
  override readonly name = 'AuditTamperedError';
  constructor(
    message: string,
    readonly broken: { tokenId: string; seq: number }[],
  ) {
    super(message);
  }
}

/**
 * Signs the chains' current heads as the next checkpoint, in one transaction: at most one per
 * `minIntervalMs` (database clock), none when no chain changed since the last, and never over
 * chains that no longer extend the last checkpoint's heads (AuditTamperedError): a checkpoint must
 * not vouch for a tampered trail.
 */
export async function writeAuditCheckpoint(
  pool: StorePool,
  key: AuditKey,
  options: { minIntervalMs: number; batchSize?: number; previousKeys?: AuditKey[] },
): Promise<AuditCheckpointOutcome> {
  if (!key.privateKey) throw new Error('writing an audit checkpoint needs the signing key (TOKENWARDEN_AUDIT_KEY)');
  const batch = options.batchSize ?? AUDIT_VERIFY_BATCH;
  const db = await checkout(pool);
  const t = db.tables;
  try {
    await db.query('BEGIN');
    // One writer at a time per schema; each statement below sees what committed before it.
    await db.query(`SELECT pg_advisory_xact_lock(hashtext($1))`, [`tokenwarden:audit_checkpoint:${t.schema}`]);
    const { rows: clock } = await db.query(`SELECT now() AS now`);
    const now = clock[0].now as Date;
    const { rows: last } = await db.query(
      `SELECT seq, created_at, key_id, statement, signature FROM ${t.audit_checkpoint} ORDER BY seq DESC LIMIT 1`,
    );
    const previous = last[0]
      ? {
          seq: last[0].seq as number,
          createdAt: last[0].created_at as Date,
          keyId: last[0].key_id as string,
          statement: last[0].statement as string,
          signature: last[0].signature as Buffer,
        }
      : undefined;
    if (previous && now.getTime() - previous.createdAt.getTime() < options.minIntervalMs) {
      await db.query('ROLLBACK');
      return { written: false, skipped: 'recent', seq: previous.seq };
    }
    let previousStatement: CheckpointStatement | undefined;
    if (previous) {
      // Linking to a forged checkpoint would lend it this one's signature, and one signed by a key
      // nobody configured is indistinguishable from a forgery.
      const failed = (detail: string) =>
        new AuditTamperedError(
          `refusing to write an audit checkpoint: checkpoint #${previous.seq} ${detail} (run \`tokenwarden audit verify\`)`,
          [],
        );
      checkCheckpoint(previous, [key, ...(options.previousKeys ?? [])], (_, detail) => {
        throw failed(detail);
      });
      try {
        previousStatement = JSON.parse(previous.statement) as CheckpointStatement;
      } catch {
        throw failed('is not JSON');
      }
      // Read-only first: on a quiet store a due pass must not insert (and roll back) a row per chain.
      // Nothing is signed then, so there is nothing to vouch for: verify checks the stored heads.
      if ((await currentHeadsDigest(db, batch)) === previousStatement.headsDigest) {
        await db.query('ROLLBACK');
        return { written: false, skipped: 'unchanged', seq: previousStatement.seq };
      }
      await checkPreviousHeadsHold(db, previous.seq, previousStatement, batch);
    }

    const seq = (previous?.seq ?? 0) + 1;
    await db.query(
      `INSERT INTO ${t.audit_checkpoint_head} (checkpoint_seq, token_id, seq, hash)
       SELECT DISTINCT ON (token_id) $1::integer, token_id, seq, hash FROM ${t.audit_event} ORDER BY token_id, seq DESC`,
      [seq],
    );
    const digest = new HeadsDigest();
    for await (const head of checkpointHeads(db, seq, batch)) digest.add(head);
    const headsDigest = digest.digest();
    if (previousStatement?.headsDigest === headsDigest) {
      await db.query('ROLLBACK');
      return { written: false, skipped: 'unchanged', seq: previousStatement.seq };
    }
    const statement: CheckpointStatement = {
      v: 1,
      seq,
      at: now.toISOString(),
      keyId: key.keyId,
      chains: digest.chains,
      events: digest.events,
      headsDigest,
      previous: previous ? sha256(previous.statement) : null,
    };
    const text = canonical(statement);
    await db.query(
      `INSERT INTO ${t.audit_checkpoint} (seq, created_at, key_id, statement, signature) VALUES ($1, $2, $3, $4, $5)`,
      [seq, now, key.keyId, text, sign(null, Buffer.from(text, 'utf8'), key.privateKey)],
    );
    await db.query(`DELETE FROM ${t.audit_checkpoint_head} WHERE checkpoint_seq <= $1`, [
      seq - AUDIT_CHECKPOINT_HEADS_KEPT,
    ]);
    await db.query('COMMIT');
    return { written: true, seq, chains: digest.chains, events: digest.events, digest: sha256(text) };
  } catch (err) {
    await db.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    db.release();
  }
}

/**
 * The digest of every chain's head now, in keyset pages of the primary key (each page one statement:
 * a head is always a committed prefix, and chains only grow), writing nothing.
 */
async function currentHeadsDigest(db: Queryable, batch: number): Promise<string> {
  const t = db.tables;
  const digest = new HeadsDigest();
  let after = '';
  for (;;) {
    const { rows } = await db.query(
      `SELECT h.token_id, h.seq, a.hash
         FROM (SELECT token_id, max(seq) AS seq FROM ${t.audit_event} WHERE token_id > $1
                GROUP BY token_id ORDER BY token_id LIMIT $2) h
         JOIN ${t.audit_event} a ON a.token_id = h.token_id AND a.seq = h.seq
        ORDER BY h.token_id`,
      [after, batch],
    );
    for (const r of rows) {
      digest.add({ tokenId: r.token_id as string, seq: r.seq as number, hash: (r.hash as Buffer).toString('hex') });
    }
    if (rows.length < batch) return digest.digest();
    after = rows[rows.length - 1]!.token_id as string;
  }
}

/**
 * The previous checkpoint's heads must still be in the chains, and still be the heads it signed:
 * otherwise a chain was deleted or rewritten since (or the heads were), and signing now would hide it.
 */
async function checkPreviousHeadsHold(
  db: Queryable,
  previousSeq: number,
  signed: CheckpointStatement,
  batch: number,
): Promise<void> {
  const t = db.tables;
  const digest = new HeadsDigest();
  const broken: { tokenId: string; seq: number }[] = [];
  let after = '';
  for (;;) {
    const { rows } = await db.query(
      `SELECT h.token_id, h.seq, h.hash, a.hash AS stored FROM ${t.audit_checkpoint_head} h
         LEFT JOIN ${t.audit_event} a ON a.token_id = h.token_id AND a.seq = h.seq
        WHERE h.checkpoint_seq = $1 AND h.token_id > $2 ORDER BY h.token_id LIMIT $3`,
      [previousSeq, after, batch],
    );
    for (const r of rows) {
      const head = { tokenId: r.token_id as string, seq: r.seq as number, hash: (r.hash as Buffer).toString('hex') };
      digest.add(head);
      if (!r.stored || !(r.stored as Buffer).equals(r.hash as Buffer))
        broken.push({ tokenId: head.tokenId, seq: head.seq });
    }
    if (rows.length < batch) break;
    after = rows[rows.length - 1]!.token_id as string;
  }
  if (digest.digest() !== signed.headsDigest || digest.chains !== signed.chains || digest.events !== signed.events) {
    throw new AuditTamperedError(
      `refusing to write an audit checkpoint: the heads stored for checkpoint #${previousSeq} are not the ones it signed (run \`tokenwarden audit verify\`)`,
      broken,
    );
  }
  if (broken.length > 0) {
    const first = broken[0]!;
    throw new AuditTamperedError(
      `refusing to write an audit checkpoint: ${broken.length} chain(s) no longer hold what checkpoint #${previousSeq} signed ` +
        `(first: token ${first.tokenId} at seq ${first.seq}; run \`tokenwarden audit verify\`)`,
      broken.slice(0, 20),
    );
  }
}

/** A token row's facts that its chain must agree with (subject, receivers, death). */
function tokenRowFacts(tokenId: string, r: Record<string, unknown>) {
  return {
    tokenId,
    subject: r.subject as string,
    receivers: r.receivers as string[],
    status: r.status as string,
    revokedAt: r.revoked_at as string | null,
    revokedBy: r.revoked_by as string | null,
    revokeReason: r.revoke_reason as string | null,
  };
}
