/** Notices to a token's owner (warnings), each sent once: the `notice` table keyed by (token, key). */
import type { StorePool } from '../db.js';
import { quoteIdent } from '../identifiers.js';
import { appendAudit } from './audit.js';
import { inTransaction } from './rows.js';

const noticeTable = (pool: StorePool) => `${quoteIdent(pool.tables.schema)}.notice`;

export async function isNoticeSent(pool: StorePool, tokenId: string, key: string): Promise<boolean> {
  const { rows } = await pool.query(`SELECT 1 FROM ${noticeTable(pool)} WHERE token_id = $1 AND key = $2`, [
    tokenId,
    key,
  ]);
  return rows.length > 0;
}

/** Records the notice and its audit event (`notice.sent`) once; a repeat changes nothing. */
export async function recordNotice(
  pool: StorePool,
  req: { tokenId: string; key: string; kind: string; audit: Record<string, unknown> },
): Promise<void> {
  await inTransaction(pool, async (db) => {
    const { rowCount } = await db.query(
      `INSERT INTO ${noticeTable(pool)} (token_id, key, kind) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`,
      [req.tokenId, req.key, req.kind],
    );
    if (rowCount)
      await appendAudit(db, req.tokenId, `notice:${req.key}`, 'notice.sent', {
        key: req.key,
        kind: req.kind,
        ...req.audit,
      });
  });
}
