/**
 * A token's credentials across rotations: `current`, `previous` (valid until its grace ends),
 * `pending` (an automatic rotation's, not yet delivered, never valid), `revoked`. Every step that
 * revokes a credential writes its credential.revoked event: one outbox row per receiver (the body
 * stored verbatim), an audit event and a NOTIFY on the kill channel (ids only), in one transaction.
 */
import { createHash } from 'node:crypto';
import type { StoreClient, StorePool } from '../db.js';
import { EVENT_ID_PREFIX, KILL_CHANNEL, type InitiatingEntity } from '../names.js';
import { appendAudit } from './audit.js';
import { inTransaction } from './rows.js';

/** The id of a credential's revocation event: the same for every path and retry. */
export const credentialRevokedEventId = (credentialId: string): string =>
  EVENT_ID_PREFIX + createHash('sha256').update(`${credentialId}:credential-revoked`).digest('hex').slice(0, 32);

/** A rotation as the workflow records it: ids and instants only. */
export interface RotationOutcome {
  credentialId: string;
  previousCredentialId: string | null;
  previousValidUntil: string | null;
  /** Credentials this step revoked that have receivers to tell, with their credential.revoked event ids. */
  revoked: { credentialId: string; eventId: string }[];
}

/** The token is dead or expired: nothing about its credentials changes. */
export class TokenNotActiveError extends Error {
  override name = 'TokenNotActiveError';
}

const iso = (v: unknown): string => new Date(v as string).toISOString();

interface LockedToken {
  id: string;
  subject: string;
  receivers: string[];
  active: boolean;
}

async function lockToken(db: StoreClient, tokenId: string): Promise<LockedToken> {
  const { rows } = await db.query(
    `SELECT id, subject, receivers, (status = 'active' AND expires_at > now()) AS active
       FROM ${db.tables.token} WHERE id = $1 FOR UPDATE`,
    [tokenId],
  );
  if (!rows[0]) throw new TokenNotActiveError(`token ${tokenId} does not exist`);
  return rows[0] as LockedToken;
}

/**
 * Writes the credential.revoked event of `credentialId`: one outbox row per receiver, an audit
 * event, the NOTIFY. Returns it when there is a receiver to tell.
 */
async function credentialRevoked(
  db: StoreClient,
  token: LockedToken,
  credentialId: string,
  why: { reason: string; actor: string; initiatingEntity: InitiatingEntity },
): Promise<{ credentialId: string; eventId: string } | undefined> {
  const eventId = credentialRevokedEventId(credentialId);
  const body = JSON.stringify({
    type: 'credential.revoked',
    token_id: token.id,
    credential_id: credentialId,
    sub_id: { format: 'opaque', id: token.subject },
    reason: why.reason,
    change_type: 'revoke',
    initiating_entity: why.initiatingEntity,
    event_timestamp: Math.floor(Date.now() / 1000),
  });
  await db.query(
    `INSERT INTO ${db.tables.delivery} (event_id, receiver_id, token_id, body)
     SELECT $1, r, $2, $3 FROM unnest($4::text[]) AS r ON CONFLICT DO NOTHING`,
    [eventId, token.id, body, token.receivers],
  );
  await appendAudit(db, token.id, `credential-revoked:${credentialId}`, 'credential.revoked', {
    credentialId,
    eventId,
    reason: why.reason,
    actor: why.actor,
    initiatingEntity: why.initiatingEntity,
    receivers: token.receivers,
  });
  await db.query('SELECT pg_notify($1, $2)', [KILL_CHANNEL, `${db.tables.schema}:${token.id}`]);
  return token.receivers.length > 0 ? { credentialId, eventId } : undefined;
}

/**
 * Moves the token to a new current credential: the `previous` one (if any) is revoked at once, the
 * current one becomes `previous` until now() + grace (revoked at once when the grace is 0).
 */
async function rotateTo(
  db: StoreClient,
  token: LockedToken,
  credentialId: string,
  graceMs: number,
  who: { actor: string; reason: string },
): Promise<RotationOutcome> {
  const revoked: RotationOutcome['revoked'] = [];
  const why = { reason: 'rotated', actor: who.actor, initiatingEntity: 'admin' as const };
  const { rows: earlier } = await db.query(
    `UPDATE ${db.tables.credential} SET state = 'revoked', revoked_at = now()
      WHERE token_id = $1 AND state = 'previous' RETURNING id`,
    [token.id],
  );
  for (const row of earlier) {
    const event = await credentialRevoked(db, token, row.id as string, why);
    if (event) revoked.push(event);
  }
  const { rows: old } = await db.query(
    `UPDATE ${db.tables.credential}
        SET state = CASE WHEN $2::bigint > 0 THEN 'previous' ELSE 'revoked' END,
            valid_until = CASE WHEN $2::bigint > 0 THEN now() + $2::bigint * interval '1 millisecond' END,
            revoked_at = CASE WHEN $2::bigint > 0 THEN NULL ELSE now() END
      WHERE token_id = $1 AND state = 'current' AND id <> $3 RETURNING id, valid_until`,
    [token.id, graceMs, credentialId],
  );
  await db.query(`UPDATE ${db.tables.credential} SET state = 'current' WHERE id = $1`, [credentialId]);
  const previous = old[0];
  if (previous && graceMs === 0) {
    const event = await credentialRevoked(db, token, previous.id as string, { ...why, reason: who.reason });
    if (event) revoked.push(event);
  }
  await appendAudit(db, token.id, `credential-rotated:${credentialId}`, 'credential.rotated', {
    credentialId,
    previousCredentialId: previous ? (previous.id as string) : null,
    graceMs,
    actor: who.actor,
    reason: who.reason,
  });
  await db.query('SELECT pg_notify($1, $2)', [KILL_CHANNEL, `${db.tables.schema}:${token.id}`]);
  return {
    credentialId,
    previousCredentialId: previous && graceMs > 0 ? (previous.id as string) : null,
    previousValidUntil: previous && graceMs > 0 ? iso(previous.valid_until) : null,
    revoked,
  };
}

/** What a repeated rotation to `credentialId` returns: the rotation as it stands. */
async function rotationAsItStands(db: StoreClient, tokenId: string, credentialId: string): Promise<RotationOutcome> {
  const { rows } = await db.query(
    `SELECT id, valid_until FROM ${db.tables.credential} WHERE token_id = $1 AND state = 'previous'`,
    [tokenId],
  );
  return {
    credentialId,
    previousCredentialId: rows[0] ? (rows[0].id as string) : null,
    previousValidUntil: rows[0] ? iso(rows[0].valid_until) : null,
    revoked: [],
  };
}

/** Manual rotation: the caller's new credential (its hash) becomes current. Idempotent by credential id. */
export async function rotateCredential(
  pool: StorePool,
  req: { tokenId: string; credentialId: string; secretHash: Buffer; graceMs: number; actor: string; reason: string },
): Promise<RotationOutcome> {
  return inTransaction(pool, async (db) => {
    const token = await lockToken(db, req.tokenId);
    const { rows } = await db.query(`SELECT token_id, state FROM ${db.tables.credential} WHERE id = $1`, [
      req.credentialId,
    ]);
    if (rows[0]) {
      if (rows[0].token_id !== req.tokenId) throw new TokenNotActiveError(`credentialId ${req.credentialId} is taken`);
      return rotationAsItStands(db, req.tokenId, req.credentialId);
    }
    if (!token.active) throw new TokenNotActiveError(`token ${req.tokenId} is not active`);
    await db.query(
      `INSERT INTO ${db.tables.credential} (id, token_id, secret_hash, state) VALUES ($1, $2, $3, 'pending')`,
      [req.credentialId, req.tokenId, req.secretHash],
    );
    return rotateTo(db, token, req.credentialId, req.graceMs, req);
  });
}

/** The credential an automatic rotation made, if any: pending (not yet delivered) or already promoted. */
export async function findRotation(
  pool: StorePool,
  rotationId: string,
): Promise<{ state: string; outcome: RotationOutcome } | undefined> {
  return inTransaction(pool, async (db) => {
    const { rows } = await db.query(`SELECT id, token_id, state FROM ${db.tables.credential} WHERE rotation_id = $1`, [
      rotationId,
    ]);
    if (!rows[0]) return undefined;
    return {
      state: rows[0].state as string,
      outcome: await rotationAsItStands(db, rows[0].token_id as string, rows[0].id as string),
    };
  });
}

/** Drops the pending credential of `rotationId` (an attempt whose secret may not have reached the owner). */
export async function discardPendingCredential(pool: StorePool, rotationId: string): Promise<void> {
  await pool.query(`DELETE FROM ${pool.tables.credential} WHERE rotation_id = $1 AND state = 'pending'`, [rotationId]);
}

export async function insertPendingCredential(
  pool: StorePool,
  req: { tokenId: string; credentialId: string; rotationId: string; secretHash: Buffer },
): Promise<void> {
  await inTransaction(pool, async (db) => {
    const token = await lockToken(db, req.tokenId);
    if (!token.active) throw new TokenNotActiveError(`token ${req.tokenId} is not active`);
    await db.query(
      `INSERT INTO ${db.tables.credential} (id, token_id, secret_hash, state, rotation_id) VALUES ($1, $2, $3, 'pending', $4)`,
      [req.credentialId, req.tokenId, req.secretHash, req.rotationId],
    );
  });
}

/** The delivered pending credential becomes current. Idempotent. */
export async function promoteCredential(
  pool: StorePool,
  req: { tokenId: string; credentialId: string; graceMs: number; actor: string; reason: string },
): Promise<RotationOutcome> {
  return inTransaction(pool, async (db) => {
    const token = await lockToken(db, req.tokenId);
    const { rows } = await db.query(`SELECT state FROM ${db.tables.credential} WHERE id = $1 AND token_id = $2`, [
      req.credentialId,
      req.tokenId,
    ]);
    if (rows[0] && rows[0].state !== 'pending') return rotationAsItStands(db, req.tokenId, req.credentialId);
    if (!rows[0] || !token.active) throw new TokenNotActiveError(`token ${req.tokenId} is not active`);
    return rotateTo(db, token, req.credentialId, req.graceMs, req);
  });
}

/**
 * The end of a previous credential's grace: `previous` → `revoked` with its credential.revoked
 * event. Repeated, it returns the same event (still to deliver); nothing when there is nobody to tell.
 */
export async function endGrace(
  pool: StorePool,
  tokenId: string,
  credentialId: string,
): Promise<{ revoked: RotationOutcome['revoked'] }> {
  return inTransaction(pool, async (db) => {
    const token = await lockToken(db, tokenId);
    const { rows } = await db.query(
      `UPDATE ${db.tables.credential} SET state = 'revoked', revoked_at = now()
        WHERE id = $1 AND token_id = $2 AND state = 'previous' RETURNING id`,
      [credentialId, tokenId],
    );
    if (rows[0]) {
      const event = await credentialRevoked(db, token, credentialId, {
        reason: 'grace_ended',
        actor: 'system:rotation',
        initiatingEntity: 'system',
      });
      return { revoked: event ? [event] : [] };
    }
    // Already ended (a retried call): its outbox rows, if any, are still to deliver.
    const eventId = credentialRevokedEventId(credentialId);
    const { rows: outbox } = await db.query(`SELECT 1 FROM ${db.tables.delivery} WHERE event_id = $1 LIMIT 1`, [
      eventId,
    ]);
    return { revoked: outbox[0] ? [{ credentialId, eventId }] : [] };
  });
}
