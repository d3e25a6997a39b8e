/**
 * Workflow inputs, results and message definitions: shared by the workflow, the worker and every
 * client. Pure module (it is bundled into the workflow sandbox).
 */
import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import {
  QUERY,
  SIGNAL,
  UPDATE,
  type DeliveryState,
  type InitiatingEntity,
  type PropagationState,
  type PropagationTiming,
  type ReconcileSet,
  type SuspiciousAction,
  type TokenStatus,
} from './names.js';

import type { KillResult } from './store/kill.js';

export type { PropagationTiming } from './names.js';

/** Input of `tokenLifecycle`: ids and timestamps only, never a secret. */
export interface TokenWorkflowInput {
  version: 1;
  tokenId: string;
  subject: string;
  receivers: string[];
  /** From the store (database clock), ISO 8601. */
  expiresAt: string;
  /** Id of the token's revocation event (the outbox rows' event id, the receivers' webhook-id). */
  revocationEventId: string;
  /**
   * Ignored by runs that read their timing from the worker (every run since that change); runs
   * recorded before it used this, so histories holding it still replay.
   */
  timing?: PropagationTiming;
  /** The token's policy when the run started (absent: no policy; the global maximum lifetime only). */
  policy?: PolicySnapshot;
  /** Set by the workflow itself when it continues as new: what the next run starts from. */
  carried?: CarriedLifecycle;
}

/** A named policy as the workflow sees it (store `policy` row; durations in ms, null when unset). */
export interface PolicySnapshot {
  name: string;
  version: number;
  maxLifetimeMs: number | null;
  idleTimeoutMs: number | null;
  rotateEveryMs: number | null;
  graceMs: number;
  /** Warnings before expiry or idle revocation, largest first. */
  warnBeforeMs: number[];
  /** Null: any scope. */
  allowedScopes: string[] | null;
  onSuspicious: SuspiciousAction;
  /** Whether the policy names a destination for the token's owner (warnings, rotated secrets). */
  hasOwnerDestination: boolean;
}

/** The alive phase's state carried across continue-as-new (plain JSON). */
export interface CarriedLifecycle {
  /** The store's expiry as last adopted (extend/shorten move it). */
  expiresAt: string;
  currentCredentialId: string | null;
  /** The immediately previous credential and the end of its grace; null when none is in grace. */
  previous: { credentialId: string; validUntil: string } | null;
  /** credential.revoked events whose deliveries have not all settled yet. */
  credentialRevocations: { credentialId: string; eventId: string }[];
  /** When the next automatic rotation is due (null: the policy rotates nothing). */
  rotateAt: string | null;
  /** When inactivity is next checked (null: no idle timeout). */
  idleCheckAt: string | null;
  suspended: boolean;
  scheduledRevoke: { at: string; reason: string; actor: string } | null;
  /** Rotations done so far, across runs (ids of automatic rotations derive from it). */
  rotations: number;
  /** Suspicious reports handled so far, across runs. */
  suspiciousReports: number;
  /** Keys of the warnings already sent for the current deadlines (each is sent once, across runs). */
  warningsSent: string[];
}

/** The timing a run propagates with, and where it came from. */
export interface EffectiveTiming extends PropagationTiming {
  source: 'worker' | 'workflow input';
}

/** What the store and the worker say when propagation starts (the `loadPropagation` activity). */
export interface PropagationSnapshot {
  /** The worker's TOKENWARDEN_ESCALATE_AFTER, TOKENWARDEN_RETRY_INITIAL and TOKENWARDEN_RETRY_MAX. */
  timing: PropagationTiming;
  /** The delivery rows of the token's revocation event; empty until a kill has committed. */
  deliveries: DeliveryView[];
}

/**
 * The kill's outcome with what propagation starts from, read right after it (the `killAndLoad`
 * local activity): a run that records the kill can start its deliveries in the same workflow task.
 */
export interface KillSnapshot extends PropagationSnapshot {
  kill: KillResult;
}

export interface RevokeRequest {
  reason: string;
  actor: string;
  initiatingEntity: InitiatingEntity;
  correlationId?: string;
  /** Set by the library: lets the caller recognise its own kill if the workflow's commits first. */
  requestId?: string;
}

/** Payload of the `revoke` Signal. Every field is optional: a malformed signal still revokes. */
export type RevokeSignalPayload = Partial<RevokeRequest> | undefined;

export interface OperatorRequest {
  /** Required: why the operator intervenes (audited). */
  reason: string;
  actor?: string;
}

export interface DeliveryView {
  receiverId: string;
  eventId: string;
  status: DeliveryState;
  attempts: number;
  lastStatusCode: number | null;
  lastError: string | null;
}

export type LifecyclePhase = 'active' | 'killing' | 'propagating' | 'stuck' | 'complete';

export interface TokenWorkflowView {
  tokenId: string;
  phase: LifecyclePhase;
  status: TokenStatus;
  propagation: PropagationState;
  expiresAt: string;
  /** As of the last delivery result or store read (attempts made since are in the store only). */
  deliveries: DeliveryView[];
  retryRound: number;
  /** Whether an operator forced completion. */
  forced: boolean;
  /** Set once propagation starts. */
  timing: EffectiveTiming | null;
  /** When propagation escalates to `stuck` unless every receiver has confirmed; null when not pending. */
  escalateAt: string | null;
}

export interface TokenLifecycleResult {
  tokenId: string;
  status: TokenStatus;
  propagation: 'complete';
  forced: boolean;
  deliveries: DeliveryView[];
}

/** Update `rotate`: the caller generated the secret; the workflow gets its hash only. */
export interface RotateRequest {
  /** `cred_…`, generated by the caller (a retry with the same id is the same rotation). */
  credentialId: string;
  /** SHA-256 of the new token string, 64 hex digits. */
  secretHash: string;
  /** Grace of the previous credential; the policy's (or the worker's default) when absent. */
  graceMs?: number;
  actor?: string;
  reason?: string;
}
export interface RotateResult {
  tokenId: string;
  credentialId: string;
  previousCredentialId: string | null;
  /** When the previous credential stops being valid; null when there was none. */
  previousValidUntil: string | null;
}

/** Signal `reportSuspicious`. Never refused: a malformed report is still acted on and audited as such. */
export interface SuspiciousReport {
  reason: string;
  /** Free-form JSON evidence (bounded: 8 KiB as JSON), kept in the audit trail. */
  evidence?: unknown;
  actor?: string;
  reportId?: string;
}

/** Signal `policyChanged`. */
export interface PolicyChangedSignal {
  policy?: string;
  /** The `policy apply` operation (audited on the token's events). */
  operationId?: string;
}

export interface SuspendRequest {
  reason: string;
  actor?: string;
}
export interface SuspendResult {
  suspended: boolean;
  /** When the store recorded the suspension (null after a resume). */
  suspendedAt: string | null;
}

export interface ScheduleRevokeRequest {
  /** ISO 8601 instant, in the future. */
  at: string;
  reason: string;
  actor?: string;
}
export interface ScheduleRevokeResult {
  revokeAt: string | null;
}

/** Update `changeExpiry`: the new expiry is now + ttlMs on the database clock. */
export interface ChangeExpiryRequest {
  ttlMs: number;
  /** `extend` refuses an earlier expiry, `shorten` a later one. */
  mode: 'extend' | 'shorten';
  reason: string;
  actor?: string;
}
export interface ChangeExpiryResult {
  expiresAt: string;
  previousExpiresAt: string;
}

export interface RetryPropagationResult {
  retrying: string[];
}
export interface ForceCompleteResult {
  forced: string[];
}

export interface ReconcileInput {
  version: 1;
  /** Overrides the worker's TOKENWARDEN_RECONCILE_GRACE (tests use 0). */
  graceMs?: number;
  /** Rows one activity handles (one page of one set). */
  batchSize?: number;
  /** How long one run walks each set before it moves on to the next set (checked after each page). */
  setBudgetMs?: number;
  /** Set by the pass itself when it continues as new: where each set's walk resumes, and the report so far. */
  carried?: ReconcileCarried;
}
export interface ReconcileCarried {
  /** Sets this pass has walked to their end (not walked again until the next pass). */
  walked: ReconcileSet[];
  /** Per set cut off by its budget: the token id its walk resumes after. */
  resumeAfter: Partial<Record<ReconcileSet, string>>;
  report: ReconcileReport;
}
/** Healing actions a report counts (every row also goes to the metrics; errors to the worker's log). */
export const RECONCILE_ACTIONS = ['expired', 'signalled', 'restarted', 'started', 'wedged'] as const;
export type ReconcileAction = (typeof RECONCILE_ACTIONS)[number];
/**
 * What a pass did: the number of rows of each kind and the first few of each, never every id, so a
 * pass over thousands of rows still fits in one payload.
 */
export interface ReconcileReport {
  /** What the pass healed, in words (the Web UI shows a run's result; passes recorded before have none). */
  summary?: string;
  counts: Record<ReconcileAction | 'errors', number>;
  /** Active rows past expiry, killed as expired. */
  expired: string[];
  /** Dead tokens whose workflow had not taken over propagation, signalled (with start). */
  signalled: string[];
  /** Unfinished propagations whose workflow was no longer running, started again. */
  restarted: string[];
  /** Active tokens whose workflow was never started. */
  started: string[];
  /** Dead tokens whose workflow runs but cannot make progress (its workflow tasks keep failing): surfaced, not signalled. */
  wedged: string[];
  /** Rows that could not be healed this pass (retried on the next). */
  errors: { tokenId: string; error: string }[];
  /** The audit checkpoint at the end of the pass (passes recorded before checkpoints have none). */
  auditCheckpoint?: AuditCheckpointOutcome;
}

/** What a pass's audit checkpoint step did (common/store/audit-verify.ts writes it). */
export interface AuditCheckpointOutcome {
  written: boolean;
  /** Why none was written: the last one is younger than the interval, nothing changed since, or no key. */
  skipped?: 'recent' | 'unchanged' | 'no audit key';
  /** The checkpoint written, or the latest one when skipped. */
  seq?: number;
  chains?: number;
  events?: number;
  /** SHA-256 of the signed statement (logged by the worker: a copy outside the database). */
  digest?: string;
}

export const emptyReconcileReport = (): ReconcileReport => ({
  counts: { expired: 0, signalled: 0, restarted: 0, started: 0, wedged: 0, errors: 0 },
  expired: [],
  signalled: [],
  restarted: [],
  started: [],
  wedged: [],
  errors: [],
});

/** Adds `from` to `into`, keeping at most `sample` entries of each list. */
export function addToReconcileReport(into: ReconcileReport, from: ReconcileReport, sample: number): void {
  for (const action of RECONCILE_ACTIONS) {
    into.counts[action] += from.counts[action];
    into[action].push(...from[action].slice(0, Math.max(0, sample - into[action].length)));
  }
  into.counts.errors += from.counts.errors;
  into.errors.push(...from.errors.slice(0, Math.max(0, sample - into.errors.length)));
}

export const revokeSignal = defineSignal<[RevokeSignalPayload?]>(SIGNAL.revoke);
export const retryPropagationUpdate = defineUpdate<RetryPropagationResult, [OperatorRequest]>(UPDATE.retryPropagation);
export const forceCompleteUpdate = defineUpdate<ForceCompleteResult, [OperatorRequest]>(UPDATE.forceComplete);
export const describeQuery = defineQuery<TokenWorkflowView>(QUERY.describe);
export const rotateUpdate = defineUpdate<RotateResult, [RotateRequest]>(UPDATE.rotate);
export const reportSuspiciousSignal = defineSignal<[SuspiciousReport?]>(SIGNAL.reportSuspicious);
export const policyChangedSignal = defineSignal<[PolicyChangedSignal?]>(SIGNAL.policyChanged);
export const suspendUpdate = defineUpdate<SuspendResult, [SuspendRequest]>(UPDATE.suspend);
export const resumeUpdate = defineUpdate<SuspendResult, [SuspendRequest]>(UPDATE.resume);
export const scheduleRevokeUpdate = defineUpdate<ScheduleRevokeResult, [ScheduleRevokeRequest]>(UPDATE.scheduleRevoke);
export const cancelScheduledRevokeUpdate = defineUpdate<ScheduleRevokeResult, [OperatorRequest]>(
  UPDATE.cancelScheduledRevoke,
);
export const changeExpiryUpdate = defineUpdate<ChangeExpiryResult, [ChangeExpiryRequest]>(UPDATE.changeExpiry);
