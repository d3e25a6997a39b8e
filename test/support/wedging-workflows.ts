/**
 * A token workflow whose workflow tasks fail for good once it receives `wedge`: it stands in for
 * anything that wedges a deployed workflow (a payload it cannot decode, a bug shipped in a deploy).
 * Revoked before that, it first takes over propagation through the real kill activity, as the real
 * workflow does; so a test can wedge it before or after the store shows it took over.
 */
import { condition, defineSignal, proxyActivities, setHandler } from '@temporalio/workflow';
import type { Activities } from '../../activities/index.js';
import { revokeSignal, type TokenWorkflowInput } from '../../common/messages.js';

export const wedgeSignal = defineSignal('wedge');

const { killToken } = proxyActivities<Activities>({ startToCloseTimeout: '30s' });

export async function tokenLifecycle(input: TokenWorkflowInput): Promise<never> {
  let revoked = false;
  let wedged = false;
  setHandler(revokeSignal, () => void (revoked = true));
  setHandler(wedgeSignal, () => void (wedged = true));
  await condition(() => revoked || wedged);
  if (revoked && !wedged) {
    await killToken({
      tokenId: input.tokenId,
      reason: 'wedge drill',
      actor: 'test',
      initiatingEntity: 'admin',
      byWorkflow: true,
    });
  }
  await condition(() => wedged);
  // Not a Temporal failure: the SDK fails the workflow task (and retries it), never the workflow.
  throw new TypeError('this workflow task always fails');
}
