/**
 * The set-up and tear-down every benchmark on the user's stack shares: Ctrl-C handling, the stack
 * with a Temporal client and a library client (a Rig), stopping them in reverse, the machine's facts.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { TokenWarden } from '../client/index.js';
import { connectTemporal } from '../common/temporal.js';
import type { Rig, Teardown } from './scale-rig.js';
import { startUserStack, waitForWorkers } from './scale-stack.js';

/** Aborted by the first Ctrl-C (or SIGTERM): the benchmark stops its stack; a second one exits at once. */
export function haltOnSignals(say: (msg: string) => void): AbortController {
  const halt = new AbortController();
  const onSignal = () => {
    if (halt.signal.aborted) process.exit(130);
    say('interrupted: stopping the stack (Ctrl-C again to force, which leaves its servers running)');
    halt.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return halt;
}

/** `tokenwarden start` with its in-process worker, a Temporal client and a library client of it. */
export async function openUserRig(signal: AbortSignal, say: (msg: string) => void, teardown: Teardown): Promise<Rig> {
  const stack = await startUserStack({ workers: 0, log: say, signal });
  teardown.push({ name: 'stack', stop: stack.stop });
  const client = await connectTemporal(stack.settings);
  teardown.push({ name: 'temporal client', stop: () => client.connection.close() });
  await waitForWorkers(stack, client, signal);
  const warden = await TokenWarden.connect(stack.settings);
  teardown.push({ name: 'warden', stop: () => warden.close() });
  say(`stack ready: ${stack.env.TEMPORAL_ADDRESS}`);
  return { stack, warden, client, tag: randomBytes(3).toString('hex'), signal, say, teardown };
}

/** Stops what was started, last first; a failure to stop is reported and fails the run. */
export async function closeRig(teardown: Teardown, say: (msg: string) => void): Promise<void> {
  for (const { name, stop } of teardown.reverse()) {
    await stop().catch((err: Error) => {
      say(`stopping ${name} failed: ${err.message}`);
      process.exitCode = 1;
    });
  }
}

/** The machine a figure was measured on. */
export const machineFacts = () => ({
  node: process.version,
  cpus: os.cpus().length,
  cpuModel: os.cpus()[0]?.model ?? 'unknown',
  platform: `${os.platform()} ${os.arch()}`,
  memoryGiB: Math.round(os.totalmem() / 2 ** 30),
});
