import { ApplicationFailure, proxyActivities } from '@temporalio/workflow';
import type { Activities } from '../activities/index.js';
import { RECONCILE_SETS } from '../common/names.js';
import type { ReconcileInput, ReconcileReport } from './messages.js';

/** Rows one activity heals unless the input says otherwise (a few seconds of work). */
export const DEFAULT_RECONCILE_BATCH = 100;

// Many small activities, each heartbeating: a lost one (its worker killed, Temporal down) is
// retried within the heartbeat timeout instead of blocking every later pass until a long timeout.
const { reconcilePage } = proxyActivities<Activities>({
  heartbeatTimeout: '30s',
  startToCloseTimeout: '2m',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 5 },
});

/**
 * Run by a Temporal Schedule every minute: heals whatever a crash left between store and workflows.
 * Walks every page of every set; rows it could not heal fail the pass (after the whole walk), so a
 * failure shows in the Schedule's recent actions and the Web UI instead of hiding in a result.
 */
export async function reconcile(input?: ReconcileInput): Promise<ReconcileReport> {
  const batchSize = input?.batchSize ?? DEFAULT_RECONCILE_BATCH;
  const report: ReconcileReport = { expired: [], signalled: [], restarted: [], started: [], wedged: [], errors: [] };
  for (const set of RECONCILE_SETS) {
    let afterId: string | null = null;
    do {
      const page = await reconcilePage.executeWithOptions(
        { summary: `heal ${set} rows after ${afterId ?? 'the start'}` },
        [{ set, afterId, batchSize, ...(input?.graceMs !== undefined ? { graceMs: input.graceMs } : {}) }],
      );
      for (const key of Object.keys(report) as (keyof ReconcileReport)[]) {
        (report[key] as unknown[]).push(...page.report[key]);
      }
      afterId = page.nextAfterId;
    } while (afterId !== null);
  }
  if (report.errors.length > 0) {
    const first = report.errors[0]!;
    throw ApplicationFailure.create({
      type: 'ReconcilePassIncomplete',
      message:
        `${report.errors.length} row(s) could not be healed this pass (first: ${first.tokenId}: ${first.error})`.slice(
          0,
          500,
        ),
      nonRetryable: true,
      details: [report],
    });
  }
  return report;
}
