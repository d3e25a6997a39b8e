/** What the reconciler looks for: facts a crash left between the store and the workflows. */
import type { Queryable } from '../db.js';
import { toToken, TOKEN_COLUMNS, type TokenRecord } from './rows.js';

/** Active rows past expiry (plus grace): the expiry timer did not fire or its worker was down. */
export async function findOverdueTokens(db: Queryable, graceMs: number, limit: number): Promise<string[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT id FROM ${t.token} WHERE status = 'active' AND expires_at <= now() - $1 * interval '1 millisecond'
      ORDER BY expires_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map((r) => r.id as string);
}

/** Active rows whose workflow was never confirmed started (the issuer died between commit and start). */
export async function findUnstartedTokens(db: Queryable, graceMs: number, limit: number): Promise<TokenRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM ${t.token}
      WHERE workflow_started_at IS NULL AND status = 'active' AND issued_at <= now() - $1 * interval '1 millisecond'
      ORDER BY issued_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}

/** Dead rows whose workflow never took over propagation (a crash between the kill and the signal). */
export async function findUntoldTokens(db: Queryable, graceMs: number, limit: number): Promise<TokenRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM ${t.token}
      WHERE status <> 'active' AND propagation_started_at IS NULL AND revoked_at <= now() - $1 * interval '1 millisecond'
      ORDER BY revoked_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}

/** Dead tokens whose propagation started but has not completed: the reconciler checks their workflow runs. */
export async function findUnfinishedPropagations(
  db: Queryable,
  graceMs: number,
  limit: number,
): Promise<TokenRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM ${t.token}
      WHERE status <> 'active' AND propagation IN ('pending', 'stuck')
        AND propagation_started_at <= now() - $1 * interval '1 millisecond'
      ORDER BY propagation_started_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}
