/**
 * One durable workflow per token: sleeps until expiry or a revoke, kills the token in the store
 * (through the one kill activity), then propagates the revocation to every receiver until each has
 * confirmed, escalating to `stuck` when one has not by the deadline. Deterministic: all I/O is in
 * activities; time is workflow time.
 */
import {
  ActivityFailure,
  ApplicationFailure,
  CancellationScope,
  allHandlersFinished,
  condition,
  continueAsNew,
  currentUpdateInfo,
  isCancellation,
  log,
  proxyActivities,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { Activities } from '../activities/index.js';
import { RECEIVER_REJECTED, SEARCH_ATTRIBUTE, type PropagationState, type TokenStatus } from '../common/names.js';
import type { KillResult } from '../common/store/index.js';
import { summaryText } from '../common/text.js';
import {
  isSettled,
  msUntil,
  parseRevokeSignal,
  propagationVerdict,
  validateOperatorRequest,
} from './lifecycle-state.js';
import {
  describeQuery,
  forceCompleteUpdate,
  retryPropagationUpdate,
  revokeSignal,
  type DeliveryView,
  type LifecyclePhase,
  type RevokeRequest,
  type TokenLifecycleResult,
  type TokenWorkflowInput,
} from './messages.js';

const store = proxyActivities<Activities>({
  startToCloseTimeout: '30s',
  retry: {
    initialInterval: '1s',
    backoffCoefficient: 2,
    maximumInterval: '1m',
    nonRetryableErrorTypes: ['NotFoundError'],
  },
});

export async function tokenLifecycle(input: TokenWorkflowInput): Promise<TokenLifecycleResult> {
  const { tokenId, timing } = input;
  const delivery = proxyActivities<Activities>({
    // One HTTP attempt is bounded at 10 s; a worker that died mid-attempt delays the retry by this much.
    startToCloseTimeout: '15s',
    // TRY_CANCEL: retryPropagation restarts a delivery at once; an attempt still in flight records
    // its own outcome in the store, which the next attempt reads before sending anything.
    cancellationType: 'TRY_CANCEL',
    retry: {
      initialInterval: timing.retryInitialMs,
      backoffCoefficient: 2,
      maximumInterval: timing.retryMaxMs,
      nonRetryableErrorTypes: [RECEIVER_REJECTED],
    },
  });

  let phase: LifecyclePhase = 'active';
  let status: TokenStatus = 'active';
  let propagation: PropagationState = 'none';
  let revokeRequest: (RevokeRequest & { malformed: boolean }) | undefined;
  let retryRound = 0;
  let forced = false;
  const deliveries = new Map<string, DeliveryView>();
  const running = new Map<string, CancellationScope>();
  /** Receivers whose running attempt an operator cancelled (retry or force), as opposed to a workflow cancel. */
  const restarted = new Set<string>();
  /** Bumped whenever a delivery's state changes, so the supervisor below re-evaluates. */
  let changes = 0;
  const update = (receiverId: string, next: DeliveryView) => {
    deliveries.set(receiverId, next);
    changes++;
  };
  const unsettledReceivers = () =>
    [...deliveries.values()].filter((d) => !isSettled(d.status)).map((d) => d.receiverId);
  const restart = (receiverId: string) => {
    const scope = running.get(receiverId);
    if (!scope) return;
    restarted.add(receiverId);
    scope.cancel();
  };

  // Handlers first, before any await: an Update reaching a workflow without its handler is rejected.
  setHandler(revokeSignal, (payload) => {
    revokeRequest ??= parseRevokeSignal(payload);
  });
  setHandler(describeQuery, () => ({
    tokenId,
    phase,
    status,
    propagation,
    expiresAt: input.expiresAt,
    deliveries: [...deliveries.values()],
    retryRound,
  }));
  const requirePropagating = (request: unknown) => {
    validateOperatorRequest(request);
    if (phase !== 'propagating' && phase !== 'stuck') {
      throw new Error(`token ${tokenId} is not propagating a revocation (phase ${phase})`);
    }
    if (unsettledReceivers().length === 0) {
      throw new Error(`token ${tokenId}: every receiver has already confirmed; nothing to retry or force`);
    }
  };
  setHandler(
    retryPropagationUpdate,
    async (request) => {
      const updateId = currentUpdateInfo()?.id ?? String(retryRound + 1);
      const retrying = unsettledReceivers();
      await store.recordAudit.executeWithOptions({ summary: 'audit: operator asked to retry propagation' }, [
        {
          tokenId,
          auditKey: `retry:${updateId}`,
          kind: 'propagation.retry-requested',
          data: { reason: request.reason, actor: request.actor ?? 'operator', receivers: retrying },
        },
      ]);
      retryRound++;
      // Restart deliveries now: cancelling a running activity resets its backoff.
      for (const receiverId of retrying) restart(receiverId);
      return { retrying };
    },
    { validator: requirePropagating },
  );
  setHandler(
    forceCompleteUpdate,
    async (request) => {
      const updateId = currentUpdateInfo()?.id ?? 'force';
      const receivers = await store.forceCompleteDeliveries.executeWithOptions(
        { summary: 'operator forces propagation complete' },
        [{ tokenId, auditKey: `force:${updateId}`, reason: request.reason, actor: request.actor ?? 'operator' }],
      );
      forced = true;
      for (const receiverId of receivers) {
        const d = deliveries.get(receiverId);
        if (d) update(receiverId, { ...d, status: 'forced' });
        restart(receiverId);
      }
      return { forced: receivers };
    },
    { validator: requirePropagating },
  );

  // One delivery per receiver, of the token's one revocation event (its outbox row is written by
  // whichever kill commits).
  for (const receiverId of input.receivers) {
    deliveries.set(receiverId, {
      receiverId,
      eventId: input.revocationEventId,
      status: 'pending',
      attempts: 0,
      lastStatusCode: null,
      lastError: null,
    });
  }

  const deliverUntilSettled = async (receiverId: string): Promise<void> => {
    while (!isSettled(deliveries.get(receiverId)!.status)) {
      const current = deliveries.get(receiverId)!;
      if (current.status === 'failed') {
        // A non-retryable answer: wait for an operator (retryPropagation or forceComplete).
        const round = retryRound;
        await condition(() => retryRound > round || isSettled(deliveries.get(receiverId)!.status));
        if (isSettled(deliveries.get(receiverId)!.status)) return;
        update(receiverId, { ...deliveries.get(receiverId)!, status: 'pending' });
      }
      const scope = new CancellationScope();
      running.set(receiverId, scope);
      try {
        const result = await scope.run(() =>
          delivery.deliverRevocation.executeWithOptions({ summary: `deliver revocation to ${receiverId}` }, [
            { eventId: current.eventId, receiverId },
          ]),
        );
        if (!isSettled(deliveries.get(receiverId)!.status)) update(receiverId, result);
      } catch (err) {
        // Cancelled by retryPropagation (restart) or forceComplete (settled): the loop re-checks. Any
        // other cancellation is the workflow's own (e.g. from the Web UI): let it end the workflow;
        // the reconciler restarts propagation that a closed workflow left unfinished.
        if (isCancellation(err) && restarted.delete(receiverId)) continue;
        if (!(err instanceof ActivityFailure)) throw err;
        // Retries are unlimited, so only a non-retryable answer (e.g. HTTP 400 or 410) ends up here.
        const cause = err.cause instanceof ApplicationFailure ? err.cause : undefined;
        update(receiverId, {
          ...deliveries.get(receiverId)!,
          status: 'failed',
          lastError: cause?.message ?? err.message,
        });
      } finally {
        running.delete(receiverId);
      }
    }
  };

  /** True once every delivery loop has ended; `deliveryFailure` holds what ended one abnormally. */
  let settled = false;
  let deliveryFailure: unknown;
  let deliveriesStarted = false;
  const startDeliveries = () => {
    if (deliveriesStarted) return;
    deliveriesStarted = true;
    Promise.all([...deliveries.keys()].map((receiverId) => deliverUntilSettled(receiverId))).then(
      () => (settled = true),
      (err: unknown) => {
        deliveryFailure = err;
        settled = true;
      },
    );
  };

  // ---- Phase 1: alive. Sleep until expiry or a revoke.
  let kill: KillResult | undefined;
  while (!kill) {
    if (revokeRequest) {
      const { malformed, ...request } = revokeRequest;
      phase = 'killing';
      const killing = store.killToken.executeWithOptions({ summary: summaryText(`revoke: ${request.reason}`) }, [
        { tokenId, ...request, byWorkflow: true },
      ]);
      // Deliveries go out in the same workflow task as the kill: a revoke's caller has usually
      // committed the kill (and its outbox rows) before this workflow ran; an attempt that finds no
      // outbox row yet retries shortly.
      startDeliveries();
      kill = await killing;
      if (malformed) {
        await store.recordAudit.executeWithOptions({ summary: 'audit: malformed revoke signal' }, [
          {
            tokenId,
            auditKey: 'malformed-revoke-signal',
            kind: 'signal.malformed',
            data: { reasonRecorded: 'unspecified' },
          },
        ]);
      }
      break;
    }
    const remaining = msUntil(input.expiresAt, Date.now());
    if (remaining <= 0) {
      phase = 'killing';
      const result = await store.killToken.executeWithOptions({ summary: 'expire: the token reached its expiry' }, [
        {
          tokenId,
          reason: 'expired',
          actor: 'system',
          initiatingEntity: 'system',
          onlyIfExpired: true,
          byWorkflow: true,
        },
      ]);
      if (result.notYetExpiredMs === undefined) {
        kill = result;
        break;
      }
      // The database clock is behind workflow time: wait the difference (a revoke still wins).
      phase = 'active';
      await condition(() => revokeRequest !== undefined, result.notYetExpiredMs, {
        summary: 'waiting for the database clock to reach expiry',
      });
      continue;
    }
    if (workflowInfo().continueAsNewSuggested) {
      await condition(allHandlersFinished);
      if (!revokeRequest) await continueAsNew<typeof tokenLifecycle>(input);
      continue;
    }
    setCurrentDetails(`Active until ${input.expiresAt}.`);
    await condition(() => revokeRequest !== undefined, remaining, {
      summary: `sleep until expiry at ${input.expiresAt}`,
    });
  }

  status = kill.token.status;
  propagation = kill.token.propagation;
  upsertSearchAttributes([
    { key: SEARCH_ATTRIBUTE.status, value: status },
    { key: SEARCH_ATTRIBUTE.propagation, value: propagation },
  ]);
  setCurrentDetails(
    `**${status}** at ${kill.token.revokedAt} by ${kill.token.revokedBy}: ${kill.token.revokeReason}. Propagation: ${propagation}.`,
  );

  // ---- Phase 2: every receiver told, in parallel, until each confirms or an operator decides.
  phase = 'propagating';
  startDeliveries();

  let escalateAt = Date.now() + timing.escalateAfterMs;
  for (;;) {
    if (deliveryFailure !== undefined) throw deliveryFailure;
    const verdict = propagationVerdict([...deliveries.values()], Date.now(), escalateAt);
    if (verdict.kind === 'complete') {
      await condition(() => settled);
      if (deliveryFailure !== undefined) throw deliveryFailure;
      break;
    }
    if (verdict.kind === 'wait') {
      const seen = changes;
      await condition(() => settled || changes !== seen, verdict.ms, { summary: 'waiting for receivers to confirm' });
      continue;
    }
    // Stuck: record it (retryable deliveries keep retrying), then wait for progress or an operator.
    const round = retryRound;
    if (propagation !== 'stuck') {
      const unsettled = [...deliveries.values()].filter((d) => !isSettled(d.status));
      const token = await store.setPropagation.executeWithOptions({ summary: 'escalate: propagation is stuck' }, [
        {
          tokenId,
          state: 'stuck',
          auditKey: `stuck:${round}`,
          detail: {
            receivers: unsettled.map((d) => ({ receiverId: d.receiverId, status: d.status, lastError: d.lastError })),
          },
        },
      ]);
      propagation = token.propagation;
      phase = 'stuck';
      upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: propagation }]);
      log.warn('revocation propagation is stuck', { tokenId, receivers: unsettled.map((d) => d.receiverId) });
    }
    await condition(() => settled || retryRound > round);
    if (retryRound > round && !settled) {
      const token = await store.setPropagation.executeWithOptions(
        { summary: 'operator retry: propagation pending again' },
        [{ tokenId, state: 'pending', auditKey: `pending:${retryRound}`, detail: { retryRound } }],
      );
      propagation = token.propagation;
      phase = 'propagating';
      upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: propagation }]);
      escalateAt = Date.now() + timing.escalateAfterMs;
    }
  }

  const done = await store.setPropagation.executeWithOptions({ summary: 'every receiver confirmed: complete' }, [
    { tokenId, state: 'complete', auditKey: 'complete', detail: { forced, receivers: [...deliveries.keys()] } },
  ]);
  phase = 'complete';
  propagation = 'complete';
  upsertSearchAttributes([{ key: SEARCH_ATTRIBUTE.propagation, value: done.propagation }]);
  setCurrentDetails(`**${status}**; every receiver confirmed${forced ? ' (forced by an operator)' : ''}.`);
  await condition(allHandlersFinished);
  return { tokenId, status, propagation: 'complete', forced, deliveries: [...deliveries.values()] };
}
