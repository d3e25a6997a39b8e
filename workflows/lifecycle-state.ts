/**
 * Pure lifecycle decisions, unit-tested without Temporal. Hand-written checks instead of zod: this
 * module runs inside the workflow sandbox.
 */
import { INITIATING_ENTITIES, type DeliveryState, type InitiatingEntity } from '../common/names.js';
import type { OperatorRequest, RevokeRequest } from './messages.js';

const SETTLED: ReadonlySet<DeliveryState> = new Set(['delivered', 'forced', 'cancelled']);

export const isSettled = (status: DeliveryState): boolean => SETTLED.has(status);

/** A trimmed, bounded string, or undefined. NUL is dropped: PostgreSQL text cannot store it. */
const text = (value: unknown, max: number): string | undefined => {
  if (typeof value !== 'string') return undefined;
  const clean = value.replaceAll('\u0000', '').trim();
  return clean.length > 0 ? clean.slice(0, max) : undefined;
};

/**
 * A revoke Signal is never refused (batch operations and old clients send it): a malformed payload
 * still revokes, with reason `unspecified`, and the audit trail says so.
 */
export function parseRevokeSignal(payload: unknown): RevokeRequest & { malformed: boolean } {
  const p = (typeof payload === 'object' && payload !== null ? payload : {}) as Record<string, unknown>;
  const reason = text(p.reason, 500);
  const actor = text(p.actor, 200);
  const entity = INITIATING_ENTITIES.includes(p.initiatingEntity as InitiatingEntity)
    ? (p.initiatingEntity as InitiatingEntity)
    : undefined;
  const correlationId = text(p.correlationId, 200);
  const requestId = text(p.requestId, 100);
  return {
    reason: reason ?? 'unspecified',
    actor: actor ?? 'unknown (via Temporal signal)',
    initiatingEntity: entity ?? 'admin',
    ...(correlationId ? { correlationId } : {}),
    ...(requestId ? { requestId } : {}),
    malformed: reason === undefined,
  };
}

/** Validator of the operator Updates: throws (rejecting the Update, no history event) when bad. */
export function validateOperatorRequest(request: unknown): asserts request is OperatorRequest {
  const r = (typeof request === 'object' && request !== null ? request : {}) as Record<string, unknown>;
  if (text(r.reason, 500) === undefined) throw new Error('reason: a non-empty reason is required');
  if (r.actor !== undefined && text(r.actor, 200) === undefined) throw new Error('actor: expected a non-empty string');
}

/** Milliseconds until `deadlineIso` at workflow time `nowMs`; ≤ 0 when due. */
export function msUntil(deadlineIso: string, nowMs: number): number {
  return Date.parse(deadlineIso) - nowMs;
}

/**
 * What propagation should wait for next: everything settled → complete; some delivery rejected or
 * the escalation deadline passed → stuck; otherwise keep waiting until the deadline.
 */
export function propagationVerdict(
  deliveries: { status: DeliveryState }[],
  nowMs: number,
  escalateAtMs: number,
): { kind: 'complete' } | { kind: 'stuck' } | { kind: 'wait'; ms: number } {
  if (deliveries.every((d) => isSettled(d.status))) return { kind: 'complete' };
  if (deliveries.some((d) => d.status === 'failed') || nowMs >= escalateAtMs) return { kind: 'stuck' };
  return { kind: 'wait', ms: escalateAtMs - nowMs };
}
