/**
 * Runs one CLI command as a child process and watches its memory through /proc/<pid>/status: VmHWM
 * (the kernel's own peak RSS, so nothing between two samples is lost; only the last interval before
 * exit is unseen) and VmRSS over time, to tell a flat process from a growing one.
 */
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { PACKAGE_ROOT } from '../common/config.js';
import { mib, readMemory } from './proc.js';
import { CLI_PATH } from './scale-stack.js';

export interface ChildRun {
  exitCode: number | null;
  stdout: string;
  stderr: string;
  seconds: number;
  /** VmHWM at the last sample before exit. */
  peakRssMiB: number;
  /** VmRSS at a quarter, half, three quarters of the run, and at its last sample. */
  rssAlongMiB: number[];
  samples: number;
}

const SAMPLE_MS = 25;

export async function runCliMeasured(
  args: string[],
  env: NodeJS.ProcessEnv,
  opts: { signal: AbortSignal; stdin?: string },
): Promise<ChildRun> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [CLI_PATH, ...args], {
    cwd: PACKAGE_ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const stop = () => child.kill('SIGINT');
  opts.signal.addEventListener('abort', stop, { once: true });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr = (stderr + chunk).slice(-64 * 1024)));
  const series: Array<{ at: number; rss: number }> = [];
  let peak = 0;
  const sample = () => {
    const memory = child.pid === undefined ? undefined : readMemory(child.pid);
    // An exited child not yet reaped still has a status file, without its memory lines.
    if (!memory || !Number.isFinite(memory.peakBytes) || !Number.isFinite(memory.rssBytes)) return;
    peak = Math.max(peak, memory.peakBytes);
    series.push({ at: performance.now() - t0, rss: memory.rssBytes });
  };
  sample();
  const timer = setInterval(sample, SAMPLE_MS);
  const exitCode = await new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code) => resolve(code));
  }).finally(() => {
    clearInterval(timer);
    opts.signal.removeEventListener('abort', stop);
  });
  const seconds = (performance.now() - t0) / 1000;
  const at = (fraction: number) => {
    const due = seconds * 1000 * fraction;
    const found = [...series].reverse().find((s) => s.at <= due) ?? series[0];
    return found ? mib(found.rss) : 0;
  };
  return {
    exitCode,
    stdout,
    stderr,
    seconds: Math.round(seconds * 100) / 100,
    peakRssMiB: mib(peak),
    rssAlongMiB: [0.25, 0.5, 0.75, 1].map(at),
    samples: series.length,
  };
}
