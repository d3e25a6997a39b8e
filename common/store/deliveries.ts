/** The outbox: one delivery row per (event, receiver), and the token's propagation state. */
import type { Queryable, StorePool } from '../db.js';
import type { PropagationState } from '../names.js';
import { appendAudit } from './audit.js';
import { inTransaction, toDelivery, toToken, TOKEN_COLUMNS, type DeliveryRecord, type TokenRecord } from './rows.js';
import { requireToken } from './tokens.js';

export async function listDeliveries(db: Queryable, tokenId: string): Promise<DeliveryRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT * FROM ${t.delivery} WHERE token_id = $1 ORDER BY receiver_id`, [tokenId]);
  return rows.map(toDelivery);
}

export async function loadDeliveryForAttempt(
  db: Queryable,
  eventId: string,
  receiverId: string,
): Promise<{ delivery: DeliveryRecord; body: string } | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT * FROM ${t.delivery} WHERE event_id = $1 AND receiver_id = $2`, [
    eventId,
    receiverId,
  ]);
  return rows[0] ? { delivery: toDelivery(rows[0]), body: rows[0].body as string } : undefined;
}

/**
 * Whether an operator asked to retry the token's propagation (the audited `retryPropagation`) after
 * this delivery's last attempt: only then may a rejected delivery be sent again.
 */
export async function retryRequestedSinceLastAttempt(
  db: Queryable,
  eventId: string,
  receiverId: string,
): Promise<boolean> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT EXISTS (
       SELECT 1 FROM ${t.delivery} d JOIN ${t.audit_event} a ON a.token_id = d.token_id
        WHERE d.event_id = $1 AND d.receiver_id = $2 AND a.kind = 'propagation.retry-requested'
          AND a.recorded_at > coalesce(d.last_attempt_at, '-infinity')) AS requested`,
    [eventId, receiverId],
  );
  return rows[0]?.requested === true;
}

export type AttemptOutcome =
  | { kind: 'delivered'; statusCode: number }
  | { kind: 'retryable'; statusCode: number | null; error: string }
  | { kind: 'rejected'; statusCode: number | null; error: string }
  | { kind: 'cancelled'; error: string };

/**
 * Records one delivery attempt. A delivery already settled (delivered, forced, cancelled) is never
 * moved back; the returned row says what the store holds.
 */
export async function recordDeliveryAttempt(
  pool: StorePool,
  eventId: string,
  receiverId: string,
  outcome: AttemptOutcome,
): Promise<DeliveryRecord> {
  const t = pool.tables;
  const status = { delivered: 'delivered', retryable: 'pending', rejected: 'failed', cancelled: 'cancelled' }[
    outcome.kind
  ];
  return inTransaction(pool, async (client) => {
    const { rows } = await client.query(
      `UPDATE ${t.delivery}
          SET attempts = attempts + CASE WHEN $3 = 'cancelled' THEN 0 ELSE 1 END,
              status = $3,
              last_status_code = $4, last_error = $5, last_attempt_at = now(),
              acked_at = CASE WHEN $3 = 'delivered' THEN now() END
        WHERE event_id = $1 AND receiver_id = $2 AND status IN ('pending', 'failed')
        RETURNING *`,
      [
        eventId,
        receiverId,
        status,
        'statusCode' in outcome ? outcome.statusCode : null,
        'error' in outcome ? outcome.error : null,
      ],
    );
    const row =
      rows[0] ??
      (
        await client.query(`SELECT * FROM ${t.delivery} WHERE event_id = $1 AND receiver_id = $2`, [
          eventId,
          receiverId,
        ])
      ).rows[0];
    if (!row) throw new Error(`delivery ${eventId}/${receiverId} does not exist`);
    const delivery = toDelivery(row);
    if (rows[0] && (outcome.kind === 'delivered' || outcome.kind === 'cancelled')) {
      await appendAudit(
        client,
        delivery.tokenId,
        `delivery:${eventId}:${receiverId}:${outcome.kind}`,
        `delivery.${outcome.kind}`,
        {
          eventId,
          receiverId,
          attempts: delivery.attempts,
          ...(outcome.kind === 'delivered' ? { statusCode: outcome.statusCode } : { detail: outcome.error }),
        },
      );
    }
    return delivery;
  });
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
        RETURNING ${TOKEN_COLUMNS}`,
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
