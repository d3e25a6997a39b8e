/**
 * Fan-out: revoke → the last of N receivers has acknowledged the event, against one receiver, each
 * receiver answering after the same delay. The two series are interleaved (rotating order), and each
 * measurement starts once the previous token's workflow has completed.
 */
import { performance } from 'node:perf_hooks';
import { tokenWorkflowId } from '../common/names.js';
import { addReceiver, issueTokens, round, within, type BenchReceiver, type Rig } from './scale-rig.js';
import { ratio, summarize } from './stats.js';
import { mapLimited, waitUntilIdle } from './workflows.js';

export const GOAL_FANOUT_RATIO = 1.5;
const WAIT_MS = 120_000;

interface Series {
  name: string;
  receivers: BenchReceiver[];
  tokenIds: string[];
  /** Revoke call start → last acknowledgement (ms), and → last request's arrival. */
  acknowledged: number[];
  arrived: number[];
}

export async function fanOutSection(
  rig: Rig,
  opts: { receivers: number; delayMs: number; samples: number; settle: () => Promise<unknown> },
) {
  rig.say(`  starting ${opts.receivers} + 1 receivers answering after ${opts.delayMs} ms`);
  const many = await mapLimited(opts.receivers, 8, (i) => addReceiver(rig, `fan${i}`, { delayMs: opts.delayMs }));
  const one = [await addReceiver(rig, 'fan-one', { delayMs: opts.delayMs })];
  const series: Series[] = [];
  for (const [name, receivers] of [
    [`${opts.receivers} receivers`, many],
    ['1 receiver', one],
  ] as const) {
    const { tokenIds } = await issueTokens(rig, opts.samples, 4, (i) => ({
      subject: `usr_fan_${rig.tag}_${receivers.length}_${i}`,
      receivers: receivers.map((r) => r.id),
      ttl: '30d',
    }));
    series.push({ name, receivers: [...receivers], tokenIds, acknowledged: [], arrived: [] });
  }
  await mapLimited(opts.samples * 2, 4, (i) =>
    waitUntilIdle(rig.client, tokenWorkflowId(series[i % 2]!.tokenIds[Math.floor(i / 2)]!), rig.signal),
  );
  await opts.settle();

  for (let i = 0; i < opts.samples; i++) {
    for (let k = 0; k < series.length; k++) await measureOne(rig, series[(i + k) % series.length]!, i);
  }
  const [fan, single] = series.map((s) => ({
    acknowledged: summarize(s.acknowledged),
    arrived: summarize(s.arrived),
  }));
  const fanRatio = ratio(fan!.acknowledged.p50Ms, single!.acknowledged.p50Ms);
  return {
    receivers: opts.receivers,
    receiverDelayMs: opts.delayMs,
    samples: opts.samples,
    measuredTo: 'the last receiver’s 2xx (acknowledged); arrived = the last request’s body in',
    fanOut: fan!,
    oneReceiver: single!,
    ratioP50: fanRatio,
    ratioArrivedP50: ratio(fan!.arrived.p50Ms, single!.arrived.p50Ms),
    duplicateDeliveries: [...many, ...one].reduce((sum, r) => sum + r.receiver.repeats, 0),
    goalRatio: GOAL_FANOUT_RATIO,
    goalMet: fanRatio <= GOAL_FANOUT_RATIO,
  };
}

async function measureOne(rig: Rig, s: Series, i: number): Promise<void> {
  const tokenId = s.tokenIds[i]!;
  const t0 = performance.now();
  const outcome = await rig.warden.revoke({ tokenId, reason: 'fan-out benchmark' });
  if (!outcome.changed) throw new Error(`${tokenId} was already dead before its revoke`);
  const arrivals = await Promise.all(s.receivers.map((r) => r.receiver.arrivalOf(tokenId, WAIT_MS)));
  s.acknowledged.push(round(Math.max(...arrivals.map((a) => a.ackedAt)) - t0, 3));
  s.arrived.push(round(Math.max(...arrivals.map((a) => a.at)) - t0, 3));
  // The next measurement starts on a quiet worker: this token's propagation has completed.
  const handle = rig.client.workflow.getHandle(tokenWorkflowId(tokenId));
  await within(rig, handle.result(), WAIT_MS, `the workflow of ${tokenId} to complete`);
}
