/**
 * `npm run build && node dist/bench/bulk-tune.js [--starts N --concurrency 16,32,64 --configs base,sync-full,…]`:
 * the engine-side settings for bulk load, measured. Each configuration is a fresh `tokenwarden start`
 * (bench/scale-stack.ts) with some settings changed (TOKENWARDEN_SQLITE_PRAGMAS for the dev server's
 * SQLite file, the worker's TOKENWARDEN_* capacity); on it, at each concurrency, N raw starts of the
 * token workflow on the real task queue (bench/bulk-import.ts), and N more through startMany when the
 * tree has it. Per series: starts per second, and how long until the stack is quiet again (every
 * workflow's first task done: the worker's part of the load), from a quiet stack each time.
 * Human lines on stderr, a final JSON line on stdout.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { TokenWarden } from '../client/index.js';
import { connectTemporal } from '../common/temporal.js';
import { rawStarts, startManyOf, tokenTemplate } from './bulk-import.js';
import { importRecord } from './bulk-records.js';
import { waitUntilQuiet } from './proc.js';
import { watchedPids } from './scale-memory.js';
import { addReceiver, round, type Rig, type Teardown } from './scale-rig.js';
import { startUserStack, waitForWorkers } from './scale-stack.js';

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

/** A quiet window this short gives the drain time to about a second. */
const QUIET_WINDOW_MS = 1_000;

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      starts: { type: 'string', default: '1000' },
      concurrency: { type: 'string', default: '16,32,64' },
      configs: { type: 'string', default: [...Object.keys(CONFIGS), 'base'].join(',') },
      timeout: { type: 'string', default: '300' },
    },
  });
  const starts = Number(values.starts);
  if (!Number.isInteger(starts) || starts < 1) throw new Error('--starts: expected a positive integer');
  const levels = values.concurrency.split(',').map(Number);
  if (levels.some((n) => !Number.isInteger(n) || n < 1))
    throw new Error('--concurrency: expected integers, comma-separated');
  const configs = values.configs.split(',').map((s) => s.trim());
  const unknown = configs.filter((name) => !(name in CONFIGS));
  if (unknown.length) throw new Error(`--configs takes ${Object.keys(CONFIGS).join(', ')}; got ${unknown.join(', ')}`);
  return { starts, levels, configs, timeoutMs: Number(values.timeout) * 1000 };
}

type Options = ReturnType<typeof parseOptions>;

async function measureConfig(name: string, opts: Options, halt: AbortSignal) {
  const teardown: Teardown = [];
  try {
    const stack = await startUserStack({ workers: 0, log: say, signal: halt, stackEnv: CONFIGS[name]! });
    teardown.push({ name: 'stack', stop: stack.stop });
    const client = await connectTemporal(stack.settings);
    teardown.push({ name: 'temporal client', stop: () => client.connection.close() });
    await waitForWorkers(stack, client, halt);
    const warden = await TokenWarden.connect(stack.settings);
    teardown.push({ name: 'warden', stop: () => warden.close() });
    const rig: Rig = { stack, warden, client, tag: randomBytes(3).toString('hex'), signal: halt, say, teardown };
    const quiet = (windowMs = 3_000) =>
      waitUntilQuiet(() => watchedPids(rig), { windowMs, timeoutMs: opts.timeoutMs, signal: halt });
    const { id: receiver } = await addReceiver(rig, 'tune');
    const template = await tokenTemplate(rig, receiver);
    const startMany = startManyOf(warden);
    // Warm-up: the connection, the worker's first bundle load, SQLite's first pages.
    await rawStarts(rig, template, 100, 16, `usr_warm_${rig.tag}`);
    const levels = [];
    for (const concurrency of opts.levels) {
      const series: Record<string, { perSecond: number; drainedMs: number }> = {};
      const runs: Array<[string, () => Promise<number>]> = [
        ['raw', () => rawStarts(rig, template, opts.starts, concurrency, `usr_raw_${rig.tag}_${concurrency}`)],
      ];
      if (startMany) {
        runs.push([
          'startMany',
          async () => {
            const records = Array.from({ length: opts.starts }, (_, i) =>
              importRecord(i, { tag: `${rig.tag}${concurrency}`, receiver, subjectPrefix: 'usr_tune' }),
            );
            const t0 = performance.now();
            await startMany(records, { concurrency, signal: halt });
            return performance.now() - t0;
          },
        ]);
      }
      for (const [series_, run] of runs) {
        await quiet();
        const t0 = performance.now();
        const ms = await run();
        // The stack's CPU settles once every started workflow's first task is done.
        const settled = await quiet(QUIET_WINDOW_MS);
        const drainedMs = performance.now() - t0 - QUIET_WINDOW_MS;
        series[series_] = { perSecond: round(opts.starts / (ms / 1000), 1), drainedMs: round(drainedMs) };
        if (!settled.quiet) say(`  ${series_} did not settle within the timeout`);
        say(
          `  ${name} c=${concurrency} ${series_}: ${series[series_]!.perSecond}/s, quiet after ${round(drainedMs / 1000, 1)} s`,
        );
      }
      levels.push({ concurrency, series });
    }
    return { config: name, settings: CONFIGS[name], levels, loadAverageAfter: os.loadavg().map((x) => round(x, 2)) };
  } finally {
    for (const { name: what, stop } of teardown.reverse()) {
      await stop().catch((err: Error) => say(`stopping ${what} failed: ${err.message}`));
    }
  }
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const halt = new AbortController();
  const onSignal = () => {
    if (halt.signal.aborted) process.exit(130);
    say('interrupted: stopping the stack');
    halt.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const results = [];
  let failure: unknown;
  try {
    for (const name of opts.configs) {
      say(
        `${name}: ${JSON.stringify(CONFIGS[name])}, load average ${os
          .loadavg()
          .map((x) => round(x, 2))
          .join(' / ')}`,
      );
      results.push(await measureConfig(name, opts, halt.signal));
    }
  } catch (err) {
    failure = err;
  }
  const line = (text: string) => process.stdout.write(`${text}\n`);
  line(`starts per second (quiet again after, s) for ${opts.starts} starts, by concurrency:`);
  for (const r of results) {
    const cells = r.levels.map((l) =>
      Object.entries(l.series)
        .map(([k, v]) => `${k} ${v.perSecond} (${round(v.drainedMs / 1000, 1)})`)
        .join(', '),
    );
    line(
      `  ${r.config.padEnd(15)} ${cells.map((c, i) => `c=${opts.levels[i]}: ${c}`).join(' | ')}   load ${r.loadAverageAfter[0]}`,
    );
  }
  line(
    JSON.stringify({
      bench: 'bulk-tune',
      date: new Date().toISOString(),
      options: opts,
      machine: { node: process.version, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown' },
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
