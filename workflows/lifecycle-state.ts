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
import {
  EMAIL_ADDRESS,
  EMAIL_IN_REASON,
  redactedText,
  redactSecrets,
  secretShapeKind,
} from '../common/secret-shapes.js';
import { withoutControls } from '../common/text.js';
import { isUndecodablePayload } from './payload-converter.js';
import type {
  CarriedLifecycle,
  ChangeExpiryRequest,
  PolicySnapshot,
  RotateRequest,
  ScheduleRevokeRequest,
  SuspendRequest,
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

/** How much of a raw text the masks read: enough to fill 500 after masking, bounded for a 2 MB Signal. */
const MASK_WINDOW = 20_000;
const EMAIL_ADDRESSES = new RegExp(EMAIL_ADDRESS.source, 'g');

/**
 * A raw Signal's reason as recorded: secret-shaped text noted, addresses masked, then cut to 500,
 * so masking short addresses cannot grow it past the bound the library enforces.
 */
function recordedReason(value: unknown, masked: boolean): string | undefined {
  // Before the masking: secret shapes noted in the first 500 characters, addresses kept.
  if (!masked) {
    const cut = text(value, 500);
    return cut === undefined ? undefined : redactedText(cut);
  }
  const wide = text(value, MASK_WINDOW);
  return wide === undefined ? undefined : text(redactedText(wide).replace(EMAIL_ADDRESSES, '[an email address]'), 500);
}

/**
 * Operators' and receivers' text inside the current details, which the Web UI renders as markdown:
 * escaped so that an image or link in a reason is shown as text, never fetched; one line.
 */
export const md = (value: string): string => value.replace(/\s+/g, ' ').replace(/[\\`*_[\]<>!|~]/g, '\\$&');

export type ParsedRevoke = RevokeRequest & {
  malformed: boolean;
  /** The encoding of a payload the converter could not decode (see payload-converter.ts). */
  undecodableEncoding?: string;
};

/**
 * A revoke Signal is never refused (batch operations and old clients send it): a malformed payload
 * still revokes, with reason `unspecified`, and the audit trail says so.
 */
export function parseRevokeSignal(payload: unknown, maskedReasons = true): ParsedRevoke {
  const p = (typeof payload === 'object' && payload !== null ? payload : {}) as Record<string, unknown>;
  // A Signal bypasses the library's refusal of secrets: a secret-shaped text is recorded (kill,
  // audit, receivers' events) as a note of what it looked like, never as itself.
  const secretFree = (value: string | undefined) => (value === undefined ? undefined : redactedText(value));
  // An address in a raw Signal's reason (the library refuses one) is kept out of the audit data.
  const reason = recordedReason(p.reason, maskedReasons);
  const actor = secretFree(text(p.actor, 200));
  const entity = INITIATING_ENTITIES.includes(p.initiatingEntity as InitiatingEntity)
    ? (p.initiatingEntity as InitiatingEntity)
    : undefined;
  const correlationId = secretFree(text(p.correlationId, 200));
  // Matched as given (the caller's own kill): a secret-shaped id is dropped, not redacted.
  const givenRequestId = text(p.requestId, 100);
  const requestId =
    givenRequestId !== undefined && secretShapeKind(givenRequestId) === undefined ? givenRequestId : undefined;
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
  for (const field of ['reason', 'actor'] as const) {
    const problem = secretInText(r[field], field);
    if (problem) throw ApplicationFailure.nonRetryable(problem, INVALID_OPERATOR_REQUEST);
  }
}

/**
 * A refusal when a text field looks like a secret: an Update refused by its validator is not
 * written to history, so the secret reaches neither history, activities nor the audit trail.
 */
function secretInText(value: unknown, field: string): string | undefined {
  const kind = typeof value === 'string' ? secretShapeKind(value) : undefined;
  if (kind !== undefined) {
    return `${field}: looks like a secret (${kind}); it would be kept in plaintext (history, audit trail): leave the secret out`;
  }
  return field === 'reason' && typeof value === 'string' && EMAIL_ADDRESS.test(value)
    ? `${field}: ${EMAIL_IN_REASON}`
    : undefined;
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
  /** Who forced completion and why, when this run took the operator's Update (for the Web UI's details). */
  private forcedBy: { actor: string; reason: string } | undefined;
  timing: EffectiveTiming | undefined;
  escalateAtMs: number | undefined;
  /** Bumped whenever a delivery's state changes, so that propagation's supervisor re-evaluates. */
  deliveryChanges = 0;
  private readonly deliveries = new Map<string, DeliveryView>();
  private whyKilling: string | undefined;
  /** The expiry as last adopted (extend and shorten move it). */
  expiresAt: string;

  constructor(
    readonly input: TokenWorkflowInput,
    private readonly onChange: (state: LifecycleState) => void = () => {},
  ) {
    this.expiresAt = input.carried?.expiresAt ?? input.expiresAt;
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

  /** A revoke Signal arrived (the first one counts); `masked` asks the run's patch decision only then. */
  revokeRequested(payload: unknown, masked: () => boolean = () => true): void {
    if (this.revokeRequest) return;
    this.revokeRequest = parseRevokeSignal(payload, masked());
    this.changed();
  }

  /** The workflow runs the kill: for the revoke request, or because the token reached its expiry. */
  killing(why: 'revoke' | 'expiry'): void {
    this.phase = 'killing';
    this.whyKilling =
      why === 'revoke' && this.revokeRequest
        ? `revoke requested by ${this.revokeRequest.actor}: ${this.revokeRequest.reason}`
        : `the token reached its expiry at ${this.expiresAt}`;
    this.changed();
  }

  /** The workflow itself revokes (inactivity, policy, suspicious activity, a scheduled revoke): the first revoke counts. */
  systemRevoke(request: RevokeRequest): void {
    if (this.revokeRequest) return;
    this.revokeRequest = { ...request, malformed: false };
    this.changed();
  }

  /** The store's expiry moved (extend, shorten, a policy's maximum). */
  expiryMoved(expiresAt: string): void {
    this.expiresAt = expiresAt;
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
  forcedComplete(receiverIds: string[], by?: { actor: string; reason: string }): void {
    // The store forces only what was still unsettled: nothing forced, nothing to report as forced.
    if (receiverIds.length > 0) {
      this.forced = true;
      if (by) this.forcedBy = by;
    }
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
      expiresAt: this.expiresAt,
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
    if (this.phase === 'active') return `**active** until ${this.expiresAt}.`;
    if (this.phase === 'killing') return `**killing** in the store: ${md(this.whyKilling ?? '')}.`;
    const k = this.kill!;
    const lines = [`**${this.status}** at ${k.revokedAt} by ${md(`${k.revokedBy}`)}: ${md(`${k.revokeReason}`)}.`];
    const all = this.all();
    const confirmed = all.filter((d) => d.status === 'delivered').length;
    const forced = all.filter((d) => d.status === 'forced').length;
    const progress = `${confirmed} of ${all.length} receivers confirmed${forced ? `, ${forced} forced by an operator` : ''}`;
    if (this.phase === 'complete') {
      lines.push(
        forced
          ? `Propagation **complete**, forced by ${this.forcedBy ? `${md(this.forcedBy.actor)} (${md(this.forcedBy.reason)})` : 'an operator'}: ${progress}.`
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
    // Blank lines between: the Web UI's markdown joins single line breaks into one paragraph.
    return lines.join('\n\n');
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
  const last = d.lastError
    ? `; last: ${md(d.lastError)}`
    : d.lastStatusCode !== null
      ? `; HTTP ${d.lastStatusCode}`
      : '';
  switch (d.status) {
    case 'delivered':
      return `confirmed after ${attempts}`;
    case 'forced':
      return `forced complete by an operator after ${attempts}${last}`;
    case 'cancelled':
      return `cancelled (${md(d.lastError ?? 'receiver removed')})`;
    case 'failed':
      return `rejected after ${attempts}${last}; waits for an operator`;
    default:
      return `retrying, ${attempts} so far${last}`;
  }
}

// ==================================================================== alive phase: deadlines

/** Failure type of the self-managing Updates' validators and refusals (non-retryable). */
export const INVALID_LIFECYCLE_REQUEST = 'InvalidLifecycleRequest';
export const TOKEN_NOT_ACTIVE = 'TokenNotActive';
/** A run started by an earlier release (before PATCHES.selfManaging) cannot take the self-managing Updates. */
export const RUN_PREDATES_REQUEST = 'RunPredatesRequest';

/** The refusal of a self-managing Update by a run that predates it (a conflict with the token's run, not bad input). */
export const runPredatesRequest = (kind: string): ApplicationFailure =>
  ApplicationFailure.nonRetryable(
    `${kind}: not supported by this run (started by an earlier release, before ${kind} existed)`,
    RUN_PREDATES_REQUEST,
  );

const refuse = (message: string): never => {
  throw ApplicationFailure.nonRetryable(message, INVALID_LIFECYCLE_REQUEST);
};

const record = (request: unknown): Record<string, unknown> => {
  if (isUndecodablePayload(request)) {
    refuse(`request: the payload could not be decoded (encoding ${request.undecodablePayload.encoding})`);
  }
  return (typeof request === 'object' && request !== null ? request : {}) as Record<string, unknown>;
};

const optionalText = (r: Record<string, unknown>, field: string, max: number): void => {
  if (r[field] !== undefined && text(r[field], max) === undefined) refuse(`${field}: expected a non-empty string`);
  const secret = secretInText(r[field], field);
  if (secret) refuse(secret);
};

const requiredText = (r: Record<string, unknown>, field: string, max: number): void => {
  if (text(r[field], max) === undefined) refuse(`${field}: a non-empty ${field} is required`);
  const secret = secretInText(r[field], field);
  if (secret) refuse(secret);
};

const CREDENTIAL_ID = /^cred_[A-Za-z0-9_-]{8,64}$/;
const SHA256_HEX = /^[0-9a-f]{64}$/;
/** A grace longer than this is refused: a leaked old secret must not stay valid for months. */
export const MAX_GRACE_MS = 30 * 86_400_000;

export function validateRotateRequest(request: unknown): asserts request is RotateRequest {
  const r = record(request);
  if (typeof r.credentialId !== 'string' || !CREDENTIAL_ID.test(r.credentialId)) {
    refuse('credentialId: expected cred_ followed by 8 to 64 letters, digits, _ or -');
  }
  if (typeof r.secretHash !== 'string' || !SHA256_HEX.test(r.secretHash)) {
    refuse('secretHash: expected the SHA-256 of the new secret, 64 lowercase hex digits');
  }
  if (
    r.graceMs !== undefined &&
    (typeof r.graceMs !== 'number' || !Number.isInteger(r.graceMs) || r.graceMs < 0 || r.graceMs > MAX_GRACE_MS)
  ) {
    refuse(`graceMs: expected an integer from 0 to ${MAX_GRACE_MS}`);
  }
  optionalText(r, 'actor', 200);
  optionalText(r, 'reason', 500);
}

export function validateSuspendRequest(request: unknown): asserts request is SuspendRequest {
  const r = record(request);
  requiredText(r, 'reason', 500);
  optionalText(r, 'actor', 200);
}

/** `at` must parse and lie in the future of workflow time `nowMs`. */
export function validateScheduleRevokeRequest(
  request: unknown,
  nowMs: number,
): asserts request is ScheduleRevokeRequest {
  const r = record(request);
  const at = typeof r.at === 'string' ? Date.parse(r.at) : Number.NaN;
  if (Number.isNaN(at)) refuse('at: expected an ISO 8601 instant');
  if (at <= nowMs) refuse(`at: ${String(r.at)} is not in the future`);
  requiredText(r, 'reason', 500);
  optionalText(r, 'actor', 200);
}

/**
 * No ttl beyond this reaches the store (the ceiling of TOKENWARDEN_MAX_TTL, common/config.ts): a
 * larger one would overflow PostgreSQL's interval and the Update would never finish.
 */
export const MAX_TTL_CEILING_MS = 3650 * 86_400_000;

export function validateChangeExpiryRequest(request: unknown): asserts request is ChangeExpiryRequest {
  const r = record(request);
  if (typeof r.ttlMs !== 'number' || !Number.isInteger(r.ttlMs) || r.ttlMs <= 0) {
    refuse('ttl: expected a positive whole number of milliseconds');
  }
  if ((r.ttlMs as number) > MAX_TTL_CEILING_MS) refuse(`ttl: at most ${MAX_TTL_CEILING_MS} ms (3650 days)`);
  if (r.mode !== 'extend' && r.mode !== 'shorten') refuse('mode: expected extend or shorten');
  requiredText(r, 'reason', 500);
  optionalText(r, 'actor', 200);
}

/** A suspicious report is never refused: whatever arrives is acted on; the audit keeps what could be read. */
export function parseSuspiciousReport(
  payload: unknown,
  maskedReasons = true,
): {
  reason: string;
  actor: string;
  reportId: string | undefined;
  evidence: unknown;
  malformed: boolean;
} {
  const p = (typeof payload === 'object' && payload !== null ? payload : {}) as Record<string, unknown>;
  // A Signal bypasses the library's refusal of secrets: none may be copied into activities or the
  // audit trail (the Signal's own payload stays in history; only a payload codec hides that).
  const secretFree = (value: string | undefined) => (value === undefined ? undefined : redactedText(value));
  // An address in a raw Signal's reason (the library refuses one) is kept out of the audit data.
  const reason = recordedReason(p.reason, maskedReasons);
  // The audit key holds it: a secret-shaped id is dropped, not redacted (redacted ids would collide).
  const givenReportId = text(p.reportId, 100);
  const reportId =
    givenReportId !== undefined && secretShapeKind(givenReportId) === undefined ? givenReportId : undefined;
  // The audit's canonical JSON takes integers only: other numbers are kept as their text.
  const json =
    p.evidence === undefined
      ? 'null'
      : JSON.stringify(redactSecrets(p.evidence), (_k, v: unknown) =>
          typeof v === 'number' && !Number.isInteger(v) ? String(v) : v,
        );
  // Bounded in history and in the audit: 8 KiB as JSON, else a note that it was cut.
  let evidence: unknown = json === undefined ? null : (JSON.parse(json) as unknown);
  if (json === undefined || json.length > 8_192) evidence = { truncated: true, bytes: json?.length ?? 0 };
  return {
    reason: reason ?? 'unspecified',
    actor: secretFree(text(p.actor, 200)) ?? 'unknown (via Temporal signal)',
    reportId,
    evidence,
    malformed: reason === undefined,
  };
}

/** The key of a warning before `deadlineIso` (expiry or idle revocation), `beforeMs` ahead: sent once. */
export const warningKey = (reason: 'expiry' | 'inactivity', deadlineIso: string, beforeMs: number): string =>
  `expiring:${reason === 'expiry' ? 'expiry' : 'idle'}:${deadlineIso}:${beforeMs}`;

/** What the alive phase does next, the earliest first; ties go to the order of this union. */
export type AliveDeadline =
  | { kind: 'expiry'; atMs: number }
  | { kind: 'scheduledRevoke'; atMs: number }
  | { kind: 'idleCheck'; atMs: number }
  | { kind: 'graceEnd'; atMs: number; credentialId: string }
  | {
      kind: 'warning';
      atMs: number;
      key: string;
      reason: 'expiry' | 'inactivity';
      deadline: string;
      beforeMs: number;
      /** Keys of larger warnings for the same deadline that are also due: never sent once this one is. */
      superseded: string[];
    }
  | { kind: 'rotate'; atMs: number };

const KIND_ORDER: AliveDeadline['kind'][] = ['expiry', 'scheduledRevoke', 'idleCheck', 'graceEnd', 'warning', 'rotate'];

const iso = (ms: number): string => new Date(ms).toISOString();

/** A warning or an automatic rotation: work that depends on the owner's destination being up. */
export const isOwnerWork = (d: AliveDeadline): boolean => d.kind === 'warning' || d.kind === 'rotate';

/**
 * The alive phase's state (what continue-as-new carries) and its pure decisions: which deadline
 * comes next, and how each event moves them. The workflow performs the effects.
 */
export class AliveState {
  readonly carried: CarriedLifecycle;
  policy: PolicySnapshot | undefined;
  /** Bumped by every change that may move a deadline: the workflow's sleep wakes on it. */
  changes = 0;
  /**
   * Set once the run follows the owner-off-critical-path patch: an idle warning whose lead is the
   * idle timeout or more is never sent (it would fall due at every use, warning a token in use).
   */
  skipIdleWarningsBeyondTimeout = false;

  constructor(input: Pick<TokenWorkflowInput, 'expiresAt' | 'policy' | 'carried'>, nowMs: number) {
    this.policy = input.policy;
    this.carried = input.carried
      ? { ...input.carried, warningsSent: [...(input.carried.warningsSent ?? [])] }
      : {
          expiresAt: input.expiresAt,
          currentCredentialId: null,
          previous: null,
          credentialRevocations: [],
          rotateAt: null,
          idleCheckAt: null,
          suspended: false,
          scheduledRevoke: null,
          rotations: 0,
          suspiciousReports: 0,
          warningsSent: [],
        };
    if (!input.carried) this.adoptPolicyDeadlines(nowMs);
  }

  get expiresAt(): string {
    return this.carried.expiresAt;
  }

  /**
   * The deadline to act on now, or undefined when the earliest lies ahead (see next()). With
   * `ownerWorkLast`, a due deadline of the token's own (expiry, scheduled revoke, idle check, end of
   * grace) goes before a due warning or rotation: work that waits on the owner never holds them up.
   */
  due(nowMs: number, ownerWorkLast = false): AliveDeadline | undefined {
    if (ownerWorkLast) {
      const own = this.nextOwn(nowMs);
      if (own.atMs <= nowMs) return own;
    }
    const next = this.next(nowMs);
    return next.atMs <= nowMs ? next : undefined;
  }

  /** The earliest deadline that does not wait on the owner's destination (expiry always exists). */
  nextOwn(nowMs: number): AliveDeadline {
    return this.deadlines(nowMs).find((d) => !isOwnerWork(d))!;
  }

  /** The earliest deadline (expiry always exists). */
  next(nowMs: number): AliveDeadline {
    return this.deadlines(nowMs)[0]!;
  }

  private deadlines(nowMs: number): AliveDeadline[] {
    const c = this.carried;
    const all: AliveDeadline[] = [{ kind: 'expiry', atMs: Date.parse(c.expiresAt) }];
    if (c.scheduledRevoke) all.push({ kind: 'scheduledRevoke', atMs: Date.parse(c.scheduledRevoke.at) });
    if (c.idleCheckAt) all.push({ kind: 'idleCheck', atMs: Date.parse(c.idleCheckAt) });
    if (c.previous) {
      all.push({ kind: 'graceEnd', atMs: Date.parse(c.previous.validUntil), credentialId: c.previous.credentialId });
    }
    const warning = this.nextWarning(nowMs);
    if (warning) all.push(warning);
    if (c.rotateAt) all.push({ kind: 'rotate', atMs: Date.parse(c.rotateAt) });
    all.sort((a, b) => a.atMs - b.atMs || KIND_ORDER.indexOf(a.kind) - KIND_ORDER.indexOf(b.kind));
    return all;
  }

  /**
   * The next unsent warning: for the expiry and (with an idle timeout) the idle deadline, at
   * `deadline - before` for each of the policy's warnings. Of several due at once, only the one
   * nearest its deadline is sent; the larger ones are superseded.
   */
  private nextWarning(nowMs: number): Extract<AliveDeadline, { kind: 'warning' }> | undefined {
    const befores = this.policy?.warnBeforeMs ?? [];
    if (befores.length === 0) return undefined;
    const sent = new Set(this.carried.warningsSent);
    const deadlines: ['expiry' | 'inactivity', string][] = [['expiry', this.carried.expiresAt]];
    if (this.carried.idleCheckAt && this.policy?.idleTimeoutMs)
      deadlines.push(['inactivity', this.carried.idleCheckAt]);
    let best: Extract<AliveDeadline, { kind: 'warning' }> | undefined;
    for (const [reason, deadline] of deadlines) {
      const deadlineMs = Date.parse(deadline);
      if (deadlineMs <= nowMs) continue;
      const idleTimeoutMs = this.policy?.idleTimeoutMs ?? 0;
      const unsent = [...befores]
        .filter((b) => !(reason === 'inactivity' && this.skipIdleWarningsBeyondTimeout && b >= idleTimeoutMs))
        .sort((a, b) => b - a)
        .map((beforeMs) => ({ beforeMs, key: warningKey(reason, deadline, beforeMs), atMs: deadlineMs - beforeMs }))
        .filter((w) => !sent.has(w.key));
      if (unsent.length === 0) continue;
      const due = unsent.filter((w) => w.atMs <= nowMs);
      const pick = due.length > 0 ? due[due.length - 1]! : unsent[0]!;
      const superseded = due.filter((w) => w.key !== pick.key).map((w) => w.key);
      const candidate = { kind: 'warning' as const, reason, deadline, superseded, ...pick };
      if (!best || candidate.atMs < best.atMs) best = candidate;
    }
    return best;
  }

  // ---------------------------------------------------------------- transitions

  /** Arms the policy's deadlines from `nowMs` (a new run, or a changed policy). */
  adoptPolicyDeadlines(nowMs: number): void {
    const p = this.policy;
    // The first idle check reads the real last use (the run does not know when the token was issued).
    this.carried.idleCheckAt = p?.idleTimeoutMs ? (this.carried.idleCheckAt ?? iso(nowMs)) : null;
    this.carried.rotateAt = p?.rotateEveryMs ? (this.carried.rotateAt ?? iso(nowMs + p.rotateEveryMs)) : null;
    this.changed();
  }

  policyChanged(policy: PolicySnapshot | undefined, nowMs: number): void {
    const before = this.policy;
    this.policy = policy;
    if (before?.rotateEveryMs !== policy?.rotateEveryMs) this.carried.rotateAt = null;
    if (before?.idleTimeoutMs !== policy?.idleTimeoutMs) this.carried.idleCheckAt = null;
    this.adoptPolicyDeadlines(nowMs);
  }

  /** A rotation committed: the new credential is current, the old one in grace (or revoked at once). */
  rotated(
    result: {
      credentialId: string;
      previousCredentialId: string | null;
      previousValidUntil: string | null;
      revoked: { credentialId: string; eventId: string }[];
    },
    nowMs: number,
  ): void {
    const c = this.carried;
    c.currentCredentialId = result.credentialId;
    c.previous =
      result.previousCredentialId && result.previousValidUntil
        ? { credentialId: result.previousCredentialId, validUntil: result.previousValidUntil }
        : null;
    this.credentialsRevoked(result.revoked);
    c.rotations++;
    if (this.policy?.rotateEveryMs) c.rotateAt = iso(nowMs + this.policy.rotateEveryMs);
    this.changed();
  }

  /** The previous credential's grace ended in the store. */
  graceEnded(credentialId: string, revoked: { credentialId: string; eventId: string }[]): void {
    if (this.carried.previous?.credentialId === credentialId) this.carried.previous = null;
    this.credentialsRevoked(revoked);
    this.changed();
  }

  credentialsRevoked(revoked: { credentialId: string; eventId: string }[]): void {
    for (const r of revoked) {
      if (!this.carried.credentialRevocations.some((x) => x.eventId === r.eventId)) {
        this.carried.credentialRevocations.push(r);
      }
    }
  }

  /** Every receiver has a settled delivery of this credential.revoked event. */
  credentialRevocationSettled(eventId: string): void {
    this.carried.credentialRevocations = this.carried.credentialRevocations.filter((r) => r.eventId !== eventId);
  }

  /**
   * The idle check read the token's last activity (last use, else issue). Returns true when the
   * token has been idle past its timeout (revoke); otherwise the check moves to the new deadline.
   */
  idleChecked(lastActivityAt: string, nowMs: number): boolean {
    const idle = this.policy?.idleTimeoutMs;
    if (!idle) {
      this.carried.idleCheckAt = null;
      this.changed();
      return false;
    }
    const deadlineMs = Date.parse(lastActivityAt) + idle;
    if (deadlineMs <= nowMs) return true;
    this.moveIdleDeadline(iso(deadlineMs));
    return false;
  }

  private moveIdleDeadline(deadline: string): void {
    const old = this.carried.idleCheckAt;
    this.carried.idleCheckAt = deadline;
    // Warnings of a deadline that no longer exists are forgotten (the list stays small).
    if (old !== deadline) this.forgetWarnings('idle', deadline);
    this.changed();
  }

  warningSent(warning: Extract<AliveDeadline, { kind: 'warning' }>): void {
    this.carried.warningsSent.push(warning.key, ...warning.superseded);
    this.changed();
  }

  expiryChanged(expiresAt: string): void {
    this.carried.expiresAt = expiresAt;
    this.forgetWarnings('expiry', expiresAt);
    this.changed();
  }

  private forgetWarnings(kind: 'expiry' | 'idle', deadline: string): void {
    const prefix = `expiring:${kind}:`;
    this.carried.warningsSent = this.carried.warningsSent.filter(
      (k) => !k.startsWith(prefix) || k.startsWith(`${prefix}${deadline}:`),
    );
  }

  suspendedChanged(suspended: boolean): void {
    this.carried.suspended = suspended;
    this.changed();
  }

  revokeScheduled(schedule: CarriedLifecycle['scheduledRevoke']): void {
    this.carried.scheduledRevoke = schedule;
    this.changed();
  }

  suspiciousReported(): number {
    this.carried.suspiciousReports++;
    this.changed();
    return this.carried.suspiciousReports;
  }

  /** An automatic rotation could not happen (no owner destination): the next one is armed. */
  rotationSkipped(nowMs: number): void {
    if (this.policy?.rotateEveryMs) this.carried.rotateAt = iso(nowMs + this.policy.rotateEveryMs);
    this.changed();
  }

  /** The automatic rotation's instant has come (a manual rotation since re-armed it). */
  rotationDue(nowMs: number): boolean {
    return this.carried.rotateAt !== null && Date.parse(this.carried.rotateAt) <= nowMs;
  }

  /** The rotation id of the next automatic rotation: deterministic, so a retried activity finds its own. */
  nextRotationId(tokenId: string): string {
    return `${tokenId}:rot:${this.carried.rotations + 1}`;
  }

  /** Plain JSON for continue-as-new. */
  toCarried(): CarriedLifecycle {
    return JSON.parse(JSON.stringify(this.carried)) as CarriedLifecycle;
  }

  private changed(): void {
    this.changes++;
  }
}
