/**
 * The one throttled path that records a token's last use (the store's record_token_use,
 * migrations/0007). Imports only pg's types and a pure module: the verifier's entry point uses it.
 */
import type pg from 'pg';
import { quoteIdent } from '../identifiers.js';

/** Writes last_used_at = now() unless the token's last recorded use is under `minIntervalMs` old; true when it wrote. */
export async function recordTokenUse(
  db: Pick<pg.Pool, 'query'>,
  schema: string,
  tokenId: string,
  minIntervalMs: number,
): Promise<boolean> {
  const { rows } = await db.query<{ written: boolean }>(
    `SELECT ${quoteIdent(schema)}.record_token_use($1, $2) AS written`,
    [tokenId, Math.round(minIntervalMs)],
  );
  return rows[0]?.written === true;
}

export interface LastUse {
  /** Null when never used (recorded): the idle deadline then counts from issuedAt. */
  lastUsedAt: string | null;
  issuedAt: string;
  /** Whether the token is still active (not revoked or expired in the store). */
  active: boolean;
  /** The database clock when read. */
  now: string;
}

/** A token's last recorded use, for its idle deadline; undefined for an unknown token. */
export async function readLastUse(
  db: Pick<pg.Pool, 'query'>,
  schema: string,
  tokenId: string,
): Promise<LastUse | undefined> {
  const { rows } = await db.query<{ last_used_at: Date | null; issued_at: Date; active: boolean; now: Date }>(
    `SELECT last_used_at, issued_at, status = 'active' AS active, now() AS now
       FROM ${quoteIdent(schema)}.token WHERE id = $1`,
    [tokenId],
  );
  const row = rows[0];
  if (!row) return undefined;
  return {
    lastUsedAt: row.last_used_at?.toISOString() ?? null,
    issuedAt: row.issued_at.toISOString(),
    active: row.active,
    now: row.now.toISOString(),
  };
}
