/** The one kill every path uses (library, CLI, workflow, reconciler). */
import type { StorePool } from '../db.js';
import { NotFoundError } from '../errors.js';
import { revocationEventId } from '../ids.js';
import { KILL_CHANNEL, type InitiatingEntity } from '../names.js';
import { routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

export interface KillRequest {
  tokenId: string;
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  /** Kill only if the token is already past its expiry on the database clock (the expiry timer's kill). */
  onlyIfExpired?: boolean;
  /** Called by the token's own workflow: records that the workflow has taken over propagation. */
  byWorkflow?: boolean;
  /** Ties events with one root cause together (e.g. an offboarding). */
  correlationId?: string;
  /** Id of this revoke request, recorded with the kill that commits (see revoke_request_id). */
  requestId?: string;
}

export interface KillResult {
  /** True when this call killed the token; false when it was already dead (the first kill's facts). */
  changed: boolean;
  /** Only with onlyIfExpired: the token is active and not yet expired; ms until it is. */
  notYetExpiredMs?: number;
  token: TokenRecord;
}

/**
 * The one kill used by every path: one statement, so one round trip and one transaction on its own.
 * The store's `kill_token` function (migrations/0002) sets the status (expired if past expiry, with
 * the expiry as its time of death, else revoked), revokes the credentials, writes one outbox row per
 * receiver, appends the audit event and sends the NOTIFY. Idempotent: when the token is already dead
 * nothing changes and the first kill's facts are returned. Bind parameters only, no session state,
 * so it works behind a transaction-mode pooler.
 */
export async function killToken(pool: StorePool, req: KillRequest): Promise<KillResult> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT changed, remaining_ms, ${tokenColumns(t)}
       FROM (SELECT k.changed, k.remaining_ms, (k.facts).*
               FROM ${routine(t, 'kill_token')}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) AS k) AS killed`,
    [
      t.schema,
      req.tokenId,
      req.actor,
      req.reason,
      req.initiatingEntity,
      req.byWorkflow ?? false,
      req.onlyIfExpired ?? false,
      req.requestId ?? null,
      req.correlationId ?? null,
      revocationEventId(req.tokenId),
      KILL_CHANNEL,
    ],
  );
  const row = rows[0];
  if (!row) throw new NotFoundError('token', req.tokenId);
  const result: KillResult = { changed: row.changed === true, token: toToken(row) };
  if (row.remaining_ms !== null) result.notYetExpiredMs = Number(row.remaining_ms);
  return result;
}

export interface ExpiredKills {
  /** The facts of the tokens this call killed, oldest expiry first. */
  killed: TokenRecord[];
  /** Tokens whose kill failed: only when the batch failed and each due token was then killed alone. */
  failed: { tokenId: string; error: string }[];
}

/**
 * The store's part of a mass expiry: kills up to `limit` active tokens at least `graceMs` past their
 * expiry (oldest first), each by the one kill exactly as the expiry timer's kill would, in one
 * statement and one transaction (the store's `kill_expired_tokens`, migrations/0006). Tokens another
 * transaction holds (a revoke, another caller of this) are skipped, so callers may run at once.
 * When the batch fails, each due token is killed alone, so one token whose kill fails is reported
 * and the rest still die; when even that cannot start (the store is unreachable) it throws.
 */
export async function killExpiredTokens(
  pool: StorePool,
  opts: { limit: number; graceMs?: number },
): Promise<ExpiredKills> {
  const t = pool.tables;
  const graceMs = opts.graceMs ?? 0;
  try {
    const { rows } = await pool.query(
      `SELECT ${tokenColumns(t)} FROM ${routine(t, 'kill_expired_tokens')}($1, $2, $3, $4)`,
      [t.schema, opts.limit, graceMs, KILL_CHANNEL],
    );
    return { killed: rows.map(toToken), failed: [] };
  } catch (batchError) {
    let due: string[];
    try {
      const { rows } = await pool.query(
        `SELECT id FROM ${t.token}
          WHERE status = 'active' AND expires_at <= now() - $1 * interval '1 millisecond'
          ORDER BY expires_at, id LIMIT $2`,
        [graceMs, opts.limit],
      );
      due = rows.map((r) => r.id as string);
    } catch {
      throw batchError;
    }
    const result: ExpiredKills = { killed: [], failed: [] };
    for (const tokenId of due) {
      try {
        const kill = await killToken(pool, {
          tokenId,
          reason: 'expired',
          actor: 'system',
          initiatingEntity: 'system',
          onlyIfExpired: true,
        });
        if (kill.changed) result.killed.push(kill.token);
      } catch (err) {
        result.failed.push({ tokenId, error: err instanceof Error ? err.message : String(err) });
      }
    }
    return result;
  }
}

export interface BulkKillRequest {
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  /** One id for the whole operation: the correlation id (`txn`) of every event and audit record. */
  operationId: string;
}

/**
 * Kills every listed token that is still active, in one statement and one transaction (the store's
 * `kill_tokens`, migrations/0009), each by the one kill: when this returns, none of them verifies.
 * Returns the facts of the tokens this call killed; the others were dead already (or unknown).
 */
export async function killTokens(
  pool: StorePool,
  tokenIds: readonly string[],
  req: BulkKillRequest,
): Promise<TokenRecord[]> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT ${tokenColumns(t)} FROM ${routine(t, 'kill_tokens')}($1, $2, $3, $4, $5, $6, $7, $8)`,
    [t.schema, tokenIds, req.actor, req.reason, req.initiatingEntity, req.operationId, req.operationId, KILL_CHANNEL],
  );
  return rows.map(toToken);
}

/**
 * Kills every active token of a subject in one transaction (offboarding). The store's
 * `kill_subject_tokens` (migrations/0011) first takes the subject's issuance barrier, then reads
 * their ids: a token issued for them has committed and is killed here, or is issued after this.
 */
export async function killSubjectTokens(
  pool: StorePool,
  subject: string,
  req: BulkKillRequest,
): Promise<TokenRecord[]> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT ${tokenColumns(t)} FROM ${routine(t, 'kill_subject_tokens')}($1, $2, $3, $4, $5, $6, $7, $8)`,
    [t.schema, subject, req.actor, req.reason, req.initiatingEntity, req.operationId, req.operationId, KILL_CHANNEL],
  );
  return rows.map(toToken);
}

/** Every dead token of a subject (revoked or expired), oldest first. */
export async function deadTokensOf(pool: StorePool, subject: string): Promise<TokenRecord[]> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT ${tokenColumns(t)} FROM ${t.token} WHERE subject = $1 AND status <> 'active' ORDER BY revoked_at, id`,
    [subject],
  );
  return rows.map(toToken);
}
