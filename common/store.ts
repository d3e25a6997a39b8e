/**
 * The central store: every SQL statement of tokenwarden lives here. Validity is decided by the
 * database clock: a token is valid iff `status = 'active' AND expires_at > now()`.
 */
import canonicalize from 'canonicalize';
import type pg from 'pg';
import { createHash } from 'node:crypto';
import { revocationEventId } from './ids.js';
import { z } from 'zod';
import {
  DELIVERY_STATES,
  INITIATING_ENTITIES,
  KILL_CHANNEL,
  PROPAGATION_STATES,
  TOKEN_STATUSES,
  type DeliveryState,
  type InitiatingEntity,
  type PropagationState,
  type TokenStatus,
} from './names.js';
import { InvalidInputError, NotFoundError } from './errors.js';

type Queryable = pg.Pool | pg.PoolClient;

export interface TokenRecord {
  id: string;
  subject: string;
  name: string | null;
  scopes: string[];
  receivers: string[];
  /** The stored status. */
  status: TokenStatus;
  /** What a verifier sees now: an active row past its expiry is already `expired`. */
  effectiveStatus: TokenStatus;
  valid: boolean;
  propagation: PropagationState;
  issuedAt: string;
  expiresAt: string;
  revokedAt: string | null;
  revokedBy: string | null;
  revokeReason: string | null;
  initiatingEntity: InitiatingEntity | null;
  revokeRequestId: string | null;
  workflowStartedAt: string | null;
  propagationStartedAt: string | null;
  propagationCompletedAt: string | null;
}

export interface DeliveryRecord {
  eventId: string;
  receiverId: string;
  tokenId: string;
  status: DeliveryState;
  attempts: number;
  lastStatusCode: number | null;
  lastError: string | null;
  lastAttemptAt: string | null;
  ackedAt: string | null;
}

export interface ReceiverRecord {
  id: string;
  kind: 'webhook';
  url: string;
  enabled: boolean;
  createdAt: string;
  removedAt: string | null;
}

export interface AuditRecord {
  seq: number;
  kind: string;
  canonical: string;
  hash: string;
  prevHash: string | null;
}

const TOKEN_COLUMNS = `
  id, subject, name, scopes, receivers, status, propagation, issued_at, expires_at, revoked_at,
  revoked_by, revoke_reason, initiating_entity, revoke_request_id, workflow_started_at, propagation_started_at,
  propagation_completed_at,
  CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END AS effective_status,
  (status = 'active' AND expires_at > now()) AS valid`;

// Rows are parsed, not cast: a row the code does not expect (a manual edit, a schema drift) fails
// loudly with the column named instead of travelling on as a wrong fact.
const date = z.date().transform((d) => d.toISOString());
const nullableDate = date.nullable();
const nullableText = z.string().nullable();

const tokenRow = z
  .object({
    id: z.string(),
    subject: z.string(),
    name: nullableText,
    scopes: z.array(z.string()),
    receivers: z.array(z.string()),
    status: z.enum(TOKEN_STATUSES),
    effective_status: z.enum(TOKEN_STATUSES),
    valid: z.boolean(),
    propagation: z.enum(PROPAGATION_STATES),
    issued_at: date,
    expires_at: date,
    revoked_at: nullableDate,
    revoked_by: nullableText,
    revoke_reason: nullableText,
    initiating_entity: z.enum(INITIATING_ENTITIES).nullable(),
    revoke_request_id: nullableText,
    workflow_started_at: nullableDate,
    propagation_started_at: nullableDate,
    propagation_completed_at: nullableDate,
  })
  .transform((r): TokenRecord => ({
    id: r.id,
    subject: r.subject,
    name: r.name,
    scopes: r.scopes,
    receivers: r.receivers,
    status: r.status,
    effectiveStatus: r.effective_status,
    valid: r.valid,
    propagation: r.propagation,
    issuedAt: r.issued_at,
    expiresAt: r.expires_at,
    revokedAt: r.revoked_at,
    revokedBy: r.revoked_by,
    revokeReason: r.revoke_reason,
    initiatingEntity: r.initiating_entity,
    revokeRequestId: r.revoke_request_id,
    workflowStartedAt: r.workflow_started_at,
    propagationStartedAt: r.propagation_started_at,
    propagationCompletedAt: r.propagation_completed_at,
  }));

const deliveryRow = z
  .object({
    event_id: z.string(),
    receiver_id: z.string(),
    token_id: z.string(),
    status: z.enum(DELIVERY_STATES),
    attempts: z.number().int().nonnegative(),
    last_status_code: z.number().int().nullable(),
    last_error: nullableText,
    last_attempt_at: nullableDate,
    acked_at: nullableDate,
  })
  .transform((r): DeliveryRecord => ({
    eventId: r.event_id,
    receiverId: r.receiver_id,
    tokenId: r.token_id,
    status: r.status,
    attempts: r.attempts,
    lastStatusCode: r.last_status_code,
    lastError: r.last_error,
    lastAttemptAt: r.last_attempt_at,
    ackedAt: r.acked_at,
  }));

const receiverRow = z
  .object({
    id: z.string(),
    kind: z.literal('webhook'),
    url: z.string(),
    enabled: z.boolean(),
    created_at: date,
    removed_at: nullableDate,
  })
  .transform((r): ReceiverRecord => ({
    id: r.id,
    kind: r.kind,
    url: r.url,
    enabled: r.enabled,
    createdAt: r.created_at,
    removedAt: r.removed_at,
  }));

function parseRow<T>(schema: z.ZodType<T>, table: string, row: unknown): T {
  const result = schema.safeParse(row);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  throw new Error(`unexpected ${table} row in the store: ${issue?.path.join('.')}: ${issue?.message}`);
}

const toToken = (row: unknown) => parseRow(tokenRow, 'token', row);
const toDelivery = (row: unknown) => parseRow(deliveryRow, 'delivery', row);
const toReceiver = (row: unknown) => parseRow(receiverRow, 'receiver', row);

export async function inTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

// ---------------------------------------------------------------- audit

/**
 * Appends one event to the token's hash chain, in the caller's transaction. Takes the token row's
 * lock so concurrent writers cannot fork the chain; a repeated idempotency key is a no-op, so a
 * retried activity does not log twice.
 */
export async function appendAudit(
  client: pg.PoolClient,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  await client.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [tokenId]);
  const { rows } = await client.query(
    `SELECT now() AS now,
            (SELECT 1 FROM audit_event WHERE token_id = $1 AND idempotency_key = $2) AS seen,
            last.seq, last.hash
       FROM (SELECT 1) one
       LEFT JOIN LATERAL (SELECT seq, hash FROM audit_event WHERE token_id = $1 ORDER BY seq DESC LIMIT 1) last ON true`,
    [tokenId, idempotencyKey],
  );
  const head = rows[0] as { now: Date; seen: number | null; seq: number | null; hash: Buffer | null };
  if (head.seen) return;
  const event = sealAuditEvent(tokenId, head, kind, data);
  await client.query(
    `INSERT INTO audit_event (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
     VALUES ($1, $2, $3, $4, $5, $6, $7)`,
    [tokenId, event.seq, idempotencyKey, kind, event.canonical, head.hash, event.hash],
  );
}

/** The next link of a token's chain: canonical JSON (RFC 8785) of the event, and its SHA-256. */
function sealAuditEvent(
  tokenId: string,
  head: { now: Date; seq: number | null; hash: Buffer | null },
  kind: string,
  data: Record<string, unknown>,
): { seq: number; canonical: string; hash: Buffer } {
  const seq = (head.seq ?? 0) + 1;
  const prevHash = head.hash ? head.hash.toString('hex') : null;
  const canonical = canonicalize({ tokenId, seq, kind, at: head.now.toISOString(), prevHash, data });
  if (canonical === undefined) throw new Error('audit event is not serialisable');
  return { seq, canonical, hash: createHash('sha256').update(canonical, 'utf8').digest() };
}

export async function recordAudit(
  pool: pg.Pool,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  await inTransaction(pool, (client) => appendAudit(client, tokenId, idempotencyKey, kind, data));
}

export async function readAudit(db: Queryable, tokenId: string): Promise<AuditRecord[]> {
  const { rows } = await db.query(
    'SELECT seq, kind, canonical, hash, prev_hash FROM audit_event WHERE token_id = $1 ORDER BY seq',
    [tokenId],
  );
  return rows.map((r) => ({
    seq: r.seq as number,
    kind: r.kind as string,
    canonical: r.canonical as string,
    hash: (r.hash as Buffer).toString('hex'),
    prevHash: r.prev_hash ? (r.prev_hash as Buffer).toString('hex') : null,
  }));
}

/** Recomputes the chain; returns the seq of the first broken link, or null when intact. */
export function findBrokenAuditLink(events: AuditRecord[]): number | null {
  let prev: string | null = null;
  for (const event of events) {
    const hash = createHash('sha256').update(event.canonical, 'utf8').digest('hex');
    const body = JSON.parse(event.canonical) as { prevHash: string | null; seq: number };
    if (hash !== event.hash || event.prevHash !== prev || body.prevHash !== prev || body.seq !== event.seq) {
      return event.seq;
    }
    prev = hash;
  }
  return null;
}

// ---------------------------------------------------------------- receivers

export async function insertReceiver(
  pool: pg.Pool,
  receiver: { id: string; url: string; secretCiphertext: Buffer; secretKeyId: string },
): Promise<ReceiverRecord> {
  const { rows } = await pool.query(
    `INSERT INTO receiver (id, url, secret_ciphertext, secret_key_id) VALUES ($1, $2, $3, $4)
     ON CONFLICT (id) DO NOTHING RETURNING *`,
    [receiver.id, receiver.url, receiver.secretCiphertext, receiver.secretKeyId],
  );
  if (!rows[0]) {
    throw new InvalidInputError(`invalid receiver: id: receiver ${JSON.stringify(receiver.id)} already exists`, [
      { path: 'id', message: 'already exists' },
    ]);
  }
  return toReceiver(rows[0]);
}

export async function listReceivers(db: Queryable): Promise<ReceiverRecord[]> {
  const { rows } = await db.query('SELECT * FROM receiver WHERE removed_at IS NULL ORDER BY id');
  return rows.map(toReceiver);
}

/** Removal keeps the row (deliveries reference it) and stops new tokens from naming it. */
export async function removeReceiver(db: Queryable, id: string): Promise<ReceiverRecord> {
  const { rows } = await db.query(
    `UPDATE receiver SET enabled = false, removed_at = coalesce(removed_at, now()) WHERE id = $1 RETURNING *`,
    [id],
  );
  if (!rows[0]) throw new NotFoundError('receiver', id);
  return toReceiver(rows[0]);
}

export async function loadReceiverSecret(
  db: Queryable,
  id: string,
): Promise<{ receiver: ReceiverRecord; ciphertext: Buffer; keyId: string } | undefined> {
  const { rows } = await db.query('SELECT * FROM receiver WHERE id = $1', [id]);
  const row = rows[0];
  if (!row) return undefined;
  return { receiver: toReceiver(row), ciphertext: row.secret_ciphertext as Buffer, keyId: row.secret_key_id as string };
}

// ---------------------------------------------------------------- tokens

export interface NewToken {
  tokenId: string;
  credentialId: string;
  subject: string;
  name: string | null;
  scopes: string[];
  receivers: string[];
  ttlMs: number;
  secretHash: Buffer;
}

/** Writes an active token and its current credential (hash only); expiry comes from the database clock. */
export async function insertToken(pool: pg.Pool, token: NewToken): Promise<TokenRecord> {
  return inTransaction(pool, async (client) => {
    if (token.receivers.length > 0) {
      const { rows } = await client.query('SELECT id FROM receiver WHERE id = ANY($1::text[]) AND enabled FOR SHARE', [
        token.receivers,
      ]);
      const known = new Set(rows.map((r) => r.id as string));
      const unknown = token.receivers.filter((r) => !known.has(r));
      if (unknown.length > 0) {
        throw new InvalidInputError(
          `invalid token request: receivers: unknown or removed receiver ${unknown.join(', ')}`,
          [{ path: 'receivers', message: `unknown or removed receiver ${unknown.join(', ')}` }],
        );
      }
    }
    const { rows } = await client.query(
      `INSERT INTO token (id, subject, name, scopes, receivers, expires_at)
       VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')
       RETURNING ${TOKEN_COLUMNS}`,
      [token.tokenId, token.subject, token.name, token.scopes, token.receivers, token.ttlMs],
    );
    await client.query(`INSERT INTO credential (id, token_id, secret_hash, state) VALUES ($1, $2, $3, 'current')`, [
      token.credentialId,
      token.tokenId,
      token.secretHash,
    ]);
    const record = toToken(rows[0]);
    await appendAudit(client, token.tokenId, 'issued', 'token.issued', {
      subject: record.subject,
      credentialId: token.credentialId,
      receivers: record.receivers,
      scopes: record.scopes,
      expiresAt: record.expiresAt,
    });
    return record;
  });
}

export async function markWorkflowStarted(db: Queryable, tokenId: string): Promise<void> {
  await db.query('UPDATE token SET workflow_started_at = coalesce(workflow_started_at, now()) WHERE id = $1', [
    tokenId,
  ]);
}

export async function getToken(db: Queryable, tokenId: string): Promise<TokenRecord | undefined> {
  const { rows } = await db.query(`SELECT ${TOKEN_COLUMNS} FROM token WHERE id = $1`, [tokenId]);
  return rows[0] ? toToken(rows[0]) : undefined;
}

export async function requireToken(db: Queryable, tokenId: string): Promise<TokenRecord> {
  const token = await getToken(db, tokenId);
  if (!token) throw new NotFoundError('token', tokenId);
  return token;
}

export async function listTokens(
  db: Queryable,
  filter: { subject?: string; status?: TokenStatus; limit: number },
): Promise<TokenRecord[]> {
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM token
      WHERE ($1::text IS NULL OR subject = $1)
        AND ($2::text IS NULL OR CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END = $2)
      ORDER BY id DESC LIMIT $3`,
    [filter.subject ?? null, filter.status ?? null, filter.limit],
  );
  return rows.map(toToken);
}

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
 * The one kill used by every path. One transaction: status (expired if past expiry, else revoked),
 * credentials revoked, one outbox row per receiver, an audit event, NOTIFY. Idempotent: when the
 * token is already dead nothing changes and the existing facts are returned.
 */
export async function killToken(pool: pg.Pool, req: KillRequest): Promise<KillResult> {
  // Statement 1 reads the audit head with the snapshot taken before it waited for the row lock, so a
  // writer that appended to this token's chain meanwhile makes our seq collide: the transaction
  // rolls back whole and runs again on a fresh snapshot.
  for (let attempt = 1; ; attempt++) {
    try {
      return await killOnce(pool, req);
    } catch (err) {
      const pgErr = err as { code?: string; constraint?: string };
      if (attempt >= 5 || pgErr.code !== '23505' || pgErr.constraint !== 'audit_event_pkey') throw err;
    }
  }
}

/** Statement 1 of the kill: the token, its credentials, and what the audit chain needs next. */
const KILL_SQL = `WITH killed AS (
     UPDATE token
        SET status = CASE WHEN expires_at <= now() THEN 'expired' ELSE 'revoked' END,
            revoked_at = now(), revoked_by = $2,
            revoke_reason = CASE WHEN expires_at <= now() THEN 'expired' ELSE $3 END,
            initiating_entity = CASE WHEN expires_at <= now() THEN 'system' ELSE $4 END,
            propagation = CASE WHEN cardinality(receivers) = 0 THEN 'complete' ELSE 'pending' END,
            propagation_completed_at = CASE WHEN cardinality(receivers) = 0 THEN now() END,
            propagation_started_at = CASE WHEN $5 THEN now() END,
            revoke_request_id = $7
      WHERE id = $1 AND status = 'active' AND (NOT $6 OR expires_at <= now())
      RETURNING *),
   creds AS (
     UPDATE credential SET state = 'revoked', revoked_at = now()
      WHERE token_id = $1 AND state <> 'revoked' AND EXISTS (SELECT 1 FROM killed)
      RETURNING id)
   SELECT ${TOKEN_COLUMNS},
          ARRAY(SELECT id FROM creds ORDER BY id) AS credential_ids,
          now() AS now, head.seq AS audit_seq, head.hash AS audit_hash
     FROM killed
     LEFT JOIN LATERAL (SELECT seq, hash FROM audit_event WHERE token_id = $1 ORDER BY seq DESC LIMIT 1) head ON true`;

/** Statement 2: one outbox row per receiver, the audit event, and the NOTIFY (sent at COMMIT). */
const KILL_OUTBOX_SQL = `WITH outbox AS (
     INSERT INTO delivery (event_id, receiver_id, token_id, body)
     SELECT $1, r, $2, $3 FROM unnest($4) AS r
     ON CONFLICT DO NOTHING),
   audit AS (
     INSERT INTO audit_event (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
     VALUES ($2, $5, 'killed', $6, $7, $8, $9))
   SELECT pg_notify($10, current_schema() || ':' || $2)`;

/**
 * Revoke's hot path runs in two round trips: `BEGIN; EXECUTE kill(…)` and `EXECUTE outbox(…); COMMIT`.
 * The statements are prepared once per connection (SQL PREPARE, so they can share a round trip with
 * BEGIN and COMMIT in the simple protocol); values are sent as literals escaped by the driver.
 */
const KILL_PREPARED = Symbol('tokenwarden kill statements prepared on this connection');
async function prepareKill(client: pg.PoolClient & { [KILL_PREPARED]?: true }): Promise<void> {
  if (client[KILL_PREPARED]) return;
  try {
    await client.query(
      `PREPARE tokenwarden_kill(text, text, text, text, boolean, boolean, text) AS ${KILL_SQL};
       PREPARE tokenwarden_kill_outbox(text, text, text, text[], integer, text, text, bytea, bytea, text) AS ${KILL_OUTBOX_SQL}`,
    );
  } catch (err) {
    // 42P05: already prepared on this connection (e.g. by another wrapper of the same client).
    if ((err as { code?: string }).code !== '42P05') throw err;
  }
  client[KILL_PREPARED] = true;
}

type SqlValue = string | number | boolean | null | Buffer | string[];
function literal(client: pg.PoolClient, value: SqlValue): string {
  if (value === null) return 'NULL';
  if (typeof value === 'boolean') return value ? 'TRUE' : 'FALSE';
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) throw new Error(`not an integer: ${value}`);
    return String(value);
  }
  if (Buffer.isBuffer(value)) return `decode('${value.toString('hex')}', 'hex')`;
  if (Array.isArray(value)) return `ARRAY[${value.map((v) => client.escapeLiteral(v)).join(', ')}]::text[]`;
  return client.escapeLiteral(value);
}
const call = (client: pg.PoolClient, name: string, values: SqlValue[]) =>
  `EXECUTE ${name}(${values.map((v) => literal(client, v)).join(', ')})`;

async function killOnce(pool: pg.Pool, req: KillRequest): Promise<KillResult> {
  const client = await pool.connect();
  try {
    await prepareKill(client);
    const results = (await client.query(
      `BEGIN; ${call(client, 'tokenwarden_kill', [
        req.tokenId,
        req.actor,
        req.reason,
        req.initiatingEntity,
        req.byWorkflow ?? false,
        req.onlyIfExpired ?? false,
        req.requestId ?? null,
      ])}`,
    )) as unknown as pg.QueryResult[];
    const rows = results[1]!.rows;
    if (!rows[0]) {
      const facts = await existingFacts(client, req);
      await client.query('COMMIT');
      return facts;
    }
    const row = rows[0] as Record<string, unknown> & {
      credential_ids: string[];
      now: Date;
      audit_seq: number | null;
      audit_hash: Buffer | null;
    };
    const token = toToken(row);
    const credentialIds = row.credential_ids;
    const eventId = revocationEventId(token.id);
    const kind = token.status === 'expired' ? 'token.expired' : 'token.revoked';
    const body = canonicalize({
      id: eventId,
      type: kind,
      // CAEP credential-change vocabulary, so receivers that speak SSF/CAEP can map it directly.
      change_type: 'revoke',
      credential_type: 'api-token',
      token_id: token.id,
      credential_ids: credentialIds,
      sub_id: { format: 'opaque', id: token.subject },
      reason: token.revokeReason,
      initiating_entity: token.initiatingEntity,
      actor: token.revokedBy,
      event_timestamp: Math.floor(Date.parse(token.revokedAt!) / 1000),
      occurred_at: token.revokedAt,
      txn: req.correlationId ?? null,
    })!;
    const audit = sealAuditEvent(token.id, { now: row.now, seq: row.audit_seq, hash: row.audit_hash }, kind, {
      reason: token.revokeReason,
      actor: token.revokedBy,
      initiatingEntity: token.initiatingEntity,
      credentialIds,
      eventId,
      receivers: token.receivers,
      correlationId: req.correlationId ?? null,
    });
    await client.query(
      `${call(client, 'tokenwarden_kill_outbox', [
        eventId,
        token.id,
        body,
        token.receivers,
        audit.seq,
        kind,
        audit.canonical,
        row.audit_hash,
        audit.hash,
        KILL_CHANNEL,
      ])}; COMMIT`,
    );
    return { changed: true, token };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

/** The kill changed nothing: the token is already dead (its first kill's facts) or not yet expired. */
async function existingFacts(client: pg.PoolClient, req: KillRequest): Promise<KillResult> {
  const { rows: current } = await client.query(
    `SELECT ${TOKEN_COLUMNS}, greatest(0, ceil(extract(epoch FROM expires_at - now()) * 1000))::bigint AS remaining_ms
       FROM token WHERE id = $1 FOR UPDATE`,
    [req.tokenId],
  );
  const row = current[0];
  if (!row) throw new NotFoundError('token', req.tokenId);
  let token = toToken(row);
  if (token.status === 'active') {
    return { changed: false, notYetExpiredMs: Math.max(1, Number(row.remaining_ms)), token };
  }
  if (req.byWorkflow && !token.propagationStartedAt) {
    const { rows: updated } = await client.query(
      `UPDATE token SET propagation_started_at = now() WHERE id = $1 RETURNING ${TOKEN_COLUMNS}`,
      [req.tokenId],
    );
    token = toToken(updated[0]);
  }
  return { changed: false, token };
}

// ---------------------------------------------------------------- deliveries

export async function listDeliveries(db: Queryable, tokenId: string): Promise<DeliveryRecord[]> {
  const { rows } = await db.query('SELECT * FROM delivery WHERE token_id = $1 ORDER BY receiver_id', [tokenId]);
  return rows.map(toDelivery);
}

export async function loadDeliveryForAttempt(
  db: Queryable,
  eventId: string,
  receiverId: string,
): Promise<{ delivery: DeliveryRecord; body: string } | undefined> {
  const { rows } = await db.query('SELECT * FROM delivery WHERE event_id = $1 AND receiver_id = $2', [
    eventId,
    receiverId,
  ]);
  return rows[0] ? { delivery: toDelivery(rows[0]), body: rows[0].body as string } : undefined;
}

export type AttemptOutcome =
  | { kind: 'delivered'; statusCode: number }
  | { kind: 'retryable'; statusCode: number | null; error: string }
  | { kind: 'rejected'; statusCode: number; error: string }
  | { kind: 'cancelled'; error: string };

/**
 * Records one delivery attempt. A delivery already settled (delivered, forced, cancelled) is never
 * moved back; the returned row says what the store holds.
 */
export async function recordDeliveryAttempt(
  pool: pg.Pool,
  eventId: string,
  receiverId: string,
  outcome: AttemptOutcome,
): Promise<DeliveryRecord> {
  const status = { delivered: 'delivered', retryable: 'pending', rejected: 'failed', cancelled: 'cancelled' }[
    outcome.kind
  ];
  return inTransaction(pool, async (client) => {
    const { rows } = await client.query(
      `UPDATE delivery
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
      (await client.query('SELECT * FROM delivery WHERE event_id = $1 AND receiver_id = $2', [eventId, receiverId]))
        .rows[0];
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
  pool: pg.Pool,
  tokenId: string,
  state: Exclude<PropagationState, 'none'>,
  auditKey: string,
  detail: Record<string, unknown>,
): Promise<TokenRecord> {
  return inTransaction(pool, async (client) => {
    if (state === 'complete') {
      const { rows } = await client.query(
        `SELECT receiver_id FROM delivery WHERE token_id = $1 AND status IN ('pending', 'failed')`,
        [tokenId],
      );
      if (rows.length > 0) {
        throw new Error(
          `propagation of ${tokenId} is not complete: ${rows.map((r) => r.receiver_id).join(', ')} unsettled`,
        );
      }
    }
    const { rows } = await client.query(
      `UPDATE token SET propagation = $2,
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
  pool: pg.Pool,
  tokenId: string,
  auditKey: string,
  reason: string,
  actor: string,
): Promise<string[]> {
  return inTransaction(pool, async (client) => {
    const { rows } = await client.query(
      `UPDATE delivery SET status = 'forced' WHERE token_id = $1 AND status IN ('pending', 'failed') RETURNING receiver_id`,
      [tokenId],
    );
    const receivers = rows.map((r) => r.receiver_id as string).sort();
    await appendAudit(client, tokenId, auditKey, 'propagation.forced', { reason, actor, receivers });
    return receivers;
  });
}

// ---------------------------------------------------------------- reconciler

/** Active rows past expiry (plus grace): the expiry timer did not fire or its worker was down. */
export async function findOverdueTokens(db: Queryable, graceMs: number, limit: number): Promise<string[]> {
  const { rows } = await db.query(
    `SELECT id FROM token WHERE status = 'active' AND expires_at <= now() - $1 * interval '1 millisecond'
      ORDER BY expires_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map((r) => r.id as string);
}

/** Active rows whose workflow was never confirmed started (the issuer died between commit and start). */
export async function findUnstartedTokens(db: Queryable, graceMs: number, limit: number): Promise<TokenRecord[]> {
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM token
      WHERE workflow_started_at IS NULL AND status = 'active' AND issued_at <= now() - $1 * interval '1 millisecond'
      ORDER BY issued_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}

/** Dead rows whose workflow never took over propagation (a crash between the kill and the signal). */
export async function findUntoldTokens(db: Queryable, graceMs: number, limit: number): Promise<TokenRecord[]> {
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM token
      WHERE status <> 'active' AND propagation_started_at IS NULL AND revoked_at <= now() - $1 * interval '1 millisecond'
      ORDER BY revoked_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}

/** Dead tokens whose propagation started but has not completed: the reconciler checks their workflow runs. */
export async function findUnfinishedPropagations(
  db: Queryable,
  graceMs: number,
  limit: number,
): Promise<TokenRecord[]> {
  const { rows } = await db.query(
    `SELECT ${TOKEN_COLUMNS} FROM token
      WHERE status <> 'active' AND propagation IN ('pending', 'stuck')
        AND propagation_started_at <= now() - $1 * interval '1 millisecond'
      ORDER BY propagation_started_at LIMIT $2`,
    [graceMs, limit],
  );
  return rows.map(toToken);
}
