/**
 * `npm run bench:bulk [-- --tokens N --revoke-tokens N --concurrency C --only import,revoke …]`: bulk
 * work on the stack a user gets (`tokenwarden start`, fsync on; bench/scale-stack.ts), each against
 * its floor in the same run, from a quiet stack, with the load average around each section:
 *   import   N tokens through startMany and through `tokenwarden import` (its peak RSS) against raw
 *            token-workflow starts at the same concurrency (bench/bulk-import.ts); then
 *            `tokenwarden import --dry-run` over files of growing size: memory stays flat
 *   revoke   revokeMany of N tokens against a raw signal loop (bench/bulk-revoke.ts)
 * Progress goes to stderr; stdout gets a summary, then a final line with one JSON object.
 */
import { parseArgs } from 'node:util';
import { BULK_DEFAULTS } from '../client/bulk/pipeline.js';
import { REVOKE_MANY_DEFAULTS } from '../client/index.js';
import { importSection, memorySection } from './bulk-import.js';
import { revokeSection } from './bulk-revoke.js';
import { waitUntilQuiet } from './proc.js';
import { watchedPids } from './scale-memory.js';
import { section, type Teardown } from './scale-rig.js';
import { closeRig, haltOnSignals, machineFacts, openUserRig } from './user-rig.js';

const SECTIONS = ['import', 'revoke'] as const;
type Section = (typeof SECTIONS)[number];

const say = (msg: string) => process.stderr.write(`[bench:bulk] ${msg}\n`);

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      tokens: { type: 'string', default: '10000' },
      'revoke-tokens': { type: 'string', default: '1000' },
      concurrency: { type: 'string', default: String(BULK_DEFAULTS.concurrency) },
      'revoke-concurrency': { type: 'string', default: String(REVOKE_MANY_DEFAULTS.concurrency) },
      rate: { type: 'string', default: '10000' },
      'memory-lines': { type: 'string', default: '10000,100000,1000000' },
      'skip-cli': { type: 'boolean', default: false },
      only: { type: 'string', default: SECTIONS.join(',') },
      timeout: { type: 'string', default: '600' },
    },
  });
  const int = (name: keyof typeof values, min: number) => {
    const text = values[name] as string;
    if (!/^\d+$/.test(text) || Number(text) < min)
      throw new Error(`--${name} must be an integer ≥ ${min}, got ${JSON.stringify(text)}`);
    return Number(text);
  };
  const only = values.only.split(',').map((s) => s.trim());
  const unknown = only.filter((s) => !(SECTIONS as readonly string[]).includes(s));
  if (unknown.length > 0) throw new Error(`--only takes ${SECTIONS.join(', ')}; got ${unknown.join(', ')}`);
  const memoryLines = values['memory-lines']
    .split(',')
    .filter(Boolean)
    .map((text) => {
      if (!/^\d+$/.test(text) || Number(text) < 1)
        throw new Error(`--memory-lines: ${JSON.stringify(text)} is no line count`);
      return Number(text);
    });
  return {
    tokens: int('tokens', 2),
    revokeTokens: int('revoke-tokens', 1),
    concurrency: int('concurrency', 1),
    revokeConcurrency: int('revoke-concurrency', 1),
    rate: int('rate', 1),
    memoryLines,
    cli: !values['skip-cli'],
    only: SECTIONS.filter((s) => only.includes(s)),
    timeoutMs: int('timeout', 10) * 1000,
  };
}

type Options = ReturnType<typeof parseOptions>;

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const halt = haltOnSignals(say);

  const teardown: Teardown = [];
  const results: Record<string, unknown> = {};
  let failure: unknown;
  try {
    const rig = await openUserRig(halt.signal, say, teardown);
    const settle = () => waitUntilQuiet(() => watchedPids(rig), { timeoutMs: options.timeoutMs, signal: halt.signal });
    const run: Record<Section, () => Promise<object>> = {
      import: async () => ({
        rate: await importSection(rig, {
          tokens: options.tokens,
          concurrency: options.concurrency,
          cli: options.cli,
          settle,
        }),
        memory:
          options.memoryLines.length > 0 ? await memorySection(rig, { lines: options.memoryLines }) : { skipped: true },
      }),
      revoke: () =>
        revokeSection(rig, {
          tokens: options.revokeTokens,
          rate: options.rate,
          concurrency: options.revokeConcurrency,
          timeoutMs: options.timeoutMs,
          settle,
        }),
    };
    for (const name of options.only) {
      const settled = await settle();
      results[name] = { settledBefore: settled, ...(await section(rig, name, run[name])) };
    }
  } catch (err) {
    failure = err;
  } finally {
    await closeRig(teardown, say);
  }
  const final = {
    bench: 'bulk',
    date: new Date().toISOString(),
    options: { ...options, only: options.only.join(',') },
    machine: machineFacts(),
    stack: 'tokenwarden start (Temporal dev server on SQLite, embedded PostgreSQL with fsync on, in-process worker)',
    ...results,
    ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
  };
  printSummary(final, options);
  process.stdout.write(`${JSON.stringify(final)}\n`);
  if (failure) throw failure;
}

/* eslint-disable @typescript-eslint/no-explicit-any -- reads back the figures assembled above */
function printSummary(final: Record<string, any>, options: Options): void {
  const line = (text = '') => process.stdout.write(`${text}\n`);
  const imp = final.import;
  if (imp?.rate) {
    const r = imp.rate;
    line(`import of ${r.tokens} tokens at concurrency ${r.concurrency}, against raw token-workflow starts:`);
    line(
      `  raw starts          ${r.raw.perSecond}/s (halves ${r.raw.firstHalfPerSecond} / ${r.raw.secondHalfPerSecond})`,
    );
    line(
      `  startMany           ${r.library.perSecond ?? '—'}/s  ×${r.ratios.libraryVsRaw ?? '—'}  (goal ≥ ×${r.goalRatio}${r.library.skipped ? `; ${r.library.skipped}` : ''})`,
    );
    line(
      `  tokenwarden import  ${r.cli.perSecond ?? '—'}/s  ×${r.ratios.cliVsRaw ?? '—'}${r.cli.child ? `  peak RSS ${r.cli.child.peakRssMiB} MiB` : ''}${r.cli.skipped ? `  (${r.cli.skipped})` : ''}`,
    );
  }
  for (const run of imp?.memory?.runs ?? []) {
    line(
      `  --dry-run ${String(run.lines).padStart(8)} lines: ${run.seconds} s, peak RSS ${run.peakRssMiB} MiB (along: ${run.rssAlongMiB.join(' / ')})`,
    );
  }
  const rev = final.revoke;
  if (rev) {
    const b = rev.revokeMany;
    const r = rev.rawSignalLoop;
    line(`bulk revoke of ${options.revokeTokens} tokens, against a raw signal loop at concurrency ${r.concurrency}:`);
    line(`                      revokeMany      raw signal loop`);
    line(
      `  all dead in store   ${String(b.deadSeenByAnotherConnectionMs).padStart(8)} ms   ${String(r.deadSeenByAnotherConnectionMs).padStart(8)} ms   (goal ≤ ${b.goalDeadMs ?? 1000} ms${b.skipped ? `; ${b.skipped}` : `: ${b.goalMet ? 'met' : 'not met'}`})`,
    );
    line(`  all told            ${String(b.allToldMs).padStart(8)} ms   ${String(r.allToldMs).padStart(8)} ms`);
    line(
      `  all delivered       ${String(b.allDeliveredMs).padStart(8)} ms   ${String(r.allDeliveredMs).padStart(8)} ms`,
    );
  }
  for (const name of SECTIONS) {
    const la = final[name]?.loadAverage;
    if (la) line(`  ${name}: 1-min load average ${la.before[0]} → ${la.after[0]}, ${final[name].seconds} s`);
  }
}
/* eslint-enable @typescript-eslint/no-explicit-any */

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    const interrupted = err instanceof Error && err.message === 'interrupted';
    console.error(err instanceof Error ? (interrupted ? err.message : (err.stack ?? err.message)) : err);
    process.exit(1);
  },
);
