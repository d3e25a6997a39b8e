/**
 * The engine of bulk import and bulk issue: records in batches into the store (one statement per
 * batch), then each new token's workflow started (USE_EXISTING, REJECT_DUPLICATE), a bounded number at once. Memory
 * stays flat whatever the input's length: at most two batches are read ahead of the starts, and
 * errors leave through `onError` as they happen (the report keeps the first few only).
 */
import { performance } from 'node:perf_hooks';
import { WorkflowExecutionAlreadyStartedError, type Client } from '@temporalio/client';
import type { Settings } from '../../common/config.js';
import type { StorePool } from '../../common/db.js';
import { importTokens, type ImportedToken, type TokenRecord } from '../../common/store/index.js';
import { TEMPORAL_CALL_DEADLINE_MS, startTokenWorkflow } from '../../common/temporal.js';
import type { Prepared } from './records.js';

// Concurrency 64: the fastest of 16/32/64 for starts and startMany in every round of bench/bulk-tune.ts (docs/benchmarks.md).
export const BULK_DEFAULTS = { concurrency: 64, batchSize: 100 } as const;
/** Batches written to the store ahead of the starts: the next is ready when the current one's starts end. */
const BATCHES_AHEAD = 2;
/** Starts failed in a row after which a run stops (Temporal is likely down; each would wait out its deadline). */
const GIVE_UP_AFTER = 8;
/** Errors kept in the report; all of them go to `onError`. */
const REPORTED_ERRORS = 100;

export interface BulkDeps {
  pool: StorePool;
  temporal: Client;
  settings: Settings;
  /** Records that a token's workflow exists (batched, off the critical path). */
  markStarted: (tokenId: string) => void;
  /**
   * Writes the marks collected so far (never rejects): a run ends with them stored, so the next run
   * counts those tokens `existing` (a start of a running workflow cannot tell it was there).
   */
  flushStarted: () => Promise<void>;
}

/** A record that was not brought under management, with why. Never holds a secret. */
export interface BulkError {
  /** The input line (or the record's position, from 1, for records given as objects). */
  line: number;
  /**
   * `invalid`: the record itself is wrong; `failed`: the store refused it, its workflow could not be
   * started, or its token is stored but dead (revoked or expired).
   */
  kind: 'invalid' | 'failed';
  field?: string;
  message: string;
  tokenId?: string;
  /** Every problem of an invalid record, when it has several (`field`/`message` are the first). */
  issues?: Array<{ field: string; message: string }>;
}

export interface BulkProgress {
  /** Records with an outcome so far: started + existing + invalid + failed. */
  done: number;
  /** Workflows this run started (for rows it wrote, or rows an earlier run wrote but never started). */
  started: number;
  /** Rows stored before whose workflow had started already (or ran and closed). */
  existing: number;
  invalid: number;
  failed: number;
}

export interface BulkOptions {
  /** Workflow starts in flight at once (default 64). */
  concurrency?: number;
  /** Records per store statement (default 100). */
  batchSize?: number;
  /** Called after each record's outcome. */
  onProgress?: (progress: BulkProgress) => void;
  /** Called with each invalid or failed record as it happens (e.g. to write an errors file). */
  onError?: (error: BulkError) => void;
  /** Stops taking records; the records already in the store get their starts; the report says aborted. */
  signal?: AbortSignal;
}

export interface BulkReport extends Omit<BulkProgress, 'done'> {
  /** Stopped early by the signal: run it again to finish (everything done is skipped). */
  aborted: boolean;
  /** Why the run stopped before the end of its input, when it did for another reason than the signal. */
  stopped?: string;
  /** The first invalid or failed records (all of them went to onError); errorCount counts them all. */
  errors: BulkError[];
  errorCount: number;
  durationMs: number;
}

interface Internal extends BulkOptions {
  /** Marks the `token.issued` audit events as imports. */
  imported: boolean;
  /** Runs before a batch is written to the store, one batch at a time, in input order. */
  beforeBatch?: (batch: Array<{ line: number; token: ImportedToken }>) => Promise<void>;
}

/** Waits for a free slot among `size`; release() frees one. */
class Slots {
  #free: number;
  #waiting: Array<() => void> = [];
  constructor(size: number) {
    this.#free = size;
  }
  async take(): Promise<void> {
    if (this.#free > 0) {
      this.#free--;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }
  release(): void {
    const next = this.#waiting.shift();
    if (next) next();
    else this.#free++;
  }
}

const causes = (err: unknown): string => {
  const messages: string[] = [];
  for (let e: unknown = err; e instanceof Error && messages.length < 4; e = e.cause) messages.push(e.message);
  return messages.join(': ') || String(err);
};

export async function runBulk(deps: BulkDeps, items: AsyncIterable<Prepared>, opts: Internal): Promise<BulkReport> {
  const begun = performance.now();
  const concurrency = opts.concurrency ?? BULK_DEFAULTS.concurrency;
  const batchSize = opts.batchSize ?? BULK_DEFAULTS.batchSize;
  const counts = { started: 0, existing: 0, invalid: 0, failed: 0 };
  const errors: BulkError[] = [];
  let errorCount = 0;
  let stopped: string | undefined;
  let failedInARow = 0;
  const starts = new Slots(concurrency);
  const startsInFlight = new Set<Promise<void>>();
  const batchesInFlight = new Set<Promise<void>>();

  const stop = (why: string) => {
    stopped ??= why;
  };
  // A caller's callback that throws (e.g. the errors file's disk is full) stops the run like a
  // failure would; its error is thrown once the work in flight has ended.
  let callbackFailure: { error: unknown } | undefined;
  const call = <A>(callback: ((arg: A) => void) | undefined, arg: A) => {
    try {
      callback?.(arg);
    } catch (error) {
      callbackFailure ??= { error };
      stop(`a callback failed (${causes(error)})`);
    }
  };
  const progress = () =>
    call(opts.onProgress, { done: counts.started + counts.existing + counts.invalid + counts.failed, ...counts });
  const report = (error: BulkError) => {
    counts[error.kind]++;
    errorCount++;
    if (errors.length < REPORTED_ERRORS) errors.push(error);
    call(opts.onError, error);
    progress();
  };

  const start = async (line: number, token: TokenRecord) => {
    try {
      let outcome: 'started' | 'existing' = 'started';
      try {
        await deps.temporal.connection.withDeadline(Date.now() + TEMPORAL_CALL_DEADLINE_MS, () =>
          startTokenWorkflow(deps.temporal, token, deps.settings.temporal.taskQueue, deps.settings.timing),
        );
      } catch (err) {
        // Its workflow ran and closed since the row was read (a revoke got there first): never a second run.
        if (!(err instanceof WorkflowExecutionAlreadyStartedError)) throw err;
        outcome = 'existing';
      }
      failedInARow = 0;
      deps.markStarted(token.id);
      counts[outcome]++;
      progress();
    } catch (err) {
      // The row stays: its secret is in use out there. The reconciler starts it, or a rerun does.
      if (++failedInARow >= GIVE_UP_AFTER) {
        stop(`${GIVE_UP_AFTER} workflow starts failed in a row (is Temporal reachable?); run it again to resume`);
      }
      report({ line, kind: 'failed', tokenId: token.id, message: `its workflow could not be started: ${causes(err)}` });
    }
  };

  const writeBatch = async (batch: Array<{ line: number; token: ImportedToken }>) => {
    let outcomes;
    try {
      outcomes = await importTokens(
        deps.pool,
        batch.map((r) => r.token),
        opts.imported,
      );
    } catch (err) {
      stop(`the store refused a batch (${causes(err)}); run it again to resume`);
      for (const r of batch) {
        report({
          line: r.line,
          kind: 'failed',
          tokenId: r.token.tokenId,
          message: `may not have been written to the store (rerun to finish): ${causes(err)}`,
        });
      }
      return;
    }
    for (const [i, outcome] of outcomes.entries()) {
      const { line } = batch[i]!;
      if (outcome.outcome === 'conflict') {
        report({
          line,
          kind: 'failed',
          field: outcome.field,
          message: outcome.message,
          tokenId: batch[i]!.token.tokenId,
        });
        continue;
      }
      const { token } = outcome;
      if (outcome.outcome === 'existing' && !token.valid) {
        // Stored and dead: reporting it as managed would read as valid. Its workflow (or the
        // reconciler) propagates the death; nothing to start.
        report({
          line,
          kind: 'failed',
          tokenId: token.id,
          message: `token ${token.id} is ${token.effectiveStatus}; a dead token is not brought back`,
        });
        continue;
      }
      if (outcome.outcome === 'existing' && token.workflowStartedAt !== null) {
        counts.existing++;
        progress();
        continue;
      }
      await starts.take();
      if (stopped) {
        starts.release();
        report({ line, kind: 'failed', tokenId: token.id, message: `its workflow was not started: ${stopped}` });
        continue;
      }
      const running = start(line, token).finally(() => {
        starts.release();
        startsInFlight.delete(running);
      });
      startsInFlight.add(running);
    }
  };

  let batch: Array<{ line: number; token: ImportedToken }> = [];
  const dispatch = async () => {
    const full = batch;
    batch = [];
    while (batchesInFlight.size >= BATCHES_AHEAD) await Promise.race(batchesInFlight);
    // Aborted while waiting: this batch was read but not written; the rerun takes it.
    if (opts.signal?.aborted) return;
    if (stopped) {
      for (const r of full) {
        report({ line: r.line, kind: 'failed', tokenId: r.token.tokenId, message: `not written: ${stopped}` });
      }
      return;
    }
    await opts.beforeBatch?.(full);
    const writing = writeBatch(full).finally(() => batchesInFlight.delete(writing));
    batchesInFlight.add(writing);
  };

  let aborted = false;
  try {
    for await (const item of items) {
      if (opts.signal?.aborted) {
        aborted = true;
        break;
      }
      if (stopped) break;
      if ('problem' in item) {
        report({ line: item.line, kind: 'invalid', ...item.problem });
        continue;
      }
      batch.push(item);
      if (batch.length >= batchSize) await dispatch();
    }
    aborted ||= opts.signal?.aborted === true;
    // A batch read but not yet written is dropped on abort: the rerun takes it.
    if (!aborted && !stopped && batch.length > 0) await dispatch();
  } finally {
    // In flight: written batches still take their start slots, then every start ends.
    while (batchesInFlight.size > 0) await Promise.all(batchesInFlight);
    while (startsInFlight.size > 0) await Promise.all(startsInFlight);
    await deps.flushStarted();
  }
  if (callbackFailure) throw callbackFailure.error;
  return {
    ...counts,
    aborted,
    ...(stopped ? { stopped } : {}),
    errors,
    errorCount,
    durationMs: Math.round(performance.now() - begun),
  };
}
