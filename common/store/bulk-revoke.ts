/**
 * Revocation by filter in the store (migrations/0012): the operation record a resume starts from, the
 * kill in chunks (each one transaction through kill_tokens, the operation id on every event and audit
 * record), and the set of its kills whose workflow has not taken over propagation yet.
 */
import { z } from 'zod';
import { quoteIdent, type Queryable, type StorePool } from '../db.js';
import { NotFoundError } from '../errors.js';
import { INITIATING_ENTITIES, KILL_CHANNEL, type InitiatingEntity } from '../names.js';
import { parseRow, routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

/** What a revocation by filter matches; every criterion given must hold (AND). */
export interface BulkRevokeFilter {
  subject?: string;
  /** Tokens that list this receiver. */
  receiver?: string;
  /** Tokens issued strictly before this instant (ISO 8601). */
  issuedBefore?: string;
  /** Tokens whose name starts with this text (case-sensitive). */
  namePrefix?: string;
}

export const BULK_REVOKE_STATES = ['killing', 'telling', 'complete', 'incomplete'] as const;
export type BulkRevokeState = (typeof BULK_REVOKE_STATES)[number];

export interface BulkRevokeRecord {
  /** The operation id: request id and correlation id (`txn`) of every kill of the operation. */
  id: string;
  filter: BulkRevokeFilter;
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  createdAt: string;
  /** Tokens issued after this instant (the database clock when the operation began) never match. */
  cutoff: string;
  state: BulkRevokeState;
  /** Tokens the operation killed, over all its runs. */
  killed: number;
  /** Workflows told, over all its runs (a workflow told twice counts twice). */
  told: number;
}

const date = z.date().transform((d) => d.toISOString());

const operationRow = z
  .object({
    id: z.string(),
    subject: z.string().nullable(),
    receiver: z.string().nullable(),
    issued_before: date.nullable(),
    name_prefix: z.string().nullable(),
    reason: z.string(),
    actor: z.string(),
    initiating_entity: z.enum(INITIATING_ENTITIES),
    created_at: date,
    cutoff: date,
    state: z.enum(BULK_REVOKE_STATES),
    killed: z.number().int(),
    told: z.number().int(),
  })
  .transform((r): BulkRevokeRecord => ({
    id: r.id,
    filter: {
      ...(r.subject !== null ? { subject: r.subject } : {}),
      ...(r.receiver !== null ? { receiver: r.receiver } : {}),
      ...(r.issued_before !== null ? { issuedBefore: r.issued_before } : {}),
      ...(r.name_prefix !== null ? { namePrefix: r.name_prefix } : {}),
    },
    reason: r.reason,
    actor: r.actor,
    initiatingEntity: r.initiating_entity,
    createdAt: r.created_at,
    cutoff: r.cutoff,
    state: r.state,
    killed: r.killed,
    told: r.told,
  }));

const toOperation = (row: unknown) => parseRow(operationRow, 'bulk_revoke', row);
const table = (db: Queryable) => `${quoteIdent(db.tables.schema)}.bulk_revoke`;
const filterParams = (f: BulkRevokeFilter) => [
  f.subject ?? null,
  f.receiver ?? null,
  f.issuedBefore ?? null,
  f.namePrefix ?? null,
];

export interface MatchCount {
  /** Matching tokens still active: what a revocation would kill now. */
  active: number;
  /** Matching tokens already dead (revoked or expired). */
  dead: number;
  /** The database clock of the count: pass it as `asOf` to match exactly the tokens counted. */
  asOf: string;
}

/** Counts the tokens a filter matches now, on the database clock (the confirmation's figure). */
export async function countMatching(db: Queryable, filter: BulkRevokeFilter): Promise<MatchCount> {
  const { rows } = await db.query<{ active: number; dead: number; as_of: Date }>(
    `SELECT count(*) FILTER (WHERE t.status = 'active')::int AS active,
            count(*) FILTER (WHERE t.status <> 'active')::int AS dead,
            now() AS as_of
       FROM ${db.tables.token} t
      WHERE ${routine(db.tables, 'bulk_revoke_matches')}(t, now(), $1, $2, $3, $4)`,
    filterParams(filter),
  );
  const row = rows[0]!;
  return { active: row.active, dead: row.dead, asOf: row.as_of.toISOString() };
}

export interface NewBulkRevoke {
  id: string;
  filter: BulkRevokeFilter;
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  /** An earlier instant to cut off at (a preview's `asOf`): tokens issued after it never match. */
  asOf?: string;
}

/**
 * Records a new operation. Its cutoff is read after the issuance barrier (migrations/0011): every
 * issuing transaction in flight has committed by then, so each token issued at or before the cutoff
 * is visible to the kill chunks. The cutoff is that clock, or `asOf` when earlier.
 */
export async function createBulkRevoke(db: Queryable, op: NewBulkRevoke): Promise<BulkRevokeRecord> {
  const { rows } = await db.query(
    `WITH barrier AS (SELECT ${routine(db.tables, 'issuance_barrier')}() AS clock)
     INSERT INTO ${table(db)}
            (id, subject, receiver, issued_before, name_prefix, reason, actor, initiating_entity, cutoff)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, least(b.clock, coalesce($9::timestamptz, b.clock)) FROM barrier b
     RETURNING *`,
    [op.id, ...filterParams(op.filter), op.reason, op.actor, op.initiatingEntity, op.asOf ?? null],
  );
  return toOperation(rows[0]);
}

/** Operations not complete (killing, telling, incomplete), oldest first: what may need a resume. */
export async function unfinishedBulkRevokes(db: Queryable): Promise<BulkRevokeRecord[]> {
  const { rows } = await db.query(`SELECT * FROM ${table(db)} WHERE state <> 'complete' ORDER BY created_at, id`);
  return rows.map(toOperation);
}

export async function requireBulkRevoke(db: Queryable, id: string): Promise<BulkRevokeRecord> {
  const { rows } = await db.query(`SELECT * FROM ${table(db)} WHERE id = $1`, [id]);
  if (!rows[0]) throw new NotFoundError('revoke operation', id);
  return toOperation(rows[0]);
}

/** The ids of up to `limit` active tokens matching the operation after `afterId`, lowest first. */
export async function bulkRevokeDue(
  db: Queryable,
  id: string,
  afterId: string | null,
  limit: number,
): Promise<string[]> {
  const { rows } = await db.query<{ due: string[] }>(
    `SELECT ${routine(db.tables, 'bulk_revoke_due')}($1, $2, $3) AS due`,
    [id, afterId, limit],
  );
  return rows[0]!.due;
}

/**
 * Kills those of `tokenIds` still active and matching the operation, in one statement and one
 * transaction, each by the one kill; returns the facts of those this call killed. Idempotent.
 */
export async function killBulkRevokeChunk(
  pool: StorePool,
  id: string,
  tokenIds: readonly string[],
): Promise<TokenRecord[]> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT ${tokenColumns(t)} FROM ${routine(t, 'bulk_revoke_kill_chunk')}($1, $2, $3, $4)`,
    [t.schema, id, tokenIds, KILL_CHANNEL],
  );
  return rows.map(toToken);
}

/** Active tokens still matching the operation: 0 once its kill phase is done. */
export async function bulkRevokeRemaining(db: Queryable, id: string): Promise<number> {
  const { rows } = await db.query<{ n: string }>(`SELECT ${routine(db.tables, 'bulk_revoke_remaining')}($1) AS n`, [
    id,
  ]);
  return Number(rows[0]!.n);
}

/** Matching tokens (at the operation's cutoff) that were dead before it: another kill's. */
export async function bulkRevokeAlreadyDead(db: Queryable, op: BulkRevokeRecord): Promise<number> {
  const { rows } = await db.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM ${db.tables.token} t
      WHERE t.status <> 'active' AND t.revoke_request_id IS DISTINCT FROM $1
        AND ${routine(db.tables, 'bulk_revoke_matches')}(t, $2, $3, $4, $5, $6)`,
    [op.id, op.cutoff, ...filterParams(op.filter)],
  );
  return rows[0]!.n;
}

const UNTOLD = `revoke_request_id = $1 AND status <> 'active' AND propagation_started_at IS NULL`;

/** How many of the operation's kills no workflow has taken over yet. */
export async function countUntold(db: Queryable, id: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${db.tables.token} WHERE ${UNTOLD}`, [
    id,
  ]);
  return rows[0]!.n;
}

/**
 * One page (by id, after `afterId`) of the operation's kills whose workflow has not taken over
 * propagation: what is left to tell. Keyset on id, so a page's rows turning told meanwhile never
 * shifts the next page.
 */
export async function untoldPage(
  db: Queryable,
  id: string,
  afterId: string | null,
  limit: number,
): Promise<TokenRecord[]> {
  const { rows } = await db.query(
    `SELECT ${tokenColumns(db.tables)} FROM ${db.tables.token}
      WHERE ${UNTOLD} AND ($2::text IS NULL OR id > $2) ORDER BY id LIMIT $3`,
    [id, afterId, limit],
  );
  return rows.map(toToken);
}

/** The ids of the operation's kills still untold after `afterId` (for a report). */
export async function untoldIdsAfter(db: Queryable, id: string, afterId: string | null): Promise<string[]> {
  const { rows } = await db.query<{ id: string }>(
    `SELECT id FROM ${db.tables.token} WHERE ${UNTOLD} AND ($2::text IS NULL OR id > $2) ORDER BY id`,
    [id, afterId],
  );
  return rows.map((r) => r.id);
}

/** Moves the operation to `state`, adding `told` workflows to its running total. */
export async function updateBulkRevoke(
  db: Queryable,
  id: string,
  change: { state: BulkRevokeState; told?: number },
): Promise<void> {
  await db.query(`UPDATE ${table(db)} SET state = $2, told = told + $3, updated_at = now() WHERE id = $1`, [
    id,
    change.state,
    change.told ?? 0,
  ]);
}
