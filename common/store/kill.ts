/** The one kill every path uses (library, CLI, workflow, reconciler). */
import canonicalize from 'canonicalize';
import type pg from 'pg';
import { checkout, type StoreClient, type StorePool, type Tables } from '../db.js';
import { NotFoundError } from '../errors.js';
import { revocationEventId } from '../ids.js';
import { KILL_CHANNEL, type InitiatingEntity } from '../names.js';
import { sealAuditEvent } from './audit.js';
import { toToken, TOKEN_COLUMNS, type TokenRecord } from './rows.js';

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
export async function killToken(pool: StorePool, req: KillRequest): Promise<KillResult> {
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
const killSql = (t: Tables) => `WITH killed AS (
     UPDATE ${t.token}
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
     UPDATE ${t.credential} SET state = 'revoked', revoked_at = now()
      WHERE token_id = $1 AND state <> 'revoked' AND EXISTS (SELECT 1 FROM killed)
      RETURNING id)
   SELECT ${TOKEN_COLUMNS},
          ARRAY(SELECT id FROM creds ORDER BY id) AS credential_ids,
          now() AS now, head.seq AS audit_seq, head.hash AS audit_hash
     FROM killed
     LEFT JOIN LATERAL (SELECT seq, hash FROM ${t.audit_event} WHERE token_id = $1 ORDER BY seq DESC LIMIT 1) head ON true`;

/** Statement 2: one outbox row per receiver, the audit event, and the NOTIFY (sent at COMMIT). */
const killOutboxSql = (t: Tables) => `WITH outbox AS (
     INSERT INTO ${t.delivery} (event_id, receiver_id, token_id, body)
     SELECT $1, r, $2, $3 FROM unnest($4) AS r
     ON CONFLICT DO NOTHING),
   audit AS (
     INSERT INTO ${t.audit_event} (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
     VALUES ($2, $5, 'killed', $6, $7, $8, $9))
   SELECT pg_notify($10, ${sqlString(t.schema)} || ':' || $2)`;
const sqlString = (text: string) => `'${text.replaceAll("'", "''")}'`;

/**
 * Revoke's hot path runs in two round trips: `BEGIN; EXECUTE kill(…)` and `EXECUTE outbox(…); COMMIT`.
 * The statements are prepared once per connection (SQL PREPARE, so they can share a round trip with
 * BEGIN and COMMIT in the simple protocol); values are sent as literals escaped by the driver.
 */
const KILL_PREPARED = Symbol('tokenwarden kill statements prepared on this connection');
async function prepareKill(client: StoreClient & { [KILL_PREPARED]?: true }): Promise<void> {
  if (client[KILL_PREPARED]) return;
  try {
    await client.query(
      `PREPARE tokenwarden_kill(text, text, text, text, boolean, boolean, text) AS ${killSql(client.tables)};
       PREPARE tokenwarden_kill_outbox(text, text, text, text[], integer, text, text, bytea, bytea, text) AS ${killOutboxSql(client.tables)}`,
    );
  } catch (err) {
    // 42P05: already prepared on this connection (e.g. by another wrapper of the same client).
    if ((err as { code?: string }).code !== '42P05') throw err;
  }
  client[KILL_PREPARED] = true;
}

type SqlValue = string | number | boolean | null | Buffer | string[];
function literal(client: StoreClient, value: SqlValue): string {
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
const call = (client: StoreClient, name: string, values: SqlValue[]) =>
  `EXECUTE ${name}(${values.map((v) => literal(client, v)).join(', ')})`;

async function killOnce(pool: StorePool, req: KillRequest): Promise<KillResult> {
  const client = await checkout(pool);
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
async function existingFacts(client: StoreClient, req: KillRequest): Promise<KillResult> {
  const t = client.tables;
  const { rows: current } = await client.query(
    `SELECT ${TOKEN_COLUMNS}, greatest(0, ceil(extract(epoch FROM expires_at - now()) * 1000))::bigint AS remaining_ms
       FROM ${t.token} WHERE id = $1 FOR UPDATE`,
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
      `UPDATE ${t.token} SET propagation_started_at = now() WHERE id = $1 RETURNING ${TOKEN_COLUMNS}`,
      [req.tokenId],
    );
    token = toToken(updated[0]);
  }
  return { changed: false, token };
}
