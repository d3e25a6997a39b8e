/** The one kill every path uses (library, CLI, workflow, reconciler). */
import type { StorePool } from '../db.js';
import { NotFoundError } from '../errors.js';
import { revocationEventId } from '../ids.js';
import { KILL_CHANNEL, type InitiatingEntity } from '../names.js';
import { routine, toToken, TOKEN_COLUMNS, type TokenRecord } from './rows.js';

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
    `SELECT changed, remaining_ms, ${TOKEN_COLUMNS}
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
