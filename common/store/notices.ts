/**
 * Notices to a token's owner (warnings, rotated secrets), each sent once: a deterministic key per
 * notice, recorded after it was sent, checked before sending again (retries, continue-as-new).
 */
import type { Queryable } from '../db.js';
import { quoteIdent } from '../identifiers.js';
import { routine } from './rows.js';

export async function isNoticeSent(db: Queryable, tokenId: string, key: string): Promise<boolean> {
  const { rows } = await db.query(
    `SELECT 1 FROM ${quoteIdent(db.tables.schema)}.notice WHERE token_id = $1 AND key = $2`,
    [tokenId, key],
  );
  return rows.length > 0;
}

/**
 * Records the notice as sent, with its `notice.sent` audit event (`data` added to it), in one
 * statement. True when this call recorded it, false when it had been recorded before.
 */
export async function recordNotice(
  db: Queryable,
  req: { tokenId: string; key: string; kind: string; data?: Record<string, unknown> },
): Promise<boolean> {
  const { rows } = await db.query<{ recorded: boolean }>(
    `SELECT ${routine(db.tables, 'record_notice')}($1, $2, $3, $4::jsonb) AS recorded`,
    [req.tokenId, req.key, req.kind, JSON.stringify(req.data ?? {})],
  );
  return rows[0]?.recorded === true;
}
