/**
 * The no-op Update floor: one bench-only workflow per token (`updateSink`), run by a worker in the
 * benchmark's process on its own task queue of the same server, whose Update is accepted and
 * completed in one workflow task without touching anything.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import { PACKAGE_ROOT } from '../common/config.js';
import { newCredentialId } from '../common/ids.js';
import type { RotateRequest } from '../common/messages.js';
import { hashToken } from '../common/secrets.js';
import { noopUpdate, updateSink } from './rotate-floor-workflows.js';
import type { Rig } from './scale-rig.js';

const FLOOR_WORKFLOWS_PATH = path.join(PACKAGE_ROOT, 'dist', 'bench', 'rotate-floor-workflows.js');
const UPDATE_DEADLINE_MS = 10_000;

export interface NoopFloor {
  workflowId(i: number): string;
  /** One no-op Update to the i-th floor workflow; its latency in ms. */
  update(i: number): Promise<number>;
}

/** Starts the floor worker (stopped at teardown) and `count` floor workflows. */
export async function startNoopFloor(rig: Rig, count: number): Promise<NoopFloor> {
  Runtime.install({ logger: new DefaultLogger('WARN'), shutdownSignals: [] });
  const { temporal } = rig.stack.settings;
  const connection = await NativeConnection.connect(temporal.connectionOptions);
  rig.teardown.push({ name: 'floor worker connection', stop: () => connection.close() });
  const taskQueue = `bench-rotate-floor-${rig.tag}`;
  rig.say('  bundling the no-op Update floor workflow');
  const worker = await Worker.create({
    connection,
    namespace: temporal.namespace,
    taskQueue,
    workflowsPath: FLOOR_WORKFLOWS_PATH,
  });
  const running = worker.run();
  running.catch((err: Error) => rig.say(`the floor worker failed: ${err.message}`));
  rig.teardown.push({
    name: 'floor worker',
    stop: async () => {
      if (worker.getState() === 'RUNNING') worker.shutdown();
      await running;
    },
  });
  const handles = await Promise.all(
    Array.from({ length: count }, (_, i) =>
      rig.client.workflow.start(updateSink, { taskQueue, workflowId: `bench-rotate-floor-${rig.tag}-${i}` }),
    ),
  );
  // A rotate-shaped payload (a fresh credential id and a hash), as the rotate Update carries.
  const request = (): RotateRequest => ({
    credentialId: newCredentialId(),
    secretHash: hashToken(randomUUID()).toString('hex'),
    graceMs: 1000,
    actor: 'bench',
    reason: 'bench: no-op floor',
  });
  return {
    workflowId: (i) => handles[i]!.workflowId,
    async update(i) {
      const handle = handles[i]!;
      const args: [RotateRequest] = [request()];
      const t0 = performance.now();
      await rig.client.connection.withDeadline(Date.now() + UPDATE_DEADLINE_MS, () =>
        handle.executeUpdate(noopUpdate, { args, updateId: randomUUID() }),
      );
      return performance.now() - t0;
    },
  };
}
