/** The outbox: one delivery row per (event, receiver), and the token's propagation state. */
import type { Queryable, StorePool } from '../db.js';
import type { PropagationState } from '../names.js';
import { appendAudit } from './audit.js';
import {
  inTransaction,
  routine,
  toDelivery,
  toReceiver,
  toToken,
  tokenColumns,
  type DeliveryRecord,
  type ReceiverRecord,
  type TokenRecord,
} from './rows.js';
import { requireToken } from './tokens.js';

export async function listDeliveries(db: Queryable, tokenId: string): Promise<DeliveryRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT * FROM ${t.delivery} WHERE token_id = $1 ORDER BY receiver_id`, [tokenId]);
  return rows.map(toDelivery);
}

/**
 * A delivery as `show` reports it: the receiver's acknowledgement and its probe's confirmation,
 * apart. `verified` is the confirmation's time, or `pending` (a probe is to confirm), `no probe`
 * (the receiver offers none: its acknowledgement settles the delivery), or `not verified`
 * (settled without the probe's word: forced by an operator, or cancelled).
 */
export interface DeliveryReport extends DeliveryRecord {
  /** When the receiver acknowledged the event (2xx); null until it has. */
  delivered: string | null;
  verified: string;
}

export async function listDeliveryReports(db: Queryable, tokenId: string): Promise<DeliveryReport[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${DELIVERY_COLUMNS}, r.probe_url IS NOT NULL AS probed
       FROM ${t.delivery} d LEFT JOIN ${t.receiver} r ON r.id = d.receiver_id
      WHERE d.token_id = $1 ORDER BY d.receiver_id`,
    [tokenId],
  );
  return rows.map((row) => {
    const d = toDelivery(row);
    const verified =
      d.verifiedAt ??
      (row.probed !== true ? 'no probe' : d.status === 'pending' || d.status === 'failed' ? 'pending' : 'not verified');
    return { ...d, delivered: d.ackedAt, verified };
  });
}

/** A delivery row's columns, without its body. */
const DELIVERY_COLUMNS = `d.event_id, d.receiver_id, d.token_id, d.status, d.attempts, d.last_status_code, d.last_error,
  d.last_attempt_at, d.acked_at, d.verified_at, d.probes`;

/** Everything one delivery attempt needs, read together. */
export interface AttemptContext {
  delivery: DeliveryRecord;
  /** The event body, the same bytes on every attempt. */
  body: string;
  /** The receiver and its encrypted signing secret; undefined when its row is gone. */
  receiver: { record: ReceiverRecord; ciphertext: Buffer; keyId: string } | undefined;
  /**
   * For a rejected delivery: whether an operator asked to retry the token's propagation (the audited
   * `retryPropagation`) after its last attempt; only then may it be sent again.
   */
  retryRequested: boolean;
}

/**
 * The outbox row, its receiver with the encrypted secret, and whether an operator's retry is newer
 * than the last attempt, in one statement: a fan-out starts every attempt at once on a shared pool.
 * Undefined while no kill has written the outbox row.
 */
export async function loadAttempt(
  db: Queryable,
  eventId: string,
  receiverId: string,
): Promise<AttemptContext | undefined> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT ${DELIVERY_COLUMNS}, d.body,
            r.id AS r_id, r.kind AS r_kind, r.url AS r_url, r.probe_url AS r_probe_url, r.enabled AS r_enabled,
            r.created_at AS r_created_at,
            r.removed_at AS r_removed_at, r.secret_ciphertext AS r_secret_ciphertext, r.secret_key_id AS r_secret_key_id,
            CASE WHEN d.status = 'failed' THEN EXISTS (
              SELECT 1 FROM ${t.audit_event} a
               WHERE a.token_id = d.token_id AND a.kind = 'propagation.retry-requested'
                 AND a.recorded_at > coalesce(d.last_attempt_at, '-infinity')) ELSE false END AS retry_requested
       FROM ${t.delivery} d LEFT JOIN ${t.receiver} r ON r.id = d.receiver_id
      WHERE d.event_id = $1 AND d.receiver_id = $2`,
    [eventId, receiverId],
  );
  const row = rows[0];
  if (!row) return undefined;
  return {
    delivery: toDelivery(row),
    body: row.body as string,
    receiver:
      row.r_id === null
        ? undefined
        : {
            record: toReceiver({
              id: row.r_id,
              kind: row.r_kind,
              url: row.r_url,
              probe_url: row.r_probe_url,
              enabled: row.r_enabled,
              created_at: row.r_created_at,
              removed_at: row.r_removed_at,
            }),
            ciphertext: row.r_secret_ciphertext as Buffer,
            keyId: row.r_secret_key_id as string,
          },
    retryRequested: row.retry_requested === true,
  };
}

/**
 * What one attempt found. The event's POST: `delivered` (acknowledged, no probe to ask), `acknowledged`
 * (a probe decides), `retryable`, `rejected`, `cancelled`. The probe's answer after an
 * acknowledgement: `verified` (the token is rejected there), `probe-retryable`, `probe-rejected`.
 */
export type AttemptOutcome =
  | { kind: 'delivered' | 'acknowledged' | 'verified'; statusCode: number }
  | { kind: 'retryable' | 'probe-retryable'; statusCode: number | null; error: string }
  | { kind: 'rejected' | 'probe-rejected'; statusCode: number | null; error: string }
  | { kind: 'cancelled'; error: string };

/**
 * Records one delivery attempt in one statement (the store's `record_delivery_attempt`). A delivery
 * already settled (delivered, forced, cancelled) is never moved back; the returned row says what
 * the store holds. Settling it as delivered or cancelled appends its audit event once.
 */
export async function recordDeliveryAttempt(
  db: Queryable,
  eventId: string,
  receiverId: string,
  outcome: AttemptOutcome,
): Promise<DeliveryRecord> {
  const { rows } = await db.query(
    `SELECT ${DELIVERY_COLUMNS} FROM ${routine(db.tables, 'record_delivery_attempt')}($1, $2, $3, $4, $5) d`,
    [
      eventId,
      receiverId,
      outcome.kind,
      'statusCode' in outcome ? outcome.statusCode : null,
      'error' in outcome ? outcome.error : null,
    ],
  );
  if (!rows[0]) throw new Error(`delivery ${eventId}/${receiverId} does not exist`);
  return toDelivery(rows[0]);
}

/**
 * Moves the token's propagation state (pending ⇄ stuck → complete) with an audit event. `complete`
 * is refused while a delivery is unsettled, so a crash can never report half-done as done.
 */
export async function setPropagation(
  pool: StorePool,
  tokenId: string,
  state: Exclude<PropagationState, 'none'>,
  auditKey: string,
  detail: Record<string, unknown>,
): Promise<TokenRecord> {
  const t = pool.tables;
  return inTransaction(pool, async (client) => {
    if (state === 'complete') {
      const { rows } = await client.query(
        `SELECT receiver_id FROM ${t.delivery} WHERE token_id = $1 AND status IN ('pending', 'failed')`,
        [tokenId],
      );
      if (rows.length > 0) {
        throw new Error(
          `propagation of ${tokenId} is not complete: ${rows.map((r) => r.receiver_id).join(', ')} unsettled`,
        );
      }
    }
    const { rows } = await client.query(
      `UPDATE ${t.token} SET propagation = $2,
              propagation_completed_at = CASE WHEN $2 = 'complete' THEN coalesce(propagation_completed_at, now()) END
        WHERE id = $1 AND status <> 'active' AND propagation <> 'complete'
        RETURNING ${tokenColumns(t)}`,
      [tokenId, state],
    );
    if (rows[0]) await appendAudit(client, tokenId, auditKey, `propagation.${state}`, detail);
    return rows[0] ? toToken(rows[0]) : requireToken(client, tokenId);
  });
}

/** Operator override: unsettled deliveries become `forced`; audited with the reason. */
export async function forceCompleteDeliveries(
  pool: StorePool,
  tokenId: string,
  auditKey: string,
  reason: string,
  actor: string,
): Promise<string[]> {
  const t = pool.tables;
  return inTransaction(pool, async (client) => {
    const { rows } = await client.query(
      `UPDATE ${t.delivery} SET status = 'forced' WHERE token_id = $1 AND status IN ('pending', 'failed') RETURNING receiver_id`,
      [tokenId],
    );
    const receivers = rows.map((r) => r.receiver_id as string).sort();
    await appendAudit(client, tokenId, auditKey, 'propagation.forced', { reason, actor, receivers });
    return receivers;
  });
}

/** Deliveries of these tokens not yet confirmed (pending or failed), counted per receiver. */
export async function unconfirmedByReceiver(
  db: StorePool,
  tokenIds: readonly string[],
): Promise<Record<string, number>> {
  const { rows } = await db.query(
    `SELECT receiver_id, count(*)::integer AS n FROM ${db.tables.delivery}
      WHERE token_id = ANY($1) AND status IN ('pending', 'failed')
      GROUP BY receiver_id ORDER BY receiver_id`,
    [tokenIds],
  );
  return Object.fromEntries(rows.map((r) => [r.receiver_id as string, r.n as number]));
}
