/** The one Temporal client factory, and the start/signal calls every path shares. */
import { Client, Connection, WorkflowIdConflictPolicy, type WorkflowHandle } from '@temporalio/client';
import type { Settings } from './config.js';
import { revocationEventId } from './ids.js';
import { SEARCH_ATTRIBUTE, WORKFLOW_TYPE, tokenWorkflowId } from './names.js';
import type { TokenRecord } from './store/index.js';
import { summaryText } from './text.js';
import {
  revokeSignal,
  type RevokeRequest,
  type TokenWorkflowInput,
  type PropagationTiming,
} from '../workflows/messages.js';

/**
 * A client whose connection opens on first use: reading and killing in the store must keep working
 * while Temporal is unreachable (revoke then reports that its workflow could not be told).
 */
export async function connectTemporal(settings: Settings): Promise<Client> {
  const connection = Connection.lazy(settings.temporal.connectionOptions as Parameters<typeof Connection.lazy>[0]);
  return new Client({ connection, namespace: settings.temporal.namespace });
}

/** How long revoke waits for Temporal to accept its signal before reporting it could not. */
export const SIGNAL_DEADLINE_MS = 5_000;

export function tokenWorkflowInput(token: TokenRecord, timing: PropagationTiming): TokenWorkflowInput {
  return {
    version: 1,
    tokenId: token.id,
    subject: token.subject,
    receivers: token.receivers,
    expiresAt: token.expiresAt,
    revocationEventId: revocationEventId(token.id),
    timing,
  };
}

function startOptions(token: TokenRecord, taskQueue: string, timing: PropagationTiming) {
  const receivers = token.receivers.length ? token.receivers.join(', ') : 'no receivers';
  return {
    workflowId: tokenWorkflowId(token.id),
    taskQueue,
    args: [tokenWorkflowInput(token, timing)] as [TokenWorkflowInput],
    workflowIdConflictPolicy: WorkflowIdConflictPolicy.USE_EXISTING,
    typedSearchAttributes: [
      { key: SEARCH_ATTRIBUTE.subject, value: token.subject },
      { key: SEARCH_ATTRIBUTE.status, value: token.status },
      { key: SEARCH_ATTRIBUTE.propagation, value: token.propagation },
      { key: SEARCH_ATTRIBUTE.expiresAt, value: new Date(token.expiresAt) },
      { key: SEARCH_ATTRIBUTE.receivers, value: token.receivers },
    ],
    staticSummary: summaryText(`Token ${token.id} of ${token.subject}, expires ${token.expiresAt}`),
    staticDetails: [
      `**Token** \`${token.id}\``,
      `**Subject** \`${token.subject}\``,
      `**Issued** ${token.issuedAt}`,
      `**Expires** ${token.expiresAt}`,
      `**Receivers** ${receivers}`,
    ].join('\n\n'),
  };
}

/** Starts the token's workflow; harmless when it already runs (USE_EXISTING). */
export async function startTokenWorkflow(
  client: Client,
  token: TokenRecord,
  taskQueue: string,
  timing: PropagationTiming,
): Promise<WorkflowHandle> {
  return client.workflow.start(WORKFLOW_TYPE.tokenLifecycle, startOptions(token, taskQueue, timing));
}

/**
 * Tells the token's workflow that the token is dead. Signal-with-start: a workflow that was never
 * started (or has already closed) is started, adopts the store's facts and propagates.
 */
export async function signalRevoke(
  client: Client,
  token: TokenRecord,
  request: RevokeRequest,
  taskQueue: string,
  timing: PropagationTiming,
): Promise<void> {
  await client.workflow.signalWithStart(WORKFLOW_TYPE.tokenLifecycle, {
    ...startOptions(token, taskQueue, timing),
    signal: revokeSignal,
    signalArgs: [request],
  });
}

/** A plain Signal to the token's running workflow (throws WorkflowNotFoundError when none runs). */
export async function signalRevokeRunning(client: Client, tokenId: string, request: RevokeRequest): Promise<void> {
  await client.workflow.getHandle(tokenWorkflowId(tokenId)).signal(revokeSignal, request);
}
