/**
 * The issuer's record that a token's workflow exists (`workflow_started_at`), written off the issue's
 * critical path: ids are collected and marked together, one statement per interval and on close.
 * A mark lost to a crash or a failed write costs only a harmless restart: the reconciler starts the
 * workflow of every active row still unmarked after its grace (USE_EXISTING keeps the running one).
 */
import type { StorePool } from '../common/db.js';
import * as store from '../common/store/index.js';

/** Far below the reconciler's grace (a minute by default), so it restarts only what a crash left. */
export const STARTED_MARK_INTERVAL_MS = 100;

export class StartedMarks {
  #pending: string[] = [];
  #timer: NodeJS.Timeout | undefined;
  /** The write under way (each waits for the previous one): close() waits for all of them. Never rejects. */
  #writing: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(
    private readonly pool: StorePool,
    private readonly onError: (err: Error) => void,
    private readonly intervalMs = STARTED_MARK_INTERVAL_MS,
  ) {}

  /** After close() the pool is ended: a late issue's mark is left to the reconciler. */
  add(tokenId: string): void {
    if (this.#closed) return;
    this.#pending.push(tokenId);
    this.#timer ??= setTimeout(() => void this.flush(), this.intervalMs);
  }

  /** Writes every mark collected so far; never rejects (a failure goes to onError). */
  flush(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const ids = this.#pending;
    if (ids.length === 0) return this.#writing;
    this.#pending = [];
    this.#writing = this.#writing.then(() =>
      store
        .markWorkflowsStarted(this.pool, ids)
        .catch((err: unknown) =>
          this.report(
            new Error(
              `recording that ${ids.length} issued token(s) have their workflow failed (${(err as Error).message}); the reconciler will record it`,
              { cause: err },
            ),
          ),
        ),
    );
    return this.#writing;
  }

  /** Writes the marks still pending and takes no more; call it before ending the pool. */
  close(): Promise<void> {
    this.#closed = true;
    return this.flush();
  }

  /** The app's handler may throw: that must neither crash the timer's flush nor stop later marks. */
  private report(err: Error): void {
    try {
      this.onError(err);
    } catch {
      // Nowhere left to report it: the library prints nothing, and the reconciler records the marks.
    }
  }
}
