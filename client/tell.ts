/**
 * Telling many dead tokens' workflows to propagate, rate-limited with bounded concurrency: the one
 * paced loop of offboarding and of revocation by filter. The kills have committed before it runs, so
 * stopping it (abort, Temporal unreachable) leaves nothing valid, only workflows still to tell.
 */
import type { TokenRecord } from '../common/store/index.js';

/** Signals failed in a row after which telling stops (Temporal is likely down). */
export const GIVE_UP_AFTER = 8;

/**
 * What `tell` answers when Temporal says the token's workflow is not running (closed, or never
 * started): an answer, so Temporal is up; the token is left untold without counting as a failure.
 */
export const NOT_RUNNING = 'not-running';

export interface TellProgress {
  /** Workflows told so far, and how many failed to be. */
  done: number;
  failed: number;
  total: number;
}

export interface TellPace {
  /** Workflows told per second at most (Temporal's rate limits are per namespace). */
  rate: number;
  /** Workflows told at once at most. */
  concurrency: number;
}

export interface TellOutcome {
  signalled: number;
  notSignalled: string[];
  /** Signals that failed, and the first three failures' text. */
  failed: number;
  firstFailures: string[];
  /** Tokens (also in notSignalled) whose workflow Temporal said is not running. */
  notRunning: string[];
  /** Stopped after GIVE_UP_AFTER failures in a row; `notTried` workflows were then left. */
  gaveUp: boolean;
  notTried: number;
  /** The abort left a workflow untold. */
  aborted: boolean;
}

/** The messages of an error and its causes, outermost first (Temporal wraps the gRPC status). */
export function causes(err: unknown): string {
  const messages: string[] = [];
  for (let e: unknown = err; e instanceof Error && messages.length < 4; e = e.cause) messages.push(e.message);
  return messages.join(': ') || String(err);
}

/**
 * Tells each token's workflow with `tell`, paced by start time (the n-th call goes out no earlier
 * than n / rate after the first) and at most `concurrency` at once.
 */
export async function tellPaced<T extends Pick<TokenRecord, 'id'>>(
  tokens: readonly T[],
  tell: (token: T) => Promise<void | typeof NOT_RUNNING>,
  pace: TellPace,
  opts: { onProgress?: (progress: TellProgress) => void; signal?: AbortSignal },
): Promise<TellOutcome> {
  const abort = opts.signal;
  // One abort listener for the whole loop, not one per sleeping worker: `concurrency` of them on
  // one signal pass Node's limit of 10 (MaxListenersExceededWarning, a leak as far as it can tell).
  const sleepers = new Set<() => void>();
  const wakeAll = () => [...sleepers].forEach((wake) => wake());
  abort?.addEventListener('abort', wakeAll, { once: true });
  /** Waits `ms`, or less when the abort comes meanwhile (an abort at a low rate is heard at once). */
  const sleepUnlessAborted = (ms: number) =>
    new Promise<void>((resolve) => {
      if (abort?.aborted) return resolve();
      const wake = () => {
        clearTimeout(timer);
        sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      sleepers.add(wake);
    });
  const notSignalled: string[] = [];
  const notRunning: string[] = [];
  const firstFailures: string[] = [];
  let failed = 0;
  let failedInARow = 0;
  let skipped = 0;
  let signalled = 0;
  let next = 0;
  let slot = Date.now();
  const spacingMs = 1000 / pace.rate;
  const report = () => opts.onProgress?.({ done: signalled, failed, total: tokens.length });
  // Temporal unreachable: every call would wait out its deadline; the reconciler tells the rest later.
  const givenUp = () => failedInARow >= GIVE_UP_AFTER;
  const worker = async () => {
    while (next < tokens.length && !abort?.aborted && !givenUp()) {
      const token = tokens[next++]!;
      const wait = slot - Date.now();
      slot = Math.max(slot, Date.now()) + spacingMs;
      if (wait > 0) await sleepUnlessAborted(wait);
      if (abort?.aborted || givenUp()) {
        notSignalled.push(token.id);
        skipped++;
        continue;
      }
      try {
        if ((await tell(token)) === NOT_RUNNING) {
          notSignalled.push(token.id);
          notRunning.push(token.id);
        } else signalled++;
        failedInARow = 0;
      } catch (err) {
        notSignalled.push(token.id);
        failedInARow++;
        if (++failed <= 3) firstFailures.push(`${token.id}: ${causes(err)}`);
      }
      report();
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(pace.concurrency, tokens.length) }, worker));
  } finally {
    abort?.removeEventListener('abort', wakeAll);
  }
  const untouched = tokens.slice(next).map((t) => t.id);
  notSignalled.push(...untouched);
  const aborted = abort?.aborted === true && skipped + untouched.length > 0;
  return {
    signalled,
    notSignalled,
    failed,
    firstFailures,
    notRunning,
    gaveUp: givenUp(),
    notTried: skipped + untouched.length,
    aborted,
  };
}

/** What a caller is told of an outcome; `rerun` says how to resume (e.g. "run offboard again"). */
export function tellWarnings(outcome: TellOutcome, rerun: string): string[] {
  const { failed, firstFailures } = outcome;
  const warnings: string[] = [];
  if (failed > 0) {
    warnings.push(
      `${failed} workflow(s) could not be signalled (${firstFailures.join('; ')}${failed > 3 ? '; …' : ''})` +
        (outcome.gaveUp ? `; stopped after ${GIVE_UP_AFTER} failures in a row, ${outcome.notTried} not tried` : '') +
        `; they are dead in the store: the reconciler will start their propagation, or ${rerun}`,
    );
  }
  if (outcome.aborted) {
    warnings.push(`aborted: ${outcome.notSignalled.length} workflow(s) not told; ${rerun} to resume`);
  }
  return warnings;
}
