/**
 * Activities, built from their dependencies once per worker (pool, Temporal client, settings).
 * Thin: I/O and error classification; the lifecycle decisions live in the workflow.
 */
import { ApplicationFailure } from '@temporalio/activity';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { StorePool } from '../common/db.js';
import type { Settings } from '../common/config.js';
import { NotFoundError } from '../common/errors.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { ReconcileReport } from '../workflows/messages.js';
import { signalRevoke, startTokenWorkflow } from '../common/temporal.js';
import { MasterKeyring } from '../common/secrets.js';
import { deliverRevocation } from './propagation.js';

export interface ActivityDeps {
  pool: StorePool;
  client: Client;
  settings: Pick<
    Settings,
    'masterKey' | 'previousMasterKeys' | 'receiverAllow' | 'timing' | 'reconcileGraceMs' | 'temporal'
  >;
}

/** How many rows one reconciler pass handles of each kind; the next pass takes the rest. */
const RECONCILE_BATCH = 500;

export function createActivities(deps: ActivityDeps) {
  const { pool, client, settings } = deps;
  const taskQueue = settings.temporal.taskQueue;
  const keyring = new MasterKeyring(settings.masterKey, settings.previousMasterKeys);

  /** Store errors the workflow cannot fix by retrying become non-retryable failures. */
  async function classify<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof NotFoundError) throw ApplicationFailure.nonRetryable(err.message, err.name);
      throw err;
    }
  }

  return {
    async killToken(req: store.KillRequest): Promise<store.KillResult> {
      return classify(() => store.killToken(pool, req));
    },

    async deliverRevocation(input: { eventId: string; receiverId: string }) {
      return deliverRevocation({ pool, keyring, receiverAllow: settings.receiverAllow }, input);
    },

    async setPropagation(input: {
      tokenId: string;
      state: 'pending' | 'stuck' | 'complete';
      auditKey: string;
      detail: Record<string, unknown>;
    }): Promise<store.TokenRecord> {
      return store.setPropagation(pool, input.tokenId, input.state, input.auditKey, input.detail);
    },

    async forceCompleteDeliveries(input: { tokenId: string; auditKey: string; reason: string; actor: string }) {
      return store.forceCompleteDeliveries(pool, input.tokenId, input.auditKey, input.reason, input.actor);
    },

    async recordAudit(input: { tokenId: string; auditKey: string; kind: string; data: Record<string, unknown> }) {
      await store.recordAudit(pool, input.tokenId, input.auditKey, input.kind, input.data);
    },

    /**
     * Heals what a crash left between the store and the workflows: overdue tokens are killed as
     * expired, dead tokens whose workflow never took over are signalled (with start), active tokens
     * whose workflow was never started get it started.
     */
    async reconcileStore(input: { graceMs?: number }): Promise<ReconcileReport> {
      const graceMs = input.graceMs ?? settings.reconcileGraceMs;
      const report: ReconcileReport = { expired: [], signalled: [], restarted: [], started: [], errors: [] };
      /** One row's failure is reported and skipped: it must not starve the rows after it. */
      const each = async <T extends string | store.TokenRecord>(rows: T[], heal: (row: T) => Promise<void>) => {
        for (const row of rows) {
          try {
            await heal(row);
          } catch (err) {
            const tokenId = typeof row === 'string' ? row : row.id;
            report.errors.push({ tokenId, error: err instanceof Error ? err.message : String(err) });
          }
        }
      };
      const tell = (token: store.TokenRecord) =>
        signalRevoke(
          client,
          token,
          {
            reason: token.revokeReason ?? 'unspecified',
            actor: token.revokedBy ?? 'reconciler',
            initiatingEntity: token.initiatingEntity ?? 'system',
          },
          taskQueue,
          settings.timing,
        );

      await each(await store.findOverdueTokens(pool, graceMs, RECONCILE_BATCH), async (tokenId) => {
        const result = await store.killToken(pool, {
          tokenId,
          reason: 'expired',
          actor: 'reconciler',
          initiatingEntity: 'system',
          onlyIfExpired: true,
        });
        if (!result.changed) return;
        report.expired.push(tokenId);
        await tell(result.token);
        report.signalled.push(tokenId);
      });
      await each(await store.findUntoldTokens(pool, graceMs, RECONCILE_BATCH), async (token) => {
        if (report.signalled.includes(token.id)) return;
        await tell(token);
        report.signalled.push(token.id);
      });
      // Propagation under way in the store but no workflow running it (terminated, failed, cancelled):
      // a new run adopts the store's facts and finishes it. Describe is strongly consistent.
      await each(await store.findUnfinishedPropagations(pool, graceMs, RECONCILE_BATCH), async (token) => {
        if (report.signalled.includes(token.id)) return;
        try {
          const { status } = await client.workflow.getHandle(tokenWorkflowId(token.id)).describe();
          if (status.name === 'RUNNING') return;
        } catch (err) {
          if (!(err instanceof WorkflowNotFoundError)) throw err;
        }
        await tell(token);
        report.restarted.push(token.id);
      });
      await each(await store.findUnstartedTokens(pool, graceMs, RECONCILE_BATCH), async (token) => {
        await startTokenWorkflow(client, token, taskQueue, settings.timing);
        await store.markWorkflowStarted(pool, token.id);
        report.started.push(token.id);
      });
      return report;
    },
  };
}

export type Activities = ReturnType<typeof createActivities>;
