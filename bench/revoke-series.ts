/**
 * The series bench/revoke.ts interleaves: tokenwarden's revoke against its two floors, and a profile
 * of the revoke call's two legs (the store kill and the plain signal, which revoke() sends at once).
 */
import { performance } from 'node:perf_hooks';
import type { Client } from '@temporalio/client';
import type { TokenWarden } from '../client/index.js';
import { signalRevokeRunning } from '../common/temporal.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { RevokeRequest } from '../common/messages.js';
import { deliverSignal, pingSignal } from './floor-workflows.js';
import type { ArrivalReceiver } from './receiver.js';
import { timeStatements } from './statement-timer.js';

/** The payload of every signal in this benchmark: what warden.revoke() sends for this reason. */
export const REVOKE: RevokeRequest = { reason: 'benchmark', actor: 'admin', initiatingEntity: 'admin' };

/** One measurement of one series; `measured` is false during warm-up. */
export type Series = (i: number, measured: boolean) => Promise<void>;

/** Latencies in ms, one entry per measured iteration. */
export interface Samples {
  revokeCall: number[];
  signalFloor: number[];
  revokeToDelivered: number[];
  deliveryFloor: number[];
  /** Profile: store.killToken() alone, as revoke() calls it. */
  kill: number[];
  /** Profile: the plain signal to the token's running workflow alone, as revoke() sends it. */
  tokenSignal: number[];
  /** Profile: one `SELECT 1` on the same pool, the unit of the kill's round trips. */
  pgRoundTrip: number[];
  /** Of each kill: the time spent in Node between its statements (total minus the statements). */
  killBetweenStatements: number[];
}

/** A measured run whose history is read afterwards for the step breakdown (epoch ms). */
export interface TimedRun {
  workflowId: string;
  callStart: number;
  arrival: number;
}

export interface Measurements {
  samples: Samples;
  /** Per statement the kill sent (as the client labels it), its time in each measured kill. */
  killStatements: Map<string, number[]>;
  /** Round trips (statements sent) of each measured kill, pool.connect not counted. */
  killRoundTrips: number[];
  revokeRuns: TimedRun[];
  floorRuns: TimedRun[];
}

export interface SeriesRig {
  warden: TokenWarden;
  client: Client;
  receiver: ArrivalReceiver;
  /** One token per iteration for the revoke series and one for the profile, issued and idle. */
  revokeTokens: string[];
  profileTokens: string[];
  /** One running floor workflow per iteration and series, idle. */
  signalSinks: string[];
  floorDeliveries: string[];
  /** Distinguishes this run's floor events at the receiver. */
  tag: string;
  /** Resolves with the promise, or rejects on timeout, Ctrl-C or a stopped worker. */
  waitFor<T>(promise: Promise<T>, what: string): Promise<T>;
  waitMs: number;
}

export function revokeSeries(rig: SeriesRig): { series: Series[]; measurements: Measurements } {
  const { warden, client, receiver, waitFor, waitMs } = rig;
  const m: Measurements = {
    samples: {
      revokeCall: [],
      signalFloor: [],
      revokeToDelivered: [],
      deliveryFloor: [],
      kill: [],
      tokenSignal: [],
      pgRoundTrip: [],
      killBetweenStatements: [],
    },
    killStatements: new Map(),
    killRoundTrips: [],
    revokeRuns: [],
    floorRuns: [],
  };
  let statementsOfThisKill = new Map<string, number>();
  let roundTripsOfThisKill = 0;
  const killPool = timeStatements(warden.pool, (statement, took) => {
    statementsOfThisKill.set(statement, (statementsOfThisKill.get(statement) ?? 0) + took);
    if (statement !== '(pool.connect)') roundTripsOfThisKill++;
  });
  const wall = (t: number) => performance.timeOrigin + t;
  /** Waits for the workflow to complete, so that the next measurement starts on a quiet system. */
  const quiet = (workflowId: string) =>
    waitFor(client.workflow.getHandle(workflowId).result(), `workflow ${workflowId} to complete`);

  const series: Series[] = [
    async function revokeCall(i, measured) {
      const tokenId = rig.revokeTokens[i]!;
      const t0 = performance.now();
      const outcome = await warden.revoke({ tokenId, reason: REVOKE.reason });
      const t1 = performance.now();
      if (!outcome.changed || !outcome.workflowSignalled) {
        throw new Error(`revoking ${tokenId} did not kill and signal it: ${outcome.warning ?? 'it was already dead'}`);
      }
      const arrival = await waitFor(receiver.arrivalOf(tokenId, waitMs), `the event of ${tokenId}`);
      await quiet(tokenWorkflowId(tokenId));
      if (!measured) return;
      m.samples.revokeCall.push(t1 - t0);
      m.samples.revokeToDelivered.push(arrival.at - t0);
      m.revokeRuns.push({ workflowId: tokenWorkflowId(tokenId), callStart: wall(t0), arrival: wall(arrival.at) });
    },
    async function signalFloor(i, measured) {
      const handle = client.workflow.getHandle(rig.signalSinks[i]!);
      const t0 = performance.now();
      await handle.signal(pingSignal, REVOKE);
      const t1 = performance.now();
      await quiet(handle.workflowId);
      if (measured) m.samples.signalFloor.push(t1 - t0);
    },
    async function deliveryFloor(i, measured) {
      const handle = client.workflow.getHandle(rig.floorDeliveries[i]!);
      const floorId = `floor_${rig.tag}_${i}`;
      const t0 = performance.now();
      await handle.signal(deliverSignal, { eventId: `evt_${floorId}`, tokenId: floorId });
      const arrival = await waitFor(receiver.arrivalOf(floorId, waitMs), `the event of ${floorId}`);
      await quiet(handle.workflowId);
      if (!measured) return;
      m.samples.deliveryFloor.push(arrival.at - t0);
      m.floorRuns.push({ workflowId: handle.workflowId, callStart: wall(t0), arrival: wall(arrival.at) });
    },
    // Profile: revoke() sends the kill and the signal at once; here each leg is timed alone, the
    // kill statement by statement, next to one round trip on the same pool.
    async function revokeLegs(i, measured) {
      const tokenId = rig.profileTokens[i]!;
      statementsOfThisKill = new Map();
      roundTripsOfThisKill = 0;
      const t0 = performance.now();
      const kill = await store.killToken(killPool, { tokenId, ...REVOKE });
      const t1 = performance.now();
      const roundTrips = roundTripsOfThisKill;
      await signalRevokeRunning(client, tokenId, REVOKE);
      const t2 = performance.now();
      await warden.pool.query('SELECT 1');
      const t3 = performance.now();
      if (!kill.changed) throw new Error(`killing ${tokenId} changed nothing: it was already dead`);
      await waitFor(receiver.arrivalOf(tokenId, waitMs), `the event of ${tokenId}`);
      await quiet(tokenWorkflowId(tokenId));
      if (!measured) return;
      m.samples.kill.push(t1 - t0);
      m.samples.tokenSignal.push(t2 - t1);
      m.samples.pgRoundTrip.push(t3 - t2);
      m.killRoundTrips.push(roundTrips);
      let inStatements = 0;
      for (const [statement, took] of statementsOfThisKill) {
        m.killStatements.set(statement, [...(m.killStatements.get(statement) ?? []), took]);
        inStatements += took;
      }
      m.samples.killBetweenStatements.push(t1 - t0 - inStatements);
    },
  ];
  return { series, measurements: m };
}
