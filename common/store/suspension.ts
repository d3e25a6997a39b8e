/** Suspension: a suspended token fails verification but is not dead (status stays active). */
import type { StorePool } from '../db.js';
import { KILL_CHANNEL } from '../names.js';
import { appendAudit } from './audit.js';
import { TokenNotActiveError } from './credentials.js';
import { inTransaction } from './rows.js';

/** Suspends or resumes; the NOTIFY makes verifiers drop their cached answers. Idempotent. */
export async function setSuspended(
  pool: StorePool,
  req: { tokenId: string; suspended: boolean; reason: string; actor: string },
): Promise<{ suspended: boolean; suspendedAt: string | null }> {
  return inTransaction(pool, async (db) => {
    const { rows } = await db.query(
      `UPDATE ${db.tables.token}
          SET suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END,
              suspended_by = CASE WHEN $2 THEN $3 END,
              suspend_reason = CASE WHEN $2 THEN $4 END
        WHERE id = $1 AND status = 'active' RETURNING suspended_at`,
      [req.tokenId, req.suspended, req.actor, req.reason],
    );
    if (!rows[0]) throw new TokenNotActiveError(`token ${req.tokenId} is not active`);
    const suspendedAt = rows[0].suspended_at ? new Date(rows[0].suspended_at as string).toISOString() : null;
    await appendAudit(
      db,
      req.tokenId,
      `${req.suspended ? 'suspended' : 'resumed'}:${suspendedAt ?? Date.now()}`,
      req.suspended ? 'token.suspended' : 'token.resumed',
      { reason: req.reason, actor: req.actor },
    );
    await db.query('SELECT pg_notify($1, $2)', [KILL_CHANNEL, `${db.tables.schema}:${req.tokenId}`]);
    return { suspended: req.suspended, suspendedAt };
  });
}
