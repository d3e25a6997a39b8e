/**
 * `npm run bench:rotate`, on the stack a user gets (`tokenwarden start`: Temporal dev server on
 * SQLite, embedded PostgreSQL with fsync on, the in-process worker):
 *  - latency: the `rotate` Update through the library against the cheapest Update of the same token
 *    workflows, interleaved, in steady state (bench/rotate-latency.ts);
 *  - year: history events and Temporal Cloud actions per token-year of typical use, counted from real
 *    histories of a token living a scaled year (bench/rotate-year.ts).
 * Human lines on stderr, a summary and a final JSON line on stdout.
 */
import { parseArgs } from 'node:util';
import { waitUntilQuiet } from './proc.js';
import { latencySection } from './rotate-latency.js';
import { yearSection } from './rotate-year.js';
import { watchedPids } from './scale-memory.js';
import { section, type Teardown } from './scale-rig.js';
import { closeRig, haltOnSignals, machineFacts, openUserRig } from './user-rig.js';

const say = (msg: string) => process.stderr.write(`[bench:rotate] ${msg}\n`);
const SECTIONS = ['latency', 'year'] as const;

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      tokens: { type: 'string', default: '20' },
      rotations: { type: 'string', default: '10' },
      warmup: { type: 'string', default: '2' },
      'grace-ms': { type: 'string', default: '1000' },
      'day-ms': { type: 'string', default: '400' },
      'year-tokens': { type: 'string', default: '2' },
      'idle-days': { type: 'string', default: '90' },
      'grace-days': { type: 'string', default: '1' },
      'use-probes': { type: 'string', default: '50' },
      only: { type: 'string', default: SECTIONS.join(',') },
      'no-floor': { type: 'boolean', default: false },
      timeout: { type: 'string', default: '300' },
    },
  });
  const int = (name: keyof typeof values, min: number) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < min) throw new Error(`--${name}: expected an integer ≥ ${min}`);
    return n;
  };
  const only = String(values.only).split(',');
  for (const s of only) {
    if (!(SECTIONS as readonly string[]).includes(s)) throw new Error(`--only: expected some of ${SECTIONS.join(',')}`);
  }
  return {
    latency: {
      tokens: int('tokens', 1),
      rotations: int('rotations', 1),
      warmup: int('warmup', 0),
      graceMs: int('grace-ms', 1),
      timeoutMs: int('timeout', 1) * 1000,
      noopFloor: !values['no-floor'],
    },
    year: {
      dayMs: int('day-ms', 20),
      tokens: int('year-tokens', 1),
      idleDays: int('idle-days', 31),
      graceDays: int('grace-days', 1),
      useProbes: int('use-probes', 1),
      timeoutMs: int('timeout', 1) * 1000,
    },
    only,
  };
}

type Latency = Awaited<ReturnType<typeof latencySection>> & { loadAverage: { before: number[]; after: number[] } };
type Year = Awaited<ReturnType<typeof yearSection>> & { loadAverage: { before: number[]; after: number[] } };

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const halt = haltOnSignals(say);
  const teardown: Teardown = [];
  const results: { latency?: Latency; year?: Year } = {};
  let failure: unknown;
  try {
    const rig = await openUserRig(halt.signal, say, teardown);
    const settle = () => waitUntilQuiet(() => watchedPids(rig), { timeoutMs: 60_000, signal: halt.signal });
    if (opts.only.includes('latency')) {
      await settle();
      results.latency = await section(rig, 'rotate latency', () => latencySection(rig, opts.latency, settle));
    }
    if (opts.only.includes('year')) {
      await settle();
      results.year = await section(rig, 'token-year', () => yearSection(rig, opts.year, settle));
    }
  } catch (err) {
    failure = err;
  } finally {
    await closeRig(teardown, say);
  }
  const final = {
    bench: 'rotate',
    date: new Date().toISOString(),
    options: opts,
    machine: machineFacts(),
    stack: 'tokenwarden start (Temporal dev server on SQLite, embedded PostgreSQL with fsync on, in-process worker)',
    ...results,
    ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
  };
  printSummary(results);
  process.stdout.write(`${JSON.stringify(final)}\n`);
  if (failure) throw failure;
}

function printSummary({ latency, year }: { latency?: Latency; year?: Year }): void {
  const line = (text: string) => process.stdout.write(`${text}\n`);
  const load = (l: { before: number[]; after: number[] }) => `load average ${l.before[0]} → ${l.after[0]}`;
  if (latency) {
    const row = (name: string, s: Latency['rotate']) =>
      line(
        `  ${name.padEnd(34)} ${s.p50Ms.toFixed(2).padStart(8)} ${s.p99Ms.toFixed(2).padStart(8)} ${s.meanMs.toFixed(2).padStart(8)} ${String(s.n).padStart(5)}`,
      );
    line(
      `rotate Update, ${latency.tokens} tokens × ${latency.rotationsPerToken} rotations (after ${latency.warmupRounds} warm-up rounds), grace ${latency.graceMs} ms (${load(latency.loadAverage)}):`,
    );
    line(
      `  ${''.padEnd(34)} ${'p50 ms'.padStart(8)} ${'p99 ms'.padStart(8)} ${'mean ms'.padStart(8)} ${'n'.padStart(5)}`,
    );
    row('TokenWarden.rotate()', latency.rotate);
    row('baseline: refused retryPropagation', latency.baseline);
    if (latency.noop) row('floor: no-op Update (bench workflow)', latency.noop);
    line(
      `  rotate / refused Update: p50 ×${latency.ratio.p50}, p99 ×${latency.ratio.p99}, mean ×${latency.ratio.mean} (goal p50 ≤ ×${latency.goalRatio}: ${latency.goalMet ? 'met' : 'NOT met'})`,
    );
    if (latency.ratioToNoop) {
      const r = latency.ratioToNoop;
      line(`  rotate / no-op Update:   p50 ×${r.p50}, p99 ×${r.p99}, mean ×${r.mean}`);
    }
    line(`  where a rotate call goes (p50 of each step):`);
    for (const [step, p50] of Object.entries(latency.rotateStepsP50Ms)) line(`    ${step}: ${p50} ms`);
    const r = latency.runOfOneRotation;
    line(
      `  a run holding one manual rotation (its grace end, delivery, continue-as-new): ${r.historyEventsP50} events, ${r.actionsP50} actions (p50)`,
    );
  }
  if (year) {
    const y = year.perTokenYear;
    const u = year.useProbe;
    line(`token-year of typical use (${year.dayMs} ms per day; ${load(year.loadAverage)}):`);
    line(
      `  daily use: ${u.verifications} verifications (${u.lastUseWrites} last-use writes) left the workflow's history at ${u.historyEventsBefore} → ${u.historyEventsAfter} events (same run: ${u.sameRun})`,
    );
    for (const t of year.perToken) {
      line(
        `  ${t.tokenId}: rotations scheduled on days ${t.rotationDays.join(', ')} (expiry on day ${t.expiryDay}); a month's run: ${t.monthRun.historyEvents} events, ${t.monthRun.actions} actions`,
      );
      line(
        `    ${t.runs} runs, ${t.historyEvents} events (largest run ${t.largestRunEvents}), ${t.actions} actions; ${t.rotations} rotations (${t.rotationAttempts} attempted), ${t.warnings} warnings, ${t.lastUseReads} last-use reads, ${t.dailyUses} uses (${t.usesRefused} refused), ${t.workflowTasksTimedOutOrFailed} workflow tasks timed out or failed`,
      );
    }
    if (!year.matchesScenario) {
      line(
        `  NOTE: expected ${year.expected.rotations} rotations and ${year.expected.warnings} warnings with no refused use; scaled time drifted: the dev server fires sub-second timers after about a second (raise --day-ms)`,
      );
    }
    line(
      `  per token-year: ${y.historyEvents} history events, ${y.actions} Temporal Cloud actions (${year.billingRules})`,
    );
    if (!year.matchesScenario) {
      const all = year.perTokenYearWithAllRotations;
      line(
        `  … with the ${year.expected.rotations} rotations of a real year (each one short added at a month's run): ${all.historyEvents} history events, ${all.actions} actions`,
      );
    }
    line(`  actions by kind: ${JSON.stringify(year.perToken[0]?.actionsBreakdown ?? {})}`);
  }
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
