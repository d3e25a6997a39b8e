/**
 * Worker memory: RSS at rest (the worker settled, its CPU quiet) with no tokens, then with N
 * sleeping tokens (long TTL) issued at concurrency 32; and the peak while a section runs.
 */
import { mib, readMemory, resetPeak, RssSampler, totalRss, waitUntilQuiet, type Quiet } from './proc.js';
import { addReceiver, issueTokens, round, type Rig } from './scale-rig.js';

export const GOAL_RSS_MIB = 1536;
const SLEEPING_TTL = '30d';

export interface MemoryAtRest {
  /** Summed RSS of the worker processes (the stack process itself, launcher included, without --workers). */
  workerRssMiB: number;
  workerEachMiB: number[];
  /** The stack process alone when workers run separately (--workers). */
  launcherRssMiB?: number;
  /** Temporal dev server and PostgreSQL processes under the stack, for context. */
  serversRssMiB: number;
  settled: Quiet;
}

/** Every process whose CPU must be quiet before memory is read or a section starts. */
export const watchedPids = (rig: Rig): number[] => [
  ...new Set([rig.stack.stackPid, ...rig.stack.workerPids, ...rig.stack.serverPids()]),
];

/** Waits until the worker has worked off its backlog (CPU quiet), then reads memory. */
export async function memoryAtRest(rig: Rig, timeoutMs: number): Promise<MemoryAtRest> {
  const settled = await waitUntilQuiet(() => watchedPids(rig), { timeoutMs, signal: rig.signal });
  if (!settled.quiet) rig.say(`  not quiet after ${timeoutMs / 1000} s (${settled.cores} cores busy): reading anyway`);
  const each = rig.stack.workerPids.map((pid) => mib(readMemory(pid)?.rssBytes ?? 0));
  return {
    workerRssMiB: round(
      each.reduce((sum, x) => sum + x, 0),
      1,
    ),
    workerEachMiB: each,
    ...(rig.stack.workerInStack ? {} : { launcherRssMiB: mib(readMemory(rig.stack.stackPid)?.rssBytes ?? 0) }),
    serversRssMiB: mib(totalRss(rig.stack.serverPids())),
    settled,
  };
}

export async function sleepingSection(rig: Rig, opts: { sleeping: number; timeoutMs: number }) {
  rig.say('  baseline: the stack with no tokens of this run, at rest');
  const baseline = await memoryAtRest(rig, opts.timeoutMs);
  // Their receiver is never called during the run: they sleep for 30 days.
  const { id } = await addReceiver(rig, 'sleep');
  rig.say(`  issuing ${opts.sleeping} sleeping tokens (ttl ${SLEEPING_TTL}) at concurrency 32`);
  const issued = await issueTokens(rig, opts.sleeping, 32, (i) => ({
    subject: `usr_sleep_${rig.tag}_${i}`,
    receivers: [id],
    ttl: SLEEPING_TTL,
  }));
  rig.say(`  issued in ${issued.seconds} s (${issued.perSecond}/s); waiting for the worker to settle`);
  const atRest = await memoryAtRest(rig, opts.timeoutMs);
  return {
    sleeping: opts.sleeping,
    issue: { seconds: issued.seconds, perSecond: issued.perSecond },
    baseline,
    atRest,
    goalMiB: GOAL_RSS_MIB,
    goalMet: atRest.workerRssMiB <= GOAL_RSS_MIB,
  };
}

export interface PeakMemory {
  /** Highest summed RSS of the worker processes, sampled every 200 ms. */
  workerPeakRssMiB: number;
  /** Each worker process's VmHWM over the section (reset at its start when the kernel allows). */
  workerEachPeakMiB: number[];
  peakWasReset: boolean;
}

/** Watches the worker processes' memory from now until the returned function is called. */
export function watchPeakMemory(rig: Rig): () => PeakMemory {
  const pids = rig.stack.workerPids;
  const peakWasReset = pids.map(resetPeak).every(Boolean);
  const sampler = new RssSampler(pids);
  return () => ({
    workerPeakRssMiB: mib(sampler.stop()),
    workerEachPeakMiB: pids.map((pid) => mib(readMemory(pid)?.peakBytes ?? 0)),
    peakWasReset,
  });
}
