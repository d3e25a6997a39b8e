/**
 * Evidence of terminations: one record per token death (revocation or expiry) with who asked, why,
 * when it was due, when the store stopped accepting it and when each receiver confirmed, read
 * through a server-side cursor (DECLARE … FETCH in one read-only transaction), so an export of a
 * year of deaths holds one batch in memory, never the whole result. Every instant is the store's
 * (PostgreSQL's) clock, ISO 8601 in UTC with milliseconds; README "Audit export" defines each field.
 */
import { z } from 'zod';
import { checkout, quoteIdent, type StorePool } from '../db.js';
import { DELIVERY_STATES, INITIATING_ENTITIES, PROPAGATION_STATES, type InitiatingEntity } from '../names.js';
import { parseRow } from './rows.js';

export interface DeathFilter {
  /** Deaths at or after this instant (ISO 8601), by `deadInStoreAt`. */
  since?: string;
  /** Deaths before this instant (ISO 8601), by `deadInStoreAt`. */
  until?: string;
  subject?: string;
}

/** How one receiver learned of the death; see README "Audit export" for the exact meanings. */
export const RECEIVER_OUTCOMES = [
  'verified',
  'acknowledged',
  'forced',
  'cancelled',
  'pending',
  'failed',
  'untold',
] as const;
export type ReceiverOutcome = (typeof RECEIVER_OUTCOMES)[number];

export interface ReceiverEvidence {
  receiverId: string;
  outcome: ReceiverOutcome;
  /** When the store recorded the receiver's first 2xx to the signed event; null until then. */
  acknowledgedAt: string | null;
  /** POSTs of the event made so far (retries included). */
  attempts: number;
  /** When the receiver's probe said the token is rejected there; null when it has not (or offers no probe). */
  verifiedAt: string | null;
  /** Probe requests made so far. */
  probes: number;
  /** When this receiver counts as told: verifiedAt, or acknowledgedAt for one settled without a probe. */
  confirmedAt: string | null;
  /** The operator's override that settled it unconfirmed (`tokenwarden force`). */
  forced: { at: string; actor: string; reason: string } | null;
  lastAttemptAt: string | null;
  lastStatusCode: number | null;
  lastError: string | null;
}

export interface DeathRecord {
  tokenId: string;
  subject: string;
  name: string | null;
  policy: string | null;
  status: 'revoked' | 'expired';
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  /** The operation that killed many tokens at once (offboarding, revoke --where), if any. */
  correlationId: string | null;
  issuedAt: string;
  expiresAt: string;
  /** From when the token was due to be dead: its expiry, a scheduled revocation's instant, or the revoke's commit. */
  requestedAt: string;
  /** From when the store refused it (every verifier and introspection): revoked_at, or the expiry. */
  deadInStoreAt: string;
  /** When the death was written with its outbox rows; null for an expiry no process has recorded yet. */
  recordedAt: string | null;
  /** When the last receiver confirmed (deadInStoreAt without receivers); null while any is not confirmed. */
  deadEverywhereAt: string | null;
  timeToDeadInStoreMs: number;
  timeToDeadEverywhereMs: number | null;
  propagation: 'none' | 'pending' | 'stuck' | 'complete';
  /** The first escalation: no confirmation from every receiver by the deadline. */
  stuckAt: string | null;
  /** When the store marked propagation complete (every receiver confirmed, or an operator forced it). */
  propagationCompletedAt: string | null;
  /** The revocation event's id: the `webhook-id` every receiver was sent. */
  eventId: string | null;
  receivers: ReceiverEvidence[];
  /** The store's clock when the export began: pending, stuck and failed states are as of this instant. */
  asOf: string;
}

/** Rows per FETCH: what the export holds in memory at most, besides the record being written. */
export const DEATH_EXPORT_FETCH_SIZE = 500;

const CURSOR = 'death_export';

const isoText = z.string().regex(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
const deliveryJson = z.object({
  receiverId: z.string(),
  status: z.enum(DELIVERY_STATES).nullable(),
  attempts: z.number().int().nullable(),
  probes: z.number().int().nullable(),
  ackedAt: isoText.nullable(),
  verifiedAt: isoText.nullable(),
  lastAttemptAt: isoText.nullable(),
  lastStatusCode: z.number().int().nullable(),
  lastError: z.string().nullable(),
});
const forcedJson = z.object({
  at: isoText,
  data: z.object({ actor: z.string(), reason: z.string(), receivers: z.array(z.string()) }),
});
const deathRow = z.object({
  id: z.string(),
  subject: z.string(),
  name: z.string().nullable(),
  policy: z.string().nullable(),
  status: z.enum(['revoked', 'expired']),
  reason: z.string(),
  actor: z.string(),
  initiating_entity: z.enum(INITIATING_ENTITIES),
  correlation_id: z.string().nullable(),
  issued_at: isoText,
  expires_at: isoText,
  requested_at: isoText,
  dead_in_store_at: isoText,
  recorded_at: isoText.nullable(),
  propagation: z.enum(PROPAGATION_STATES),
  stuck_at: isoText.nullable(),
  propagation_completed_at: isoText.nullable(),
  event_id: z.string().nullable(),
  deliveries: z.array(deliveryJson),
  forced: z.array(forcedJson),
});

/**
 * The deaths matching `filter`, oldest death first (then token id), as a stream: one read-only
 * REPEATABLE READ transaction, so every record is of the same snapshot (`asOf`), and a cursor read
 * `fetchSize` rows at a time, only as fast as the consumer takes them. Stopping early (a `break`)
 * closes the cursor and returns the connection. The filter is taken as given: validate it first
 * (the library's exportDeaths does). A slow consumer keeps the transaction open that long.
 */
export async function* exportDeaths(
  pool: StorePool,
  filter: DeathFilter,
  options: { fetchSize?: number } = {},
): AsyncGenerator<DeathRecord, void, undefined> {
  const fetchSize = options.fetchSize ?? DEATH_EXPORT_FETCH_SIZE;
  if (!Number.isInteger(fetchSize) || fetchSize < 1) throw new Error(`fetchSize: expected a positive integer`);
  const client = await checkout(pool);
  let done = false;
  try {
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    const iso = `${quoteIdent(pool.tables.schema)}.iso_time`;
    const { rows: clock } = await client.query(`SELECT ${iso}(now()) AS as_of`);
    const asOf = z.string().parse(clock[0]?.as_of);
    await client.query(`DECLARE ${CURSOR} NO SCROLL CURSOR FOR ${deathsQuery(pool)}`, [
      filter.since ?? null,
      filter.until ?? null,
      filter.subject ?? null,
    ]);
    for (;;) {
      const { rows } = await client.query(`FETCH FORWARD ${fetchSize} FROM ${CURSOR}`);
      for (const row of rows) yield toDeathRecord(parseRow(deathRow, 'death export', row), asOf);
      if (rows.length < fetchSize) break;
    }
    await client.query('COMMIT');
    done = true;
  } finally {
    if (done) client.release();
    else {
      // Stopped early or failed: the cursor goes with the transaction; a connection that cannot
      // even roll back is destroyed, never handed on.
      const rolledBack = await client.query('ROLLBACK').then(
        () => true,
        () => false,
      );
      client.release(rolledBack ? undefined : new Error('death export: rollback failed'));
    }
  }
}

/**
 * The export's statement ($1 since, $2 until, $3 subject; each NULL when not filtered on). The
 * tokens are sorted in the inner query and the per-token reads are subqueries of the outer one, so
 * each FETCH reads the deliveries and audit events of the rows it returns, not of every death.
 */
export function deathsQuery(pool: StorePool): string {
  const t = pool.tables;
  const iso = `${quoteIdent(t.schema)}.iso_time`;
  // An active row past its expiry is dead (DESIGN §2) even before a process records it.
  const diedAt = `CASE WHEN tk.status = 'active' THEN tk.expires_at ELSE tk.revoked_at END`;
  return `
    SELECT t.id, t.subject, t.name, t.policy,
           CASE WHEN t.status = 'active' THEN 'expired' ELSE t.status END AS status,
           -- An expiry not yet recorded: what its kill will record (migrations/0002 kill_token).
           coalesce(t.revoke_reason, 'expired') AS reason,
           coalesce(t.revoked_by, 'system') AS actor,
           coalesce(t.initiating_entity, 'system') AS initiating_entity,
           k.data ->> 'correlationId' AS correlation_id,
           ${iso}(t.issued_at) AS issued_at,
           ${iso}(t.expires_at) AS expires_at,
           ${iso}(CASE WHEN t.status = 'revoked' AND t.revoke_scheduled_at <= t.died_at
                       THEN t.revoke_scheduled_at ELSE t.died_at END) AS requested_at,
           ${iso}(t.died_at) AS dead_in_store_at,
           ${iso}(k.recorded_at) AS recorded_at,
           t.propagation,
           (SELECT ${iso}(min(a.recorded_at)) FROM ${t.audit_event} a
             WHERE a.token_id = t.id AND a.kind = 'propagation.stuck') AS stuck_at,
           ${iso}(t.propagation_completed_at) AS propagation_completed_at,
           k.data ->> 'eventId' AS event_id,
           (SELECT coalesce(json_agg(json_build_object(
                     'receiverId', r.id, 'status', d.status, 'attempts', d.attempts, 'probes', d.probes,
                     'ackedAt', ${iso}(d.acked_at), 'verifiedAt', ${iso}(d.verified_at),
                     'lastAttemptAt', ${iso}(d.last_attempt_at), 'lastStatusCode', d.last_status_code,
                     'lastError', d.last_error) ORDER BY r.n), '[]'::json)
              FROM unnest(t.receivers) WITH ORDINALITY AS r(id, n)
              LEFT JOIN ${t.delivery} d ON d.event_id = k.data ->> 'eventId' AND d.receiver_id = r.id) AS deliveries,
           (SELECT coalesce(json_agg(json_build_object('at', ${iso}(a.recorded_at), 'data', a.canonical::json -> 'data')
                                     ORDER BY a.seq), '[]'::json)
              FROM ${t.audit_event} a WHERE a.token_id = t.id AND a.kind = 'propagation.forced') AS forced
      FROM (SELECT tk.*, ${diedAt} AS died_at FROM ${t.token} tk
             WHERE (tk.status <> 'active' OR tk.expires_at <= now())
               AND ($1::timestamptz IS NULL OR ${diedAt} >= $1::timestamptz)
               AND ($2::timestamptz IS NULL OR ${diedAt} < $2::timestamptz)
               AND ($3::text IS NULL OR tk.subject = $3::text)
             ORDER BY died_at, tk.id) t
      LEFT JOIN LATERAL (SELECT a.recorded_at, a.canonical::jsonb -> 'data' AS data FROM ${t.audit_event} a
                          WHERE a.token_id = t.id AND a.idempotency_key = 'killed') k ON true
     ORDER BY t.died_at, t.id`;
}

const later = (a: string, b: string) => (Date.parse(a) >= Date.parse(b) ? a : b);

function toDeathRecord(row: z.output<typeof deathRow>, asOf: string): DeathRecord {
  const receivers = row.deliveries.map((d): ReceiverEvidence => {
    const forcing = d.status === 'forced' ? row.forced.find((f) => f.data.receivers.includes(d.receiverId)) : undefined;
    const outcome: ReceiverOutcome =
      d.status === null
        ? 'untold'
        : d.status === 'delivered'
          ? d.verifiedAt !== null
            ? 'verified'
            : 'acknowledged'
          : d.status;
    return {
      receiverId: d.receiverId,
      outcome,
      acknowledgedAt: d.ackedAt,
      attempts: d.attempts ?? 0,
      verifiedAt: d.verifiedAt,
      probes: d.probes ?? 0,
      confirmedAt: outcome === 'verified' ? d.verifiedAt : outcome === 'acknowledged' ? d.ackedAt : null,
      forced: forcing ? { at: forcing.at, actor: forcing.data.actor, reason: forcing.data.reason } : null,
      lastAttemptAt: d.lastAttemptAt,
      lastStatusCode: d.lastStatusCode,
      lastError: d.lastError,
    };
  });
  const confirmations = receivers.map((r) => r.confirmedAt);
  const deadEverywhereAt = confirmations.every((c): c is string => c !== null)
    ? confirmations.reduce(later, row.dead_in_store_at)
    : null;
  const since = (instant: string) => Date.parse(instant) - Date.parse(row.requested_at);
  return {
    tokenId: row.id,
    subject: row.subject,
    name: row.name,
    policy: row.policy,
    status: row.status,
    reason: row.reason,
    actor: row.actor,
    initiatingEntity: row.initiating_entity,
    correlationId: row.correlation_id,
    issuedAt: row.issued_at,
    expiresAt: row.expires_at,
    requestedAt: row.requested_at,
    deadInStoreAt: row.dead_in_store_at,
    recordedAt: row.recorded_at,
    deadEverywhereAt,
    timeToDeadInStoreMs: since(row.dead_in_store_at),
    timeToDeadEverywhereMs: deadEverywhereAt === null ? null : since(deadEverywhereAt),
    propagation: row.propagation,
    stuckAt: row.stuck_at,
    propagationCompletedAt: row.propagation_completed_at,
    eventId: row.event_id,
    receivers,
    asOf,
  };
}
