/**
 * What the reconciler looks for: facts a crash left between the store and the workflows. Each set is
 * read in pages (keyset on its time column, then id), so rows that stay in a set (a propagation
 * legitimately stuck, a row that fails to heal) never hide the rows after them.
 */
import type { Queryable } from '../db.js';
import type { ReconcileSet } from '../names.js';
import { toToken, tokenColumns, type TokenRecord } from './rows.js';

/** The sets read in pages; the overdue set is killed in batches instead (killExpiredTokens). */
export type PagedReconcileSet = Exclude<ReconcileSet, 'overdue'>;

/**
 * Each set's condition ($1 is the grace in ms):
 * - untold: dead rows whose workflow never took over propagation (a crash between the kill and the signal);
 * - overdue: active rows past expiry (plus grace): no sweep or expiry timer recorded their death
 *   (the condition of the store's kill_expired_tokens);
 * - unfinished: dead rows whose propagation started but has not completed (is its workflow still running?);
 * - unstarted: active rows whose workflow was never confirmed started (the issuer died between commit and start).
 */
const CONDITIONS: Record<ReconcileSet, string> = {
  untold: `status <> 'active' AND propagation_started_at IS NULL AND revoked_at <= now() - $1 * interval '1 millisecond'`,
  overdue: `status = 'active' AND expires_at <= now() - $1 * interval '1 millisecond'`,
  unfinished: `status <> 'active' AND propagation IN ('pending', 'stuck')
        AND propagation_started_at <= now() - $1 * interval '1 millisecond'`,
  unstarted: `workflow_started_at IS NULL AND status = 'active' AND issued_at <= now() - $1 * interval '1 millisecond'`,
};

/** The immutable time column each paged set is read in order of. */
const PAGE_KEYS: Record<PagedReconcileSet, string> = {
  untold: 'revoked_at',
  unfinished: 'propagation_started_at',
  unstarted: 'issued_at',
};

/**
 * One page of a reconciler set: up to `limit` rows after the row `afterId` (null: from the start).
 * The cursor is a token id; its time key is read in SQL, so no timestamp loses precision in transit.
 */
export async function findReconcilePage(
  db: Queryable,
  set: PagedReconcileSet,
  opts: { graceMs: number; afterId: string | null; limit: number },
): Promise<TokenRecord[]> {
  const t = db.tables;
  const where = CONDITIONS[set];
  const key = PAGE_KEYS[set];
  // The plain bound on the key lets the set's partial index start at the cursor; the row comparison
  // breaks ties between equal timestamps by id.
  const { rows } = await db.query(
    `WITH cursor AS (SELECT ${key} AS key, id FROM ${t.token} WHERE id = $2)
     SELECT ${tokenColumns(db.tables)} FROM ${t.token}
      WHERE ${where}
        AND ($2::text IS NULL OR (${key} >= (SELECT key FROM cursor) AND (${key}, id) > (SELECT key, id FROM cursor)))
      ORDER BY ${key}, id LIMIT $3`,
    [opts.graceMs, opts.afterId, opts.limit],
  );
  return rows.map(toToken);
}

/**
 * The sets that hold at least one row now: one statement, so a quiet pass (the usual one) costs
 * the reconciler one short read instead of a page activity per set.
 */
export async function setsWithRows(db: Queryable, graceMs: number): Promise<ReconcileSet[]> {
  const t = db.tables;
  const entries = Object.entries(CONDITIONS) as [ReconcileSet, string][];
  const { rows } = await db.query(
    `SELECT ${entries.map(([set, where]) => `EXISTS (SELECT 1 FROM ${t.token} WHERE ${where}) AS ${set}`).join(', ')}`,
    [graceMs],
  );
  return entries.filter(([set]) => rows[0]?.[set] === true).map(([set]) => set);
}
