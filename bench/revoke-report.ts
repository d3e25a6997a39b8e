/**
 * bench/revoke.ts's figures: the two ratios against their floors, the profile of the revoke call's
 * legs and of revoke-to-delivered's steps, printed for people and as one JSON line.
 */
import type { Client } from '@temporalio/client';
import type { Measurements, TimedRun } from './revoke-series.js';
import { ms, ratio, summarize, type LatencySummary } from './stats.js';
import { historyMarks, stepMedians, type Mark } from './timeline.js';
import { mapLimited } from './workflows.js';

export const GOAL_RATIO = 1.5;

export interface RunFacts {
  tokens: number;
  warmup: number;
  seriesCount: number;
  measureSeconds: number;
  loadBefore: number;
  loadAfter: number;
  receiverRepeats: number;
  node: string;
  cpus: number;
  cpuModel: string;
  platform: string;
  postgres: string;
  /** How the dev server ran, e.g. "as npm test starts it" or the raised limit. */
  temporal: string;
}

type Ratio = { p50: number; p99: number; goalMet: boolean };

const compare = (value: LatencySummary, floor: LatencySummary): Ratio => {
  const p50 = ratio(value.p50Ms, floor.p50Ms);
  const p99 = ratio(value.p99Ms, floor.p99Ms);
  return { p50, p99, goalMet: p50 <= GOAL_RATIO && p99 <= GOAL_RATIO };
};

/** The step breakdown of (b), from each measured run's history (read after the timed part). */
async function timelines(client: Client, runs: TimedRun[], firstLabel: string, concurrency: number) {
  const histories = await mapLimited(runs.length, concurrency, (i) =>
    client.workflow.getHandle(runs[i]!.workflowId).fetchHistory(),
  );
  return stepMedians(
    runs.map((run, i): Mark[] => [
      { label: firstLabel, at: run.callStart },
      ...historyMarks(histories[i]!).filter((mark) => mark.at < run.arrival),
      { label: 'event at the receiver', at: run.arrival },
    ]),
  );
}

/** Prints the figures and returns the final JSON line's object. */
export async function reportRevokeBenchmark(
  client: Client,
  m: Measurements,
  facts: RunFacts,
  out: (text?: string) => void,
): Promise<Record<string, unknown>> {
  const s = m.samples;
  const figure = {
    revokeCall: summarize(s.revokeCall),
    signalFloor: summarize(s.signalFloor),
    revokeToDelivered: summarize(s.revokeToDelivered),
    deliveryFloor: summarize(s.deliveryFloor),
    kill: summarize(s.kill),
    tokenSignal: summarize(s.tokenSignal),
    pgRoundTrip: summarize(s.pgRoundTrip),
    killBetweenStatements: summarize(s.killBetweenStatements),
  };
  const killStatementP50s = [...m.killStatements].map(([statement, took]) => ({
    statement,
    p50Ms: summarize(took).p50Ms,
  }));
  const roundTrips = [...new Set(m.killRoundTrips)].sort((a, b) => a - b);
  const revokeCallRatio = compare(figure.revokeCall, figure.signalFloor);
  const deliveredRatio = compare(figure.revokeToDelivered, figure.deliveryFloor);
  const revokeSteps = await timelines(client, m.revokeRuns, 'revoke call starts', 4);
  const floorSteps = await timelines(client, m.floorRuns, 'signal call starts', 4);

  const fmt = (value: number) => `${ms(value).toFixed(2).padStart(8)} ms`;
  const line = (name: string, x: LatencySummary) =>
    `  ${name.padEnd(44)} p50 ${fmt(x.p50Ms)}  p99 ${fmt(x.p99Ms)}  (min ${fmt(x.minMs)}, max ${fmt(x.maxMs)})`;
  const verdict = (r: Ratio) =>
    `  ${'ratio'.padEnd(44)} p50 ×${r.p50.toFixed(2)}     p99 ×${r.p99.toFixed(2)}     goal ≤ ${GOAL_RATIO}: ${r.goalMet ? 'met' : 'NOT met'}`;

  out(
    `revoke benchmark: n=${facts.tokens} per series (+${facts.warmup} warm-up), ${facts.seriesCount} series interleaved in rotating order`,
  );
  out(`  node ${facts.node}, ${facts.cpus} CPUs (${facts.cpuModel}), PostgreSQL ${facts.postgres}`);
  out(`  Temporal dev server in memory, ${facts.temporal}`);
  out(
    `  measuring took ${facts.measureSeconds.toFixed(1)} s; 1-min load average ${facts.loadBefore.toFixed(2)} before, ` +
      `${facts.loadAfter.toFixed(2)} after; receiver saw ${facts.receiverRepeats} repeated event(s)`,
  );
  out();
  out('(a) revoke call latency');
  out(line('warden.revoke()', figure.revokeCall));
  out(line('floor: handle.signal() to a bare workflow', figure.signalFloor));
  out(verdict(revokeCallRatio));
  out();
  out('(b) revoke-to-delivered');
  out(line('revoke call start → event at the receiver', figure.revokeToDelivered));
  out(line('floor: signal start → its activity’s POST', figure.deliveryFloor));
  out(verdict(deliveredRatio));
  out();
  out('profile of (a): revoke() sends the kill and the signal at once; each leg alone (separate tokens)');
  out(line('store.killToken()', figure.kill));
  out(line('signal to the token’s running workflow', figure.tokenSignal));
  out(line('one PostgreSQL round trip (SELECT 1)', figure.pgRoundTrip));
  out(
    `  store.killToken(): ${roundTrips.join(' or ')} round trip(s); statement by statement (p50, as the client sees it):`,
  );
  for (const x of killStatementP50s) out(`    ${x.statement.padEnd(62)} ${fmt(x.p50Ms)}`);
  out(`    ${'in Node between statements'.padEnd(62)} ${fmt(figure.killBetweenStatements.p50Ms)}`);
  out();
  out('profile of (b): median of each step (history times are the server’s clock)');
  for (const x of revokeSteps) out(`  ${x.step.padEnd(64)} ${fmt(x.p50Ms)}`);
  out('  floor:');
  for (const x of floorSteps) out(`  ${x.step.padEnd(64)} ${fmt(x.p50Ms)}`);
  out();

  return {
    bench: 'revoke',
    date: new Date().toISOString(),
    n: facts.tokens,
    warmup: facts.warmup,
    order: 'interleaved, rotating; each measurement starts after the previous workflow completed',
    revokeCall: figure.revokeCall,
    signalFloor: figure.signalFloor,
    revokeCallRatio,
    revokeToDelivered: figure.revokeToDelivered,
    deliveryFloor: figure.deliveryFloor,
    revokeToDeliveredRatio: deliveredRatio,
    goalRatio: GOAL_RATIO,
    goalMet: { revokeCall: revokeCallRatio.goalMet, revokeToDelivered: deliveredRatio.goalMet },
    profile: {
      kill: figure.kill,
      tokenSignal: figure.tokenSignal,
      pgRoundTrip: figure.pgRoundTrip,
      killRoundTrips: roundTrips,
      killStatementsP50Ms: Object.fromEntries(killStatementP50s.map((x) => [x.statement, x.p50Ms])),
      killBetweenStatements: figure.killBetweenStatements,
      revokeToDeliveredStepsP50Ms: Object.fromEntries(revokeSteps.map((x) => [x.step, x.p50Ms])),
      deliveryFloorStepsP50Ms: Object.fromEntries(floorSteps.map((x) => [x.step, x.p50Ms])),
    },
    receiverRepeats: facts.receiverRepeats,
    node: facts.node,
    cpus: facts.cpus,
    loadAverage1m: {
      before: Math.round(facts.loadBefore * 100) / 100,
      after: Math.round(facts.loadAfter * 100) / 100,
    },
    platform: facts.platform,
    postgres: facts.postgres,
    temporal: `dev server (Temporal CLI), in memory, ${facts.temporal}`,
  };
}
