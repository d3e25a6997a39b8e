/**
 * `npm run bench:scale [-- --tokens N --sleeping N --workers N --fanout N --only rss,wave,… --data-dir D]`:
 * the scale goals measured on the stack a user gets (`tokenwarden start`, see bench/scale-stack.ts),
 * each with its baseline in the same run and the load average around it:
 *   rss      worker RSS at rest, with no tokens and with N sleeping tokens (bench/scale-memory.ts)
 *   wave     N tokens expiring together: all dead in the store / all delivered (bench/scale-death.ts)
 *   revoke   N revokes through the library at concurrency 16: the same two times
 *   fanout   revoke → delivered to 50 receivers against 1 (bench/scale-fanout.ts)
 *   issue    issue rate against raw workflow starts at concurrency 1/8/32 (bench/scale-issue.ts)
 *   cli      CLI start-up against `node -e 0` (bench/scale-cli.ts)
 *   actions  Temporal Cloud actions per token and per token-year (bench/scale-actions.ts)
 * Progress goes to stderr; stdout gets a summary, then a final line with one JSON object.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { parseArgs } from 'node:util';
import { TokenWarden } from '../client/index.js';
import { connectTemporal } from '../common/temporal.js';
import { actionsSection } from './scale-actions.js';
import { cliSection } from './scale-cli.js';
import { expiryWaveSection, massRevokeSection } from './scale-death.js';
import { fanOutSection } from './scale-fanout.js';
import { issueRateSection } from './scale-issue.js';
import { sleepingSection, watchedPids } from './scale-memory.js';
import { printSummary, type Results } from './scale-report.js';
import { section, type Rig, type Teardown } from './scale-rig.js';
import { startUserStack, waitForWorkers } from './scale-stack.js';
import { waitUntilQuiet } from './proc.js';

const SECTIONS = ['rss', 'wave', 'revoke', 'fanout', 'issue', 'cli', 'actions'] as const;
type Section = (typeof SECTIONS)[number];

const say = (msg: string) => process.stderr.write(`[bench:scale] ${msg}\n`);

export interface ScaleOptions {
  tokens: number;
  sleeping: number;
  workers: number;
  fanout: number;
  fanoutDelayMs: number;
  fanoutSamples: number;
  issueCalls: number;
  cliRuns: number;
  tokenDays: number;
  waveLeadMs?: number;
  timeoutMs: number;
  only: Section[];
  dataDir?: string;
}

function parseOptions(argv: string[]): ScaleOptions {
  const { values } = parseArgs({
    args: argv,
    options: Object.fromEntries(
      [
        'tokens',
        'sleeping',
        'workers',
        'fanout',
        'fanout-delay',
        'fanout-samples',
        'issue-calls',
        'cli-runs',
        'token-days',
        'wave-lead',
        'timeout',
        'only',
        'data-dir',
      ].map((name) => [name, { type: 'string' as const }]),
    ),
  });
  const int = (name: string, fallback: number, min: number) => {
    const text = values[name] as string | undefined;
    if (text === undefined) return fallback;
    if (!/^\d+$/.test(text) || Number(text) < min)
      throw new Error(`--${name} must be an integer ≥ ${min}, got ${JSON.stringify(text)}`);
    return Number(text);
  };
  const only = ((values.only as string | undefined) ?? SECTIONS.join(',')).split(',').map((s) => s.trim());
  const unknown = only.filter((s) => !(SECTIONS as readonly string[]).includes(s));
  if (unknown.length > 0) throw new Error(`--only takes ${SECTIONS.join(', ')}; got ${unknown.join(', ')}`);
  return {
    tokens: int('tokens', 1000, 1),
    sleeping: int('sleeping', 10_000, 0),
    workers: int('workers', 0, 0),
    fanout: int('fanout', 50, 2),
    fanoutDelayMs: int('fanout-delay', 100, 0),
    fanoutSamples: int('fanout-samples', 20, 1),
    issueCalls: int('issue-calls', 200, 1),
    cliRuns: int('cli-runs', 10, 1),
    tokenDays: int('token-days', 90, 1),
    ...(values['wave-lead'] !== undefined ? { waveLeadMs: int('wave-lead', 0, 5) * 1000 } : {}),
    timeoutMs: int('timeout', 600, 10) * 1000,
    only: SECTIONS.filter((s) => only.includes(s)),
    ...(values['data-dir'] !== undefined ? { dataDir: values['data-dir'] as string } : {}),
  };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  // Ctrl-C stops the measurement and still stops the stack (SIGINT, waiting for it to exit).
  const halt = new AbortController();
  const onSignal = () => {
    if (halt.signal.aborted) process.exit(130);
    say('interrupted: stopping the stack (Ctrl-C again to force, which leaves its servers running)');
    halt.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const teardown: Teardown = [];
  const results: Results = {};
  let failure: unknown;
  let stackFacts: Record<string, unknown> = {};
  try {
    const stack = await startUserStack({
      ...(options.dataDir ? { dataDir: options.dataDir } : {}),
      workers: options.workers,
      log: say,
      signal: halt.signal,
    });
    teardown.push({ name: 'stack', stop: stack.stop });
    const client = await connectTemporal(stack.settings);
    teardown.push({ name: 'temporal client', stop: () => client.connection.close() });
    await waitForWorkers(stack, client, halt.signal);
    const warden = await TokenWarden.connect(stack.settings);
    teardown.push({ name: 'warden', stop: () => warden.close() });
    stackFacts = {
      command: `tokenwarden start --data-dir <dir>${options.workers ? ' --no-worker' : ''}`,
      workers: options.workers
        ? `${options.workers} \`tokenwarden worker\` process(es) (the first keeps the reconciler Schedule)`
        : 'in the stack process: its RSS is the worker plus the stack launcher',
      taskQueue: stack.settings.temporal.taskQueue,
      dataDirReused: options.dataDir !== undefined,
    };
    say(`stack ready: ${stack.env.TEMPORAL_ADDRESS}, ${stack.workerPids.length} worker process(es)`);

    const rig: Rig = { stack, warden, client, tag: randomBytes(3).toString('hex'), signal: halt.signal, say, teardown };
    const settle = () => waitUntilQuiet(() => watchedPids(rig), { timeoutMs: options.timeoutMs, signal: halt.signal });
    const run: Record<Section, () => Promise<object>> = {
      rss: () => sleepingSection(rig, { sleeping: options.sleeping, timeoutMs: options.timeoutMs }),
      wave: () =>
        expiryWaveSection(rig, {
          tokens: options.tokens,
          ...(options.waveLeadMs !== undefined ? { leadMs: options.waveLeadMs } : {}),
          timeoutMs: options.timeoutMs,
        }),
      revoke: () => massRevokeSection(rig, { tokens: options.tokens, timeoutMs: options.timeoutMs, settle }),
      fanout: () =>
        fanOutSection(rig, {
          receivers: options.fanout,
          delayMs: options.fanoutDelayMs,
          samples: options.fanoutSamples,
          settle,
        }),
      issue: () => issueRateSection(rig, { calls: options.issueCalls, settle }),
      cli: () => cliSection(rig, { runs: options.cliRuns }),
      actions: () => actionsSection(rig, { tokenDays: options.tokenDays, fleet: Math.max(options.sleeping, 1) }),
    };
    for (const name of options.only) {
      const settled = await settle();
      (results as Record<string, object>)[name] = { settledBefore: settled, ...(await section(rig, name, run[name])) };
    }
  } catch (err) {
    failure = err;
  } finally {
    for (const { name, stop } of teardown.reverse()) {
      await stop().catch((err: Error) => {
        say(`stopping ${name} failed: ${err.message}`);
        process.exitCode = 1;
      });
    }
  }
  const final = {
    bench: 'scale',
    date: new Date().toISOString(),
    options: { ...options, only: options.only.join(',') },
    machine: {
      node: process.version,
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? 'unknown',
      memoryGiB: Math.round(os.totalmem() / 2 ** 30),
      platform: `${process.platform} ${process.arch}`,
    },
    stack: stackFacts,
    ...results,
    ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
  };
  printSummary(final, (text = '') => process.stdout.write(`${text}\n`));
  process.stdout.write(`${JSON.stringify(final)}\n`);
  if (failure) throw failure;
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    const interrupted = err instanceof Error && err.message === 'interrupted';
    console.error(err instanceof Error ? (interrupted ? err.message : (err.stack ?? err.message)) : err);
    process.exit(1);
  },
);
