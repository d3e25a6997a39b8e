/** The one Temporal client factory, and the start/signal calls every path shares. */
import {
  Client,
  Connection,
  WorkflowIdConflictPolicy,
  WorkflowIdReusePolicy,
  defaultGrpcRetryOptions,
  makeGrpcRetryInterceptor,
  type ConnectionOptions,
  type WorkflowHandle,
} from '@temporalio/client';
import type { Settings } from './config.js';
import { clientDataConverter } from './data-converter.js';
import { revocationEventId } from './ids.js';
import { SEARCH_ATTRIBUTE, WORKFLOW_TYPE, tokenWorkflowId } from './names.js';
import type { TokenRecord } from './store/index.js';
import { summaryText } from './text.js';
import {
  revokeSignal,
  type PolicySnapshot,
  type RevokeRequest,
  type TokenWorkflowInput,
  type PropagationTiming,
} from './messages.js';

/**
 * A client whose connection opens on first use: reading and killing in the store must keep working
 * while Temporal is unreachable (revoke then reports that its workflow could not be told).
 */
export async function connectTemporal(settings: Settings): Promise<Client> {
  const connection = Connection.lazy({
    ...(settings.temporal.connectionOptions as ConnectionOptions),
    interceptors: [retriesWithinDeadline()],
  });
  return new Client({
    connection,
    namespace: settings.temporal.namespace,
    dataConverter: clientDataConverter(settings),
  });
}

/** How long issue and revoke wait for Temporal to accept a workflow start or a signal. */
export const TEMPORAL_CALL_DEADLINE_MS = 5_000;

/** Runs `fn`'s Temporal calls under the call deadline (TEMPORAL_CALL_DEADLINE_MS unless given). */
export function withCallDeadline<T>(client: Client, fn: () => Promise<T>, ms = TEMPORAL_CALL_DEADLINE_MS): Promise<T> {
  return client.connection.withDeadline(Date.now() + ms, fn);
}

type GrpcInterceptor = NonNullable<ConnectionOptions['interceptors']>[number];

/** A retry starting later than this before the deadline could not get an answer in time. */
const LAST_RETRY_MARGIN_MS = 250;

/**
 * The SDK's gRPC retries, minus any retry that would start too close to the call's deadline or
 * after it: the SDK schedules its backoff regardless, so a 5 s deadline used to end 5.2-7 s in, with
 * "deadline exceeded" instead of the reason. Now the call fails in time with its last real error.
 */
function retriesWithinDeadline(): GrpcInterceptor {
  const sdk = defaultGrpcRetryOptions();
  return (options, nextCall) => {
    const { deadline } = options;
    const end = deadline === undefined ? Infinity : typeof deadline === 'number' ? deadline : deadline.getTime();
    let delay = 0;
    return makeGrpcRetryInterceptor({
      retryableDecider: (attempt, status) => {
        if (!sdk.retryableDecider(attempt, status)) return false;
        delay = sdk.delayFunction(attempt, status);
        return Date.now() + delay + LAST_RETRY_MARGIN_MS < end;
      },
      delayFunction: () => delay,
    })(options, nextCall);
  };
}

/** The workflow's input; `policy`, the token's policy when it has one (a token without keeps the input it always had). */
export function tokenWorkflowInput(
  token: TokenRecord,
  timing: PropagationTiming,
  policy?: PolicySnapshot,
): TokenWorkflowInput {
  return {
    version: 1,
    tokenId: token.id,
    subject: token.subject,
    receivers: token.receivers,
    expiresAt: token.expiresAt,
    revocationEventId: revocationEventId(token.id),
    // Ignored by this release's workflow (the worker owns the timing); kept while workers of the
    // previous release, which read it, may still pick up new runs during a rolling deploy.
    timing,
    ...(policy ? { policy } : {}),
  };
}

function startOptions(token: TokenRecord, taskQueue: string, timing: PropagationTiming, policy?: PolicySnapshot) {
  const receivers = token.receivers.length ? token.receivers.join(', ') : 'no receivers';
  return {
    workflowId: tokenWorkflowId(token.id),
    taskQueue,
    args: [tokenWorkflowInput(token, timing, policy)] as [TokenWorkflowInput],
    workflowIdConflictPolicy: WorkflowIdConflictPolicy.USE_EXISTING,
    typedSearchAttributes: [
      { key: SEARCH_ATTRIBUTE.subject, value: token.subject },
      { key: SEARCH_ATTRIBUTE.status, value: token.status },
      { key: SEARCH_ATTRIBUTE.propagation, value: token.propagation },
      { key: SEARCH_ATTRIBUTE.expiresAt, value: new Date(token.expiresAt) },
      { key: SEARCH_ATTRIBUTE.receivers, value: token.receivers },
      ...(policy ? [{ key: SEARCH_ATTRIBUTE.policy, value: policy.name }] : []),
      ...(token.name ? [{ key: SEARCH_ATTRIBUTE.name, value: token.name }] : []),
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

/**
 * Starts the token's workflow; harmless when it already runs (USE_EXISTING). Throws
 * WorkflowExecutionAlreadyStartedError when it ran and closed (REJECT_DUPLICATE): a start holds a
 * row read earlier, which may be dead by now, and a closed run is never followed by a plain start
 * (only a revoke's signal-with-start opens a run again).
 */
export async function startTokenWorkflow(
  client: Client,
  token: TokenRecord,
  taskQueue: string,
  timing: PropagationTiming,
  policy?: PolicySnapshot,
): Promise<WorkflowHandle> {
  return client.workflow.start(WORKFLOW_TYPE.tokenLifecycle, {
    ...startOptions(token, taskQueue, timing, policy),
    workflowIdReusePolicy: WorkflowIdReusePolicy.REJECT_DUPLICATE,
  });
}

/**
 * Tells the token's workflow that the token is dead. Signal-with-start: a workflow that was never
 * started (or has already closed) is started, adopts the store's facts and propagates. `policy`:
 * the token's, when it has one, so a run opened here starts as an issue's would.
 */
export async function signalRevoke(
  client: Client,
  token: TokenRecord,
  request: RevokeRequest,
  taskQueue: string,
  timing: PropagationTiming,
  policy?: PolicySnapshot,
): Promise<void> {
  await client.workflow.signalWithStart(WORKFLOW_TYPE.tokenLifecycle, {
    ...startOptions(token, taskQueue, timing, policy),
    signal: revokeSignal,
    signalArgs: [request],
  });
}

/** A plain Signal to the token's running workflow (throws WorkflowNotFoundError when none runs). */
export async function signalRevokeRunning(client: Client, tokenId: string, request: RevokeRequest): Promise<void> {
  await client.workflow.getHandle(tokenWorkflowId(tokenId)).signal(revokeSignal, request);
}
