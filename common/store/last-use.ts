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
