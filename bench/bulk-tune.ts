/**
 * `npm run build && node dist/bench/bulk-tune.js [--starts N --rounds R --configs base,sync-full,… --levels 8,16,64]`:
 * the engine-side settings for bulk load, measured. Each configuration is its own `tokenwarden start`
 * (bench/scale-stack.ts) with some settings changed (TOKENWARDEN_SQLITE_PRAGMAS for the dev server's
 * SQLite file, the worker's TOKENWARDEN_* capacity), all of them up at once. A cell is a burst of N
 * token-workflow starts on one stack at one concurrency: raw starts on the real task queue
 * (bench/bulk-import.ts), or startMany. Every configuration is measured at
 * concurrency 32, and the base one also at --levels. The cells run in R rounds, in a rotating
 * order, each from quiet stacks (the others idle), so load from outside falls on every cell alike;
 * a cell's figure is its median over the rounds. Per burst: starts per second, and the time until
 * its stack is quiet again (every workflow's first task done: the worker's part of the load).
 * Human lines on stderr, a summary and a final JSON line on stdout.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { TokenWarden } from '../client/index.js';
import type { TokenRecord } from '../common/store/index.js';
import { connectTemporal } from '../common/temporal.js';
import { rawStarts, tokenTemplate } from './bulk-import.js';
import { importRecord } from './bulk-records.js';
import { cpuSeconds, waitUntilQuiet } from './proc.js';
import { watchedPids } from './scale-memory.js';
import { addReceiver, round, type Rig, type Teardown } from './scale-rig.js';
import { startUserStack, waitForWorkers } from './scale-stack.js';
import { percentile } from './stats.js';

const say = (msg: string) => process.stderr.write(`[bench:bulk-tune] ${msg}\n`);

/** Each configuration: the settings it changes from the stack's defaults. */
const CONFIGS: Record<string, Record<string, string>> = {
  base: {},
  'sync-full': { TOKENWARDEN_SQLITE_PRAGMAS: 'synchronous=full' },
  'checkpoint-10k': { TOKENWARDEN_SQLITE_PRAGMAS: 'wal_autocheckpoint=10000' },
  'cache-64m': { TOKENWARDEN_SQLITE_PRAGMAS: 'cache_size=-65536' },
  'mmap-256m': { TOKENWARDEN_SQLITE_PRAGMAS: 'mmap_size=268435456' },
  'slots-100': { TOKENWARDEN_WORKFLOW_TASK_SLOTS: '100', TOKENWARDEN_WORKFLOW_TASK_POLLERS: '20' },
  'slots-10': { TOKENWARDEN_WORKFLOW_TASK_SLOTS: '10', TOKENWARDEN_WORKFLOW_TASK_POLLERS: '4' },
};
const MAIN_LEVEL = 32;
/** A quiet window this short gives the drain time to about a second. */
const QUIET_WINDOW_MS = 1_000;

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      starts: { type: 'string', default: '500' },
      rounds: { type: 'string', default: '3' },
      levels: { type: 'string', default: '8,16,64' },
      configs: { type: 'string', default: Object.keys(CONFIGS).join(',') },
      series: { type: 'string', default: 'raw,startMany' },
      timeout: { type: 'string', default: '300' },
    },
  });
  const positive = (name: string, text: string) => {
    if (!/^\d+$/.test(text) || Number(text) < 1) throw new Error(`--${name}: expected a positive integer, got ${text}`);
    return Number(text);
  };
  const configs = values.configs.split(',').map((s) => s.trim());
  const unknown = configs.filter((name) => !(name in CONFIGS));
  if (unknown.length) throw new Error(`--configs takes ${Object.keys(CONFIGS).join(', ')}; got ${unknown.join(', ')}`);
  if (!configs.includes('base')) throw new Error('--configs must include base');
  const series = values.series.split(',').map((s) => s.trim());
  if (series.some((s) => s !== 'raw' && s !== 'startMany')) throw new Error('--series takes raw, startMany');
  return {
    starts: positive('starts', values.starts),
    rounds: positive('rounds', values.rounds),
    levels: values.levels
      .split(',')
      .filter(Boolean)
      .map((text) => positive('levels', text)),
    configs,
    series: series as Array<'raw' | 'startMany'>,
    timeoutMs: positive('timeout', values.timeout) * 1000,
  };
}

interface Bench {
  name: string;
  rig: Rig;
  template: TokenRecord;
  receiver: string;
  teardown: Teardown;
}

interface Cell {
  config: string;
  concurrency: number;
  series: 'raw' | 'startMany';
  perSecond: number[];
  drainedMs: number[];
  /** CPU seconds of the stack's processes and of this process per 1,000 starts, burst and drain. */
  cpuPer1000: number[];
}

async function startBench(name: string, halt: AbortSignal): Promise<Bench> {
  const teardown: Teardown = [];
  try {
    const stack = await startUserStack({ workers: 0, log: say, signal: halt, stackEnv: CONFIGS[name]! });
    teardown.push({ name: `${name} stack`, stop: stack.stop });
    const client = await connectTemporal(stack.settings);
    teardown.push({ name: `${name} temporal client`, stop: () => client.connection.close() });
    await waitForWorkers(stack, client, halt);
    const warden = await TokenWarden.connect(stack.settings);
    teardown.push({ name: `${name} warden`, stop: () => warden.close() });
    const rig: Rig = { stack, warden, client, tag: randomBytes(3).toString('hex'), signal: halt, say, teardown };
    const { id: receiver } = await addReceiver(rig, 'tune');
    const template = await tokenTemplate(rig, receiver);
    // Warm-up: the connections, the worker's first bundle load, SQLite's first pages.
    await rawStarts(rig, template, 100, 16, `usr_warm_${rig.tag}`);
    return { name, rig, template, receiver, teardown };
  } catch (err) {
    await stopAll(teardown);
    throw err;
  }
}

async function stopAll(teardown: Teardown): Promise<void> {
  for (const { name, stop } of [...teardown].reverse()) {
    await stop().catch((err: Error) => say(`stopping ${name} failed: ${err.message}`));
  }
}

/** One burst on one stack: starts per second, and ms until its stack was quiet again. */
async function burst(bench: Bench, cell: Cell, n: number, round_: number, opts: { timeoutMs: number }) {
  const { rig } = bench;
  const tag = `${rig.tag}${cell.series[0]}${cell.concurrency}r${round_}`;
  let ms: number;
  const pids = [...watchedPids(rig), process.pid];
  const cpuBefore = pids.map(cpuSeconds);
  const t0 = performance.now();
  if (cell.series === 'raw') {
    ms = await rawStarts(rig, bench.template, n, cell.concurrency, `usr_raw_${tag}`);
  } else {
    const records = Array.from({ length: n }, (_, i) =>
      importRecord(i, { tag, receiver: bench.receiver, subjectPrefix: 'usr_tune' }),
    );
    const s0 = performance.now();
    const report = await rig.warden.startMany(records, { concurrency: cell.concurrency, signal: rig.signal });
    ms = performance.now() - s0;
    if (report.started !== n) throw new Error(`startMany started ${report.started} of ${n}: ${JSON.stringify(report)}`);
  }
  const settled = await waitUntilQuiet(() => watchedPids(rig), {
    windowMs: QUIET_WINDOW_MS,
    timeoutMs: opts.timeoutMs,
    signal: rig.signal,
  });
  if (!settled.quiet) say(`  ${cell.config} did not settle within the timeout`);
  // Processes gone meanwhile (a database connection closed) are left out, as in waitUntilQuiet.
  const cpu = pids.reduce((sum, pid, i) => sum + Math.max(0, cpuSeconds(pid) - cpuBefore[i]!), 0);
  return {
    perSecond: round(n / (ms / 1000), 1),
    drainedMs: round(performance.now() - t0 - QUIET_WINDOW_MS),
    cpuPer1000: round((cpu * 1000) / n, 2),
  };
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const halt = new AbortController();
  const onSignal = () => {
    if (halt.signal.aborted) process.exit(130);
    say('interrupted: stopping the stacks');
    halt.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const benches: Bench[] = [];
  const cells: Cell[] = [];
  const loads: number[] = [];
  let failure: unknown;
  try {
    for (const name of opts.configs) {
      say(`starting ${name}: ${JSON.stringify(CONFIGS[name])}`);
      benches.push(await startBench(name, halt.signal));
    }
    for (const s of opts.series) {
      for (const config of opts.configs)
        cells.push({ config, concurrency: MAIN_LEVEL, series: s, perSecond: [], drainedMs: [], cpuPer1000: [] });
      for (const level of opts.levels.filter((l) => l !== MAIN_LEVEL)) {
        cells.push({ config: 'base', concurrency: level, series: s, perSecond: [], drainedMs: [], cpuPer1000: [] });
      }
    }
    const allQuiet = async () => {
      for (const bench of benches) {
        await waitUntilQuiet(() => watchedPids(bench.rig), { timeoutMs: opts.timeoutMs, signal: halt.signal });
      }
    };
    for (let r = 0; r < opts.rounds; r++) {
      for (let k = 0; k < cells.length; k++) {
        const cell = cells[(r * 3 + k) % cells.length]!;
        await allQuiet();
        loads.push(os.loadavg()[0]!);
        const bench = benches.find((b) => b.name === cell.config)!;
        const figures = await burst(bench, cell, opts.starts, r, opts);
        cell.perSecond.push(figures.perSecond);
        cell.drainedMs.push(figures.drainedMs);
        cell.cpuPer1000.push(figures.cpuPer1000);
        say(
          `  round ${r + 1} ${cell.config} c=${cell.concurrency} ${cell.series}: ${figures.perSecond}/s, quiet after ${round(figures.drainedMs / 1000, 1)} s, ${figures.cpuPer1000} CPU s per 1,000 (load ${round(os.loadavg()[0]!, 1)})`,
        );
      }
    }
  } catch (err) {
    failure = err;
  } finally {
    for (const bench of benches.reverse()) await stopAll(bench.teardown);
  }
  const median = (xs: number[]) =>
    xs.length
      ? percentile(
          [...xs].sort((a, b) => a - b),
          50,
        )
      : null;
  const results = cells.map((c) => ({
    ...c,
    medianPerSecond: median(c.perSecond),
    medianDrainedMs: median(c.drainedMs),
    medianCpuPer1000: median(c.cpuPer1000),
  }));
  const line = (text: string) => process.stdout.write(`${text}\n`);
  line(
    `${opts.starts} token-workflow starts per burst, ${opts.rounds} rounds: median starts/s (quiet again after, s) [CPU s per 1,000]`,
  );
  for (const r of results) {
    line(
      `  ${r.series.padEnd(9)} ${r.config.padEnd(15)} c=${String(r.concurrency).padEnd(3)} ${r.medianPerSecond}/s (${r.medianDrainedMs === null ? '—' : round(r.medianDrainedMs / 1000, 1)}) [${r.medianCpuPer1000}]   all: ${r.perSecond.join(', ')}`,
    );
  }
  const sortedLoads = [...loads].sort((a, b) => a - b);
  line(
    JSON.stringify({
      bench: 'bulk-tune',
      date: new Date().toISOString(),
      options: opts,
      machine: { node: process.version, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown' },
      configs: Object.fromEntries(opts.configs.map((name) => [name, CONFIGS[name]])),
      loadAverageAtBursts: sortedLoads.length
        ? { min: round(sortedLoads[0]!, 2), median: round(median(sortedLoads)!, 2), max: round(sortedLoads.at(-1)!, 2) }
        : null,
      results,
      ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
    }),
  );
  if (failure) throw failure;
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
