/**
 * Bench-only workflow: the no-op Update that bench/rotate.ts measures the `rotate` Update against.
 * Deterministic workflow code, bundled on its own for a worker in the benchmark's process.
 */
import { condition, defineUpdate, setHandler } from '@temporalio/workflow';
import type { RotateRequest } from '../common/messages.js';

/** Carries the `rotate` Update's payload, so both cost the same on the wire. */
export const noopUpdate = defineUpdate<null, [RotateRequest]>('noop');

/** Accepts and completes its Update in one workflow task, changing nothing; runs until terminated. */
export async function updateSink(): Promise<void> {
  setHandler(noopUpdate, () => null);
  await condition(() => false);
}
