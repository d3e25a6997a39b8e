/**
 * Evidence of terminations: one record per token death (revocation or expiry) with who asked, why,
 * when it was due, when the store stopped accepting it and when each receiver confirmed, read
 * through a server-side cursor (DECLARE … FETCH in one read-only transaction), so an export of a
 * year of deaths holds one batch in memory, never the whole result. Every settled fact (the kill,
 * acknowledgements, verifications, forcing, escalation) is read from the token's hash-chained
 * audit events, the text `audit verify` checks, not from the mutable token and delivery rows;
 * those give only what is still in progress. The subject and filters' matching columns of the token
 * row are compared with the chain by `audit verify` (row-mismatch). Instants are the store's (PostgreSQL's) clock, ISO
 * 8601 in UTC with milliseconds; README "Evidence for auditors" defines every field.
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

/** How one receiver learned of the death; see README "Evidence for auditors" for the exact meanings. */
export const RECEIVER_OUTCOMES = [
  'verified',
  'acknowledged',
  'forced',
  'cancelled',
  'pending',
  'failed',
  'untold',
  'unaudited',
] as const;
export type ReceiverOutcome = (typeof RECEIVER_OUTCOMES)[number];

export interface ReceiverEvidence {
  receiverId: string;
  outcome: ReceiverOutcome;
  /** When the store recorded the receiver's first 2xx to the signed event; null until then. */
  acknowledgedAt: string | null;
  /** POSTs of the event (retries included): at settlement, or so far while unsettled. */
  attempts: number;
  /** When the receiver's probe said the token is rejected there; null when it has not (or offers no probe). */
  verifiedAt: string | null;
  /** Probe requests made: at verification, or so far. */
  probes: number;
  /** When this receiver counts as told: verifiedAt, or acknowledgedAt for one settled without a probe. */
  confirmedAt: string | null;
  /** The operator's override that settled it unconfirmed (`tokenwarden force`). */
  forced: { at: string; actor: string; reason: string } | null;
  /** The delivery row's latest attempt (live state, not chained). */
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
  /** From when the store refused it (every verifier and introspection): the kill's commit, or the expiry. */
  deadInStoreAt: string;
  /** When the death was written with its outbox rows; null for an expiry no process has recorded yet. */
  recordedAt: string | null;
  /** When the last receiver confirmed (deadInStoreAt without receivers); null while any is not confirmed. */
  deadEverywhereAt: string | null;
  timeToDeadInStoreMs: number;
  timeToDeadEverywhereMs: number | null;
  /** The token row's propagation state now (as of `asOf`). */
  propagation: 'none' | 'pending' | 'stuck' | 'complete';
  /** The first escalation: no confirmation from every receiver by the deadline. */
  stuckAt: string | null;
  /** When propagation completed (every receiver confirmed, or an operator forced the rest). */
  propagationCompletedAt: string | null;
  /** The revocation event's id: the `webhook-id` every receiver was sent. */
  eventId: string | null;
  receivers: ReceiverEvidence[];
  /** The `seq` of each audit event of the token's chain this record's settled facts come from. */
  auditSeqs: number[];
  /** The store's clock when the export began: pending, stuck and failed states are as of this instant. */
  asOf: string;
}

/** Rows per FETCH: what the export holds in memory at most, besides the record being written. */
export const DEATH_EXPORT_FETCH_SIZE = 500;

const CURSOR = 'death_export';

/** The audit event kinds a death's record is drawn from. */
export const EVIDENCE_KINDS = [
  'token.issued',
  'token.revoked',
  'token.expired',
  'revoke.scheduled',
  'revoke.schedule-cancelled',
  'delivery.acknowledged',
  'delivery.delivered',
  'delivery.cancelled',
  'propagation.stuck',
  'propagation.forced',
  'propagation.complete',
];

const isoText = z.string().regex(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
const deliveryJson = z.object({
  eventId: z.string(),
  receiverId: z.string(),
  status: z.enum(DELIVERY_STATES),
  attempts: z.number().int(),
  probes: z.number().int(),
  lastAttemptAt: isoText.nullable(),
  lastStatusCode: z.number().int().nullable(),
  lastError: z.string().nullable(),
});
const deathRow = z.object({
  id: z.string(),
  subject: z.string(),
  name: z.string().nullable(),
  policy: z.string().nullable(),
  receivers: z.array(z.string()),
  unrecorded: z.boolean(),
  issued_at: isoText,
  expires_at: isoText,
  died_at: isoText,
  propagation: z.enum(PROPAGATION_STATES),
  events: z.array(z.string()).nullable(),
  deliveries: z.array(deliveryJson).nullable(),
});

/** An audit event as hashed: its canonical text's own fields, never the row's unhashed columns. */
const chainedEvent = z.object({
  seq: z.number().int(),
  kind: z.string(),
  at: isoText,
  data: z.record(z.string(), z.unknown()),
});
type ChainedEvent = z.output<typeof chainedEvent>;
const killData = z.object({
  reason: z.string(),
  actor: z.string(),
  initiatingEntity: z.enum(INITIATING_ENTITIES),
  occurredAt: isoText,
  eventId: z.string(),
  /** The receivers the kill was sent to (its outbox rows): the record's receivers, never the row's. */
  receivers: z.array(z.string()),
  credentialIds: z.array(z.string()).optional(),
  correlationId: z.string().nullable().optional(),
});
const issuedData = z.object({ subject: z.string(), receivers: z.array(z.string()) });
const deliveryData = z.object({
  eventId: z.string(),
  receiverId: z.string(),
  attempts: z.number().int(),
  verified: z.boolean().optional(),
  probes: z.number().int().optional(),
});
const forcedData = z.object({ reason: z.string(), actor: z.string(), receivers: z.array(z.string()) });
const scheduleData = z.object({ at: z.iso.datetime({ offset: true }) });

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
      EVIDENCE_KINDS,
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
 * The export's statement ($1 since, $2 until, $3 subject, each NULL when not filtered on; $4 the
 * evidence kinds). The tokens are sorted in the inner query and the per-token reads are subqueries
 * of the outer one, so each FETCH reads the events and deliveries of the rows it returns only.
 */
export function deathsQuery(pool: StorePool): string {
  const t = pool.tables;
  const iso = `${quoteIdent(t.schema)}.iso_time`;
  // An active row past its expiry is dead (DESIGN §2) even before a process records it.
  const diedAt = `CASE WHEN tk.status = 'active' THEN tk.expires_at ELSE tk.revoked_at END`;
  return `
    SELECT t.id, t.subject, t.name, t.policy, t.receivers, t.status = 'active' AS unrecorded,
           ${iso}(t.issued_at) AS issued_at, ${iso}(t.expires_at) AS expires_at, ${iso}(t.died_at) AS died_at,
           t.propagation,
           (SELECT array_agg(a.canonical ORDER BY a.seq) FROM ${t.audit_event} a
             WHERE a.token_id = t.id AND a.kind = ANY ($4::text[])) AS events,
           (SELECT json_agg(json_build_object(
                     'eventId', d.event_id, 'receiverId', d.receiver_id, 'status', d.status,
                     'attempts', d.attempts, 'probes', d.probes, 'lastAttemptAt', ${iso}(d.last_attempt_at),
                     'lastStatusCode', d.last_status_code, 'lastError', d.last_error))
              FROM ${t.delivery} d WHERE d.token_id = t.id) AS deliveries
      FROM (SELECT tk.*, ${diedAt} AS died_at FROM ${t.token} tk
             WHERE (tk.status <> 'active' OR tk.expires_at <= now())
               AND ($1::timestamptz IS NULL OR ${diedAt} >= $1::timestamptz)
               AND ($2::timestamptz IS NULL OR ${diedAt} < $2::timestamptz)
               AND ($3::text IS NULL OR tk.subject = $3::text)
             ORDER BY died_at, tk.id) t
     ORDER BY t.died_at, t.id`;
}

const later = (a: string, b: string) => (Date.parse(a) >= Date.parse(b) ? a : b);
const iso = (instant: string) => new Date(instant).toISOString();

function toDeathRecord(row: z.output<typeof deathRow>, asOf: string): DeathRecord {
  const events = (row.events ?? []).map((text) => parseRow(chainedEvent, 'audit_event canonical', JSON.parse(text)));
  const used: ChainedEvent[] = [];
  const use = (event: ChainedEvent | undefined): ChainedEvent | undefined => {
    if (event) used.push(event);
    return event;
  };
  const killEvent = use(
    row.unrecorded ? undefined : events.find((e) => e.kind === 'token.revoked' || e.kind === 'token.expired'),
  );
  if (!row.unrecorded && !killEvent) {
    throw new Error(
      `token ${row.id} is dead in the store but its audit chain holds no kill event: check it with \`tokenwarden audit verify --token ${row.id}\``,
    );
  }
  const kill = killEvent && parseRow(killData, 'kill event', killEvent.data);
  const issuedEvent = use(events.find((e) => e.kind === 'token.issued'));
  const issued = issuedEvent && parseRow(issuedData, 'token.issued', issuedEvent.data);
  // The chain's facts, not the row's: a row edited after the fact (a receiver dropped) must not
  // turn an unconfirmed receiver into none. An expiry not yet recorded has only its issue event.
  const receiverIds = kill?.receivers ?? issued?.receivers ?? row.receivers;
  const status = killEvent?.kind === 'token.revoked' ? 'revoked' : 'expired';
  const deadInStoreAt = kill?.occurredAt ?? row.died_at;
  const afterKill = events.filter((e) => !killEvent || e.seq > killEvent.seq);
  const ofThisEvent = (kind: string) =>
    afterKill
      .filter((e) => e.kind === kind)
      .map((e) => ({ event: e, data: parseRow(deliveryData, kind, e.data) }))
      .filter((e) => e.data.eventId === kill?.eventId);
  const acknowledgements = ofThisEvent('delivery.acknowledged');
  const settlements = [...ofThisEvent('delivery.delivered'), ...ofThisEvent('delivery.cancelled')];
  const forcings = afterKill
    .filter((e) => e.kind === 'propagation.forced')
    .map((e) => ({ event: e, data: parseRow(forcedData, 'propagation.forced', e.data) }));
  const rows = new Map((row.deliveries ?? []).filter((d) => d.eventId === kill?.eventId).map((d) => [d.receiverId, d]));

  const receivers = receiverIds.map((receiverId): ReceiverEvidence => {
    const delivery = rows.get(receiverId);
    const acknowledged = use(acknowledgements.find((a) => a.data.receiverId === receiverId)?.event);
    const settled = settlements.find((a) => a.data.receiverId === receiverId);
    use(settled?.event);
    const forcing = forcings.find((f) => f.data.receivers.includes(receiverId));
    use(forcing?.event);
    const verified = settled?.event.kind === 'delivery.delivered' && settled.data.verified === true;
    const outcome: ReceiverOutcome = settled
      ? settled.event.kind === 'delivery.cancelled'
        ? 'cancelled'
        : verified
          ? 'verified'
          : 'acknowledged'
      : forcing
        ? 'forced'
        : delivery === undefined
          ? 'untold'
          : delivery.status === 'pending' || delivery.status === 'failed'
            ? delivery.status
            : // The row says settled, yet no audit event records it: the row is not evidence.
              'unaudited';
    const acknowledgedAt = acknowledged?.at ?? (outcome === 'acknowledged' ? settled!.event.at : null);
    const verifiedAt = verified ? settled!.event.at : null;
    return {
      receiverId,
      outcome,
      acknowledgedAt,
      attempts: settled?.data.attempts ?? delivery?.attempts ?? 0,
      verifiedAt,
      probes: settled?.data.probes ?? delivery?.probes ?? 0,
      confirmedAt: outcome === 'verified' ? verifiedAt : outcome === 'acknowledged' ? acknowledgedAt : null,
      forced: forcing ? { at: forcing.event.at, actor: forcing.data.actor, reason: forcing.data.reason } : null,
      lastAttemptAt: delivery?.lastAttemptAt ?? null,
      lastStatusCode: delivery?.lastStatusCode ?? null,
      lastError: delivery?.lastError ?? null,
    };
  });

  // A revocation scheduled for an instant at or before the kill was due then (the last schedule
  // before the kill, unless cancelled after it).
  const schedule =
    status === 'revoked'
      ? events.filter((e) => e.kind.startsWith('revoke.schedule') && e.seq < killEvent!.seq).at(-1)
      : undefined;
  const scheduledAt =
    schedule?.kind === 'revoke.scheduled' ? parseRow(scheduleData, 'revoke.scheduled', schedule.data).at : undefined;
  const dueAtSchedule = scheduledAt !== undefined && Date.parse(scheduledAt) <= Date.parse(deadInStoreAt);
  if (dueAtSchedule) use(schedule);
  const requestedAt = dueAtSchedule ? iso(scheduledAt) : deadInStoreAt;

  const confirmations = receivers.map((r) => r.confirmedAt);
  const deadEverywhereAt = confirmations.every((c): c is string => c !== null)
    ? confirmations.reduce(later, deadInStoreAt)
    : null;
  const stuck = use(afterKill.find((e) => e.kind === 'propagation.stuck'));
  const completed = use(afterKill.find((e) => e.kind === 'propagation.complete'));
  const since = (instant: string) => Date.parse(instant) - Date.parse(requestedAt);
  return {
    tokenId: row.id,
    subject: issued?.subject ?? row.subject,
    name: row.name,
    policy: row.policy,
    status,
    // An expiry not yet recorded: what its kill will record (migrations/0002 kill_token).
    reason: kill?.reason ?? 'expired',
    actor: kill?.actor ?? 'system',
    initiatingEntity: kill?.initiatingEntity ?? 'system',
    correlationId: kill?.correlationId ?? null,
    issuedAt: row.issued_at,
    expiresAt: row.expires_at,
    requestedAt,
    deadInStoreAt,
    recordedAt: killEvent?.at ?? null,
    deadEverywhereAt,
    timeToDeadInStoreMs: since(deadInStoreAt),
    timeToDeadEverywhereMs: deadEverywhereAt === null ? null : since(deadEverywhereAt),
    propagation: row.propagation,
    stuckAt: stuck?.at ?? null,
    // The kill of a token without receivers completes its propagation itself, without an event.
    propagationCompletedAt: completed?.at ?? (killEvent && receiverIds.length === 0 ? killEvent.at : null),
    eventId: kill?.eventId ?? null,
    receivers,
    auditSeqs: [...new Set(used.map((e) => e.seq))].sort((a, b) => a - b),
    asOf,
  };
}
