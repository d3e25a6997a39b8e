import { proxyActivities } from '@temporalio/workflow';
import type { Activities } from '../activities/index.js';
import type { ReconcileInput, ReconcileReport } from './messages.js';

const { reconcileStore } = proxyActivities<Activities>({
  startToCloseTimeout: '5m',
  retry: { initialInterval: '5s', maximumInterval: '1m', maximumAttempts: 5 },
});

/** Run by a Temporal Schedule every minute: heals whatever a crash left between store and workflows. */
export async function reconcile(input?: ReconcileInput): Promise<ReconcileReport> {
  return reconcileStore.executeWithOptions({ summary: 'heal the store and the token workflows' }, [
    { ...(input?.graceMs !== undefined ? { graceMs: input.graceMs } : {}) },
  ]);
}
