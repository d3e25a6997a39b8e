/**
 * A token's credentials (secret versions): rotation with a grace for the previous one, pending
 * credentials of automatic rotation, the end of a grace. Every write is one statement calling the
 * store's functions (migrations/0015), audited in the same transaction, idempotent on retry.
 */
import { z } from 'zod';
import type { Queryable } from '../db.js';
import { InvalidInputError, NotFoundError, TokenNotActiveError } from '../errors.js';
import { quoteIdent as quote } from '../identifiers.js';
import { credentialRevocationEventId } from '../ids.js';
import { CREDENTIAL_STATES, CHANGE_CHANNEL, type CredentialState, type InitiatingEntity } from '../names.js';
import { parseRow, routine } from './rows.js';

export interface CredentialRecord {
  id: string;
  tokenId: string;
  state: CredentialState;
  createdAt: string;
  /** End of the grace of a `previous` credential. */
  validUntil: string | null;
  revokedAt: string | null;
  /** The automatic rotation that made it (null: issued, or rotated by hand). */
  rotationId: string | null;
  /** Accepted now by the verifier if its token is valid: current, or previous in its grace. */
  accepted: boolean;
}

export interface RotationRequest {
  tokenId: string;
  credentialId: string;
  /** SHA-256 of the new token string (32 bytes). */
  secretHash: Buffer;
  /** How long the old current credential stays valid (0: not at all, e.g. a suspicious token). */
  graceMs: number;
  actor: string;
  reason: string;
  /** Of the credential.revoked event of a previous credential this rotation supersedes (default admin). */
  initiatingEntity?: InitiatingEntity;
}

export interface RotationResult {
  /** False when this credential had been promoted before (a retry): the facts of that promotion. */
  changed: boolean;
  credentialId: string;
  previousCredentialId: string | null;
  /** When the previous credential stops being valid (database clock); null when there was none. */
  previousValidUntil: string | null;
  /** A credential still in an earlier grace, revoked at once (its credential.revoked event is in the outbox). */
  supersededCredentialId: string | null;
  /** The event to deliver for the superseded credential (null when none was superseded). */
  supersededEventId: string | null;
}

export interface PendingCredentialRequest {
  tokenId: string;
  credentialId: string;
  secretHash: Buffer;
  /** Deterministic id of the workflow's automatic rotation (`<tokenId>:rot:<n>`). */
  rotationId: string;
}

export interface EndGraceResult {
  /** True when this call revoked the credential (false: revoked before, by a rotation or the token's kill). */
  changed: boolean;
  /** Deterministic id of its credential.revoked event (credentialRevocationEventId). */
  eventId: string;
  /** Receivers holding an outbox row for that event: deliver to each with deliverRevocation. */
  receivers: string[];
  /**
   * Set when the credential's valid_until is still ahead on the database clock (the workflow's
   * clock ran ahead): nothing was revoked; call again after this many milliseconds.
   */
  notYetEndedMs?: number;
}

const date = z.date().transform((d) => d.toISOString());
const credentialRow = z
  .object({
    id: z.string(),
    token_id: z.string(),
    state: z.enum(CREDENTIAL_STATES),
    created_at: date,
    valid_until: date.nullable(),
    revoked_at: date.nullable(),
    rotation_id: z.string().nullable(),
    accepted: z.boolean(),
  })
  .transform((r): CredentialRecord => ({
    id: r.id,
    tokenId: r.token_id,
    state: r.state,
    createdAt: r.created_at,
    validUntil: r.valid_until,
    revokedAt: r.revoked_at,
    rotationId: r.rotation_id,
    accepted: r.accepted,
  }));
const toCredential = (row: unknown) => parseRow(credentialRow, 'credential', row);

const credentialColumns = (schema: string) =>
  `id, token_id, state, created_at, valid_until, revoked_at, rotation_id,
   ${schema}.credential_accepted(state, valid_until) AS accepted`;

/** Maps the store's refusals to typed errors; anything else is rethrown as it is. */
export function storeRefusal(err: unknown, tokenId: string): never {
  const e = err as { code?: string; constraint?: string; message?: string };
  if (e.code === '55000' && e.constraint === 'token_not_active') throw new TokenNotActiveError(tokenId, e.message!);
  if (
    e.code === '23514' &&
    (e.constraint === 'credential_not_pending' || e.constraint === 'credential_superseded_while_pending')
  ) {
    throw new InvalidInputError(e.message!, [{ path: 'credentialId', message: e.message! }]);
  }
  if (e.code === '23505' && (e.constraint === 'credential_pkey' || e.constraint === 'credential_rotation_id_key')) {
    throw new InvalidInputError(`credentialId: ${e.message}`, [{ path: 'credentialId', message: e.message! }]);
  }
  if (e.code === '23505' && e.constraint === 'credential_secret_hash_key') {
    throw new InvalidInputError('secretHash: this secret is already in use', [
      { path: 'secretHash', message: 'already in use' },
    ]);
  }
  throw err;
}

const schemaOf = (db: Queryable) => db.tables.schema;

interface PromotionRow {
  changed: boolean;
  current_credential_id: string;
  previous_credential_id: string | null;
  previous_valid_until: Date | null;
  superseded_credential_id: string | null;
}

const toRotation = (row: PromotionRow, supersededEventId: (id: string) => string): RotationResult => ({
  changed: row.changed,
  credentialId: row.current_credential_id,
  previousCredentialId: row.previous_credential_id,
  previousValidUntil: row.previous_valid_until?.toISOString() ?? null,
  supersededCredentialId: row.superseded_credential_id,
  supersededEventId: row.superseded_credential_id ? supersededEventId(row.superseded_credential_id) : null,
});

/**
 * A manual rotation: the caller's new credential (its hash) becomes current, the old current becomes
 * previous until now() + graceMs on the database clock, and a credential still previous from an
 * earlier rotation is revoked at once (its own credential.revoked outbox rows). One transaction;
 * idempotent by credentialId. Throws TokenNotActiveError for a dead or expired token, NotFoundError
 * for an unknown one.
 */
export async function rotateCredential(db: Queryable, req: RotationRequest): Promise<RotationResult> {
  try {
    const { rows } = await db.query<PromotionRow>(
      `SELECT * FROM ${routine(db.tables, 'rotate_credential')}($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
      [
        schemaOf(db),
        req.tokenId,
        req.credentialId,
        req.secretHash,
        Math.round(req.graceMs),
        req.actor,
        req.reason,
        req.initiatingEntity ?? 'admin',
        CHANGE_CHANNEL,
      ],
    );
    if (!rows[0]) throw new NotFoundError('token', req.tokenId);
    return toRotation(rows[0], credentialRevocationEventId);
  } catch (err) {
    return storeRefusal(err, req.tokenId);
  }
}

/**
 * Stores an automatic rotation's credential as `pending` (never valid) before its secret is sent to
 * the owner. Idempotent by credentialId. Throws TokenNotActiveError / NotFoundError.
 */
export async function insertPendingCredential(db: Queryable, req: PendingCredentialRequest): Promise<CredentialRecord> {
  const s = schemaOf(db);
  try {
    const { rows } = await db.query(
      `SELECT ${credentialColumns(quote(s))}
         FROM ${routine(db.tables, 'insert_pending_credential')}($1, $2, $3, $4)`,
      [req.tokenId, req.credentialId, req.secretHash, req.rotationId],
    );
    if (!rows[0]) throw new NotFoundError('token', req.tokenId);
    return toCredential(rows[0]);
  } catch (err) {
    return storeRefusal(err, req.tokenId);
  }
}

/**
 * Before an automatic rotation (re)starts: drops the rotation's pending credential, whose secret was
 * lost with a crash. Returns what it found: null (the rotation stored nothing), a pending credential
 * (now deleted), or a credential already promoted (the rotation completed: do not rotate again).
 */
export async function discardPendingCredential(
  db: Queryable,
  tokenId: string,
  rotationId: string,
): Promise<CredentialRecord | null> {
  const { rows } = await db.query(
    `SELECT ${credentialColumns(quote(schemaOf(db)))}
       FROM ${routine(db.tables, 'discard_pending_credential')}($1, $2)`,
    [tokenId, rotationId],
  );
  return rows[0] ? toCredential(rows[0]) : null;
}

/**
 * Makes a pending credential current once its secret reached the owner (old current → previous
 * with its grace; an older previous revoked at once). Idempotent: a credential promoted before
 * returns the facts of that promotion with changed = false.
 */
export async function promoteCredential(
  db: Queryable,
  req: {
    tokenId: string;
    credentialId: string;
    graceMs: number;
    actor: string;
    reason: string;
    initiatingEntity?: InitiatingEntity;
  },
): Promise<RotationResult> {
  try {
    const { rows } = await db.query<PromotionRow>(
      `SELECT * FROM ${routine(db.tables, 'promote_credential')}($1, $2, $3, $4, $5, $6, $7, $8)`,
      [
        schemaOf(db),
        req.tokenId,
        req.credentialId,
        Math.round(req.graceMs),
        req.actor,
        req.reason,
        req.initiatingEntity ?? 'system',
        CHANGE_CHANNEL,
      ],
    );
    if (!rows[0]) throw new NotFoundError('token', req.tokenId);
    return toRotation(rows[0], credentialRevocationEventId);
  } catch (err) {
    return storeRefusal(err, req.tokenId);
  }
}

/**
 * The end of a previous credential's grace: revoked, one outbox row per receiver of its
 * credential.revoked event (deterministic id), audited, NOTIFY. Idempotent: a credential revoked
 * before (by a later rotation, or the token's kill) changes nothing and returns the same event id.
 */
export async function endGrace(
  db: Queryable,
  req: { tokenId: string; credentialId: string; actor?: string },
): Promise<EndGraceResult> {
  const { rows } = await db.query<{
    changed: boolean;
    event_id: string;
    receivers: string[];
    remaining_ms: string | null;
  }>(`SELECT * FROM ${routine(db.tables, 'end_grace')}($1, $2, $3, $4, $5)`, [
    schemaOf(db),
    req.tokenId,
    req.credentialId,
    req.actor ?? 'system',
    CHANGE_CHANNEL,
  ]);
  const row = rows[0];
  if (!row) throw new NotFoundError('token', req.tokenId);
  return {
    changed: row.changed,
    eventId: row.event_id,
    receivers: row.receivers,
    ...(typeof row.remaining_ms === 'string' ? { notYetEndedMs: Number(row.remaining_ms) } : {}),
  };
}

/** A token's credentials, oldest first. */
export async function listCredentials(db: Queryable, tokenId: string): Promise<CredentialRecord[]> {
  const { rows } = await db.query(
    `SELECT ${credentialColumns(quote(schemaOf(db)))} FROM ${db.tables.credential}
      WHERE token_id = $1 ORDER BY created_at, id`,
    [tokenId],
  );
  return rows.map(toCredential);
}
