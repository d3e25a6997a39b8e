/**
 * Issue rate against the engine's: `TokenWarden.issue` calls per second at concurrency 1, 8 and 32,
 * against raw `client.workflow.start` calls on a task queue no worker polls (the start alone, the
 * floor of any issue), once bare and once with the options a token's start carries (its input,
 * search attributes and summaries, through the same startTokenWorkflow). The three series are
 * interleaved in rounds with a rotating order. The floor workflows are terminated afterwards.
 */
import { performance } from 'node:perf_hooks';
import { newTokenId } from '../common/ids.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { startTokenWorkflow } from '../common/temporal.js';
import { addReceiver, round, type Rig } from './scale-rig.js';
import { ratio } from './stats.js';
import { mapLimited } from './workflows.js';

export const GOAL_ISSUE_RATIO = 0.8;
export const CONCURRENCY_LEVELS = [1, 8, 32] as const;
const ROUNDS = 4;
/** A workflow type no worker knows: its starts are recorded and never run. */
const FLOOR_WORKFLOW_TYPE = 'benchStartFloor';

type Call = (i: number) => Promise<unknown>;

interface Series {
  name: 'issue' | 'rawStart' | 'rawStartAsToken';
  call: Call;
  calls: number;
  ms: number;
}

export async function issueRateSection(rig: Rig, opts: { calls: number; settle: () => Promise<unknown> }) {
  const { id } = await addReceiver(rig, 'rate');
  const floorQueue = `bench-floor-${rig.tag}`;
  const floorIds: string[] = [];
  const template = await store.requireToken(
    rig.warden.pool,
    (await rig.warden.issue({ subject: `usr_rate_${rig.tag}`, receivers: [id], ttl: '30d' })).tokenId,
  );
  const floorId = () => {
    const workflowId = tokenWorkflowId(newTokenId());
    floorIds.push(workflowId);
    return workflowId;
  };
  const calls: Record<Series['name'], Call> = {
    issue: (i) => rig.warden.issue({ subject: `usr_rate_${rig.tag}_${i}`, receivers: [id], ttl: '30d' }),
    rawStart: () => rig.client.workflow.start(FLOOR_WORKFLOW_TYPE, { workflowId: floorId(), taskQueue: floorQueue }),
    rawStartAsToken: () => {
      const tokenId = newTokenId();
      floorIds.push(tokenWorkflowId(tokenId));
      return startTokenWorkflow(rig.client, { ...template, id: tokenId }, floorQueue, rig.warden.settings.timing);
    },
  };

  const levels = [];
  for (const [level, concurrency] of CONCURRENCY_LEVELS.entries()) {
    await opts.settle();
    const series: Series[] = (Object.keys(calls) as Series['name'][]).map((name) => ({
      name,
      call: calls[name],
      calls: 0,
      ms: 0,
    }));
    const perRound = Math.max(concurrency, Math.ceil(opts.calls / ROUNDS));
    for (let r = 0; r < ROUNDS; r++) {
      for (let k = 0; k < series.length; k++) {
        const s = series[(r + level + k) % series.length]!;
        const t0 = performance.now();
        await mapLimited(perRound, concurrency, (i) => s.call(s.calls + i));
        s.ms += performance.now() - t0;
        s.calls += perRound;
      }
    }
    const rate = Object.fromEntries(series.map((s) => [s.name, round(s.calls / (s.ms / 1000), 1)])) as Record<
      Series['name'],
      number
    >;
    rig.say(
      `  concurrency ${concurrency}: issue ${rate.issue}/s, raw start ${rate.rawStart}/s, with token options ${rate.rawStartAsToken}/s`,
    );
    levels.push({
      concurrency,
      callsPerSeries: series[0]!.calls,
      perSecond: rate,
      issueVsRawStart: ratio(rate.issue, rate.rawStart),
      tokenOptionsCost: round(1 - rate.rawStartAsToken / rate.rawStart, 2),
      goalMet: ratio(rate.issue, rate.rawStart) >= GOAL_ISSUE_RATIO,
    });
  }
  rig.say(`  terminating ${floorIds.length} floor workflows (not timed)`);
  await mapLimited(floorIds.length, 8, (i) =>
    rig.client.workflow.getHandle(floorIds[i]!).terminate('start-rate floor of the scale benchmark'),
  );
  return {
    floor: `raw client.workflow.start on a task queue no worker polls (started, never run; terminated afterwards)`,
    rounds: ROUNDS,
    levels,
    goalRatio: GOAL_ISSUE_RATIO,
    goalMet: levels.every((l) => l.goalMet),
  };
}
