/**
 * Tokens whose workflow runs but cannot make progress: their workflows run on a task queue served
 * by a worker of wedging-workflows.ts, whose workflow tasks fail for good once told to.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { bundleWorkflowCode, DefaultLogger, type Worker } from '@temporalio/worker';
import { PACKAGE_ROOT } from '../../common/config.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import { tokenWorkflowId } from '../../common/names.js';
import * as store from '../../common/store/index.js';
import { startTokenWorkflow } from '../../common/temporal.js';
import { createTokenWorker } from '../../worker/worker.js';
import type { TestContext } from './context.js';
import { waitUntil } from './wait.js';
import { wedgeSignal } from './wedging-workflows.js';

export type WedgePoint = 'before the workflow took over' | 'after the workflow took over';

export class WedgingWorker {
  private constructor(
    private readonly ctx: TestContext,
    private readonly taskQueue: string,
    private readonly worker: Worker,
    private readonly running: Promise<void>,
  ) {}

  static async start(ctx: TestContext): Promise<WedgingWorker> {
    const { code } = await bundleWorkflowCode({
      workflowsPath: path.join(PACKAGE_ROOT, 'dist', 'test', 'support', 'wedging-workflows.js'),
      logger: new DefaultLogger('WARN'),
    });
    const taskQueue = `${ctx.settings.temporal.taskQueue}-wedging-${randomBytes(3).toString('hex')}`;
    const worker = await createTokenWorker({
      connection: ctx.nativeConnection,
      client: ctx.client,
      pool: ctx.pool,
      settings: { ...ctx.settings, temporal: { ...ctx.settings.temporal, taskQueue } },
      workflowBundle: { code },
    });
    return new WedgingWorker(ctx, taskQueue, worker, worker.run());
  }

  /** A token revoked (to `receiverId`, or to none) whose workflow is wedged, before or after it took over propagation. */
  async wedgedToken(receiverId: string | null, when: WedgePoint): Promise<string> {
    const { ctx } = this;
    const token = await store.insertToken(ctx.pool, {
      tokenId: newTokenId(),
      credentialId: newCredentialId(),
      subject: 'usr_wedged',
      name: null,
      scopes: [],
      receivers: receiverId === null ? [] : [receiverId],
      ttlMs: 3_600_000,
      secretHash: randomBytes(32),
    });
    const handle = await startTokenWorkflow(ctx.client, token, this.taskQueue, ctx.settings.timing);
    await store.markWorkflowStarted(ctx.pool, token.id);
    if (when === 'before the workflow took over') {
      await handle.signal(wedgeSignal);
      await ctx.warden.revoke({ tokenId: token.id, reason: 'wedge drill' });
    } else {
      await ctx.warden.revoke({ tokenId: token.id, reason: 'wedge drill' });
      await waitUntil(
        async () => (await store.requireToken(ctx.pool, token.id)).propagationStartedAt !== null,
        'the workflow to take over propagation',
      );
      await handle.signal(wedgeSignal);
    }
    return token.id;
  }

  /** Waits until the workflow task of each token has been attempted `minAttempts` times. */
  async waitWedged(tokenIds: string[], minAttempts = 3): Promise<void> {
    for (const tokenId of tokenIds) {
      await waitUntil(
        async () => {
          const described = await this.ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).describe();
          return (described.raw.pendingWorkflowTask?.attempt ?? 0) >= minAttempts;
        },
        `the workflow tasks of ${tokenId} failing again and again`,
        60_000,
        500,
      );
    }
  }

  async stop(): Promise<void> {
    if (this.worker.getState() === 'RUNNING') this.worker.shutdown();
    await this.running;
  }
}
