/**
 * The expiry sweep: every worker process records, within about one interval, the death of each token
 * past its expiry, in batches in the store, without a workflow task. The store's clock already made
 * such a token invalid at its expiry; this only writes down what that clock decided (status, outbox,
 * audit, NOTIFY), so a backlog of workflow tasks no longer delays it. Each token's workflow still
 * wakes at its expiry, adopts these facts through its own kill and propagates.
 */
import type { Logger, MetricMeter } from '@temporalio/common';
import type { StorePool } from '../common/db.js';
import { EXPIRY_SWEEP_METRIC } from '../common/names.js';
import { killExpiredTokens } from '../common/store/index.js';

/**
 * Tokens one statement kills. Measured with fsync on (docs/design-notes.md, "Mass expiry"): the rate
 * is flat from 25 to 500 (a kill costs about 1 ms of database time whatever the batch), while a
 * batch's time, and so its locks (a revoke of one of its tokens waits for it), grow with its size.
 */
export const EXPIRY_SWEEP_BATCH = 200;

export interface ExpirySweeperOptions {
  pool: StorePool;
  intervalMs: number;
  batchSize?: number;
  logger: Logger;
  meter?: MetricMeter;
}

export interface ExpirySweeper {
  /** Ends the loop; resolves once its statement in flight (if any) has finished. */
  stop(): Promise<void>;
}

/** Sweeps at once, then every `intervalMs` after the previous sweep ended; a full batch is followed by another at once. */
export function startExpirySweeper(opts: ExpirySweeperOptions): ExpirySweeper {
  const { pool, intervalMs, logger } = opts;
  const batchSize = opts.batchSize ?? EXPIRY_SWEEP_BATCH;
  const swept = opts.meter?.createCounter(
    EXPIRY_SWEEP_METRIC.swept,
    'tokens',
    'expired tokens recorded dead by the sweep',
  );
  const errors = opts.meter?.createCounter(EXPIRY_SWEEP_METRIC.errors, 'errors', 'failed sweeps and failed kills');
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> = Promise.resolve();

  async function sweep(): Promise<void> {
    let total = 0;
    try {
      for (;;) {
        const { killed, failed } = await killExpiredTokens(pool, { limit: batchSize });
        total += killed.length;
        swept?.add(killed.length);
        if (failed.length > 0) {
          errors?.add(failed.length);
          logger.warn('expiry sweep could not record the death of some tokens', {
            count: failed.length,
            first: failed[0],
          });
        }
        if (killed.length < batchSize || stopped) break;
      }
    } catch (err) {
      // The store is unreachable (or refuses): the next tick tries again; validity is unaffected.
      errors?.add(1);
      logger.warn('expiry sweep failed; it retries at the next interval', {
        error: err instanceof Error ? err.message : String(err),
      });
    }
    if (total > 0) logger.info('expiry sweep recorded expired tokens dead', { count: total });
  }

  const tick = () => {
    running = sweep().finally(() => {
      if (stopped) return;
      timer = setTimeout(tick, intervalMs);
      // The worker keeps its process alive, not this loop.
      timer.unref();
    });
  };
  tick();

  return {
    async stop() {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
