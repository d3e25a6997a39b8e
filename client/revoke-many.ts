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
  nameSchema,
  parseInput,
  reasonSchema,
  receiverIdSchema,
  subjectSchema,
} from '../common/validation.js';
import { tellPaced, tellWarnings, type TellOutcome, type TellPace } from './tell.js';

export type { BulkRevokeFilter, MatchCount } from '../common/store/index.js';

export const REVOKE_MANY_DEFAULTS = { rate: 200, concurrency: 16, batchSize: 500 } as const;

/** An instant: an ISO 8601 date (midnight UTC) or date-time with Z or an offset. */
const instantSchema = z.union([z.iso.datetime({ offset: true }), z.iso.date()], {
  error: 'expected an ISO 8601 date or date-time, e.g. 2026-01-31 or 2026-01-31T12:00:00Z',
});

export const revokeFilterSchema = z
  .strictObject({
    subject: subjectSchema.optional(),
    receiver: receiverIdSchema.optional(),
    issuedBefore: instantSchema.transform((text) => new Date(text).toISOString()).optional(),
    namePrefix: nameSchema.optional(),
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
  batchSize: z.number().int().min(1).max(10_000).default(REVOKE_MANY_DEFAULTS.batchSize),
};

const newRunSchema = z.strictObject({
  reason: reasonSchema,
  actor: actorSchema.default('admin'),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
  /** A preview's `asOf`: tokens issued after it never match (what was counted is what is killed). */
  asOf: z.iso.datetime({ offset: true }).optional(),
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
    const { reason, actor, initiatingEntity, asOf, ...resumeFields } = fields;
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
  } else {
    const parsedFilter = parseInput(revokeFilterSchema, filter ?? {}, 'revoke filter');
    const req = parseInput(newRunSchema, fields, 'revoke request');
    pace = req;
    op = await store.createBulkRevoke(pool, {
      id: randomUUID(),
      filter: parsedFilter,
      reason: req.reason,
      actor: req.actor,
      initiatingEntity: req.initiatingEntity as InitiatingEntity,
      ...(req.asOf ? { asOf: req.asOf } : {}),
    });
  }
  onOperation?.(op);
  const resumed = fields.resume !== undefined;

  // Kill phase: chunks until nothing active matches (a chunk that killed nothing may have lost
  // every row to other kills, so the remaining count decides).
  const killStarted = performance.now();
  await store.updateBulkRevoke(pool, op.id, { state: 'killing' });
  let remaining = await store.bulkRevokeRemaining(pool, op.id);
  const killTotal = remaining;
  let killed = 0;
  let emptyChunks = 0;
  while (remaining > 0) {
    const chunk = await store.killBulkRevokeChunk(pool, op.id, pace.batchSize);
    killed += chunk.length;
    onProgress?.({ phase: 'kill', done: killed, failed: 0, total: Math.max(killTotal, killed) });
    if (chunk.length < pace.batchSize) remaining = await store.bulkRevokeRemaining(pool, op.id);
    // Other kills may empty a chunk now and then; never, chunk after chunk, while tokens match.
    emptyChunks = chunk.length === 0 ? emptyChunks + 1 : 0;
    if (emptyChunks >= 3) {
      throw new Error(
        `revoke operation ${op.id}: ${remaining} matching token(s) stay active after three kills that killed none`,
      );
    }
  }
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

  const state: BulkRevokeState = outcome.notSignalled.length === 0 ? 'complete' : 'incomplete';
  await store.updateBulkRevoke(pool, op.id, { state });
  const final = await store.requireBulkRevoke(pool, op.id);
  const alreadyDead = await store.bulkRevokeAlreadyDead(pool, final);
  const warnings = tellWarnings(outcome, `run \`tokenwarden revoke --resume ${op.id}\``);
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
    state,
    warnings,
    durationsMs: { kill: Math.round(killMs), tell: Math.round(tellMs) },
  };
}
