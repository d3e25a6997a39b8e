/** Tokens: issue, read, list. A token is valid iff `status = 'active' AND expires_at > now()`. */
import type { Queryable } from '../db.js';
import { formatDuration } from '../durations.js';
import { InvalidInputError, NotFoundError } from '../errors.js';
import type { PropagationState, TokenStatus } from '../names.js';
import { policyColumnsOf, policyFromColumns, type PolicyRecord } from './policies.js';
import { routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

export interface NewToken {
  tokenId: string;
  credentialId: string;
  subject: string;
  name: string | null;
  scopes: string[];
  receivers: string[];
  ttlMs: number;
  secretHash: Buffer;
  /** The token's policy: its max lifetime and allowed scopes are checked in the same statement. */
  policy?: string | null;
}

/** An issued token's row, with the policy it was written under. */
export interface IssuedTokenRecord extends TokenRecord {
  /** The policy as issue_token read it under its lock (absent without one): the version the row records. */
  issuedUnder?: PolicyRecord;
}

/**
 * Writes an active token and its current credential (hash only), its expiry from the database clock,
 * and its `token.issued` audit event: the store's `issue_token_under_policy` function (migrations/0020) in one
 * statement, so one round trip and one transaction of its own. Bind parameters only, no session
 * state, so it works behind a transaction-mode pooler. Refuses (writing nothing) a receiver that is
 * unknown or removed.
 */
export async function insertToken(db: Queryable, token: NewToken): Promise<IssuedTokenRecord> {
  const t = db.tables;
  try {
    const { rows } = await db.query(
      `SELECT ${tokenColumns(db.tables)}, ${policyColumnsOf('under_policy', 'under_policy_')}
         FROM (SELECT (i.facts).*, i.under_policy
                 FROM ${routine(t, 'issue_token_under_policy')}($1, $2, $3, $4, $5, $6, $7, $8, $9) AS i) AS issued`,
      [
        token.tokenId,
        token.credentialId,
        token.subject,
        token.name,
        token.scopes,
        token.receivers,
        token.ttlMs,
        token.secretHash,
        token.policy ?? null,
      ],
    );
    const row = rows[0] as Record<string, unknown>;
    const issuedUnder = policyFromColumns(row, 'under_policy_');
    return issuedUnder ? { ...toToken(row), issuedUnder } : toToken(row);
  } catch (err) {
    const e = err as { code?: string; constraint?: string; message?: string; detail?: string };
    if (e.code === '23503' && e.constraint === 'token_receivers_known') {
      throw new InvalidInputError(`invalid token request: receivers: ${e.message}`, [
        { path: 'receivers', message: e.message! },
      ]);
    }
    const refused = policyRefusal(e, token);
    if (refused) throw refused;
    throw err;
  }
}

/** issue_token's refusals under a policy (migrations/0016), as the field each one is about. */
function policyRefusal(
  e: { code?: string; constraint?: string; detail?: string },
  token: NewToken,
): InvalidInputError | undefined {
  const field = (path: string, message: string) =>
    new InvalidInputError(`invalid token request: ${path}: ${message} (nothing was issued)`, [{ path, message }]);
  if (e.code === '23503' && e.constraint === 'token_policy_known') {
    return field('policy', `no policy named ${JSON.stringify(token.policy)}`);
  }
  if (e.code === '23514' && e.constraint === 'token_policy_max_lifetime') {
    return field('ttl', `at most ${formatDuration(Number(e.detail))} (policy ${token.policy}'s max lifetime)`);
  }
  if (e.code === '23514' && e.constraint === 'token_policy_scopes') {
    return field('scopes', `${e.detail} not allowed by policy ${token.policy}`);
  }
  return undefined;
}

/**
 * Records that the workflows of these tokens exist: one statement for any number of them. Rows are
 * locked in id order, so two batches (or a batch and a kill) cannot deadlock; a row already marked
 * keeps its first time and is not written again.
 */
export async function markWorkflowsStarted(db: Queryable, tokenIds: readonly string[]): Promise<void> {
  const t = db.tables;
  await db.query(
    `WITH unmarked AS (
       SELECT id FROM ${t.token} WHERE id = ANY ($1::text[]) AND workflow_started_at IS NULL ORDER BY id FOR UPDATE)
     UPDATE ${t.token} AS t SET workflow_started_at = now() FROM unmarked WHERE t.id = unmarked.id`,
    [tokenIds],
  );
}

export const markWorkflowStarted = (db: Queryable, tokenId: string) => markWorkflowsStarted(db, [tokenId]);

export async function getToken(db: Queryable, tokenId: string): Promise<TokenRecord | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT ${tokenColumns(db.tables)} FROM ${t.token} WHERE id = $1`, [tokenId]);
  return rows[0] ? toToken(rows[0]) : undefined;
}

export async function requireToken(db: Queryable, tokenId: string): Promise<TokenRecord> {
  const token = await getToken(db, tokenId);
  if (!token) throw new NotFoundError('token', tokenId);
  return token;
}

export async function listTokens(
  db: Queryable,
  filter: { subject?: string; status?: TokenStatus; propagation?: PropagationState; limit: number; beforeId?: string },
): Promise<TokenRecord[]> {
  const t = db.tables;
  // Newest first by id (UUIDv7: time-ordered); `beforeId` continues a page where the last one ended.
  const { rows } = await db.query(
    `SELECT ${tokenColumns(db.tables)} FROM ${t.token}
      WHERE ($1::text IS NULL OR subject = $1)
        AND ($2::text IS NULL OR CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END = $2)
        AND ($4::text IS NULL OR id < $4)
        AND ($5::text IS NULL OR propagation = $5)
      ORDER BY id DESC LIMIT $3`,
    [filter.subject ?? null, filter.status ?? null, filter.limit, filter.beforeId ?? null, filter.propagation ?? null],
  );
  return rows.map(toToken);
}

/** The id of the token one of whose credentials has this SHA-256 (any state: a dead token is found too). */
export async function findTokenIdByHash(db: Queryable, secretHash: Buffer): Promise<string | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT token_id FROM ${t.credential} WHERE secret_hash = $1`, [secretHash]);
  return (rows[0] as { token_id: string } | undefined)?.token_id;
}
