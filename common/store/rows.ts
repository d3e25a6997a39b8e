/**
 * The store's records and how rows become them. Rows are parsed, not cast: a row the code does not
 * expect (a manual edit, a schema drift) fails loudly with the column named.
 */
import { z } from 'zod';
import { checkout, quoteIdent, type StoreClient, type StorePool, type Tables } from '../db.js';
import {
  DELIVERY_STATES,
  INITIATING_ENTITIES,
  PROPAGATION_STATES,
  TOKEN_STATUSES,
  type DeliveryState,
  type InitiatingEntity,
  type PropagationState,
  type TokenStatus,
} from '../names.js';

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
  /** The token's policy (null: none; the global maximum lifetime only). */
  policy: string | null;
  /** Set while the token is suspended: it fails verification but is not dead. */
  suspendedAt: string | null;
  suspendedBy: string | null;
  suspendReason: string | null;
  /** A revocation its workflow will carry out at this instant. */
  revokeScheduledAt: string | null;
  revokeScheduledReason: string | null;
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
  /** When the receiver acknowledged the event (2xx); with a probe, not yet a confirmation. */
  ackedAt: string | null;
  /** When the receiver's probe said the token is rejected there. */
  verifiedAt: string | null;
  /** Probe requests made; `attempts` counts the event's POSTs. */
  probes: number;
}

export interface ReceiverRecord {
  id: string;
  kind: 'webhook';
  url: string;
  /** Base URL of its verification probe (`GET <probeUrl>/<tokenId>`); null when it offers none. */
  probeUrl: string | null;
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

/** A function of the store (created by the migrations), named with its schema like the tables. */
export const routine = (
  t: Tables,
  name:
    | 'kill_token'
    | 'kill_expired_tokens'
    | 'kill_tokens'
    | 'append_audit'
    | 'issue_token'
    | 'issue_token_under_policy'
    | 'record_delivery_attempt'
    // Revocation by filter (migrations/0012).
    | 'bulk_revoke_matches'
    | 'bulk_revoke_kill_chunk'
    | 'bulk_revoke_remaining'
    | 'bulk_revoke_due'
    // Issuance barrier (migrations/0011).
    | 'issuance_barrier'
    | 'kill_subject_tokens'
    // Bulk import and bulk issue (migrations/0013).
    | 'import_tokens'
    // Credentials, reuse detection, suspension, expiry changes, notices (migrations/0015).
    | 'insert_pending_credential'
    | 'discard_pending_credential'
    | 'promote_credential'
    | 'rotate_credential'
    | 'end_grace'
    | 'kill_reused_credential'
    | 'set_suspended'
    | 'change_expiry'
    | 'record_notice'
    // policy apply's shorten to the limit (migrations/0017).
    | 'shorten_to_policy_limit',
) => `${quoteIdent(t.schema)}.${name}`;

/** A token row's columns as toToken reads them; `valid` is the store's token_valid, the verifier's. */
export const tokenColumns = (t: Tables): string => `
  id, subject, name, scopes, receivers, status, propagation, issued_at, expires_at, revoked_at,
  revoked_by, revoke_reason, initiating_entity, revoke_request_id, workflow_started_at, propagation_started_at,
  propagation_completed_at, policy, suspended_at, suspended_by, suspend_reason, revoke_scheduled_at,
  revoke_scheduled_reason,
  CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END AS effective_status,
  ${quoteIdent(t.schema)}.token_valid(status, expires_at, suspended_at) AS valid`;

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
    policy: nullableText,
    suspended_at: nullableDate,
    suspended_by: nullableText,
    suspend_reason: nullableText,
    revoke_scheduled_at: nullableDate,
    revoke_scheduled_reason: nullableText,
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
    policy: r.policy,
    suspendedAt: r.suspended_at,
    suspendedBy: r.suspended_by,
    suspendReason: r.suspend_reason,
    revokeScheduledAt: r.revoke_scheduled_at,
    revokeScheduledReason: r.revoke_scheduled_reason,
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
    verified_at: nullableDate,
    probes: z.number().int().nonnegative(),
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
    verifiedAt: r.verified_at,
    probes: r.probes,
  }));

const receiverRow = z
  .object({
    id: z.string(),
    kind: z.literal('webhook'),
    url: z.string(),
    probe_url: nullableText,
    enabled: z.boolean(),
    created_at: date,
    removed_at: nullableDate,
  })
  .transform((r): ReceiverRecord => ({
    id: r.id,
    kind: r.kind,
    url: r.url,
    probeUrl: r.probe_url,
    enabled: r.enabled,
    createdAt: r.created_at,
    removedAt: r.removed_at,
  }));

export function parseRow<T>(schema: z.ZodType<T>, table: string, row: unknown): T {
  const result = schema.safeParse(row);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  throw new Error(`unexpected ${table} row in the store: ${issue?.path.join('.')}: ${issue?.message}`);
}

export const toToken = (row: unknown) => parseRow(tokenRow, 'token', row);
export const toDelivery = (row: unknown) => parseRow(deliveryRow, 'delivery', row);
export const toReceiver = (row: unknown) => parseRow(receiverRow, 'receiver', row);

export async function inTransaction<T>(pool: StorePool, fn: (client: StoreClient) => Promise<T>): Promise<T> {
  const client = await checkout(pool);
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    client.release();
    return result;
  } catch (err) {
    // A connection that cannot even roll back is in an unknown state: destroyed, never handed on.
    const rolledBack = await client.query('ROLLBACK').then(
      () => true,
      () => false,
    );
    client.release(rolledBack ? undefined : (err as Error));
    throw err;
  }
}
