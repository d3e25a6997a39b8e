/**
 * What every section of bench/scale.ts works with: the user's stack, a library client and a Temporal
 * client of it, receivers registered under this run's tag, and the helpers they share (bulk issue,
 * polling, the load average around a section).
 */
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import type { Client } from '@temporalio/client';
import type { IssueRequest, TokenWarden } from '../client/index.js';
import { ArrivalReceiver, type ReceiverBehaviour } from './receiver.js';
import type { UserStack } from './scale-stack.js';
import { mapLimited } from './workflows.js';

export type Teardown = Array<{ name: string; stop: () => Promise<void> }>;

export interface Rig {
  stack: UserStack;
  warden: TokenWarden;
  client: Client;
  /** Distinguishes this run's receivers and subjects (a reused data dir keeps earlier runs' rows). */
  tag: string;
  signal: AbortSignal;
  say: (msg: string) => void;
  teardown: Teardown;
  /** Tokens per second of the last bulk issue at concurrency 32 (sizes the expiry wave's lead). */
  issueRate?: number;
}

export interface BenchReceiver {
  id: string;
  receiver: ArrivalReceiver;
}

/** Starts a receiver on loopback and registers it as `<name>-<tag>`; closed at teardown. */
export async function addReceiver(rig: Rig, name: string, behaviour: ReceiverBehaviour = {}): Promise<BenchReceiver> {
  const receiver = await ArrivalReceiver.start(rig.say, behaviour);
  rig.teardown.push({ name: `receiver ${name}`, stop: () => receiver.close() });
  const { id } = await rig.warden.addReceiver({ id: `${name}-${rig.tag}`, url: receiver.url });
  return { id, receiver };
}

export interface Issued {
  tokenIds: string[];
  seconds: number;
  perSecond: number;
}

/** Issues `count` tokens through the library, `concurrency` calls at a time. */
export async function issueTokens(
  rig: Rig,
  count: number,
  concurrency: number,
  request: (i: number) => IssueRequest,
): Promise<Issued> {
  const t0 = performance.now();
  let done = 0;
  const tokenIds = await mapLimited(count, concurrency, async (i) => {
    rig.signal.throwIfAborted();
    const { tokenId } = await rig.warden.issue(request(i));
    if (++done % 1000 === 0) rig.say(`  ${done}/${count} issued`);
    return tokenId;
  });
  const seconds = (performance.now() - t0) / 1000;
  const perSecond = round(count / seconds, 1);
  if (concurrency === 32) rig.issueRate = perSecond;
  return { tokenIds, seconds: round(seconds, 2), perSecond };
}

/**
 * Calls `probe` every `intervalMs` until it returns a value; undefined after `timeoutMs`. The
 * stack's processes are checked on every round: a crashed worker ends the wait with its output.
 */
export async function poll<T>(
  rig: Rig,
  probe: () => Promise<T | undefined> | T | undefined,
  opts: { timeoutMs: number; intervalMs?: number },
): Promise<T | undefined> {
  const deadline = Date.now() + opts.timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    rig.stack.assertRunning();
    rig.signal.throwIfAborted();
    if (Date.now() > deadline) return undefined;
    await new Promise((resolve) => setTimeout(resolve, opts.intervalMs ?? 250));
  }
}

/** Polls the store on its own connection until none of the tokens is active; ms after `t0`. */
export async function watchAllDead(
  rig: Rig,
  tokenIds: string[],
  t0: number,
  timeoutMs: number,
): Promise<number | null> {
  const t = rig.warden.pool.tables;
  const seen = await poll(
    rig,
    async () => {
      const { rows } = await rig.warden.pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM ${t.token} WHERE id = ANY($1::text[]) AND status = 'active'`,
        [tokenIds],
      );
      return rows[0]!.n === 0 ? performance.now() - t0 : undefined;
    },
    { timeoutMs, intervalMs: 5 },
  );
  return seen === undefined ? null : round(seen, 1);
}

/** Until the receiver acknowledged every token's event; ms after the epoch instant `fromEpochMs`. */
export async function watchDelivered(
  rig: Rig,
  receiver: ArrivalReceiver,
  tokenIds: string[],
  fromEpochMs: number,
  timeoutMs: number,
): Promise<number | null> {
  const last = await poll(
    rig,
    () => {
      let latest = 0;
      for (const id of tokenIds) {
        const arrival = receiver.acknowledgedOf(id);
        if (!arrival) return undefined;
        latest = Math.max(latest, arrival.ackedAtEpochMs);
      }
      return latest;
    },
    { timeoutMs, intervalMs: 100 },
  );
  return last === undefined ? null : round(last - fromEpochMs);
}

/** Resolves with `promise`, or rejects after `timeoutMs` or on Ctrl-C. */
export async function within<T>(rig: Rig, promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const stop = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing after ${timeoutMs / 1000} s`)), timeoutMs);
    onAbort = () => reject(rig.signal.reason);
    rig.signal.addEventListener('abort', onAbort, { once: true });
  });
  try {
    return await Promise.race([promise, stop]);
  } finally {
    clearTimeout(timer);
    rig.signal.removeEventListener('abort', onAbort!);
  }
}

export interface LoadAverage {
  /** 1-, 5- and 15-minute load averages of the machine. */
  before: number[];
  after: number[];
}

/** Runs one section and notes the machine's load average around it and how long it took. */
export async function section<T extends object>(
  rig: Pick<Rig, 'say'>,
  name: string,
  run: () => Promise<T>,
): Promise<T & { loadAverage: LoadAverage; seconds: number }> {
  const before = loadAverage();
  rig.say(`${name}: load average ${before.join(' / ')}`);
  const t0 = performance.now();
  const figures = await run();
  const after = loadAverage();
  const seconds = round((performance.now() - t0) / 1000, 1);
  rig.say(`${name}: done in ${seconds} s, load average ${after.join(' / ')}`);
  return { ...figures, loadAverage: { before, after }, seconds };
}

const loadAverage = () => os.loadavg().map((x) => round(x, 2));

export const round = (value: number, digits = 0): number => Math.round(value * 10 ** digits) / 10 ** digits;
