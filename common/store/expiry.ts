/** Extend or shorten a live token's expiry: now() + ttl on the database clock, within its limits. */
import type { StorePool } from '../db.js';
import { formatDuration } from '../durations.js';
import { InvalidInputError } from '../errors.js';
import { quoteIdent } from '../identifiers.js';
import { KILL_CHANNEL } from '../names.js';
import { appendAudit } from './audit.js';
import { TokenNotActiveError } from './credentials.js';
import { inTransaction } from './rows.js';

export interface ExpiryChange {
  tokenId: string;
  ttlMs: number;
  mode: 'extend' | 'shorten';
  reason: string;
  actor: string;
  /** The global maximum lifetime (TOKENWARDEN_MAX_TTL), counted from issue. */
  maxTtlMs?: number;
}

const refuse = (message: string) => new InvalidInputError(`ttl: ${message}`, [{ path: 'ttl', message }]);

/**
 * Refused (field `ttl`, with the limit) beyond the policy's max lifetime or the global maximum,
 * when `extend` would move the expiry earlier or `shorten` later. NOTIFY: cached answers are
 * bounded by the old expiry.
 */
export async function changeExpiry(
  pool: StorePool,
  req: ExpiryChange,
): Promise<{ expiresAt: string; previousExpiresAt: string }> {
  return inTransaction(pool, async (db) => {
    const { rows } = await db.query(
      `SELECT t.expires_at, t.issued_at, now() + $2::bigint * interval '1 millisecond' AS wanted,
              t.status = 'active' AND t.expires_at > now() AS active, p.max_lifetime_ms
         FROM ${db.tables.token} t LEFT JOIN ${quoteIdent(db.tables.schema)}.policy p ON p.name = t.policy
        WHERE t.id = $1 FOR UPDATE OF t`,
      [req.tokenId, req.ttlMs],
    );
    const row = rows[0];
    if (!row || !row.active) throw new TokenNotActiveError(`token ${req.tokenId} is not active`);
    const wanted = new Date(row.wanted as string).getTime();
    const current = new Date(row.expires_at as string).getTime();
    const issued = new Date(row.issued_at as string).getTime();
    if (row.max_lifetime_ms !== null && wanted > issued + Number(row.max_lifetime_ms)) {
      throw refuse(`beyond the policy's max lifetime of ${formatDuration(Number(row.max_lifetime_ms))} from issue`);
    }
    if (req.maxTtlMs !== undefined && wanted > issued + req.maxTtlMs) {
      throw refuse(`beyond the maximum lifetime of ${formatDuration(req.maxTtlMs)} from issue (TOKENWARDEN_MAX_TTL)`);
    }
    if (req.mode === 'extend' && wanted < current) throw refuse('extend would move the expiry earlier; use shorten');
    if (req.mode === 'shorten' && wanted > current) throw refuse('shorten would move the expiry later; use extend');
    const expiresAt = new Date(wanted).toISOString();
    await db.query(`UPDATE ${db.tables.token} SET expires_at = $2 WHERE id = $1`, [req.tokenId, expiresAt]);
    await appendAudit(db, req.tokenId, `expiry:${expiresAt}`, `token.${req.mode}ed`, {
      expiresAt,
      previousExpiresAt: new Date(current).toISOString(),
      reason: req.reason,
      actor: req.actor,
    });
    await db.query('SELECT pg_notify($1, $2)', [KILL_CHANNEL, `${db.tables.schema}:${req.tokenId}`]);
    return { expiresAt, previousExpiresAt: new Date(current).toISOString() };
  });
}
