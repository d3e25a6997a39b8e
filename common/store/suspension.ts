/**
 * Suspension: a suspended token fails verification but is not dead (its workflow's expiry, revoke
 * and grace still run). The store's set_suspended (migrations/0015) writes it, audits it and sends
 * the NOTIFY that drops verifier caches, in one statement.
 */
import type { Queryable } from '../db.js';
import { NotFoundError } from '../errors.js';
import { CHANGE_CHANNEL } from '../names.js';
import { storeRefusal } from './credentials.js';
import { routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

export interface SuspensionResult {
  /** False when the token already was in the state asked for (a retry, or a resume of a dead token). */
  changed: boolean;
  token: TokenRecord;
}

/**
 * Suspends (`suspended: true`) or resumes a token (migrations/0020). Throws TokenNotActiveError when suspending a dead
 * or expired token, NotFoundError for an unknown one.
 */
export async function setSuspended(
  db: Queryable,
  req: {
    tokenId: string;
    suspended: boolean;
    actor: string;
    reason: string;
    /**
     * Makes a retry the same change (e.g. the workflow's update id): audited once, and a retry after
     * a later resume or suspend changes nothing. Without it, a repeat of the same state changes nothing.
     */
    requestId?: string;
  },
): Promise<SuspensionResult> {
  try {
    const { rows } = await db.query(
      `SELECT changed, ${tokenColumns(db.tables)}
         FROM (SELECT s.changed, (s.facts).*
                 FROM ${routine(db.tables, 'set_suspended')}($1, $2, $3, $4, $5, $6, $7) AS s) AS suspended`,
      [db.tables.schema, req.tokenId, req.suspended, req.actor, req.reason, CHANGE_CHANNEL, req.requestId ?? null],
    );
    if (!rows[0]) throw new NotFoundError('token', req.tokenId);
    return { changed: rows[0].changed === true, token: toToken(rows[0]) };
  } catch (err) {
    return storeRefusal(err, req.tokenId);
  }
}

/**
 * Records (or, with `at: null`, clears) the revocation a token's workflow will carry out at `at`,
 * for `show`; the workflow owns the deadline itself.
 */
export async function setScheduledRevoke(
  db: Queryable,
  req: { tokenId: string; at: string | null; reason: string | null },
): Promise<TokenRecord> {
  const { rows } = await db.query(
    `UPDATE ${db.tables.token}
        SET revoke_scheduled_at = $2::timestamptz, revoke_scheduled_reason = CASE WHEN $2 IS NULL THEN NULL ELSE $3 END
      WHERE id = $1 RETURNING ${tokenColumns(db.tables)}`,
    [req.tokenId, req.at, req.reason],
  );
  if (!rows[0]) throw new NotFoundError('token', req.tokenId);
  return toToken(rows[0]);
}
