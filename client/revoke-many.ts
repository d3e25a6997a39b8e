/**
 * Revocation by filter: every active token matching the filter dead in the store first (chunks of
 * one transaction each, the operation id on every event and audit record), then each one's workflow
 * told to propagate, paced. The store is the checkpoint, so a run stopped anywhere resumes:
 * - crash before the operation record commits: nothing happened; run it again.
 * - crash during the kill phase: chunks committed are dead, the rest are still active; a resume
 *   kills what still matches (same filter, same cutoff), so nothing issued since is touched.
 * - crash or abort during the tell phase: every match is dead already; the tokens of this
 *   operation whose workflow has not taken over (revoke_request_id = operation id and
 *   propagation_started_at NULL) are what a resume tells; the reconciler tells them too, later.
 * - crash after telling, before the operation's state is written: a resume finds nothing to kill
 *   and tells at most the workflows that had not yet taken over (a signal a workflow gets twice
 *   changes nothing: its kill and its events are idempotent).
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { z } from 'zod';
import type { StorePool } from '../common/db.js';
import { InvalidInputError } from '../common/errors.js';
import type { RevokeRequest } from '../common/messages.js';
import { INITIATING_ENTITIES, type InitiatingEntity } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { BulkRevokeFilter, BulkRevokeRecord, BulkRevokeState, TokenRecord } from '../common/store/index.js';
import {
  actorSchema,
  instantSchema,
  parseInput,
  reasonSchema,
  receiverIdSchema,
  subjectLookupSchema,
} from '../common/validation.js';
import { causes, tellPaced, tellWarnings, type TellOutcome, type TellPace } from './tell.js';

// Errors a retry may cure: connection lost, deadlock, serialization failure, statement timeout.
const TRANSIENT_CODES = new Set(['40P01', '40001', '57014', '57P01', '08000', '08003', '08006']);
const isTransient = (err: unknown): boolean => {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') return TRANSIENT_CODES.has(code);
  const message = err instanceof Error ? err.message : '';
  return /Connection terminated|ECONNRESET|ECONNREFUSED|Query read timeout|timeout exceeded/i.test(message);
};

/** Runs an idempotent store call, retrying transient errors with a doubling backoff. */
async function withRetries<T>(call: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (attempt >= KILL_ATTEMPTS || !isTransient(err)) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** (attempt - 1)));
    }
  }
}

export type { BulkRevokeFilter, MatchCount } from '../common/store/index.js';

export const REVOKE_MANY_DEFAULTS = { rate: 200, concurrency: 16, batchSize: 500 } as const;

/** Tokens per kill transaction at most: a chunk stays far below the pool's statement timeout (12 s). */
export const MAX_BATCH_SIZE = 1000;

/** Attempts of one kill chunk on a transient error (connection lost, deadlock, serialization, timeout). */
export const KILL_ATTEMPTS = 3;

// A name prefix is taken as typed: trimming would widen it ("deploy " would match deployer-prod).
const namePrefixSchema = z
  .string()
  .min(1, 'expected a non-empty name prefix')
  .max(200, 'expected at most 200 characters')
  .refine((p) => p.trim() === p, 'must not begin or end with whitespace (quote exactly the prefix meant)');

export const revokeFilterSchema = z
  .strictObject({
    subject: subjectLookupSchema.optional(),
    receiver: receiverIdSchema.optional(),
    issuedBefore: instantSchema
      .transform((text) => new Date(text).toISOString())
      .refine((iso) => Date.parse(iso) < Date.now(), 'must be in the past: an instant at or after now filters nothing')
      .optional(),
    namePrefix: namePrefixSchema.optional(),
  })
  .refine((f) => Object.values(f).some((v) => v !== undefined), {
    message: 'at least one criterion is required (subject, receiver, issuedBefore, namePrefix)',
  });

const paceSchema = {
  /** Workflows told per second at most (Temporal's rate limits are per namespace). */
  rate: z.number().positive().max(10_000).default(REVOKE_MANY_DEFAULTS.rate),
  /** Workflows told at once at most. */
  concurrency: z.number().int().min(1).max(256).default(REVOKE_MANY_DEFAULTS.concurrency),
  /**
   * Tokens killed per transaction (each holds its rows' locks until it commits, so it stays short),
   * and untold tokens read per page while telling (memory stays flat whatever the operation's size).
   */
  batchSize: z.number().int().min(1).max(MAX_BATCH_SIZE).default(REVOKE_MANY_DEFAULTS.batchSize),
};

const newRunSchema = z.strictObject({
  reason: reasonSchema,
  actor: actorSchema.default('admin'),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
  /** A preview's `asOf`: tokens issued after it never match (what was counted is what is killed). */
  asOf: z.iso.datetime({ offset: true }).optional(),
  /** Aborts before any kill when more tokens than this match (a script's guard against a wide filter). */
  max: z.number().int().min(0).optional(),
  ...paceSchema,
});

const resumeSchema = z.strictObject({
  resume: z.uuid(),
  ...paceSchema,
});

export type RevokeFilter = z.input<typeof revokeFilterSchema>;

export interface RevokeManyProgress {
  /** Killing in the store (done: tokens killed), then telling workflows (done: workflows told). */
  phase: 'kill' | 'tell';
  done: number;
  failed: number;
  total: number;
}

interface RevokeManyHooks {
  onProgress?: (progress: RevokeManyProgress) => void;
  /**
   * Stops telling workflows; the kill phase still completes (it is short, and stopping in it would
   * leave matching tokens valid). The operation stays resumable.
   */
  signal?: AbortSignal;
  /** Called once the operation id is known (before anything is killed): where to resume from. */
  onOperation?: (operation: BulkRevokeRecord) => void;
}

export type RevokeManyOptions = (
  (z.input<typeof newRunSchema> & { resume?: undefined }) | (Partial<z.input<typeof newRunSchema>> & { resume: string })
) &
  RevokeManyHooks;

export interface RevokeManyReport {
  /** Request id and correlation id (`txn`) of every kill, event and audit record of the operation. */
  operationId: string;
  filter: BulkRevokeFilter;
  /** Tokens issued after this instant never match. */
  cutoff: string;
  resumed: boolean;
  /** Every token the filter matches at the cutoff: killed by the operation, or dead before it. */
  matched: number;
  /** Tokens this run killed, and the operation over all its runs. */
  killed: number;
  killedTotal: number;
  /** Matching tokens dead before the operation (their earlier kill's facts stand). */
  alreadyDead: number;
  /** Workflows this run told to propagate. */
  signalled: number;
  /** The operation's kills left untold (abort, failures): resume, or the reconciler tells them. */
  notSignalled: string[];
  aborted: boolean;
  /** Tokens whose kill kept failing (each alone): still active; resume to try them again. */
  failed: { tokenId: string; error: string }[];
  state: BulkRevokeState;
  warnings: string[];
  durationsMs: { kill: number; tell: number };
}

/** What revokeMany needs of the library: the store, and how one token's workflow is told. */
export interface RevokeManyDeps {
  pool: StorePool;
  tellWorkflow: (token: TokenRecord, request: RevokeRequest) => Promise<void>;
}

/** Counts the tokens a filter matches now (for a confirmation); validates the filter. */
export async function countMatching(pool: StorePool, filter: RevokeFilter): Promise<store.MatchCount> {
  return store.countMatching(pool, parseInput(revokeFilterSchema, filter, 'revoke filter'));
}

/** The earlier of two instants (either may be absent, not both). */
const earliest = (a: string | undefined, b: string | undefined): string =>
  a === undefined ? b! : b === undefined ? a : Date.parse(a) <= Date.parse(b) ? a : b;

const sameFilter = (a: BulkRevokeFilter, b: BulkRevokeFilter) =>
  a.subject === b.subject &&
  a.receiver === b.receiver &&
  a.namePrefix === b.namePrefix &&
  (a.issuedBefore === undefined) === (b.issuedBefore === undefined) &&
  (a.issuedBefore === undefined || Date.parse(a.issuedBefore) === Date.parse(b.issuedBefore!));

/**
 * Revokes every token matching `filter` (issued before the operation began), or, with `resume`,
 * carries on an earlier operation with its stored filter, reason and cutoff (`filter` may then be
 * null; a filter given must be the stored one).
 */
export async function revokeMany(
  deps: RevokeManyDeps,
  filter: RevokeFilter | null,
  options: RevokeManyOptions,
): Promise<RevokeManyReport> {
  const { onProgress, signal, onOperation, ...fields } = options;
  const pool = deps.pool;
  let op: BulkRevokeRecord;
  let pace: TellPace & { batchSize: number };
  if (fields.resume !== undefined) {
    const { reason, actor, initiatingEntity, asOf, max, ...resumeFields } = fields;
    const req = parseInput(resumeSchema, resumeFields, 'revoke resume');
    pace = req;
    op = await store.requireBulkRevoke(pool, req.resume);
    const refuse = (field: string, stored: string) => {
      throw new InvalidInputError(`invalid revoke resume: ${field}: a resume keeps the operation's ${stored}`, [
        { path: field, message: `a resume keeps the operation's ${stored}` },
      ]);
    };
    if (filter !== null && !sameFilter(parseInput(revokeFilterSchema, filter, 'revoke filter'), op.filter)) {
      refuse('filter', `filter ${JSON.stringify(op.filter)}`);
    }
    if (reason !== undefined && reason !== op.reason) refuse('reason', 'reason');
    if (actor !== undefined && actor !== op.actor) refuse('actor', 'actor');
    if (initiatingEntity !== undefined && initiatingEntity !== op.initiatingEntity) {
      refuse('initiatingEntity', 'initiating entity');
    }
    if (asOf !== undefined) refuse('asOf', 'cutoff');
    if (max !== undefined) refuse('max', 'match count (it was checked when the operation began)');
  } else {
    const parsedFilter = parseInput(revokeFilterSchema, filter ?? {}, 'revoke filter');
    const req = parseInput(newRunSchema, fields, 'revoke request');
    pace = req;
    let countedAsOf: string | undefined;
    if (req.max !== undefined) {
      const { active, asOf } = await store.countMatching(pool, parsedFilter);
      // What was counted is what may be killed: the cutoff is no later than the count.
      countedAsOf = asOf;
      if (active > req.max) {
        throw new InvalidInputError(
          `invalid revoke request: max: ${active} active token(s) match, more than the ${req.max} allowed; nothing was revoked`,
          [{ path: 'max', message: `${active} active token(s) match, more than ${req.max}` }],
        );
      }
    }
    op = await store.createBulkRevoke(pool, {
      id: randomUUID(),
      filter: parsedFilter,
      reason: req.reason,
      actor: req.actor,
      initiatingEntity: req.initiatingEntity as InitiatingEntity,
      ...(req.asOf || countedAsOf ? { asOf: earliest(req.asOf, countedAsOf) } : {}),
    });
  }
  onOperation?.(op);
  const resumed = fields.resume !== undefined;

  // Kill phase: chunks by id (keyset), each killed with retries and, when it keeps failing, split
  // down to single tokens so one bad token stops only itself.
  const killStarted = performance.now();
  await store.updateBulkRevoke(pool, op.id, { state: 'killing' });
  const killTotal = await withRetries(() => store.bulkRevokeRemaining(pool, op.id));
  let killed = 0;
  const failed = new Map<string, string>();
  const killIds = async (ids: readonly string[]): Promise<void> => {
    try {
      killed += (await withRetries(() => store.killBulkRevokeChunk(pool, op.id, ids))).length;
    } catch (err) {
      if (ids.length === 1) {
        failed.set(ids[0]!, causes(err));
        return;
      }
      const half = Math.ceil(ids.length / 2);
      await killIds(ids.slice(0, half));
      await killIds(ids.slice(half));
    }
  };
  const killPhase = async (): Promise<number> => {
    let after: string | null = null;
    for (;;) {
      const page: string[] = await withRetries(() => store.bulkRevokeDue(pool, op.id, after, pace.batchSize));
      // Ids whose kill already failed are not tried again, but they count for the page's length.
      const due = page.filter((id) => !failed.has(id));
      if (due.length > 0) {
        await killIds(due);
        onProgress?.({ phase: 'kill', done: killed, failed: failed.size, total: Math.max(killTotal, killed) });
      }
      if (page.length > 0) after = page.at(-1)!;
      // A short page was the last: no extra empty chunk walks the table.
      if (page.length < pace.batchSize) break;
    }
    return withRetries(() => store.bulkRevokeRemaining(pool, op.id));
  };
  let remaining = await killPhase();
  // Every match committed before the cutoff (the issuance barrier); a token still active after a
  // pass is one whose kill failed, or one another writer revived: one more pass, then report it.
  if (remaining > failed.size) remaining = await killPhase();
  await store.updateBulkRevoke(pool, op.id, { state: 'telling' });
  const killMs = performance.now() - killStarted;

  // Tell phase: the operation's kills no workflow has taken over, page by page (by id).
  const request: RevokeRequest = {
    reason: op.reason,
    actor: op.actor,
    initiatingEntity: op.initiatingEntity,
    requestId: op.id,
    correlationId: op.id,
  };
  const tellStarted = performance.now();
  const total = await store.countUntold(pool, op.id);
  const outcome: TellOutcome = {
    signalled: 0,
    notSignalled: [],
    failed: 0,
    firstFailures: [],
    notRunning: [],
    gaveUp: false,
    notTried: 0,
    aborted: false,
  };
  let cursor: string | null = null;
  for (;;) {
    if (signal?.aborted) break;
    const page = await store.untoldPage(pool, op.id, cursor, pace.batchSize);
    if (page.length === 0) break;
    cursor = page.at(-1)!.id;
    const before = { done: outcome.signalled, failed: outcome.failed };
    const told = await tellPaced(page, (token) => deps.tellWorkflow(token, request), pace, {
      ...(signal ? { signal } : {}),
      onProgress: (p) =>
        onProgress?.({
          phase: 'tell',
          done: before.done + p.done,
          failed: before.failed + p.failed,
          total: Math.max(total, before.done + before.failed + p.total),
        }),
    });
    await store.updateBulkRevoke(pool, op.id, { state: 'telling', told: told.signalled });
    outcome.signalled += told.signalled;
    outcome.notSignalled.push(...told.notSignalled);
    outcome.failed += told.failed;
    outcome.firstFailures.push(...told.firstFailures.slice(0, 3 - outcome.firstFailures.length));
    outcome.notTried += told.notTried;
    outcome.gaveUp = told.gaveUp;
    outcome.aborted ||= told.aborted;
    if (told.aborted || told.gaveUp) break;
  }
  // Stopped early: the pages not read are untold too.
  if (signal?.aborted || outcome.gaveUp) {
    const unread = await store.untoldIdsAfter(pool, op.id, cursor);
    outcome.notSignalled.push(...unread);
    if (outcome.gaveUp) outcome.notTried += unread.length;
    else outcome.aborted ||= unread.length > 0;
  }
  const tellMs = performance.now() - tellStarted;

  // Never complete while a match is active: recount; kill again what a pass may have missed.
  remaining = await withRetries(() => store.bulkRevokeRemaining(pool, op.id));
  if (remaining > 0 && remaining > failed.size) remaining = await killPhase();
  const state: BulkRevokeState =
    outcome.notSignalled.length === 0 && remaining === 0 && failed.size === 0 ? 'complete' : 'incomplete';
  await store.updateBulkRevoke(pool, op.id, { state });
  const final = await store.requireBulkRevoke(pool, op.id);
  const alreadyDead = await store.bulkRevokeAlreadyDead(pool, final);
  const warnings = tellWarnings(outcome, `run \`tokenwarden revoke --resume ${op.id}\``);
  if (failed.size > 0) {
    warnings.unshift(
      `${failed.size} matching token(s) could not be killed and are still active (${[...failed.keys()].slice(0, 3).join(', ')}${failed.size > 3 ? ', …' : ''}); run \`tokenwarden revoke --resume ${op.id}\` to try them again`,
    );
  } else if (remaining > 0) {
    warnings.unshift(`${remaining} matching token(s) are still active; run \`tokenwarden revoke --resume ${op.id}\``);
  }
  return {
    operationId: op.id,
    filter: op.filter,
    cutoff: op.cutoff,
    resumed,
    matched: final.killed + alreadyDead,
    killed,
    killedTotal: final.killed,
    alreadyDead,
    signalled: outcome.signalled,
    notSignalled: outcome.notSignalled,
    aborted: outcome.aborted,
    failed: [...failed].map(([tokenId, error]) => ({ tokenId, error })),
    state,
    warnings,
    durationsMs: { kill: Math.round(killMs), tell: Math.round(tellMs) },
  };
}
