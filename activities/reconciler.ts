/**
 * The reconciler's activity: heals one page of one reconciler set, row by row, heartbeating as it
 * goes. A worker that dies mid-page is noticed within the heartbeat timeout, and the retry resumes
 * after the last row its heartbeats recorded (every heal is idempotent, so a row done twice is harmless).
 */
import { ApplicationFailure, Context } from '@temporalio/activity';
import { WorkflowExecutionAlreadyStartedError, WorkflowNotFoundError, type Client } from '@temporalio/client';
import { DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS, type Settings } from '../common/config.js';
import type { StorePool } from '../common/db.js';
import { RECONCILER_METRIC, tokenWorkflowId, type ReconcileSet } from '../common/names.js';
import { signalRevoke, startTokenWorkflow } from '../common/temporal.js';
import * as store from '../common/store/index.js';
import {
  emptyReconcileReport,
  type AuditCheckpointOutcome,
  type ReconcileAction,
  type ReconcileReport,
} from '../common/messages.js';

export interface ReconcilerDeps {
  pool: StorePool;
  client: Client;
  settings: Pick<Settings, 'timing' | 'reconcileGraceMs' | 'temporal'> &
    Partial<Pick<Settings, 'auditKey' | 'auditPreviousPublicKeys' | 'auditCheckpointIntervalMs'>>;
}

export interface ReconcilePageInput {
  set: ReconcileSet;
  /** The page starts after this token id (null: at the start of the set). */
  afterId: string | null;
  batchSize: number;
  /** Overrides the worker's TOKENWARDEN_RECONCILE_GRACE. */
  graceMs?: number;
  /** Ids (and errors) the page's report lists per kind; its counts cover every row. */
  sampleSize: number;
}

export interface ReconcilePageResult {
  report: ReconcileReport;
  /** Where the next page starts; null when this page was the set's last. */
  nextAfterId: string | null;
}

/** What the heartbeats carry: how far into the page the activity got, and what it healed so far. */
interface PageProgress {
  lastId: string | null;
  handled: number;
  report: ReconcileReport;
}

/**
 * A workflow task on this attempt or later means the workflow's tasks keep failing (or timing out):
 * one crashed worker accounts for attempt 2, never for two failures in a row.
 */
export const WEDGED_TASK_ATTEMPTS = 3;

type Healed = ReconcileAction;

/** What describe() says about a token's workflow, as far as the reconciler cares. */
type WorkflowState = { kind: 'absent' | 'closed' | 'running' } | { kind: 'wedged'; runId: string; attempt: number };

export function createReconcilerActivities(deps: ReconcilerDeps) {
  const { pool, client, settings } = deps;
  const taskQueue = settings.temporal.taskQueue;
  const auditKey = settings.auditKey ? store.auditSigningKey(settings.auditKey) : undefined;
  const auditPreviousKeys = (settings.auditPreviousPublicKeys ?? []).map((raw) => store.auditCheckingKey(raw));
  const auditCheckpointIntervalMs = settings.auditCheckpointIntervalMs ?? DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS;
  // After an `unchanged` answer the heads scan is not repeated for an interval: a quiet store would
  // otherwise be scanned every pass (a change waits at most one more interval to be signed).
  let unchanged: { until: number; seq: number | undefined } | undefined;

  // A run this starts carries the token's policy snapshot, as the start would have.
  const tell = async (token: store.TokenRecord) =>
    signalRevoke(
      client,
      token,
      {
        reason: token.revokeReason ?? 'unspecified',
        actor: token.revokedBy ?? 'reconciler',
        initiatingEntity: token.initiatingEntity ?? 'system',
      },
      taskQueue,
      settings.timing,
      await store.workflowPolicyOf(pool, token),
    );

  /** Describe is strongly consistent: RUNNING means a run exists now, not that it makes progress. */
  async function inspectWorkflow(tokenId: string): Promise<WorkflowState> {
    let described;
    try {
      described = await client.workflow.getHandle(tokenWorkflowId(tokenId)).describe();
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return { kind: 'absent' };
      throw err;
    }
    if (described.status.name !== 'RUNNING') return { kind: 'closed' };
    const attempt = described.raw.pendingWorkflowTask?.attempt ?? 0;
    if (attempt < WEDGED_TASK_ATTEMPTS) return { kind: 'running' };
    return { kind: 'wedged', runId: described.runId, attempt };
  }

  /**
   * The first failed (or timed-out) workflow task of the current streak: later attempts of a failing
   * task are not written to history, so this event names the occurrence and says what went wrong.
   */
  async function failedTaskOfStreak(
    tokenId: string,
    runId: string,
  ): Promise<{ eventId: string; cause: string } | undefined> {
    const { history } = await client.workflowService.getWorkflowExecutionHistoryReverse({
      namespace: client.options.namespace,
      execution: { workflowId: tokenWorkflowId(tokenId), runId },
      maximumPageSize: 50,
    });
    for (const event of history?.events ?? []) {
      const failed = event.workflowTaskFailedEventAttributes;
      if (failed)
        return {
          eventId: String(event.eventId),
          cause: (failed.failure?.message ?? 'workflow task failed').slice(0, 300),
        };
      if (event.workflowTaskTimedOutEventAttributes)
        return { eventId: String(event.eventId), cause: 'workflow task timed out' };
      if (event.workflowTaskCompletedEventAttributes) return undefined;
    }
    return undefined;
  }

  const isPropagating = (token: store.TokenRecord) => token.propagation === 'pending' || token.propagation === 'stuck';

  /**
   * Its workflow runs but cannot move (e.g. a payload it cannot decode fails every task): nothing
   * else would ever say so, because the workflow is RUNNING. Audited once per occurrence (the run and
   * the failed task that began it); an unfinished propagation is also marked stuck in the store.
   */
  async function surfaceWedged(token: store.TokenRecord, state: { runId: string; attempt: number }): Promise<void> {
    const failure = await failedTaskOfStreak(token.id, state.runId);
    const occurrence = `wedged:${state.runId}:${failure?.eventId ?? 'unknown'}`;
    const detail = {
      cause: 'the workflow runs but its workflow tasks keep failing',
      runId: state.runId,
      workflowTaskAttempt: state.attempt,
      ...(failure ? { taskFailure: failure.cause } : {}),
    };
    if (isPropagating(token)) await store.setPropagation(pool, token.id, 'stuck', occurrence, detail);
    else await store.recordAudit(pool, token.id, occurrence, 'workflow.wedged', detail);
  }

  /** How each set's row is healed; `healed` records what was done (also when a later step fails). */
  const heal: Record<ReconcileSet, (token: store.TokenRecord, healed: Healed[]) => Promise<void>> = {
    // A wedged workflow cannot take a signal in, whatever its propagation: telling it again every
    // pass would change nothing, so it is surfaced instead until an operator ends the run.
    async untold(token, healed) {
      const state = await inspectWorkflow(token.id);
      if (state.kind === 'wedged') {
        await surfaceWedged(token, state);
        healed.push('wedged');
        return;
      }
      await tell(token);
      healed.push('signalled');
    },
    // The page's overdue rows were killed in one batch before they reach this: each is told.
    async overdue(token, healed) {
      healed.push('expired');
      await tell(token);
      healed.push('signalled');
    },
    // Propagation under way in the store: a closed (terminated, failed, cancelled) or missing run is
    // started again and adopts the store's facts; a running one is left alone unless it is wedged.
    async unfinished(token, healed) {
      const state = await inspectWorkflow(token.id);
      if (state.kind === 'running') return;
      if (state.kind === 'wedged') {
        await surfaceWedged(token, state);
        healed.push('wedged');
        return;
      }
      // The row may be older than describe(): a run that completed in between left nothing to restart.
      const current = await store.requireToken(pool, token.id);
      if (!isPropagating(current)) return;
      await tell(current);
      healed.push('restarted');
    },
    async unstarted(token, healed) {
      try {
        await startTokenWorkflow(client, token, taskQueue, settings.timing, await store.workflowPolicyOf(pool, token));
      } catch (err) {
        // Its workflow ran and closed (a revoke's signal-with-start got there first): only the mark was missing.
        if (!(err instanceof WorkflowExecutionAlreadyStartedError)) throw err;
        await store.markWorkflowStarted(pool, token.id);
        return;
      }
      await store.markWorkflowStarted(pool, token.id);
      healed.push('started');
    },
  };

  return {
    /**
     * Signs the audit chains' heads as a new checkpoint when the last is older than the interval and
     * a chain changed since (a local activity at the end of a pass). Chains that no longer hold what
     * the last checkpoint signed fail it, non-retryably: the pass fails where operators look.
     */
    async writeAuditCheckpoint(): Promise<AuditCheckpointOutcome> {
      if (!auditKey) return { written: false, skipped: 'no audit key' };
      if (unchanged && Date.now() < unchanged.until) {
        return { written: false, skipped: 'unchanged', ...(unchanged.seq !== undefined ? { seq: unchanged.seq } : {}) };
      }
      let outcome: AuditCheckpointOutcome;
      try {
        outcome = await store.writeAuditCheckpoint(pool, auditKey, {
          minIntervalMs: auditCheckpointIntervalMs,
          previousKeys: auditPreviousKeys,
        });
        unchanged =
          outcome.skipped === 'unchanged'
            ? { until: Date.now() + auditCheckpointIntervalMs, seq: outcome.seq }
            : undefined;
      } catch (err) {
        if (err instanceof store.AuditTamperedError) {
          throw ApplicationFailure.create({
            type: 'AuditChainTampered',
            message: err.message,
            nonRetryable: true,
            details: [err.broken],
          });
        }
        throw err;
      }
      // Info level: seen where the worker's log level lets it through (the pass's result has it too).
      if (outcome.written) Context.current().log.info('audit checkpoint written', { ...outcome });
      return outcome;
    },

    /** Which sets hold rows now (a local activity at the start of a pass). */
    async reconcileSetsWithRows(input: { graceMs?: number }): Promise<ReconcileSet[]> {
      return store.setsWithRows(pool, input.graceMs ?? settings.reconcileGraceMs);
    },

    /**
     * Heals one page of one set. One row's failure is reported (and counted) and skipped: it must not
     * starve the rows after it. The workflow turns reported failures into a failed pass.
     */
    async reconcilePage(input: ReconcilePageInput): Promise<ReconcilePageResult> {
      const ctx = Context.current();
      const meter = ctx.metricMeter;
      const healedCounter = meter.createCounter(RECONCILER_METRIC.healed, 'rows', 'rows healed by the reconciler');
      const wedgedCounter = meter.createCounter(
        RECONCILER_METRIC.wedged,
        'propagations',
        'propagations making no progress although their workflow runs',
      );
      const errorCounter = meter.createCounter(RECONCILER_METRIC.errors, 'rows', 'rows the reconciler could not heal');

      const progress: PageProgress = (ctx.info.heartbeatDetails as PageProgress | undefined) ?? {
        lastId: input.afterId,
        handled: 0,
        report: emptyReconcileReport(),
      };
      const { report } = progress;
      const sampled = <T>(list: T[], item: T) => {
        if (list.length < input.sampleSize) list.push(item);
      };
      const failed = (tokenId: string, error: string) => {
        // The report keeps only the first few errors: the log has every one.
        report.counts.errors++;
        sampled(report.errors, { tokenId, error });
        errorCounter.add(1, { set: input.set });
        ctx.log.warn('reconciler could not heal a row', { set: input.set, tokenId, error });
      };
      const graceMs = input.graceMs ?? settings.reconcileGraceMs;
      const limit = input.batchSize - progress.handled;
      let rows: store.TokenRecord[];
      let more: boolean;
      if (input.set === 'overdue') {
        // Killed in one batch (the one kill per token); killed rows leave the set, so its pages need
        // no cursor. A crash before they are all told leaves the rest to the untold set.
        const { killed, failed: unkilled } = await store.killExpiredTokens(pool, { limit, graceMs });
        for (const { tokenId, error } of unkilled) failed(tokenId, error);
        rows = killed;
        // Rows that failed stay at the head of the set: only a page full of kills asks for another.
        more = killed.length >= limit;
      } else {
        rows = await store.findReconcilePage(pool, input.set, { graceMs, afterId: progress.lastId, limit });
        more = progress.handled + rows.length >= input.batchSize;
      }
      // Details are encoded later, off this call: hand over a copy, never the object being mutated.
      const beat = () => ctx.heartbeat(structuredClone(progress));
      // Also while one row is slow (a lock, a slow server), so only a dead worker misses heartbeats.
      const timer = setInterval(beat, Math.max(1_000, (ctx.info.heartbeatTimeoutMs ?? 30_000) / 3));
      try {
        for (const token of rows) {
          ctx.cancellationSignal.throwIfAborted();
          const healed: Healed[] = [];
          let error: string | undefined;
          try {
            await heal[input.set](token, healed);
          } catch (err) {
            error = err instanceof Error ? err.message : String(err);
          }
          for (const action of healed) {
            report.counts[action]++;
            sampled(report[action], token.id);
            if (action === 'wedged') wedgedCounter.add(1);
            else healedCounter.add(1, { action });
          }
          if (error !== undefined) failed(token.id, error);
          progress.lastId = token.id;
          progress.handled++;
          beat();
        }
      } finally {
        clearInterval(timer);
      }
      return {
        report,
        nextAfterId: more ? progress.lastId : null,
      };
    },
  };
}
