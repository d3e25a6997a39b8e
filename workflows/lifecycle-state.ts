/**
 * The token lifecycle's state and its transitions, with the pure decisions that go with them:
 * unit-tested without Temporal. Hand-written checks instead of zod: this module runs inside the
 * workflow sandbox. The workflow (token-lifecycle.ts) performs the effects; this module only
 * records what happened and says what comes next.
 */
import { ActivityFailure, ApplicationFailure, RetryState } from '@temporalio/common';
import {
  INITIATING_ENTITIES,
  RECEIVER_REJECTED,
  type DeliveryState,
  type InitiatingEntity,
  type PropagationState,
  type TokenStatus,
} from '../common/names.js';
import { withoutControls } from '../common/text.js';
import { isUndecodablePayload } from './payload-converter.js';
import type {
  DeliveryView,
  EffectiveTiming,
  LifecyclePhase,
  OperatorRequest,
  RevokeRequest,
  TokenWorkflowInput,
  TokenWorkflowView,
} from '../common/messages.js';

const SETTLED: ReadonlySet<DeliveryState> = new Set(['delivered', 'forced', 'cancelled']);

export const isSettled = (status: DeliveryState): boolean => SETTLED.has(status);

/** Failure types of the operator Updates' validators (non-retryable: the same request fails again). */
export const INVALID_OPERATOR_REQUEST = 'InvalidOperatorRequest';
export const NOT_PROPAGATING = 'NotPropagating';

/** A trimmed, bounded string, or undefined. NUL is dropped: PostgreSQL text cannot store it. */
const text = (value: unknown, max: number): string | undefined => {
  if (typeof value !== 'string') return undefined;
  // A Signal bypasses the library's refusal of control characters, yet must still revoke: they
  // become spaces here (NUL too: PostgreSQL text cannot hold it). Cut by code point, never mid-pair.
  const clean = withoutControls(value).trim();
  return clean.length > 0 ? [...clean].slice(0, max).join('') : undefined;
};

export type ParsedRevoke = RevokeRequest & {
  malformed: boolean;
  /** The encoding of a payload the converter could not decode (see payload-converter.ts). */
  undecodableEncoding?: string;
};

/**
 * A revoke Signal is never refused (batch operations and old clients send it): a malformed payload
 * still revokes, with reason `unspecified`, and the audit trail says so.
 */
export function parseRevokeSignal(payload: unknown): ParsedRevoke {
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
    ...(isUndecodablePayload(payload) ? { undecodableEncoding: payload.undecodablePayload.encoding } : {}),
  };
}

/** Validator of the operator Updates' payload: throws a non-retryable failure naming the field. */
export function validateOperatorRequest(request: unknown): asserts request is OperatorRequest {
  if (isUndecodablePayload(request)) {
    throw ApplicationFailure.nonRetryable(
      `request: the payload could not be decoded (encoding ${request.undecodablePayload.encoding}); send JSON {"reason": …}`,
      INVALID_OPERATOR_REQUEST,
    );
  }
  const r = (typeof request === 'object' && request !== null ? request : {}) as Record<string, unknown>;
  if (text(r.reason, 500) === undefined) {
    throw ApplicationFailure.nonRetryable('reason: a non-empty reason is required', INVALID_OPERATOR_REQUEST);
  }
  if (r.actor !== undefined && text(r.actor, 200) === undefined) {
    throw ApplicationFailure.nonRetryable('actor: expected a non-empty string', INVALID_OPERATOR_REQUEST);
  }
}

/** Milliseconds until `deadlineIso` at workflow time `nowMs`; ≤ 0 when due. */
export function msUntil(deadlineIso: string, nowMs: number): number {
  return Date.parse(deadlineIso) - nowMs;
}

export type PropagationVerdict = { kind: 'complete' } | { kind: 'stuck' } | { kind: 'wait'; ms: number };

/**
 * What propagation should wait for next: everything settled → complete; some delivery rejected or
 * the escalation deadline passed → stuck; otherwise keep waiting until the deadline.
 */
export function propagationVerdict(
  deliveries: { status: DeliveryState }[],
  nowMs: number,
  escalateAtMs: number,
): PropagationVerdict {
  if (deliveries.every((d) => isSettled(d.status))) return { kind: 'complete' };
  if (deliveries.some((d) => d.status === 'failed') || nowMs >= escalateAtMs) return { kind: 'stuck' };
  return { kind: 'wait', ms: escalateAtMs - nowMs };
}

/**
 * The pause before the workflow schedules a delivery again after its activity ended without a
 * receiver's rejection (timeout, a failure of another kind): the retry schedule's step for the
 * number of such endings in a row, so a delivery that keeps ending never spins.
 */
export function pauseAfterEnding(
  endingsInARow: number,
  timing: { retryInitialMs: number; retryMaxMs: number },
): number {
  return Math.min(timing.retryInitialMs * 2 ** Math.min(Math.max(endingsInARow - 1, 0), 30), timing.retryMaxMs);
}

/**
 * Only a receiver's non-retryable answer is a rejection (it waits for an operator). An activity
 * that ended any other way (a timeout, retry state TIMEOUT, a failure of another type) is retried.
 */
export function isReceiverRejection(err: ActivityFailure): boolean {
  const cause = err.cause;
  return (
    cause instanceof ApplicationFailure &&
    cause.type === RECEIVER_REJECTED &&
    (cause.nonRetryable || err.retryState === RetryState.NON_RETRYABLE_FAILURE)
  );
}

/** The message of an activity's failure: its cause's when there is one (the activity's own words). */
export const failureMessage = (err: ActivityFailure): string =>
  (err.cause instanceof ApplicationFailure ? err.cause.message : undefined) ?? err.message;

/** The facts of the kill the workflow adopts (the store's token row). */
export interface KillFacts {
  status: TokenStatus;
  propagation: PropagationState;
  revokedAt: string | null;
  revokedBy: string | null;
  revokeReason: string | null;
}

/** `1 h`, `30 min`, `5 s`, `200 ms`: durations as an operator reads them in the details. */
export function formatMs(ms: number): string {
  for (const [unit, size] of [
    ['d', 86_400_000],
    ['h', 3_600_000],
    ['min', 60_000],
    ['s', 1_000],
  ] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size} ${unit}`;
  }
  return ms >= 1_000 ? `${(ms / 1_000).toFixed(1)} s` : `${ms} ms`;
}

/**
 * The lifecycle's state in one place. Every transition is a method; each one notifies the listener
 * (the workflow keeps its current details true with it). Phases: active → killing → propagating ⇄
 * stuck → complete.
 */
export class LifecycleState {
  phase: LifecyclePhase = 'active';
  status: TokenStatus = 'active';
  propagation: PropagationState = 'none';
  /** The first revoke Signal; later ones change nothing (the first kill's facts stand). */
  revokeRequest: ParsedRevoke | undefined;
  kill: KillFacts | undefined;
  /** Bumped by every operator retry; deliveries waiting for an operator resume on it. */
  retryRound = 0;
  forced = false;
  timing: EffectiveTiming | undefined;
  escalateAtMs: number | undefined;
  /** Bumped whenever a delivery's state changes, so that propagation's supervisor re-evaluates. */
  deliveryChanges = 0;
  private readonly deliveries = new Map<string, DeliveryView>();
  private whyKilling: string | undefined;

  constructor(
    readonly input: TokenWorkflowInput,
    private readonly onChange: (state: LifecycleState) => void = () => {},
  ) {
    // One delivery per receiver, of the token's one revocation event (its outbox row is written by
    // whichever kill commits).
    for (const receiverId of input.receivers) {
      this.deliveries.set(receiverId, {
        receiverId,
        eventId: input.revocationEventId,
        status: 'pending',
        attempts: 0,
        lastStatusCode: null,
        lastError: null,
      });
    }
  }

  // ---------------------------------------------------------------- transitions

  /** A revoke Signal arrived (the first one counts). */
  revokeRequested(payload: unknown): void {
    if (this.revokeRequest) return;
    this.revokeRequest = parseRevokeSignal(payload);
    this.changed();
  }

  /** The workflow runs the kill: for the revoke request, or because the token reached its expiry. */
  killing(why: 'revoke' | 'expiry'): void {
    this.phase = 'killing';
    this.whyKilling =
      why === 'revoke' && this.revokeRequest
        ? `revoke requested by ${this.revokeRequest.actor}: ${this.revokeRequest.reason}`
        : `the token reached its expiry at ${this.input.expiresAt}`;
    this.changed();
  }

  /** The expiry kill found the token not yet expired on the database clock: alive a little longer. */
  stillAlive(): void {
    this.phase = 'active';
    this.changed();
  }

  /** The timing this run propagates with is known (read once; it never changes within a run). */
  timingKnown(timing: EffectiveTiming): void {
    this.timing ??= timing;
    this.changed();
  }

  /**
   * A run that begins already revoking resumes from the store's delivery rows: a row an earlier
   * run left settled stays settled, a rejected one waits for an operator.
   */
  resumedFromStore(rows: DeliveryView[]): void {
    for (const row of rows) {
      const current = this.deliveries.get(row.receiverId);
      if (current && row.eventId === current.eventId) this.deliveries.set(row.receiverId, row);
      if (row.status === 'forced') this.forced = true;
    }
    this.changed();
  }

  /**
   * The token is dead in the store: adopt the store's facts. A propagation the store already holds
   * as stuck (a restarted run) stays stuck until an operator acts or every receiver confirms.
   */
  killed(facts: KillFacts, nowMs: number): void {
    this.kill = facts;
    this.status = facts.status;
    this.propagation = facts.propagation;
    this.phase = facts.propagation === 'stuck' ? 'stuck' : 'propagating';
    this.escalateAtMs = nowMs + this.timing!.escalateAfterMs;
    this.changed();
  }

  /** A delivery's store row, as an activity returned it or as read from the store. */
  deliveryObserved(row: DeliveryView): void {
    if (!this.isSettled(row.receiverId)) {
      this.merge(row);
      this.deliveryChanges++;
    }
    this.changed();
  }

  /** A receiver rejected the event (non-retryable answer): it waits for an operator. */
  deliveryRejected(receiverId: string, error: string, row?: DeliveryView): void {
    if (row) this.merge(row);
    const current = this.delivery(receiverId);
    if (!isSettled(current.status)) {
      this.deliveries.set(receiverId, { ...current, status: 'failed', lastError: row?.lastError ?? error });
    }
    this.deliveryChanges++;
    this.changed();
  }

  /** An operator's retry reached a rejected delivery: it is attempted again. */
  deliveryRetrying(receiverId: string): void {
    const current = this.delivery(receiverId);
    if (current.status === 'failed') this.deliveries.set(receiverId, { ...current, status: 'pending' });
    this.deliveryChanges++;
    this.changed();
  }

  /** Propagation escalated: the store now holds it as stuck (retryable deliveries keep retrying). */
  escalated(propagation: PropagationState): void {
    this.propagation = propagation;
    this.phase = 'stuck';
    this.changed();
  }

  /** An operator asked to retry every unsettled delivery; returns them. */
  retryRequested(): string[] {
    this.retryRound++;
    this.changed();
    return this.unsettled().map((d) => d.receiverId);
  }

  /** After an operator's retry, propagation is pending again with a new escalation deadline. */
  resumed(propagation: PropagationState, nowMs: number): void {
    this.propagation = propagation;
    this.phase = 'propagating';
    this.escalateAtMs = nowMs + this.timing!.escalateAfterMs;
    this.changed();
  }

  /** An operator forced these deliveries complete. */
  forcedComplete(receiverIds: string[]): void {
    // The store forces only what was still unsettled: nothing forced, nothing to report as forced.
    if (receiverIds.length > 0) this.forced = true;
    for (const receiverId of receiverIds) {
      const current = this.deliveries.get(receiverId);
      if (!current) continue;
      this.deliveries.set(receiverId, { ...current, status: 'forced' });
      this.deliveryChanges++;
    }
    this.changed();
  }

  completed(propagation: PropagationState): void {
    this.propagation = propagation;
    this.phase = 'complete';
    this.changed();
  }

  // ---------------------------------------------------------------- reads

  delivery(receiverId: string): DeliveryView {
    const d = this.deliveries.get(receiverId);
    if (!d) throw new Error(`no delivery to ${receiverId} in this workflow`);
    return d;
  }

  all(): DeliveryView[] {
    return [...this.deliveries.values()];
  }

  unsettled(): DeliveryView[] {
    return this.all().filter((d) => !isSettled(d.status));
  }

  isSettled(receiverId: string): boolean {
    return isSettled(this.delivery(receiverId).status);
  }

  verdict(nowMs: number): PropagationVerdict {
    return propagationVerdict(this.all(), nowMs, this.escalateAtMs ?? Number.POSITIVE_INFINITY);
  }

  /** Why an operator's retry or force cannot apply now; undefined when it can. */
  operatorRefusal(): string | undefined {
    if (this.phase !== 'killing' && this.phase !== 'propagating' && this.phase !== 'stuck') {
      return `token ${this.input.tokenId} is not propagating a revocation (phase ${this.phase})`;
    }
    if (this.unsettled().length === 0) {
      return `token ${this.input.tokenId}: every receiver has already confirmed; nothing to retry or force`;
    }
    return undefined;
  }

  view(): TokenWorkflowView {
    return {
      tokenId: this.input.tokenId,
      phase: this.phase,
      status: this.status,
      propagation: this.propagation,
      expiresAt: this.input.expiresAt,
      deliveries: this.all(),
      retryRound: this.retryRound,
      forced: this.forced,
      timing: this.timing ?? null,
      escalateAt:
        this.escalateAtMs !== undefined && this.phase === 'propagating'
          ? new Date(this.escalateAtMs).toISOString()
          : null,
    };
  }

  /** The workflow's current details (markdown, shown in the Web UI): what is true now. */
  details(): string {
    if (this.phase === 'active') return `**active** until ${this.input.expiresAt}.`;
    if (this.phase === 'killing') return `**killing** in the store: ${this.whyKilling}.`;
    const k = this.kill!;
    const lines = [`**${this.status}** at ${k.revokedAt} by ${k.revokedBy}: ${k.revokeReason}.`];
    const all = this.all();
    const confirmed = all.filter((d) => d.status === 'delivered').length;
    const forced = all.filter((d) => d.status === 'forced').length;
    const progress = `${confirmed} of ${all.length} receivers confirmed${forced ? `, ${forced} forced by an operator` : ''}`;
    if (this.phase === 'complete') {
      lines.push(
        forced
          ? `Propagation **complete**, forced by an operator: ${progress}.`
          : all.length === 0
            ? 'Propagation **complete**: no receivers.'
            : `Propagation **complete**: every receiver confirmed.`,
      );
    } else if (this.phase === 'stuck') {
      lines.push(
        `Propagation **stuck**: ${progress}. Rejected deliveries wait for an operator (retryPropagation or forceComplete); the others keep retrying.`,
      );
    } else {
      const deadline = this.escalateAtMs !== undefined ? new Date(this.escalateAtMs).toISOString() : 'unknown';
      lines.push(`Propagation **pending**: ${progress}; escalates to stuck at ${deadline} unless all confirm.`);
    }
    for (const d of all) lines.push(`- \`${d.receiverId}\`: ${describeDelivery(d)}`);
    if (this.timing) {
      const t = this.timing;
      lines.push(
        `Timing (from the ${t.source}): escalate after ${formatMs(t.escalateAfterMs)}; retries from ${formatMs(t.retryInitialMs)}, doubling up to ${formatMs(t.retryMaxMs)}.`,
      );
    }
    return lines.join('\n');
  }

  // ---------------------------------------------------------------- internals

  /**
   * Takes what a store row says. A settled row wins (the store never moves one back); otherwise the
   * attempt figures of the row with more attempts, while pending/failed stays the workflow's own
   * decision (an operator's retry makes a failed row pending before its next attempt records).
   */
  private merge(row: DeliveryView): void {
    const current = this.deliveries.get(row.receiverId);
    if (!current || row.eventId !== current.eventId || isSettled(current.status)) return;
    if (isSettled(row.status)) {
      this.deliveries.set(row.receiverId, row);
      // Forced by an operator, perhaps in an earlier run: the outcome must say so.
      if (row.status === 'forced') this.forced = true;
      return;
    }
    if (row.attempts >= current.attempts) this.deliveries.set(row.receiverId, { ...row, status: current.status });
  }

  private changed(): void {
    this.onChange(this);
  }
}

function describeDelivery(d: DeliveryView): string {
  const attempts = `${d.attempts} attempt${d.attempts === 1 ? '' : 's'}`;
  const last = d.lastError ? `; last: ${d.lastError}` : d.lastStatusCode !== null ? `; HTTP ${d.lastStatusCode}` : '';
  switch (d.status) {
    case 'delivered':
      return `confirmed after ${attempts}`;
    case 'forced':
      return `forced complete by an operator after ${attempts}${last}`;
    case 'cancelled':
      return `cancelled (${d.lastError ?? 'receiver removed'})`;
    case 'failed':
      return `rejected after ${attempts}${last}; waits for an operator`;
    default:
      return `retrying, ${attempts} so far${last}`;
  }
}
