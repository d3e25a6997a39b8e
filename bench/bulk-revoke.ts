/**
 * Bulk revoke of N tokens by filter (`TokenWarden.revokeMany`, filtered on the receiver the N
 * tokens share) against a raw signal loop in the same run: N other running token workflows, each
 * sent the `revoke` signal at the same concurrency and nothing else (each workflow then kills its
 * token itself). Measured from the call's start: until another connection polling the rows (every
 * 5 ms) sees none of the tokens active, until every workflow was told (the call returned), until
 * the receiver on loopback acknowledged every token's event.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { RevokeManyReport } from '../client/index.js';
import type { RevokeRequest } from '../common/messages.js';
import { signalRevokeRunning } from '../common/temporal.js';
import { importRecord } from './bulk-records.js';
import type { ArrivalReceiver } from './receiver.js';
import { addReceiver, round, watchAllDead, watchDelivered, type Rig } from './scale-rig.js';
import { ratio } from './stats.js';
import { mapLimited } from './workflows.js';

export const GOAL_DEAD_MS = 1_000;

export interface RevokeOptions {
  tokens: number;
  /** revokeMany's pacing (signals per second); lifted by default so telling compares with the loop. */
  rate: number;
  /** The raw loop's concurrency: revokeMany's own. */
  concurrency: number;
  timeoutMs: number;
  settle: () => Promise<unknown>;
}

interface Prepared {
  receiverId: string;
  receiver: ArrivalReceiver;
  tokenIds: string[];
}

/** N running tokens sharing one receiver, imported. */
async function prepare(rig: Rig, name: string, count: number, settle: () => Promise<unknown>): Promise<Prepared> {
  const { id: receiverId, receiver } = await addReceiver(rig, name);
  const records = Array.from({ length: count }, (_, i) =>
    importRecord(i, { tag: rig.tag, receiver: receiverId, subjectPrefix: `usr_${name}` }),
  );
  rig.say(`  importing ${count} tokens with receiver ${receiverId} (startMany)`);
  const report = await rig.warden.startMany(records, { concurrency: 32, signal: rig.signal });
  if (report.started !== count)
    throw new Error(`startMany started ${report.started} of ${count}: ${JSON.stringify(report)}`);
  const tokenIds = records.map((r) => r.tokenId);
  rig.say(`  waiting for the worker to settle`);
  await settle();
  return { receiverId, receiver, tokenIds };
}

export async function revokeSection(rig: Rig, opts: RevokeOptions) {
  let bulk;
  {
    const { receiverId, receiver, tokenIds } = await prepare(rig, 'bulkrevoke', opts.tokens, opts.settle);
    rig.say(`  revokeMany receiver=${receiverId} (rate ${opts.rate}/s, concurrency ${opts.concurrency})`);
    const startedEpoch = Date.now();
    const t0 = performance.now();
    const dead = watchAllDead(rig, tokenIds, t0, opts.timeoutMs);
    const report: RevokeManyReport = await rig.warden.revokeMany(
      { receiver: receiverId },
      { reason: 'bench: bulk revoke', rate: opts.rate, concurrency: opts.concurrency, signal: rig.signal },
    );
    const returnedMs = performance.now() - t0;
    const deadMs = await dead;
    const deliveredMs = await watchDelivered(rig, receiver, tokenIds, startedEpoch, opts.timeoutMs);
    const { notSignalled, ...rest } = report;
    bulk = {
      tokens: opts.tokens,
      rate: opts.rate,
      concurrency: opts.concurrency,
      report: { ...rest, notSignalled: notSignalled.length },
      killPhaseMs: report.durationsMs.kill,
      deadSeenByAnotherConnectionMs: deadMs,
      allToldMs: round(returnedMs),
      allDeliveredMs: deliveredMs,
      duplicateDeliveries: receiver.repeats,
      goalDeadMs: GOAL_DEAD_MS,
      goalMet: deadMs !== null && deadMs <= GOAL_DEAD_MS,
    };
    rig.say(
      `    dead ${deadMs} ms (kill phase ${report.durationsMs.kill} ms), told ${round(returnedMs)} ms, delivered ${deliveredMs} ms`,
    );
  }

  await opts.settle();
  const { receiver, tokenIds } = await prepare(rig, 'rawrevoke', opts.tokens, opts.settle);
  const request: RevokeRequest = {
    reason: 'bench: raw signal loop',
    actor: 'bench',
    initiatingEntity: 'admin',
    requestId: randomUUID(),
  };
  rig.say(`  signalling ${opts.tokens} workflows at concurrency ${opts.concurrency}, nothing else`);
  const startedEpoch = Date.now();
  const t0 = performance.now();
  const dead = watchAllDead(rig, tokenIds, t0, opts.timeoutMs);
  await mapLimited(tokenIds.length, opts.concurrency, (i) => signalRevokeRunning(rig.client, tokenIds[i]!, request));
  const toldMs = performance.now() - t0;
  const deadMs = await dead;
  const deliveredMs = await watchDelivered(rig, receiver, tokenIds, startedEpoch, opts.timeoutMs);
  const raw = {
    tokens: opts.tokens,
    concurrency: opts.concurrency,
    deadSeenByAnotherConnectionMs: deadMs,
    allToldMs: round(toldMs),
    allDeliveredMs: deliveredMs,
    duplicateDeliveries: receiver.repeats,
  };
  rig.say(`    dead ${deadMs} ms, told ${round(toldMs)} ms, delivered ${deliveredMs} ms`);
  const vs = (a: number | null, b: number | null) =>
    a === null || b === null || !Number.isFinite(a) || !b ? null : ratio(a, b);
  return {
    revokeMany: bulk,
    rawSignalLoop: raw,
    ratios: {
      deadVsRaw: vs(bulk.deadSeenByAnotherConnectionMs, raw.deadSeenByAnotherConnectionMs),
      toldVsRaw: vs(bulk.allToldMs, raw.allToldMs),
      deliveredVsRaw: vs(bulk.allDeliveredMs, raw.allDeliveredMs),
    },
  };
}
