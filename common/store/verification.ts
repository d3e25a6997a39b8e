/**
 * The verifier's store path: the one lookup that answers "is this credential valid?" (the store's
 * token_valid and credential_accepted, migrations/0015) and reuse detection's kill. Imports only pg's
 * types and pure modules: the verifier's entry point uses it.
 */
import type pg from 'pg';
import { quoteIdent } from '../identifiers.js';
import { KILL_CHANNEL } from '../names.js';

/** One row per credential with this hash ($1), whatever its state, with the verdict computed in SQL. */
export interface CredentialLookupRow {
  token_id: string;
  subject: string;
  scopes: string[];
  issued_at: Date;
  expires_at: Date;
  credential_id: string;
  /** The token is valid and this credential accepted: current, or previous in its grace. */
  valid: boolean;
  /** A revoked credential, or a previous one past its grace, presented while its token is active and unexpired. */
  reused: boolean;
  /** The token is revoked or expired: final, whatever its credential. */
  dead: boolean;
  /** A tenth of the token's policy's idle timeout (null: none): its last use is never throttled longer. */
  use_interval_cap_ms: number | null;
  /** Until the answer stops being true on the database clock: the expiry, or the end of a grace. */
  remaining_ms: number;
}

/** The lookup statement (one parameter: the credential's SHA-256). Validity's functions are inlined by the planner. */
export const credentialLookupSql = (schema: string): string => {
  const q = quoteIdent(schema);
  return `SELECT t.id AS token_id, t.subject, t.scopes, t.issued_at, t.expires_at, c.id AS credential_id,
                 (${q}.token_valid(t.status, t.expires_at, t.suspended_at)
                  AND ${q}.credential_accepted(c.state, c.valid_until)) AS valid,
                 ${q}.credential_reused(t.status, t.expires_at, c.state, c.valid_until) AS reused,
                 NOT ${q}.token_valid(t.status, t.expires_at, NULL) AS dead,
                 (extract(epoch FROM least(t.expires_at, CASE WHEN c.state = 'previous' THEN c.valid_until END) - now())
                   * 1000)::float8 AS remaining_ms,
                 (p.idle_timeout_ms / 10)::float8 AS use_interval_cap_ms
            FROM ${q}.credential c JOIN ${q}.token t ON t.id = c.token_id
            LEFT JOIN ${q}.policy p ON p.name = t.policy
           WHERE c.secret_hash = $1`;
};

/**
 * Reuse detection's kill (the store's kill_reused_credential): re-checks the reuse under the token's
 * lock and kills that token only, by the one kill, reason reuse_detected, actor
 * system:reuse-detection. Idempotent. True when this call killed it.
 */
export async function killReusedCredential(
  db: Pick<pg.Pool, 'query'>,
  schema: string,
  credentialId: string,
): Promise<{ tokenId: string; killed: boolean } | undefined> {
  const { rows } = await db.query<{ token_id: string; killed: boolean }>(
    `SELECT token_id, killed FROM ${quoteIdent(schema)}.kill_reused_credential($1, $2, $3)`,
    [schema, credentialId, KILL_CHANNEL],
  );
  const row = rows[0];
  return row ? { tokenId: row.token_id, killed: row.killed } : undefined;
}
