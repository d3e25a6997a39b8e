/** Helpers the benchmarks share: bounded concurrency for setup, and waiting for a workflow to go idle. */
import type { Client, WorkflowHandle } from '@temporalio/client';

/** fn(0 … count-1) with at most `limit` calls at a time; results in index order. */
export async function mapLimited<T>(count: number, limit: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const results = new Array<T>(count);
  let next = 0;
  const lanes = Array.from({ length: Math.min(limit, count) }, async () => {
    while (next < count) {
      const i = next++;
      results[i] = await fn(i);
    }
  });
  await Promise.all(lanes);
  return results;
}

/** Until the workflow has no task or activity pending (its first task done, now waiting). */
export async function waitUntilIdle(client: Client, workflowId: string, signal: AbortSignal): Promise<void> {
  const handle: WorkflowHandle = client.workflow.getHandle(workflowId);
  for (;;) {
    const { raw } = await handle.describe();
    if (!raw.pendingWorkflowTask && !raw.pendingActivities?.length) return;
    signal.throwIfAborted();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
