/**
 * Bench-only workflows: the floors that bench/revoke.ts measures tokenwarden's revocation against.
 * Deterministic workflow code, bundled on its own for a second worker: no Node built-ins, no I/O.
 */
import { condition, defineSignal, proxyActivities, setHandler } from '@temporalio/workflow';
import type { RevokeRequest } from '../common/messages.js';
import type { FloorActivities, FloorEvent } from './floor-activities.js';

/** Carries the token workflow's `revoke` payload, so both signals cost the same on the wire. */
export const pingSignal = defineSignal<[RevokeRequest]>('ping');
export const deliverSignal = defineSignal<[FloorEvent]>('deliver');

/**
 * Waits on its signal and does nothing else: the raw Signal round trip. It completes after the
 * signal only so that the benchmark can wait for it to be quiet before the next measurement.
 */
export async function signalSink(): Promise<void> {
  let signalled = false;
  setHandler(pingSignal, () => {
    signalled = true;
  });
  await condition(() => signalled);
}

/** Its signal starts one activity that POSTs the event to the receiver: revoke-to-delivered's floor. */
export async function floorDelivery(): Promise<number> {
  // The same timeout and retry shape as the token workflow's deliveries (retries never happen here).
  const { postEvent } = proxyActivities<FloorActivities>({
    startToCloseTimeout: '30s',
    retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '10m' },
  });
  let event: FloorEvent | undefined;
  setHandler(deliverSignal, (received) => {
    event ??= received;
  });
  await condition(() => event !== undefined);
  return postEvent(event!);
}
