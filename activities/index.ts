/**
 * Activities, built from their dependencies once per worker (pool, Temporal client, settings).
 * Thin: I/O and error classification; the lifecycle decisions live in the workflow.
 */
import { ApplicationFailure } from '@temporalio/activity';
import type { Client } from '@temporalio/client';
import type { StorePool } from '../common/db.js';
import { DEFAULT_MAX_TTL_MS, type Settings } from '../common/config.js';
import { NotFoundError } from '../common/errors.js';
import * as store from '../common/store/index.js';
import { MasterKeyring } from '../common/secrets.js';
import type { KillSnapshot, PropagationSnapshot } from '../common/messages.js';
import { createReceiverAgents, deliverRevocation, deliverRevocationToAll, toDeliveryView } from './propagation.js';
import { createReconcilerActivities } from './reconciler.js';
import { DEFAULT_GRACE_MS, createSelfManagingActivities } from './self-managing.js';

export interface ActivityDeps {
  pool: StorePool;
  client: Client;
  settings: Pick<
    Settings,
    'masterKey' | 'previousMasterKeys' | 'receiverAllow' | 'timing' | 'reconcileGraceMs' | 'temporal' | 'defaultGraceMs'
  > &
    Partial<Pick<Settings, 'maxTtlMs' | 'ownerDirRoot' | 'auditKey' | 'auditCheckpointIntervalMs'>>;
}

export function createActivities(deps: ActivityDeps) {
  const { pool, settings } = deps;
  const keyring = new MasterKeyring(settings.masterKey, settings.previousMasterKeys);
  const agents = createReceiverAgents();

  /** Store errors the workflow cannot fix by retrying become non-retryable failures. */
  async function classify<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof NotFoundError) throw ApplicationFailure.nonRetryable(err.message, err.name);
      throw err;
    }
  }

  async function loadPropagation(tokenId: string, eventId: string): Promise<PropagationSnapshot> {
    const rows = await store.listDeliveries(pool, tokenId);
    const deliveries = rows.filter((d) => d.eventId === eventId).map(toDeliveryView);
    return { timing: settings.timing, deliveries };
  }

  return {
    async killToken(req: store.KillRequest): Promise<store.KillResult> {
      return classify(() => store.killToken(pool, req));
    },

    /**
     * The kill, then the worker's timing and the delivery rows of its event (none while the token is
     * not yet expired on the database clock): the workflow records the kill and starts every
     * delivery in one workflow task. Idempotent like the kill, so a local activity run twice is harmless.
     */
    async killAndLoad(req: store.KillRequest & { eventId: string }): Promise<KillSnapshot> {
      const { eventId, ...kill } = req;
      const result = await classify(() => store.killToken(pool, kill));
      if (result.notYetExpiredMs !== undefined) return { kill: result, timing: settings.timing, deliveries: [] };
      return { kill: result, ...(await loadPropagation(req.tokenId, eventId)) };
    },

    async deliverRevocation(input: { eventId: string; receiverId: string }) {
      return deliverRevocation({ pool, keyring, receiverAllow: settings.receiverAllow, agents }, input);
    },

    async deliverRevocationToAll(input: { eventId: string; receiverIds: string[] }) {
      return deliverRevocationToAll({ pool, keyring, receiverAllow: settings.receiverAllow, agents }, input);
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
     * What a token workflow propagates with: this worker's timing (the worker owns those settings)
     * and the store's delivery rows of the revocation event, which a restarted run resumes from.
     */
    async loadPropagation(input: { tokenId: string; eventId: string }): Promise<PropagationSnapshot> {
      return loadPropagation(input.tokenId, input.eventId);
    },

    ...createReconcilerActivities(deps),

    ...createSelfManagingActivities(pool, {
      pool,
      keyring,
      receiverAllow: settings.receiverAllow,
      agents,
      ...(settings.ownerDirRoot !== undefined ? { ownerDirRoot: settings.ownerDirRoot } : {}),
      defaultGraceMs: settings.defaultGraceMs ?? DEFAULT_GRACE_MS,
      maxTtlMs: settings.maxTtlMs ?? DEFAULT_MAX_TTL_MS,
    }),
  };
}

export type Activities = ReturnType<typeof createActivities>;
