/**
 * One durable workflow per token: sleeps until expiry or a revoke, kills the token in the store
 * (through the one kill activity), then propagates the revocation to every receiver until each has
 * confirmed, escalating to `stuck` when one has not by the deadline. Deterministic: all I/O is in
 * activities; time is workflow time. The state and its transitions live in lifecycle-state.ts.
 */
import {
  type ActivityOptions,
  ActivityFailure,
  ApplicationFailure,
  CancellationScope,
  TemporalFailure,
  allHandlersFinished,
  condition,
  continueAsNew,
  currentUpdateInfo,
  isCancellation,
  log,
  patched,
  proxyActivities,
  proxyLocalActivities,
  setCurrentDetails,
  setHandler,
  sleep,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { Activities } from '../activities/index.js';
import type { FirstAttemptOutcome } from '../activities/propagation.js';
import { RECEIVER_REJECTED, SEARCH_ATTRIBUTE, SYSTEM_REVOKE_REASON } from '../common/names.js';
import type { KillResult } from '../common/store/index.js';
import { summaryText } from '../common/text.js';
import {
  AliveState,
  INVALID_LIFECYCLE_REQUEST,
  runPredatesRequest,
  isOwnerWork,
  TOKEN_NOT_ACTIVE,
  parseSuspiciousReport,
  validateChangeExpiryRequest,
  validateRotateRequest,
  validateScheduleRevokeRequest,
  validateSuspendRequest,
  type AliveDeadline,
  LifecycleState,
  NOT_PROPAGATING,
  failureMessage,
  isReceiverRejection,
  msUntil,
  pauseAfterEnding,
  validateOperatorRequest,
} from './lifecycle-state.js';
import {
  describeQuery,
  forceCompleteUpdate,
  retryPropagationUpdate,
  revokeSignal,
  type DeliveryView,
  type ForceCompleteResult,
  type KillSnapshot,
  type OperatorRequest,
  type PropagationSnapshot,
  type PropagationTiming,
  type RetryPropagationResult,
  type TokenLifecycleResult,
  type TokenWorkflowInput,
  cancelScheduledRevokeUpdate,
  changeExpiryUpdate,
  policyChangedSignal,
  reportSuspiciousSignal,
  resumeUpdate,
  rotateUpdate,
  scheduleRevokeUpdate,
  suspendUpdate,
  type ChangeExpiryRequest,
  type ChangeExpiryResult,
  type RotateRequest,
  type RotateResult,
  type ScheduleRevokeRequest,
  type ScheduleRevokeResult,
  type SuspendRequest,
  type SuspendResult,
} from '../common/messages.js';

/**
 * Changes to the command sequence since histories were first recorded: a run follows a patch from
 * the point it reaches it live; a recorded run without its marker replays the code before it.
 */
const PATCHES = {
  /**
   * Propagation reads the worker's timing and the store's delivery rows (a local activity): before
   * deliveries start when a run begins already revoking, after the kill otherwise; the rows again
   * when a delivery ends and before escalating. A delivery activity that ended without a
   * receiver's rejection is delivered again after a pause.
   */
  storeDrivenPropagation: 'store-driven-propagation',
  /** A sleeping token also wakes when the server suggests continue-as-new. */
  wakeForContinueAsNew: 'wake-for-continue-as-new',
  /**
   * Fewer workflow tasks per token: the kill is a local activity that also returns the timing and
   * the delivery rows, so every delivery starts in the task that records the kill; completion is a
   * local activity in the task of the last confirmation; one escalation timer per deadline instead
   * of a timer restarted on every confirmation; the first attempt at every pending receiver is one
   * activity (deliverRevocationToAll), the receivers it does not settle are retried one by one.
   */
  localStoreCalls: 'local-store-calls',
  /**
   * The alive phase as a deadlines loop (expiry, idle check, rotation, end of grace, warnings,
   * scheduled revoke) and the self-managing messages. Asked only by a run with a policy, a run
   * continued with carried state, or the handler of a new message: a token without any of these
   * keeps the command sequence it always had.
   */
  selfManaging: 'self-managing',
  /**
   * Work that waits on the owner's destination (warnings, automatic rotations) never holds up the
   * alive loop: it is bounded in time and cancelled when a revoke arrives or another deadline falls
   * due; the drain before continue-as-new gives way to a revoke; a scheduled revoke's schedule and
   * cancellation are decided before the store is written.
   */
  ownerOffCriticalPath: 'owner-off-critical-path',
  /**
   * A manual rotation's store write is a local activity: the Update is accepted and completed in
   * one workflow task. A kill that comes meanwhile waits for it (never two local calls at once).
   */
  localRotate: 'local-rotate',
  /**
   * Asked only by runs that follow ownerOffCriticalPath. A manual rotate retried after the store
   * committed it is adopted; a cancelled rotation is waited for (one that was sending promotes and
   * is recorded), except by a revoke; a suspicious report stops the periodic rotation and revokes
   * at once when the owner is failing; rotations heartbeat from their start with a 20 s timeout; a
   * skipped rotation is audited; the drain before continue-as-new gives way to the token's own
   * deadlines; expiry changes are serialised.
   */
  ownerWorkV2: 'owner-work-v2',
  /**
   * While a death propagates, the TokenPendingReceivers search attribute names the receivers not
   * yet confirmed (upserted when that set changes, removed when none is left): "which tokens are
   * stuck on crm?" is one visibility query.
   */
  pendingReceivers: 'pending-receivers',
  /**
   * A raw Signal's reason (revoke, suspicious report) is recorded with email addresses masked, the
   * masking done before the cut to 500 characters; a Signal received before it keeps its old reading.
   */
  maskedReasons: 'masked-reasons',
} as const;

/** A warning the owner's destination has not taken within this is dropped (audited as notice.dropped). */
const WARNING_DROPPED_AFTER = '1h';
/** An automatic rotation that cannot deliver its secret within this is skipped and re-armed. */
const ROTATION_SKIPPED_AFTER = '15m';
/** A rotation for a suspicious report that cannot deliver within this revokes the token instead. */
const SUSPICIOUS_ROTATION_REVOKES_AFTER = '5m';

const store = proxyActivities<Activities>({
  startToCloseTimeout: '30s',
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: ['NotFoundError'],
  },
});

/** The self-managing calls: a refusal (bad input, a token not active, no owner destination) is final. */
const selfManaging = proxyActivities<Activities>({
  startToCloseTimeout: '30s',
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: ['NotFoundError', INVALID_LIFECYCLE_REQUEST, TOKEN_NOT_ACTIVE, 'NoOwnerDestination'],
  },
});

/**
 * Warnings to the owner (PATCHES.ownerOffCriticalPath): bounded; a cancelled one is not waited for
 * (a send that still lands is the same notice, deduplicated by its key).
 */
const ownerWarnings = proxyActivities<Activities>({
  startToCloseTimeout: '30s',
  scheduleToCloseTimeout: WARNING_DROPPED_AFTER,
  cancellationType: 'TRY_CANCEL',
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: ['NotFoundError', INVALID_LIFECYCLE_REQUEST, TOKEN_NOT_ACTIVE, 'NoOwnerDestination'],
  },
});

/**
 * Automatic rotations (PATCHES.ownerOffCriticalPath): bounded, heartbeated so a cancellation reaches
 * the attempt (it stops before promoting). Not waited for: the SDK's default cancellation type is
 * TRY_CANCEL (see rotationOptionsV2).
 */
const rotationOptions = (scheduleToCloseTimeout: string): ActivityOptions => ({
  startToCloseTimeout: '30s',
  heartbeatTimeout: '5s',
  scheduleToCloseTimeout,
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: ['NotFoundError', INVALID_LIFECYCLE_REQUEST, TOKEN_NOT_ACTIVE, 'NoOwnerDestination'],
  },
});
const ownerRotations = proxyActivities<Activities>(rotationOptions(ROTATION_SKIPPED_AFTER));
/** A suspect secret must not stay valid while the owner is down: the report falls back to revoke sooner. */
const suspiciousRotations = proxyActivities<Activities>(rotationOptions(SUSPICIOUS_ROTATION_REVOKES_AFTER));
/**
 * PATCHES.ownerWorkV2. The SDK sends heartbeats at most every 0.8 × heartbeatTimeout, and the first
 * store call may wait on the token's lock: 20 s leaves a loaded worker room (a timed-out attempt
 * re-sends). A cancelled rotation is waited for (the SDK's default is TRY_CANCEL): an attempt that
 * was already sending promotes, and the run must record that.
 */
const rotationOptionsV2 = (scheduleToCloseTimeout: string): ActivityOptions => ({
  ...rotationOptions(scheduleToCloseTimeout),
  heartbeatTimeout: '20s',
  cancellationType: 'WAIT_CANCELLATION_COMPLETED',
});
const ownerRotationsV2 = proxyActivities<Activities>(rotationOptionsV2(ROTATION_SKIPPED_AFTER));
const suspiciousRotationsV2 = proxyActivities<Activities>(rotationOptionsV2(SUSPICIOUS_ROTATION_REVOKES_AFTER));
/**
 * A periodic rotation in flight longer than this has not delivered in one attempt (an owner send
 * is bounded at 10 s): a suspicious report then takes the owner for failing and revokes at once.
 */
const OWNER_FAILING_AFTER_MS = 15_000;

/** Deliveries of credential.revoked events while the token lives: retried until settled or rejected. */
const credentialDeliveries = proxyActivities<Activities>({
  startToCloseTimeout: '15s',
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: [RECEIVER_REJECTED],
  },
});

/**
 * Short store calls on the hot path (reads that decide the next step, the kill, completion, a manual
 * rotation): local, so they cost no round trip through the server and no workflow task of their own.
 * Never two at once: concurrent local activities can resolve in other groupings on replay.
 */
const storeLocal = proxyLocalActivities<Activities>({
  startToCloseTimeout: '10s',
  // While a local call retries, the workflow task stays open (heartbeated, three events every 8 s):
  // after 30 s, the call goes through the server as an ordinary activity (see localFirst).
  scheduleToCloseTimeout: '30s',
  retry: {
    initialInterval: '200ms',
    backoffCoefficient: 2,
    maximumInterval: '10s',
    nonRetryableErrorTypes: ['NotFoundError'],
  },
});

/**
 * The first attempt at every pending receiver together: one attempt each (the workflow retries the
 * unsettled ones one by one), bounded like a single attempt plus recording fifty outcomes; its
 * heartbeats show a lost worker within seconds.
 */
const firstAttempts = proxyActivities<Activities>({
  startToCloseTimeout: '30s',
  // The SDK sends heartbeats at most every 0.8 × this: 20 s leaves a loaded worker room.
  heartbeatTimeout: '20s',
  retry: { maximumAttempts: 1 },
});

/**
 * A store call made locally, or through the server when the local call gave up (the store down or a
 * row locked for 30 s): the ordinary activity retries without growing the history. A
 * non-retryable failure (the token does not exist) is not tried again.
 */
async function localFirst<T>(local: () => Promise<T>, remote: () => Promise<T>): Promise<T> {
  try {
    return await local();
  } catch (err) {
    // Any failure of the call (its own error, a timeout) but a cancellation or a non-retryable one:
    // live, a timeout arrives wrapped in an ActivityFailure, on replay as the marker's bare
    // TimeoutFailure; both must take the same branch.
    if (isCancellation(err) || !(err instanceof TemporalFailure)) throw err;
    const failure = err instanceof ActivityFailure ? err.cause : err;
    if (failure instanceof ApplicationFailure && failure.nonRetryable) throw err;
    return remote();
  }
}

/**
 * Delivery activities: retried on the worker's schedule, or, before that timing is known (the first
 * attempt that goes out with the kill), a single attempt that the workflow schedules again.
 */
function deliveryActivities(timing: PropagationTiming | undefined) {
  return proxyActivities<Activities>({
    // One HTTP attempt is bounded at 10 s; a worker that died mid-attempt delays the retry by this much.
    startToCloseTimeout: '15s',
    // TRY_CANCEL: retryPropagation restarts a delivery at once. The attempt in flight does not
    // heartbeat, so it is not told: it may still POST (a duplicate the receiver drops by webhook-id)
    // and records its own outcome; a settled row is never moved back.
    cancellationType: 'TRY_CANCEL',
    retry: timing
      ? {
          initialInterval: timing.retryInitialMs,
          backoffCoefficient: 2,
          maximumInterval: timing.retryMaxMs,
          nonRetryableErrorTypes: [RECEIVER_REJECTED],
        }
      : { maximumAttempts: 1, nonRetryableErrorTypes: [RECEIVER_REJECTED] },
  });
}

export async function tokenLifecycle(input: TokenWorkflowInput): Promise<TokenLifecycleResult> {
  const lifecycle = new TokenLifecycle(input);
  const killed = await lifecycle.liveUntilKilled();
  await lifecycle.propagate(killed);
  return lifecycle.complete();
}

/** One receiver's delivery loop: its running attempt, and whether an operator interrupted it. */
interface DeliveryRun {
  scope: CancellationScope | undefined;
  /** An operator cancelled the attempt (retry now, or forced complete); any other cancellation is the workflow's own. */
  interrupted: boolean;
  /** Activities in a row that ended without a result or a rejection (paces the retries). */
  endingsInARow: number;
  /** The operator retry round when the last attempt started: a retry asked during it counts. */
  roundAtAttempt: number;
}

class TokenLifecycle {
  private readonly state: LifecycleState;
  private readonly runs = new Map<string, DeliveryRun>();
  /** Whether this run follows PATCHES.storeDrivenPropagation: decided where it first matters. */
  private storeDrivenDecision: boolean | undefined;
  /** Whether this run follows PATCHES.localStoreCalls: decided when its kill starts. */
  private localDecision: boolean | undefined;
  /** The escalation deadline's one timer (PATCHES.localStoreCalls), and whether it has fired. */
  private escalationTimer: CancellationScope | undefined;
  private escalationDue = false;
  /** The run has slept since it started: a revoke now finds nothing propagated by this run. */
  private wasAsleep = false;
  private deliveriesStarted = false;
  private storeRead: Promise<PropagationSnapshot> | undefined;
  /** True once every delivery loop has ended; `deliveryFailure` holds what ended one abnormally. */
  private deliveriesEnded = false;
  private deliveryFailure: unknown;
  /** Whether this run follows PATCHES.selfManaging: undefined until something needs it. */
  private selfManagingDecision: boolean | undefined;
  /** The deadlines of the alive phase (used with PATCHES.selfManaging only). */
  private readonly alive: AliveState;
  /** A rotation happened: the run continues as new once its handlers have finished. */
  private continueAsNewDue = false;
  private rotationQueue: Promise<unknown> = Promise.resolve();
  private readonly handlerQueues = new Map<string, Promise<unknown>>();
  private readonly credentialDeliveriesRunning = new Set<string>();
  /** Whether this run follows PATCHES.ownerOffCriticalPath: only a `true` answer is kept. */
  private offPathDecision = false;
  /** The periodic rotation in flight: a manual rotation cancels it rather than wait behind the owner. */
  private periodicRotation: CancellationScope | undefined;
  /** A manual rotation's local store write in flight (PATCHES.localRotate): a kill waits for it. */
  private localRotation: Promise<unknown> | undefined;
  /** Whether this run follows PATCHES.ownerWorkV2: only a `true` answer is kept. */
  private ownerWorkV2Decision = false;
  /** Whether this run follows PATCHES.pendingReceivers, asked once at the run's start. */
  private readonly pendingReceiversDecision: boolean;
  /** The receivers TokenPendingReceivers last said (comma-joined), undefined before the first upsert. */
  private pendingReceiversShown: string | undefined;
  /** The periodic rotation in flight (PATCHES.ownerWorkV2): when it started, and its end. */
  private periodicInFlight: { startedAtMs: number; ended: Promise<void> } | undefined;
  /** Whether the last automatic rotation ended in a failure to deliver (not a cancellation). */
  private lastRotationFailed = false;

  constructor(private readonly input: TokenWorkflowInput) {
    // Asked once, in the run's first task: a decision asked later, after a local activity's result,
    // could fall in another workflow task on replay than live (a task heartbeated while the local
    // activity ran). A run started before this code never maintains the attribute.
    this.pendingReceiversDecision = patched(PATCHES.pendingReceivers);
    this.alive = new AliveState(input, Date.now());
    // Every transition rewrites the current details, so the Web UI never shows a stale phase.
    this.state = new LifecycleState(input, (state) => {
      setCurrentDetails(state.details());
      this.showPendingReceivers(state);
    });
    setCurrentDetails(this.state.details());
    for (const receiverId of input.receivers) {
      this.runs.set(receiverId, { scope: undefined, interrupted: false, endingsInARow: 0, roundAtAttempt: 0 });
    }
    this.listen();
  }

  /** Handlers first, before any await: an Update reaching a workflow without its handler is rejected. */
  private listen(): void {
    setHandler(revokeSignal, (payload) => this.state.revokeRequested(payload, () => patched(PATCHES.maskedReasons)));
    setHandler(describeQuery, () => this.state.view());
    const validator = (request: unknown) => {
      validateOperatorRequest(request);
      const refusal = this.state.operatorRefusal();
      if (refusal) throw ApplicationFailure.nonRetryable(refusal, NOT_PROPAGATING);
    };
    setHandler(retryPropagationUpdate, (request) => this.retryPropagation(request), { validator });
    setHandler(forceCompleteUpdate, (request) => this.forceComplete(request), { validator });
    const active = () => {
      const refusal = this.activeRefusal();
      if (refusal) throw ApplicationFailure.nonRetryable(refusal, TOKEN_NOT_ACTIVE);
    };
    setHandler(rotateUpdate, (request) => this.rotate(request), {
      validator: (request) => (validateRotateRequest(request), active()),
    });
    setHandler(suspendUpdate, (request) => this.setSuspended(true, request), {
      validator: (request) => (validateSuspendRequest(request), active()),
    });
    setHandler(resumeUpdate, (request) => this.setSuspended(false, request), {
      validator: (request) => (validateSuspendRequest(request), active()),
    });
    setHandler(scheduleRevokeUpdate, (request) => this.scheduleRevoke(request), {
      validator: (request) => (validateScheduleRevokeRequest(request, Date.now()), active()),
    });
    setHandler(cancelScheduledRevokeUpdate, (request) => this.cancelScheduledRevoke(request), {
      validator: (request) => (validateSuspendRequest(request), active()),
    });
    setHandler(changeExpiryUpdate, (request) => this.changeExpiry(request), {
      validator: (request) => (validateChangeExpiryRequest(request), active()),
    });
    // A Signal's failure would fail the whole workflow: a refused step is logged, the token lives on.
    setHandler(reportSuspiciousSignal, (payload) =>
      this.signalled('reportSuspicious', () => this.reportSuspicious(payload)),
    );
    setHandler(policyChangedSignal, () => this.signalled('policyChanged', () => this.policyChanged()));
  }

  // ---------------------------------------------------------------- phase 1: alive until killed

  /**
   * Sleeps until expiry or a revoke; returns the kill's facts once the token is dead in the store
   * (with the store's propagation snapshot when the kill was a local activity).
   */
  async liveUntilKilled(): Promise<KillResult | KillSnapshot> {
    // A run with a policy or carried state runs the deadlines loop from its start.
    if (this.input.policy !== undefined || this.input.carried !== undefined) this.enterSelfManaging();
    for (;;) {
      if (this.state.revokeRequest) return this.killOnRevoke();
      if (this.selfManagingDecision === true) {
        const kill = await this.aliveStep();
        if (kill) return kill;
        continue;
      }
      const remaining = msUntil(this.input.expiresAt, Date.now());
      if (remaining <= 0) {
        const kill = await this.killOnExpiry();
        if (kill) return kill;
        continue;
      }
      if (workflowInfo().continueAsNewSuggested) {
        await condition(allHandlersFinished);
        if (!this.state.revokeRequest) await continueAsNew<typeof tokenLifecycle>(this.input);
        continue;
      }
      const wakeForContinueAsNew = patched(PATCHES.wakeForContinueAsNew);
      this.wasAsleep = true;
      await condition(
        () =>
          this.state.revokeRequest !== undefined ||
          (wakeForContinueAsNew && workflowInfo().continueAsNewSuggested) ||
          // A new message switched this run to the deadlines loop (never true in a recorded older run).
          this.selfManagingDecision === true,
        remaining,
        { summary: `sleep until expiry at ${this.input.expiresAt}` },
      );
    }
  }

  /**
   * TokenPendingReceivers follows the unconfirmed receivers once the token is dead (PATCHES.pendingReceivers):
   * an upsert only when the set changes, so a propagation adds a handful of events, not one per attempt.
   */
  private showPendingReceivers(state: LifecycleState): void {
    if (state.phase === 'active' || state.phase === 'killing') return;
    const pending = state
      .unsettled()
      .map((d) => d.receiverId)
      .sort();
    const shown = pending.join(',');
    if (shown === this.pendingReceiversShown) return;
    if (!this.pendingReceiversDecision) return;
    this.pendingReceiversShown = shown;
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.pendingReceivers, value: pending.length > 0 ? pending : null }]);
  }

  // ---------------------------------------------------------------- the deadlines loop (PATCHES.selfManaging)

  /**
   * Whether this run follows PATCHES.selfManaging; asked once, by the first thing that needs it. A
   * recorded run without the marker (a new message sent to an older run) ignores the message.
   */
  private enterSelfManaging(): boolean {
    // Only a `true` answer is kept: a missing marker met during replay is no decision, as the run may
    // go on live (a message buffered by an older worker and handled on replay must not disable it).
    if (this.selfManagingDecision !== true) this.selfManagingDecision = patched(PATCHES.selfManaging);
    return this.selfManagingDecision;
  }

  /** Whether owner work is off the critical path (PATCHES.ownerOffCriticalPath); only `true` is kept. */
  private get offPath(): boolean {
    if (!this.offPathDecision) this.offPathDecision = patched(PATCHES.ownerOffCriticalPath);
    if (this.offPathDecision) this.alive.skipIdleWarningsBeyondTimeout = true;
    return this.offPathDecision;
  }

  /** Whether this run follows PATCHES.ownerWorkV2 (asked only by runs that follow ownerOffCriticalPath). */
  private get ownerWorkV2(): boolean {
    if (!this.ownerWorkV2Decision) this.ownerWorkV2Decision = patched(PATCHES.ownerWorkV2);
    return this.ownerWorkV2Decision;
  }

  /**
   * Owner work (a warning, the periodic rotation) raced against what must not wait for it: a
   * revoke, continue-as-new, a message that asks for it (`yieldTo`), or another deadline falling due.
   * The loser is cancelled; the loop then acts, and tries the work again when it is still due.
   */
  private async raceOwnerWork(
    work: () => Promise<unknown>,
    scope: CancellationScope,
    yieldTo: () => boolean = () => false,
  ): Promise<void> {
    let outcome: { error?: unknown } | undefined;
    scope.run(work).then(
      () => (outcome = {}),
      (error: unknown) => (outcome = { error }),
    );
    for (;;) {
      const seen = this.alive.changes;
      const own = this.alive.nextOwn(Date.now());
      const stop = () =>
        this.state.revokeRequest !== undefined ||
        this.continueAsNewDue ||
        workflowInfo().continueAsNewSuggested ||
        yieldTo();
      const woken = await condition(
        () => outcome !== undefined || stop() || this.alive.changes !== seen,
        Math.max(1, own.atMs - Date.now()),
        { summary: summaryText(`owner work, until ${describeDeadline(own)}`) },
      );
      if (outcome !== undefined) break;
      // A changed deadline (a new schedule, an adopted expiry) is re-read; anything else stops the work.
      if (woken && !stop()) continue;
      scope.cancel();
      // A revoke does not wait for a rotation that is still sending (PATCHES.ownerWorkV2): the kill
      // makes its credential dead whatever the attempt does.
      if (this.ownerWorkV2Decision && this.state.revokeRequest !== undefined) return;
      await condition(() => outcome !== undefined);
      break;
    }
    const ended = outcome as { error?: unknown } | undefined;
    if (ended?.error !== undefined && !isCancellation(ended.error)) throw ended.error;
  }

  /**
   * Waits for every handler to finish; false when one of the token's own deadlines (expiry, a
   * scheduled revoke, an idle check, an end of grace) falls due first, or a revoke arrives.
   */
  private async drainUnlessOwnDeadline(): Promise<boolean> {
    for (;;) {
      const own = this.alive.nextOwn(Date.now());
      if (own.atMs <= Date.now()) return false;
      const seen = this.alive.changes;
      await condition(
        () => allHandlersFinished() || this.state.revokeRequest !== undefined || this.alive.changes !== seen,
        Math.max(1, own.atMs - Date.now()),
        { summary: summaryText(`drain handlers before continue-as-new, until ${describeDeadline(own)}`) },
      );
      if (this.state.revokeRequest !== undefined) return false;
      if (allHandlersFinished()) return true;
    }
  }

  /** One step of the alive phase: act on the deadline that is due, or sleep until the next one. */
  private async aliveStep(): Promise<KillResult | KillSnapshot | undefined> {
    if (this.continueAsNewDue || workflowInfo().continueAsNewSuggested) {
      // A handler stuck on an outside system must not hold up a revoke that arrives meanwhile, nor
      // (PATCHES.ownerWorkV2) the token's own deadlines: those are acted on first, below.
      let drained = true;
      if (this.offPath && this.ownerWorkV2) drained = await this.drainUnlessOwnDeadline();
      else if (this.offPath) await condition(() => allHandlersFinished() || this.state.revokeRequest !== undefined);
      else await condition(allHandlersFinished);
      if (this.state.revokeRequest) return undefined;
      if (drained) {
        await continueAsNew<typeof tokenLifecycle>({
          ...this.input,
          expiresAt: this.alive.expiresAt,
          ...(this.alive.policy ? { policy: this.alive.policy } : {}),
          carried: this.alive.toCarried(),
        });
      }
    }
    this.deliverCredentialRevocations();
    const now = Date.now();
    // Asked only when owner work is due: a run that never warns nor rotates keeps its commands.
    const ownerWorkDue = this.alive.due(now);
    const due = ownerWorkDue && isOwnerWork(ownerWorkDue) && this.offPath ? this.alive.due(now, true) : ownerWorkDue;
    if (!due) {
      const next = this.alive.next(now);
      const seen = this.alive.changes;
      this.wasAsleep = true;
      await condition(
        () =>
          this.state.revokeRequest !== undefined ||
          this.alive.changes !== seen ||
          this.continueAsNewDue ||
          workflowInfo().continueAsNewSuggested,
        Math.max(1, next.atMs - now),
        { summary: summaryText(`sleep until ${describeDeadline(next)}`) },
      );
      return undefined;
    }
    switch (due.kind) {
      case 'expiry':
        return this.killOnExpiry();
      case 'scheduledRevoke': {
        const scheduled = this.alive.carried.scheduledRevoke!;
        this.state.systemRevoke({ reason: scheduled.reason, actor: scheduled.actor, initiatingEntity: 'admin' });
        return undefined;
      }
      case 'idleCheck':
        await this.checkIdle();
        return undefined;
      case 'graceEnd':
        await this.endGrace(due.credentialId);
        return undefined;
      case 'warning':
        if (this.offPath) await this.raceOwnerWork(() => this.warn(due), new CancellationScope());
        else await this.warn(due);
        return undefined;
      case 'rotate':
        if (this.offPath) {
          const scope = new CancellationScope();
          this.periodicRotation = scope;
          const ended = this.raceOwnerWork(() => this.rotateAutomatically(undefined, 'rotate_every'), scope);
          const inFlight = {
            startedAtMs: Date.now(),
            ended: ended.then(
              () => undefined,
              () => undefined,
            ),
          };
          this.periodicInFlight = inFlight;
          await ended.finally(() => {
            if (this.periodicRotation === scope) this.periodicRotation = undefined;
            if (this.periodicInFlight === inFlight) this.periodicInFlight = undefined;
          });
        } else await this.rotateAutomatically(undefined, 'rotate_every');
        return undefined;
    }
  }

  /** At the idle deadline: the store's last use decides (used since: sleep on; idle: revoke). */
  private async checkIdle(): Promise<boolean> {
    const { lastActivityAt } = await selfManaging.readLastUse.executeWithOptions(
      { summary: 'idle check: read the last use' },
      [{ tokenId: this.input.tokenId }],
    );
    if (!this.alive.idleChecked(lastActivityAt, Date.now())) return false;
    this.state.systemRevoke({
      reason: SYSTEM_REVOKE_REASON.inactive,
      actor: 'system:inactivity',
      initiatingEntity: 'system',
    });
    return true;
  }

  private async endGrace(credentialId: string): Promise<void> {
    const ended = await selfManaging.endGrace.executeWithOptions(
      { summary: summaryText(`end of grace of ${credentialId}`) },
      [{ tokenId: this.input.tokenId, credentialId }],
    );
    if (ended.notYetEndedMs !== undefined) {
      // The database clock is behind workflow time: the credential stays valid there, so wait the
      // difference (woken as the deadlines sleep is) and let the deadlines loop end the grace again.
      const seen = this.alive.changes;
      await condition(
        () =>
          this.state.revokeRequest !== undefined ||
          this.alive.changes !== seen ||
          this.continueAsNewDue ||
          workflowInfo().continueAsNewSuggested,
        ended.notYetEndedMs,
        { summary: 'waiting for the database clock to reach the end of grace' },
      );
      return;
    }
    this.alive.graceEnded(credentialId, ended.revoked);
    this.deliverCredentialRevocations();
  }

  private async warn(warning: Extract<AliveDeadline, { kind: 'warning' }>): Promise<void> {
    // An idle deadline is an estimate until the last use is read: a use since moves it.
    if (warning.reason === 'inactivity') {
      const { lastActivityAt } = await selfManaging.readLastUse.executeWithOptions(
        { summary: 'before an inactivity warning: read the last use' },
        [{ tokenId: this.input.tokenId }],
      );
      this.alive.idleChecked(lastActivityAt, Date.now());
      if (this.alive.carried.idleCheckAt !== warning.deadline) return;
    }
    const warnings = this.offPath ? ownerWarnings : selfManaging;
    try {
      await warnings.sendWarning.executeWithOptions(
        { summary: summaryText(`warn the owner: ${warning.reason} at ${warning.deadline}`) },
        [
          {
            tokenId: this.input.tokenId,
            subject: this.input.subject,
            key: warning.key,
            reason: warning.reason,
            deadline: warning.deadline,
            beforeMs: warning.beforeMs,
          },
        ],
      );
    } catch (err) {
      if (!(err instanceof ActivityFailure) || isCancellation(err)) throw err;
      // The owner's destination refused it, or did not take it within WARNING_DROPPED_AFTER: the
      // warning is dropped, never the token's lifecycle.
      log.warn('warning dropped: the owner destination refused it or stayed unavailable', {
        tokenId: this.input.tokenId,
        key: warning.key,
        error: failureMessage(err),
      });
      if (this.offPath) {
        await store.recordAudit.executeWithOptions({ summary: 'audit: warning dropped' }, [
          {
            tokenId: this.input.tokenId,
            auditKey: `notice-dropped:${warning.key}`,
            kind: 'notice.dropped',
            data: { key: warning.key, reason: warning.reason, deadline: warning.deadline, error: failureMessage(err) },
          },
        ]);
      }
    }
    this.alive.warningSent(warning);
  }

  /** One rotation at a time (manual, automatic, suspicious): each waits for the one before. */
  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.rotationQueue.then(fn);
    this.rotationQueue = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /**
   * An automatic rotation: the activity generates the secret, stores its hash as pending, delivers
   * it to the owner and promotes it. History sees ids and hashes only. Without an owner destination
   * the rotation cannot happen (the secret would reach nobody): the next one is armed.
   */
  private async rotateAutomatically(graceMs: number | undefined, why: string): Promise<boolean> {
    return this.serialized(async () => {
      // A manual rotation that went first re-armed the periodic one.
      if (why === 'rotate_every' && this.offPathDecision && !this.alive.rotationDue(Date.now())) return false;
      const rotationId = this.alive.nextRotationId(this.input.tokenId);
      const v2 = this.offPathDecision && this.ownerWorkV2;
      this.lastRotationFailed = false;
      const rotations = !this.offPathDecision
        ? selfManaging
        : graceMs === 0
          ? v2
            ? suspiciousRotationsV2
            : suspiciousRotations
          : v2
            ? ownerRotationsV2
            : ownerRotations;
      try {
        const result = await rotations.rotateAutomatically.executeWithOptions(
          { summary: summaryText(`automatic rotation ${rotationId} (${why})`) },
          [{ tokenId: this.input.tokenId, rotationId, ...(graceMs !== undefined ? { graceMs } : {}), why }],
        );
        this.lastRotationFailed = false;
        this.alive.rotated(result, Date.now());
        this.continueAsNewDue = true;
        this.deliverCredentialRevocations();
        return true;
      } catch (err) {
        if (!(err instanceof ActivityFailure) || isCancellation(err)) throw err;
        this.lastRotationFailed = true;
        // Cancelled once its send had started, the attempt ended and the server retried no more: the
        // rotation stays due and is tried again (as a cancelled one before its send is).
        if (v2 && CancellationScope.current().consideredCancelled) return false;
        log.warn('automatic rotation refused', { tokenId: this.input.tokenId, rotationId, error: failureMessage(err) });
        this.alive.rotationSkipped(Date.now());
        // Visible to an operator: a worker that cannot reach the owner's destination rotates nothing.
        if (v2) {
          await store.recordAudit.executeWithOptions({ summary: 'audit: rotation skipped' }, [
            {
              tokenId: this.input.tokenId,
              auditKey: `rotation-skipped:${rotationId}:${workflowInfo().runId}:${this.alive.changes}`,
              kind: 'rotation.skipped',
              data: { rotationId, why, error: failureMessage(err) },
            },
          ]);
        }
        return false;
      }
    });
  }

  /**
   * Delivers every credential.revoked event of this token to every receiver, in the background,
   * with the same delivery activity as the token's own revocation. Undelivered ones are carried.
   */
  private deliverCredentialRevocations(): void {
    for (const { eventId } of this.alive.carried.credentialRevocations) {
      if (this.credentialDeliveriesRunning.has(eventId)) continue;
      this.credentialDeliveriesRunning.add(eventId);
      Promise.all(
        this.input.receivers.map(async (receiverId) => {
          try {
            await credentialDeliveries.deliverRevocation.executeWithOptions(
              { summary: summaryText(`deliver credential revocation to ${receiverId}`) },
              [{ eventId, receiverId }],
            );
          } catch (err) {
            if (!(err instanceof ActivityFailure) || isCancellation(err)) throw err;
            // A receiver's rejection is recorded in its delivery row for an operator to see.
            log.warn('credential revocation rejected', { eventId, receiverId, error: failureMessage(err) });
          }
        }),
      ).then(
        () => this.alive.credentialRevocationSettled(eventId),
        () => {},
      );
    }
  }

  /** The self-managing Updates act on a live token only. */
  private activeRefusal(): string | undefined {
    if (this.state.phase !== 'active' || this.state.revokeRequest) {
      return `token ${this.input.tokenId} is not active (phase ${this.state.revokeRequest ? 'killing' : this.state.phase})`;
    }
    return undefined;
  }

  private requireActive(): void {
    const refusal = this.activeRefusal();
    if (refusal) throw ApplicationFailure.nonRetryable(refusal, TOKEN_NOT_ACTIVE);
  }

  /** A refusal from an activity (bad input, a limit) reaches the caller as a non-retryable failure. */
  private async refusable<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof ActivityFailure && err.cause instanceof ApplicationFailure && err.cause.nonRetryable) {
        throw ApplicationFailure.nonRetryable(err.cause.message, err.cause.type ?? INVALID_LIFECYCLE_REQUEST);
      }
      throw err;
    }
  }

  private async rotate(request: RotateRequest): Promise<RotateResult> {
    if (!this.enterSelfManaging()) throw runPredatesRequest('rotate');
    // The caller's rotation goes first: a periodic one waiting on the owner is cancelled (re-armed).
    if (this.offPath) this.periodicRotation?.cancel();
    return this.serialized(async () => {
      this.requireActive();
      const options = { summary: summaryText(`rotate: new credential ${request.credentialId}`) };
      const rotation = {
        tokenId: this.input.tokenId,
        credentialId: request.credentialId,
        secretHash: request.secretHash,
        ...(request.graceMs !== undefined ? { graceMs: request.graceMs } : {}),
        actor: request.actor ?? 'operator',
        reason: request.reason ?? 'rotation',
      };
      const remote = () => selfManaging.rotateCredential.executeWithOptions(options, [rotation]);
      // The token is active, so no kill (the only other local call while alive) is in flight.
      const local = () => {
        const write = storeLocal.rotateCredential.executeWithOptions(options, [rotation]);
        const settled = write.then(
          () => undefined,
          () => undefined,
        );
        this.localRotation = settled;
        void settled.then(() => {
          if (this.localRotation === settled) this.localRotation = undefined;
        });
        return write;
      };
      const isLocal = patched(PATCHES.localRotate);
      const result = await this.refusable(() => (isLocal ? localFirst(local, remote) : remote()));
      // A retried Update of a rotation the store already made: its facts are old, the run knows them;
      // unless it is this run's rotation whose answer was lost (a local write is retried or re-run
      // after a lost workflow task): its previous credential is still the run's current one.
      const current = this.alive.carried.currentCredentialId;
      const lostAnswer = isLocal && (current === null || result.previousCredentialId === current);
      if (!(this.offPath && result.changed === false && (isLocal ? !lostAnswer : this.staleRotation(result)))) {
        this.alive.rotated(result, Date.now());
        this.continueAsNewDue = true;
        this.deliverCredentialRevocations();
      }
      return {
        tokenId: this.input.tokenId,
        credentialId: result.credentialId,
        previousCredentialId: result.previousCredentialId,
        previousValidUntil: result.previousValidUntil,
      };
    });
  }

  /**
   * A rotation the store had made before (changed=false) is stale when the run already records a
   * later one; a retried activity of this Update is not (PATCHES.ownerWorkV2): it is adopted.
   */
  private staleRotation(result: { previousCredentialId: string | null }): boolean {
    if (!this.ownerWorkV2) return true;
    const current = this.alive.carried.currentCredentialId;
    return current !== null && current !== result.previousCredentialId;
  }

  private async setSuspended(suspended: boolean, request: SuspendRequest): Promise<SuspendResult> {
    if (!this.enterSelfManaging()) throw runPredatesRequest('suspend');
    this.requireActive();
    // The Update's id makes a retried activity the same change, audited once.
    const requestId = currentUpdateInfo()?.id;
    const change = () =>
      this.refusable(() =>
        selfManaging.setSuspended.executeWithOptions({ summary: suspended ? 'suspend' : 'resume' }, [
          {
            tokenId: this.input.tokenId,
            suspended,
            reason: request.reason,
            actor: request.actor ?? 'operator',
            ...(requestId !== undefined ? { requestId } : {}),
          },
        ]),
      );
    // Serialised: the run records the changes in the order the store committed them.
    const result = this.offPath ? await this.inOrder('suspension', change) : await change();
    this.alive.suspendedChanged(result.suspended);
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.suspended, value: result.suspended }]);
    return result;
  }

  private async scheduleRevoke(request: ScheduleRevokeRequest): Promise<ScheduleRevokeResult> {
    if (!this.enterSelfManaging()) throw runPredatesRequest('scheduleRevoke');
    this.requireActive();
    const at = new Date(Date.parse(request.at)).toISOString();
    const actor = request.actor ?? 'operator';
    const schedule = { at, reason: request.reason, actor };
    if (this.offPath) {
      // Decided now, before the store is written: the deadlines loop never acts on the old schedule
      // once this Update is accepted; the store is written in the order of the decisions.
      this.alive.revokeScheduled(schedule);
      const requestId = currentUpdateInfo()?.id;
      await this.inOrder('schedule', () => this.storeSchedule(at, request, requestId));
    } else {
      await this.storeSchedule(at, request);
      this.alive.revokeScheduled(schedule);
    }
    return { revokeAt: at };
  }

  /**
   * Handlers of one kind (the schedule's store writes, suspend/resume) one at a
   * time, in the order they arrived: the store and the run end in the same state.
   */
  private inOrder<T>(queue: 'schedule' | 'suspension' | 'expiry', step: () => Promise<T>): Promise<T> {
    const run = (this.handlerQueues.get(queue) ?? Promise.resolve()).then(step);
    this.handlerQueues.set(
      queue,
      run.then(
        () => undefined,
        () => undefined,
      ),
    );
    return run;
  }

  /** The schedule `show` displays (`at` null: cancelled), audited under the Update's id. */
  private storeSchedule(at: string | null, request: OperatorRequest, requestId?: string): Promise<void> {
    return selfManaging.setScheduledRevoke.executeWithOptions(
      { summary: at ? summaryText(`schedule revoke at ${at}`) : 'cancel the scheduled revoke' },
      [
        {
          tokenId: this.input.tokenId,
          at,
          reason: request.reason,
          actor: request.actor ?? 'operator',
          ...(requestId !== undefined ? { requestId } : {}),
        },
      ],
    );
  }

  private async cancelScheduledRevoke(request: OperatorRequest): Promise<ScheduleRevokeResult> {
    if (!this.enterSelfManaging()) {
      throw runPredatesRequest('cancelScheduledRevoke');
    }
    this.requireActive();
    if (this.offPath) {
      // The cancel wins once accepted: decided before the store is written.
      this.alive.revokeScheduled(null);
      const requestId = currentUpdateInfo()?.id;
      await this.inOrder('schedule', () => this.storeSchedule(null, request, requestId));
    } else {
      await this.storeSchedule(null, request);
      this.alive.revokeScheduled(null);
    }
    return { revokeAt: null };
  }

  private async changeExpiry(request: ChangeExpiryRequest): Promise<ChangeExpiryResult> {
    if (!this.enterSelfManaging()) throw runPredatesRequest('changeExpiry');
    this.requireActive();
    const requestId = currentUpdateInfo()?.id ?? `${workflowInfo().runId}:${this.alive.changes}`;
    const change = () =>
      this.refusable(() =>
        selfManaging.changeExpiry.executeWithOptions({ summary: summaryText(`${request.mode} expiry`) }, [
          {
            tokenId: this.input.tokenId,
            ttlMs: request.ttlMs,
            mode: request.mode,
            reason: request.reason,
            actor: request.actor ?? 'operator',
            // A retried Update is the same change.
            requestId,
          },
        ]),
      );
    if (this.offPath && this.ownerWorkV2) {
      // Serialised: the run adopts the expiries in the order the store committed them.
      return this.inOrder('expiry', async () => {
        const result = await change();
        this.adoptExpiry(result.expiresAt);
        return result;
      });
    }
    const result = await change();
    this.adoptExpiry(result.expiresAt);
    return result;
  }

  private adoptExpiry(expiresAt: string): void {
    this.alive.expiryChanged(expiresAt);
    this.state.expiryMoved(expiresAt);
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.expiresAt, value: new Date(expiresAt) }]);
  }

  private async signalled(name: string, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      if (!(err instanceof ActivityFailure) || isCancellation(err)) throw err;
      log.warn(`${name}: a step was refused`, { tokenId: this.input.tokenId, error: failureMessage(err) });
    }
  }

  /** Suspicious activity: the evidence is audited, then the policy rotates (grace 0) or revokes. */
  private async reportSuspicious(payload: unknown): Promise<void> {
    if (!this.enterSelfManaging()) return;
    const report = parseSuspiciousReport(payload, patched(PATCHES.maskedReasons));
    if (this.activeRefusal()) return;
    const n = this.alive.suspiciousReported();
    const wantsRotate = this.alive.policy?.onSuspicious === 'rotate';
    const rotate = wantsRotate && this.alive.policy!.hasOwnerDestination;
    await selfManaging.recordAudit.executeWithOptions({ summary: 'audit: suspicious activity reported' }, [
      {
        tokenId: this.input.tokenId,
        auditKey: `suspicious:${report.reportId ?? `${workflowInfo().runId}:${n}`}`,
        kind: 'token.suspicious',
        data: {
          reason: report.reason,
          actor: report.actor,
          evidence: report.evidence,
          malformed: report.malformed,
          action: rotate ? 'rotate' : 'revoke',
          // The new secret would have nowhere to go: revoking is the safe answer, said in the audit.
          ...(wantsRotate && !rotate
            ? { actionNote: 'the policy says rotate but names no owner destination for a new secret: revoked instead' }
            : {}),
        },
      },
    ]);
    if (this.activeRefusal()) return;
    // The old secret is suspect: no grace.
    if (rotate && this.offPath) {
      // PATCHES.ownerWorkV2: the report does not queue behind the periodic rotation; when that one
      // was failing to deliver, so would this one: revoke at once.
      const ownerFailing =
        this.periodicInFlight !== undefined && this.ownerWorkV2 && (await this.stopPeriodicRotation());
      if (!ownerFailing && (await this.rotateUnlessRevoked())) return;
      if (this.activeRefusal()) return;
    } else if (rotate && (await this.rotateAutomatically(0, 'suspicious activity'))) return;
    this.state.systemRevoke({
      reason: SYSTEM_REVOKE_REASON.suspicious,
      actor: report.actor,
      initiatingEntity: 'system',
    });
  }

  /**
   * Cancels the periodic rotation in flight (it stops before its send; one already sending ends as
   * its attempt does) and waits for it. True when the owner is failing: the rotation ended in a
   * failure, or had been in flight longer than a delivering attempt takes.
   */
  private async stopPeriodicRotation(): Promise<boolean> {
    const inFlight = this.periodicInFlight!;
    const slow = Date.now() - inFlight.startedAtMs >= OWNER_FAILING_AFTER_MS;
    this.periodicRotation?.cancel();
    await inFlight.ended;
    return slow || this.lastRotationFailed;
  }

  /**
   * The suspicious report's rotation, given up when a revoke arrives (the revoke does more). False
   * when it could not deliver the new secret: the caller revokes.
   */
  private async rotateUnlessRevoked(): Promise<boolean> {
    const scope = new CancellationScope();
    let outcome: { rotated: boolean } | { error: unknown } | undefined;
    scope
      .run(() => this.rotateAutomatically(0, 'suspicious activity'))
      .then(
        (rotated) => (outcome = { rotated }),
        (error: unknown) => (outcome = { error }),
      );
    await condition(() => outcome !== undefined || this.state.revokeRequest !== undefined);
    if (outcome === undefined) {
      scope.cancel();
      await condition(() => outcome !== undefined);
    }
    if ('error' in outcome!) {
      if (isCancellation(outcome.error)) return false;
      throw outcome.error;
    }
    return outcome!.rotated;
  }

  /** The policy changed: re-read it, adopt its deadlines, apply its verdict (shorten or revoke). */
  private async policyChanged(): Promise<void> {
    if (!this.enterSelfManaging()) return;
    if (this.activeRefusal()) return;
    // Asked before the read: reads run concurrently (a storm of changes is not queued), so an
    // older snapshot that finishes after a newer one must never replace it.
    const newestWins = this.offPath;
    const applied = await selfManaging.applyPolicy.executeWithOptions({ summary: 'the policy changed: apply it' }, [
      { tokenId: this.input.tokenId },
    ]);
    const current = this.alive.policy;
    if (
      newestWins &&
      applied.policy &&
      current &&
      applied.policy.name === current.name &&
      applied.policy.version < current.version
    ) {
      return;
    }
    this.alive.policyChanged(applied.policy ?? undefined, Date.now());
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.policy, value: applied.policy?.name ?? null }]);
    if (applied.expiresAt !== this.alive.expiresAt) this.adoptExpiry(applied.expiresAt);
    if (applied.verdict.kind === 'revoke' && !this.activeRefusal()) {
      this.state.systemRevoke({
        reason: applied.verdict.reason === 'inactive' ? SYSTEM_REVOKE_REASON.inactive : SYSTEM_REVOKE_REASON.policy,
        actor: `system:policy:${applied.policy?.name ?? 'none'}`,
        initiatingEntity: 'policy',
      });
    }
  }

  private async killOnRevoke(): Promise<KillResult | KillSnapshot> {
    const { malformed, undecodableEncoding, ...request } = this.state.revokeRequest!;
    this.state.killing('revoke');
    if (this.localRotation) await this.localRotation;
    if (this.local) {
      const options = { summary: summaryText(`revoke by ${request.actor}: ${request.reason}`) };
      const args = [
        { tokenId: this.input.tokenId, ...request, byWorkflow: true, eventId: this.input.revocationEventId },
      ] as const;
      const killed = await localFirst(
        () => storeLocal.killAndLoad.executeWithOptions(options, [...args]),
        () => store.killAndLoad.executeWithOptions(options, [...args]),
      );
      if (malformed) await this.auditMalformedSignal(true, undecodableEncoding);
      return killed;
    }
    // A run that begins already revoking (restarted, or told late) resumes from the store first. A
    // run woken from its sleep has propagated nothing: its deliveries go out with the kill, each
    // one's first attempt before the worker's timing is read.
    if (!this.wasAsleep) await this.startPropagation();
    const killing = store.killToken.executeWithOptions(
      { summary: summaryText(`revoke by ${request.actor}: ${request.reason}`) },
      [{ tokenId: this.input.tokenId, ...request, byWorkflow: true }],
    );
    // Deliveries go out in the same workflow task as the kill: a revoke's caller has usually
    // committed the kill (and its outbox rows) before this workflow ran; an attempt that finds no
    // outbox row yet retries shortly.
    this.startDeliveries();
    const kill = await killing;
    if (malformed) await this.auditMalformedSignal(false, undecodableEncoding);
    return kill;
  }

  /** Audits that the revoke Signal could not be read (it still revoked, with reason `unspecified`). */
  private async auditMalformedSignal(local: boolean, undecodableEncoding: string | undefined): Promise<void> {
    const options = { summary: 'audit: malformed revoke signal' };
    const audit = {
      tokenId: this.input.tokenId,
      auditKey: `malformed-revoke-signal:${workflowInfo().runId}`,
      kind: 'signal.malformed',
      data: {
        reasonRecorded: 'unspecified',
        ...(undecodableEncoding !== undefined ? { undecodableEncoding } : {}),
      },
    };
    const remote = () => store.recordAudit.executeWithOptions(options, [audit]);
    await (local ? localFirst(() => storeLocal.recordAudit.executeWithOptions(options, [audit]), remote) : remote());
  }

  /** The expiry's kill; undefined when the database clock has not reached expiry yet. */
  private async killOnExpiry(): Promise<KillResult | KillSnapshot | undefined> {
    this.state.killing('expiry');
    const request = {
      tokenId: this.input.tokenId,
      reason: 'expired',
      actor: 'system',
      initiatingEntity: 'system' as const,
      onlyIfExpired: true,
      byWorkflow: true,
    };
    const summary = { summary: 'expire: the token reached its expiry' };
    const snapshotRequest = { ...request, eventId: this.input.revocationEventId };
    if (this.localRotation) await this.localRotation;
    const killed = this.local
      ? await localFirst(
          () => storeLocal.killAndLoad.executeWithOptions(summary, [snapshotRequest]),
          () => store.killAndLoad.executeWithOptions(summary, [snapshotRequest]),
        )
      : await store.killToken.executeWithOptions(summary, [request]);
    const result = 'kill' in killed ? killed.kill : killed;
    if (result.notYetExpiredMs === undefined) return killed;
    // The database clock is behind workflow time (or the expiry moved): wait the difference (a
    // revoke still wins; a moved expiry is re-read by the deadlines loop).
    this.state.stillAlive();
    this.wasAsleep = true;
    if (this.selfManagingDecision === true && result.token.expiresAt !== this.alive.expiresAt) {
      this.adoptExpiry(result.token.expiresAt);
      return undefined;
    }
    await condition(() => this.state.revokeRequest !== undefined, result.notYetExpiredMs, {
      summary: 'waiting for the database clock to reach expiry',
    });
    return undefined;
  }

  // ---------------------------------------------------------------- phase 2: propagating ⇄ stuck

  /** Every receiver told, in parallel, until each confirms or an operator decides. */
  async propagate(killed: KillResult | KillSnapshot): Promise<void> {
    let kill: KillResult;
    if ('kill' in killed) {
      // The local kill read the timing and the rows after it committed: the run resumes from them.
      kill = killed.kill;
      this.storeDrivenDecision = true;
      this.state.timingKnown({ ...killed.timing, source: 'worker' });
      if (!this.deliveriesStarted) this.state.resumedFromStore(killed.deliveries);
    } else {
      kill = killed;
      await this.startPropagation();
    }
    this.state.killed(kill.token, Date.now());
    upsertSearchAttributes([
      { key: SEARCH_ATTRIBUTE.status, value: this.state.status },
      { key: SEARCH_ATTRIBUTE.propagation, value: this.state.propagation },
    ]);
    this.startDeliveries();

    for (;;) {
      if (this.deliveryFailure !== undefined) throw this.deliveryFailure;
      let verdict = this.state.verdict(this.escalationDue ? Number.POSITIVE_INFINITY : Date.now());
      // A propagation the store holds as stuck stays stuck until an operator acts or all settle.
      if (this.storeDriven && verdict.kind === 'wait' && this.state.propagation === 'stuck')
        verdict = { kind: 'stuck' };
      if (verdict.kind === 'complete') {
        await condition(() => this.deliveriesEnded);
        if (this.deliveryFailure !== undefined) throw this.deliveryFailure;
        return;
      }
      if (verdict.kind === 'wait') {
        // Armed once, the first time anything is waited for (never when all is settled at once).
        if (this.local && !this.escalationTimer) this.armEscalation();
        const seen = this.state.deliveryChanges;
        const changed = () => this.deliveriesEnded || this.state.deliveryChanges !== seen;
        if (this.local) await condition(() => changed() || this.escalationDue);
        else await condition(changed, verdict.ms, { summary: 'waiting for receivers to confirm' });
        continue;
      }
      // Stuck: record it (retryable deliveries keep retrying), then wait for progress or an operator.
      const round = this.state.retryRound;
      if (this.state.propagation !== 'stuck') await this.escalate(round);
      await condition(() => this.deliveriesEnded || this.state.retryRound > round);
      if (this.state.retryRound > round && !this.deliveriesEnded) await this.resume();
    }
  }

  private get storeDriven(): boolean {
    this.storeDrivenDecision ??= patched(PATCHES.storeDrivenPropagation);
    return this.storeDrivenDecision;
  }

  /** First asked when the kill starts: a run recorded before the patch keeps its activities. */
  private get local(): boolean {
    this.localDecision ??= patched(PATCHES.localStoreCalls);
    return this.localDecision;
  }

  /**
   * One timer until the escalation deadline; re-armed only when the deadline moves (an operator's
   * retry), never on a receiver's confirmation. The run may complete with it still pending.
   */
  private armEscalation(): void {
    this.escalationTimer?.cancel();
    this.escalationDue = false;
    const timer = new CancellationScope();
    this.escalationTimer = timer;
    timer
      .run(() =>
        sleep(Math.max(1, this.state.escalateAtMs! - Date.now()), {
          summary: 'escalate to stuck unless every receiver has confirmed',
        }),
      )
      .then(
        () => {
          if (this.escalationTimer === timer) this.escalationDue = true;
        },
        () => {}, // cancelled: re-armed, or the workflow itself is being cancelled
      );
  }

  /**
   * Fixes the run's timing (the worker owns it). Before deliveries start, the store's rows are
   * adopted: settled rows stay settled, rejected ones wait for an operator, the rest are delivered.
   */
  private async startPropagation(): Promise<void> {
    if (this.state.timing) return;
    if (!this.storeDriven) {
      // Runs recorded before the patch carry their timing in the input.
      this.state.timingKnown({ ...this.input.timing!, source: 'workflow input' });
      return;
    }
    const snapshot = await this.readStore();
    this.state.timingKnown({ ...snapshot.timing, source: 'worker' });
    if (!this.deliveriesStarted) this.state.resumedFromStore(snapshot.deliveries);
  }

  /**
   * The worker's timing and the store's delivery rows. One read at a time, shared by whoever needs
   * it meanwhile: concurrent local activities can resolve in other groupings on replay.
   */
  private readStore(): Promise<PropagationSnapshot> {
    const options = { summary: 'read the worker timing and the delivery rows' };
    const args = { tokenId: this.input.tokenId, eventId: this.input.revocationEventId };
    this.storeRead ??= localFirst(
      () => storeLocal.loadPropagation.executeWithOptions(options, [args]),
      () => store.loadPropagation.executeWithOptions(options, [args]),
    ).finally(() => (this.storeRead = undefined));
    return this.storeRead;
  }

  private async escalate(round: number): Promise<void> {
    if (this.storeDriven) {
      // The attempts made while the activities retried are in the store only.
      for (const row of (await this.readStore()).deliveries) {
        this.state.deliveryObserved(row);
      }
    }
    const unsettled = this.state.unsettled();
    // The refresh found every receiver settled (the deadline fired as the last one confirmed).
    if (this.storeDriven && unsettled.length === 0) return;
    // The step names each receiver still unconfirmed and its last answer: what an operator reads first.
    const waitingOn = unsettled
      .map(
        (d) =>
          `${d.receiverId} (${d.lastError ?? (d.lastStatusCode !== null ? `HTTP ${d.lastStatusCode}` : 'no answer yet')})`,
      )
      .join(', ');
    const escalation = { summary: summaryText(`escalate: stuck on ${waitingOn}`) };
    const token = await store.setPropagation.executeWithOptions(escalation, [
      {
        tokenId: this.input.tokenId,
        state: 'stuck',
        auditKey: `stuck:${workflowInfo().runId}:${round}`,
        detail: {
          receivers: unsettled.map((d) => ({
            receiverId: d.receiverId,
            status: d.status,
            attempts: d.attempts,
            lastError: d.lastError,
          })),
        },
      },
    ]);
    this.state.escalated(token.propagation);
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: token.propagation }]);
    log.warn('revocation propagation is stuck', {
      tokenId: this.input.tokenId,
      receivers: unsettled.map((d) => d.receiverId),
    });
  }

  private async resume(): Promise<void> {
    const { retryRound } = this.state;
    const token = await store.setPropagation.executeWithOptions(
      { summary: 'operator retry: propagation pending again' },
      [
        {
          tokenId: this.input.tokenId,
          state: 'pending',
          auditKey: `pending:${workflowInfo().runId}:${retryRound}`,
          detail: { retryRound },
        },
      ],
    );
    this.state.resumed(token.propagation, Date.now());
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: token.propagation }]);
    if (this.local) this.armEscalation();
  }

  // ---------------------------------------------------------------- deliveries

  private startDeliveries(): void {
    if (this.deliveriesStarted) return;
    this.deliveriesStarted = true;
    // With PATCHES.localStoreCalls, one activity makes the first attempt at every pending receiver.
    const pending = this.local ? this.state.unsettled().filter((d) => d.status === 'pending') : [];
    const first = pending.length > 0 ? this.firstAttempts(pending.map((d) => d.receiverId)) : undefined;
    const firstOf = (receiverId: string) => (pending.some((d) => d.receiverId === receiverId) ? first : undefined);
    Promise.all(
      this.input.receivers.map((receiverId) => this.deliverUntilSettled(receiverId, firstOf(receiverId))),
    ).then(
      () => (this.deliveriesEnded = true),
      (err: unknown) => {
        this.deliveryFailure = err;
        this.deliveriesEnded = true;
      },
    );
  }

  /**
   * The first attempt at several receivers in one activity. Undefined when the activity itself ended
   * (a timeout, its worker lost): every one of them is then retried on its own.
   */
  private async firstAttempts(receiverIds: string[]): Promise<Map<string, FirstAttemptOutcome> | undefined> {
    // A retry asked while these attempts run counts for a rejection among them.
    for (const receiverId of receiverIds) this.runs.get(receiverId)!.roundAtAttempt = this.state.retryRound;
    const summary =
      receiverIds.length === 1
        ? `deliver revocation to ${receiverIds[0]}`
        : `deliver revocation to ${receiverIds.length} receivers`;
    try {
      const outcomes = await firstAttempts.deliverRevocationToAll.executeWithOptions(
        { summary: summaryText(summary) },
        [{ eventId: this.input.revocationEventId, receiverIds }],
      );
      return new Map(outcomes.map((o) => [o.receiverId, o]));
    } catch (err) {
      if (!(err instanceof ActivityFailure) || isCancellation(err)) throw err;
      return undefined;
    }
  }

  private async deliverUntilSettled(
    receiverId: string,
    first?: Promise<Map<string, FirstAttemptOutcome> | undefined>,
  ): Promise<void> {
    const run = this.runs.get(receiverId)!;
    if (first) {
      const outcome = (await first)?.get(receiverId);
      if (outcome?.kind === 'result') this.state.deliveryObserved(outcome.row);
      else if (outcome?.kind === 'rejected') {
        this.state.deliveryRejected(receiverId, outcome.message, outcome.row ?? undefined);
      } else {
        if (outcome?.row) this.state.deliveryObserved(outcome.row);
        // Ended without a rejection (or the whole activity did): retried after the schedule's step,
        // or later if the receiver asked for it (Retry-After).
        if (!this.state.isSettled(receiverId)) {
          await this.pauseBeforeDeliveringAgain(receiverId, run, outcome?.retryAfterMs);
        }
      }
    }
    while (!this.state.isSettled(receiverId)) {
      if (this.state.delivery(receiverId).status === 'failed') {
        // A receiver's rejection: wait for an operator (retryPropagation or forceComplete). A retry
        // asked while the rejected attempt ran (it found no attempt to cancel) already counts.
        const round = run.roundAtAttempt;
        await condition(() => this.state.retryRound > round || this.state.isSettled(receiverId));
        if (this.state.isSettled(receiverId)) return;
        this.state.deliveryRetrying(receiverId);
      }
      const outcome = await this.attempt(receiverId, run);
      if (outcome.kind === 'interrupted') continue;
      if (outcome.kind === 'result') {
        run.endingsInARow = 0;
        this.state.deliveryObserved(outcome.row);
        // A result is a settled row; anything else is an ending like a failure, paced the same way.
        if (this.state.isSettled(receiverId) || !this.storeDriven) continue;
      } else if (!this.storeDriven) {
        // Runs recorded before the patch took every failure for a rejection.
        this.state.deliveryRejected(receiverId, failureMessage(outcome.failure));
        continue;
      } else {
        const snapshot = await this.readStore();
        this.state.timingKnown({ ...snapshot.timing, source: 'worker' });
        const row = snapshot.deliveries.find((d) => d.receiverId === receiverId);
        if (isReceiverRejection(outcome.failure)) {
          run.endingsInARow = 0;
          this.state.deliveryRejected(receiverId, failureMessage(outcome.failure), row);
          continue;
        }
        if (row) this.state.deliveryObserved(row);
      }
      await this.pauseBeforeDeliveringAgain(receiverId, run);
    }
  }

  /** One delivery activity (with its own retries), in a scope an operator can cancel. */
  private async attempt(
    receiverId: string,
    run: DeliveryRun,
  ): Promise<
    { kind: 'result'; row: DeliveryView } | { kind: 'failure'; failure: ActivityFailure } | { kind: 'interrupted' }
  > {
    const scope = new CancellationScope();
    run.scope = scope;
    run.interrupted = false;
    run.roundAtAttempt = this.state.retryRound;
    const activities = deliveryActivities(this.state.timing);
    try {
      const row = await scope.run(() =>
        activities.deliverRevocation.executeWithOptions({ summary: `deliver revocation to ${receiverId}` }, [
          { eventId: this.input.revocationEventId, receiverId },
        ]),
      );
      return { kind: 'result', row };
    } catch (err) {
      // Cancelled by retryPropagation (restart) or forceComplete (settled): the loop re-checks. Any
      // other cancellation is the workflow's own (e.g. from the Web UI): let it end the workflow;
      // the reconciler restarts propagation that a closed workflow left unfinished.
      if (isCancellation(err)) {
        if (run.interrupted) return { kind: 'interrupted' };
        throw err;
      }
      if (!(err instanceof ActivityFailure)) throw err;
      return { kind: 'failure', failure: err };
    } finally {
      run.scope = undefined;
    }
  }

  /**
   * A durable pause before a delivery that ended without a rejection is scheduled again: it never
   * spins: the schedule's step, or the receiver's Retry-After when the batched first attempt carried
   * one back (`askedMs`); an ordinary activity's Retry-After applies to its own retries.
   */
  private async pauseBeforeDeliveringAgain(receiverId: string, run: DeliveryRun, askedMs = 0): Promise<void> {
    run.endingsInARow++;
    // `interrupted` is not cleared here: an operator's retry that arrived while the ending was
    // being read cuts this pause short.
    await condition(
      () => run.interrupted || this.state.isSettled(receiverId),
      Math.max(pauseAfterEnding(run.endingsInARow, this.state.timing!), askedMs),
      { summary: `pause before delivering to ${receiverId} again` },
    );
  }

  /** An operator's retry or force: a running attempt is cancelled, a pause cut short. */
  private interrupt(receiverId: string): void {
    const run = this.runs.get(receiverId);
    if (!run) return;
    run.interrupted = true;
    run.scope?.cancel();
  }

  // ---------------------------------------------------------------- operator Updates

  /** An operator may act while the kill commits (deliveries are already running): wait for it. */
  private async untilKilled(): Promise<void> {
    if (!this.state.kill) await condition(() => this.state.kill !== undefined);
  }

  private async retryPropagation(request: OperatorRequest): Promise<RetryPropagationResult> {
    const updateId = currentUpdateInfo()?.id ?? String(this.state.retryRound + 1);
    await this.untilKilled();
    const retrying = this.state.unsettled().map((d) => d.receiverId);
    const asked = { summary: summaryText(`retry asked by ${request.actor ?? 'operator'}: ${request.reason}`) };
    await store.recordAudit.executeWithOptions(asked, [
      {
        tokenId: this.input.tokenId,
        auditKey: `retry:${workflowInfo().runId}:${updateId}`,
        kind: 'propagation.retry-requested',
        data: { reason: request.reason, actor: request.actor ?? 'operator', receivers: retrying },
      },
    ]);
    this.state.retryRequested();
    // Restart deliveries now: cancelling a running activity resets its backoff.
    for (const receiverId of retrying) this.interrupt(receiverId);
    return { retrying };
  }

  private async forceComplete(request: OperatorRequest): Promise<ForceCompleteResult> {
    const updateId = currentUpdateInfo()?.id ?? 'force';
    await this.untilKilled();
    const receivers = await store.forceCompleteDeliveries.executeWithOptions(
      { summary: summaryText(`forced complete by ${request.actor ?? 'operator'}: ${request.reason}`) },
      [
        {
          tokenId: this.input.tokenId,
          auditKey: `force:${workflowInfo().runId}:${updateId}`,
          reason: request.reason,
          actor: request.actor ?? 'operator',
        },
      ],
    );
    this.state.forcedComplete(receivers, { actor: request.actor ?? 'operator', reason: request.reason });
    for (const receiverId of receivers) this.interrupt(receiverId);
    return { forced: receivers };
  }

  // ---------------------------------------------------------------- phase 3: complete

  async complete(): Promise<TokenLifecycleResult> {
    const { forced } = this.state;
    // Local with PATCHES.localStoreCalls: recorded in the task of the last confirmation, which also
    // completes the run. Nothing else runs a local activity now: every delivery has ended.
    const options = { summary: forced ? 'complete: forced by an operator' : 'every receiver confirmed: complete' };
    const completion = {
      tokenId: this.input.tokenId,
      state: 'complete' as const,
      auditKey: `complete:${workflowInfo().runId}`,
      detail: { forced, receivers: this.input.receivers },
    };
    const remote = () => store.setPropagation.executeWithOptions(options, [completion]);
    const done = this.local
      ? await localFirst(() => storeLocal.setPropagation.executeWithOptions(options, [completion]), remote)
      : await remote();
    this.state.completed('complete');
    upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: done.propagation }]);
    await condition(allHandlersFinished);
    return {
      tokenId: this.input.tokenId,
      status: this.state.status,
      propagation: 'complete',
      forced,
      deliveries: this.state.all(),
    };
  }
}

function describeDeadline(d: AliveDeadline): string {
  const at = new Date(d.atMs).toISOString();
  switch (d.kind) {
    case 'expiry':
      return `expiry at ${at}`;
    case 'scheduledRevoke':
      return `the scheduled revoke at ${at}`;
    case 'idleCheck':
      return `the idle check at ${at}`;
    case 'graceEnd':
      return `the end of ${d.credentialId}'s grace at ${at}`;
    case 'warning':
      return `the ${d.reason} warning at ${at}`;
    case 'rotate':
      return `the automatic rotation at ${at}`;
  }
}
