/**
 * Memory and CPU of the processes a benchmark watches, read from Linux's /proc: resident set size
 * (VmRSS) and its peak (VmHWM), CPU time, and a process's descendants.
 */
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';

/** USER_HZ: the unit of /proc/<pid>/stat's CPU times, 100 on every Linux architecture Node runs on. */
const TICKS_PER_SECOND = 100;
const MIB = 1024 * 1024;

export const mib = (bytes: number): number => Math.round((bytes / MIB) * 10) / 10;

export interface Memory {
  rssBytes: number;
  /** Peak RSS since the process started, or since resetPeak(). */
  peakBytes: number;
}

/** VmRSS and VmHWM of a process; undefined once it has exited. */
export function readMemory(pid: number): Memory | undefined {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rssBytes: kib('VmRSS'), peakBytes: kib('VmHWM') };
}

/** Resets the process's VmHWM to its current RSS (Linux ≥ 4.0); false when not permitted. */
export function resetPeak(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/** The fields of /proc/<pid>/stat after the command name (which may hold spaces), from field 3 on. */
function statFields(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** User plus system CPU seconds the process has used so far (0 once it has exited). */
export function cpuSeconds(pid: number): number {
  const fields = statFields(pid);
  // utime and stime are fields 14 and 15.
  return fields ? (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND : 0;
}

/** Every live process below `pid` (children, grandchildren …). */
export function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const ppid = Number(statFields(Number(entry))?.[1]);
    if (!Number.isInteger(ppid)) continue;
    children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
  }
  const found: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    for (const child of children.get(queue.shift()!) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

/** The summed RSS of the processes that are still alive. */
export function totalRss(pids: readonly number[]): number {
  return pids.reduce((sum, pid) => sum + (readMemory(pid)?.rssBytes ?? 0), 0);
}

/**
 * Samples the summed RSS of a set of processes until stopped: the peak of the sum, which the
 * processes' own VmHWM (one peak each, at different instants) cannot give.
 */
export class RssSampler {
  private peakTotal = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly pids: readonly number[],
    intervalMs = 200,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs);
  }

  /** Stops sampling; returns the highest summed RSS seen. */
  stop(): number {
    clearInterval(this.timer);
    this.sample();
    return this.peakTotal;
  }

  private sample(): void {
    this.peakTotal = Math.max(this.peakTotal, totalRss(this.pids));
  }
}

export interface Quiet {
  quiet: boolean;
  waitedMs: number;
  /** CPU used in the last window, in cores (1 = one core busy all the time). */
  cores: number;
}

/**
 * Waits until the processes used less than `maxCores` of CPU over a whole window: the worker has
 * worked off its backlog (a reconciler pass may still blip). Gives up after `timeoutMs`.
 */
export async function waitUntilQuiet(
  pids: () => number[],
  opts: { windowMs?: number; maxCores?: number; timeoutMs: number; signal: AbortSignal },
): Promise<Quiet> {
  const windowMs = opts.windowMs ?? 3_000;
  const maxCores = opts.maxCores ?? 0.1;
  const started = Date.now();
  for (;;) {
    const before = new Map(pids().map((pid) => [pid, cpuSeconds(pid)]));
    const t0 = Date.now();
    await new Promise((resolve) => setTimeout(resolve, windowMs));
    opts.signal.throwIfAborted();
    // Processes that exited meanwhile (a database connection closed) are left out of the sum.
    let used = 0;
    for (const [pid, cpu] of before) used += Math.max(0, cpuSeconds(pid) - cpu);
    const cores = used / ((Date.now() - t0) / 1000);
    const waitedMs = Date.now() - started;
    if (cores < maxCores || waitedMs > opts.timeoutMs) {
      return { quiet: cores < maxCores, waitedMs, cores: Math.round(cores * 1000) / 1000 };
    }
  }
}
