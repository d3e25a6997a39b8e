/** bench/scale.ts's summary for people: one row per goal of the table, with its baseline and verdict. */
import type { Quiet } from './proc.js';
import type { actionsSection } from './scale-actions.js';
import type { cliSection } from './scale-cli.js';
import type { expiryWaveSection, massRevokeSection } from './scale-death.js';
import type { fanOutSection } from './scale-fanout.js';
import type { issueRateSection } from './scale-issue.js';
import type { sleepingSection } from './scale-memory.js';
import type { LoadAverage } from './scale-rig.js';

type Measured<F extends (...args: never[]) => Promise<object>> = Awaited<ReturnType<F>> & {
  loadAverage: LoadAverage;
  seconds: number;
  settledBefore: Quiet;
};

export interface Results {
  rss?: Measured<typeof sleepingSection>;
  wave?: Measured<typeof expiryWaveSection>;
  revoke?: Measured<typeof massRevokeSection>;
  fanout?: Measured<typeof fanOutSection>;
  issue?: Measured<typeof issueRateSection>;
  cli?: Measured<typeof cliSection>;
  actions?: Measured<typeof actionsSection>;
}

type Row = [what: string, measured: string, baseline: string, goal: string, met: boolean | undefined];

const seconds = (ms: number | null) => (ms === null ? 'not all' : `${(ms / 1000).toFixed(1)} s`);
const verdict = (met: boolean | undefined) => (met === undefined ? '' : met ? 'met' : 'NOT met');

function rows(r: Results): Row[] {
  const out: Row[] = [];
  if (r.wave) {
    const w = r.wave;
    out.push([
      `${w.tokens} tokens expiring within ${(w.expiryWindowMs / 1000).toFixed(1)} s: all dead in the store`,
      seconds(w.deadAfterMs),
      '—',
      '≤ 10 s',
      w.goalMet.dead,
    ]);
    out.push([
      `… all ${w.tokens} events acknowledged (${w.duplicateDeliveries} duplicate(s))`,
      seconds(w.deliveredAfterMs),
      '—',
      '≤ 30 s',
      w.goalMet.delivered,
    ]);
  }
  if (r.revoke) {
    const v = r.revoke;
    out.push([
      `${v.tokens} revokes through the library at concurrency ${v.concurrency}: all dead / all delivered`,
      `${seconds(v.deadAfterMs)} / ${seconds(v.deliveredAfterMs)}`,
      `calls done ${seconds(v.callsDoneMs)}`,
      '≤ 5 s / ≤ 30 s',
      v.goalMet.dead && v.goalMet.delivered,
    ]);
  }
  if (r.fanout) {
    const f = r.fanout;
    out.push([
      `revoke → acknowledged by ${f.receivers} receivers (each answering in ${f.receiverDelayMs} ms), p50`,
      `${f.fanOut.acknowledged.p50Ms.toFixed(0)} ms (×${f.ratioP50})`,
      `${f.oneReceiver.acknowledged.p50Ms.toFixed(0)} ms for one receiver`,
      `≤ ${f.goalRatio}× one receiver`,
      f.goalMet,
    ]);
  }
  if (r.issue) {
    const levels = r.issue.levels;
    out.push([
      `issue rate at concurrency ${levels.map((l) => l.concurrency).join(' / ')}`,
      `${levels.map((l) => l.perSecond.issue.toFixed(0)).join(' / ')} per s`,
      `raw start ${levels.map((l) => l.perSecond.rawStart.toFixed(0)).join(' / ')} per s ` +
        `(with token options ${levels.map((l) => l.perSecond.rawStartAsToken.toFixed(0)).join(' / ')})`,
      `≥ ${r.issue.goalRatio}× raw start (×${levels.map((l) => l.issueVsRawStart).join(' / ')})`,
      r.issue.goalMet,
    ]);
  }
  if (r.cli) {
    const m = r.cli.medianMs;
    out.push([
      '`list --json` / `show` / `receiver list` (node bin/…), median',
      `${m['list --json']} / ${m['show <id>']} / ${m['receiver list']} ms; npx ${r.cli.npxListJsonMedianMs} ms`,
      `node -e 0: ${m['node -e 0']} ms`,
      `≤ ${r.cli.goalMs} ms`,
      r.cli.goalMet,
    ]);
  }
  if (r.rss) {
    const peak = r.wave ? ` / ${r.wave.workerPeakRssMiB} MiB peak in the wave` : '';
    out.push([
      `worker RSS with ${r.rss.sleeping} sleeping tokens at rest${peak}`,
      `${r.rss.atRest.workerRssMiB} MiB${peak ? ` / ${r.wave!.workerPeakRssMiB} MiB` : ''}`,
      `${r.rss.baseline.workerRssMiB} MiB with none`,
      `≤ ${r.rss.goalMiB} MiB`,
      r.rss.goalMet && (!r.wave || r.wave.workerPeakRssMiB <= r.rss.goalMiB),
    ]);
  }
  if (r.actions) {
    const a = r.actions;
    out.push([
      'Temporal Cloud actions: expiry with 1 receiver / revoke with 3 delivery attempts',
      `${a.expiryWithOneReceiver.actions.total} / ${a.revokeWithThreeAttempts.actions.total}`,
      a.reconcilerPass ? `reconciler pass ${a.reconcilerPass.actions.total} + 2 (Schedule)` : 'no reconciler pass',
      '—',
      undefined,
    ]);
    out.push([
      `… per token-year (${a.tokenYear.lifecyclesPerYear} lifecycles): all expire / all revoked`,
      `${a.tokenYear.allExpire} / ${a.tokenYear.allRevokedWithThreeAttempts}`,
      a.tokenYear.reconcilerActionsPerYear === null
        ? 'no reconciler pass found'
        : `+ ${a.tokenYear.reconcilerSharePerToken} reconciler share per token`,
      '—',
      undefined,
    ]);
  }
  return out;
}

export function printSummary(final: Results & { failed?: string }, out: (text?: string) => void): void {
  const table = rows(final);
  out();
  out('scale benchmark: the stack of `tokenwarden start` (Temporal dev server on SQLite, PostgreSQL with fsync)');
  for (const [what, measured, baseline, goal, met] of table) {
    out(`  ${what}`);
    out(`      measured ${measured}; baseline ${baseline}; goal ${goal} ${verdict(met)}`.trimEnd());
  }
  const loads = (Object.entries(final) as Array<[string, unknown]>)
    .filter((entry): entry is [string, { loadAverage: LoadAverage }] => {
      const value = entry[1] as { loadAverage?: LoadAverage } | undefined;
      return typeof value === 'object' && value !== null && value.loadAverage !== undefined;
    })
    .map(([name, s]) => `${name} ${s.loadAverage.before[0]}→${s.loadAverage.after[0]}`);
  if (loads.length) out(`  1-min load average before→after each section: ${loads.join(', ')}`);
  if (final.failed) out(`  FAILED: ${final.failed}`);
  out();
}
