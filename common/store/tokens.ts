/** Tokens: issue, read, list. A token is valid iff `status = 'active' AND expires_at > now()`. */
import type { Queryable, StorePool } from '../db.js';
import { InvalidInputError, NotFoundError } from '../errors.js';
import type { TokenStatus } from '../names.js';
import { appendAudit } from './audit.js';
import { inTransaction, toToken, TOKEN_COLUMNS, type TokenRecord } from './rows.js';

export interface NewToken {
  tokenId: string;
  credentialId: string;
  subject: string;
  name: string | null;
  scopes: string[];
  receivers: string[];
  ttlMs: number;
  secretHash: Buffer;
}

/** Writes an active token and its current credential (hash only); expiry comes from the database clock. */
export async function insertToken(pool: StorePool, token: NewToken): Promise<TokenRecord> {
  const t = pool.tables;
  return inTransaction(pool, async (client) => {
    if (token.receivers.length > 0) {
      const { rows } = await client.query(
        `SELECT id FROM ${t.receiver} WHERE id = ANY($1::text[]) AND enabled FOR SHARE`,
        [token.receivers],
      );
      const known = new Set(rows.map((r) => r.id as string));
      const unknown = token.receivers.filter((r) => !known.has(r));
      if (unknown.length > 0) {
        throw new InvalidInputError(
          `invalid token request: receivers: unknown or removed receiver ${unknown.join(', ')}`,
          [{ path: 'receivers', message: `unknown or removed receiver ${unknown.join(', ')}` }],
        );
      }
    }
    const { rows } = await client.query(
      `INSERT INTO ${t.token} (id, subject, name, scopes, receivers, expires_at)
       VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')
       RETURNING ${TOKEN_COLUMNS}`,
      [token.tokenId, token.subject, token.name, token.scopes, token.receivers, token.ttlMs],
    );
    await client.query(
      `INSERT INTO ${t.credential} (id, token_id, secret_hash, state) VALUES ($1, $2, $3, 'current')`,
      [token.credentialId, token.tokenId, token.secretHash],
    );
    const record = toToken(rows[0]);
    await appendAudit(client, token.tokenId, 'issued', 'token.issued', {
      subject: record.subject,
      credentialId: token.credentialId,
      receivers: record.receivers,
      scopes: record.scopes,
      expiresAt: record.expiresAt,
    });
    return record;
  });
}

export async function markWorkflowStarted(db: Queryable, tokenId: string): Promise<void> {
  const t = db.tables;
  await db.query(`UPDATE ${t.token} SET workflow_started_at = coalesce(workflow_started_at, now()) WHERE id = $1`, [
    tokenId,
  ]);
}

export async function getToken(db: Queryable, tokenId: string): Promise<TokenRecord | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT ${TOKEN_COLUMNS} FROM ${t.token} WHERE id = $1`, [tokenId]);
  return rows[0] ? toToken(rows[0]) : undefined;
}

export async function requireToken(db: Queryable, tokenId: string): Promise<TokenRecord> {
  const token = await getToken(db, tokenId);
  if (!token) throw new NotFoundError('token', tokenId);
  return token;
}

export async function listTokens(
  db: Queryable,
  filter: { subject?: string; status?: TokenStatus; limit: number },
): Promise<TokenRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM ${t.token}
      WHERE ($1::text IS NULL OR subject = $1)
        AND ($2::text IS NULL OR CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END = $2)
      ORDER BY id DESC LIMIT $3`,
    [filter.subject ?? null, filter.status ?? null, filter.limit],
  );
  return rows.map(toToken);
}
