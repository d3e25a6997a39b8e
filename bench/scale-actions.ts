/**
 * Temporal actions per token, from real histories: (a) a token that expires with one receiver,
 * (b) a token revoked while its receiver answers 503 twice before 204 (three delivery attempts);
 * and one reconciler pass. Then per token-year of typical use, under a stated assumption.
 */
import type { WorkflowHandle } from '@temporalio/client';
import { WORKFLOW_TYPE, tokenWorkflowId } from '../common/names.js';
import { cloudActions, countHistory, type History } from './histories.js';
import { addReceiver, round, within, type Rig } from './scale-rig.js';
import { waitUntilIdle } from './workflows.js';

export const BILLING_RULES_URL = 'https://docs.temporal.io/cloud/actions';
const WAIT_MS = 120_000;
const EXPIRING_TTL = '3s';
/** The Schedule starts one pass a minute; each start bills two actions besides the workflow's own. */
const RECONCILER_PASSES_PER_YEAR = 365 * 24 * 60;
const SCHEDULE_ACTIONS_PER_RUN = 2;

async function completedHistory(rig: Rig, tokenId: string): Promise<History> {
  const handle: WorkflowHandle = rig.client.workflow.getHandle(tokenWorkflowId(tokenId));
  await within(rig, handle.result(), WAIT_MS, `the workflow of ${tokenId} to complete`);
  return handle.fetchHistory();
}

function lifecycle(history: History) {
  const counts = countHistory(history);
  return { counts, actions: cloudActions(counts) };
}

/** A completed reconciler pass (the Schedule suffixes each run's workflow id with its start time). */
async function reconcilerPass(rig: Rig) {
  const query = `WorkflowType = '${WORKFLOW_TYPE.reconcile}' AND ExecutionStatus = 'Completed'`;
  for await (const run of rig.client.workflow.list({ query, pageSize: 1 })) {
    const history = await rig.client.workflow.getHandle(run.workflowId, run.runId).fetchHistory();
    return { runId: run.runId, ...lifecycle(history) };
  }
  return undefined;
}

export async function actionsSection(rig: Rig, opts: { tokenDays: number; fleet: number }) {
  const ok = await addReceiver(rig, 'act-ok');
  const flaky = await addReceiver(rig, 'act-flaky', { failFirst: 2 });

  rig.say(`  (a) a token with one receiver, expiring in ${EXPIRING_TTL}`);
  const expiring = await rig.warden.issue({ subject: `usr_act_${rig.tag}_a`, receivers: [ok.id], ttl: EXPIRING_TTL });
  const expiry = lifecycle(await completedHistory(rig, expiring.tokenId));

  rig.say('  (b) a token revoked while its receiver answers 503, 503, then 204');
  const revoked = await rig.warden.issue({ subject: `usr_act_${rig.tag}_b`, receivers: [flaky.id], ttl: '1h' });
  await waitUntilIdle(rig.client, tokenWorkflowId(revoked.tokenId), rig.signal);
  await rig.warden.revoke({ tokenId: revoked.tokenId, reason: 'actions benchmark' });
  const revoke = lifecycle(await completedHistory(rig, revoked.tokenId));
  const deliveryRequests = flaky.receiver.acknowledgedOf(revoked.tokenId)?.requests;
  if (deliveryRequests !== 3) {
    throw new Error(`the flaky receiver acknowledged after ${deliveryRequests ?? 'no'} request(s), expected 3`);
  }

  const reconciler = await reconcilerPass(rig);
  const lifecyclesPerYear = round(365 / opts.tokenDays, 2);
  const reconcilerActionsPerYear = reconciler
    ? (reconciler.actions.total + SCHEDULE_ACTIONS_PER_RUN) * RECONCILER_PASSES_PER_YEAR
    : null;
  const reconcilerShare = reconcilerActionsPerYear === null ? 0 : reconcilerActionsPerYear / opts.fleet;
  return {
    billingRules: BILLING_RULES_URL,
    expiryWithOneReceiver: expiry,
    revokeWithThreeAttempts: { ...revoke, deliveryRequests },
    reconcilerPass: reconciler ?? null,
    tokenYear: {
      assumption:
        `one credential kept for a year by rotating ${opts.tokenDays}-day tokens (${lifecyclesPerYear} lifecycles a year), ` +
        `each sleeping on one timer to its end (no continue-as-new), with one receiver; ` +
        `the reconciler's Schedule (one pass a minute, ${SCHEDULE_ACTIONS_PER_RUN} Schedule actions + the pass's own) shared by a fleet of ${opts.fleet} tokens`,
      lifecyclesPerYear,
      allExpire: round(lifecyclesPerYear * expiry.actions.total, 1),
      allRevokedWithThreeAttempts: round(lifecyclesPerYear * revoke.actions.total, 1),
      reconcilerActionsPerYear,
      reconcilerSharePerToken: round(reconcilerShare, 1),
    },
  };
}
