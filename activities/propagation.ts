/** Delivery of signed revocation events to receivers (Standard Webhooks). I/O and error classification only. */
import type { LookupAddress } from 'node:dns';
import { Agent as HttpAgent, request as httpRequest, type ClientRequestArgs } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { setTimeout } from 'node:timers/promises';
import { ApplicationFailure, Context } from '@temporalio/activity';
import { ApplicationFailureCategory, type RetryPolicy } from '@temporalio/common';
import { msOptionalToNumber } from '@temporalio/common/lib/time.js';
import { checkReceiverUrl, pinnedLookup, resolveReceiver, type ReceiverAllowance } from '../common/addresses.js';
import type { StorePool } from '../common/db.js';
import { signWebhook, type MasterKeyring } from '../common/secrets.js';
import { loadAttempt, recordDeliveryAttempt, type DeliveryRecord } from '../common/store/index.js';
import type { DeliveryView } from '../common/messages.js';
import { RECEIVER_REJECTED } from '../common/names.js';

/** Error types the workflow (and its retry policy) recognise. */
export const RECEIVER_UNAVAILABLE = 'ReceiverUnavailable';

const HTTP_TIMEOUT_MS = 10_000;
/** A Retry-After longer than this is capped: the workflow's own escalation still applies. */
const MAX_RETRY_AFTER_MS = 6 * 3_600_000;

export const toDeliveryView = (d: DeliveryRecord): DeliveryView => ({
  receiverId: d.receiverId,
  eventId: d.eventId,
  status: d.status,
  attempts: d.attempts,
  lastStatusCode: d.lastStatusCode,
  lastError: d.lastError,
});

/** Parses an HTTP Retry-After value (seconds or HTTP date) to ms; undefined when absent or invalid. */
export function parseRetryAfter(value: string | null | undefined, nowMs: number): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? undefined : Math.max(0, at - nowMs);
}

/** The retry schedule an activity runs under; Temporal's defaults where the server sent none. */
export interface RetrySchedule {
  initialMs: number;
  coefficient: number;
  maximumMs: number;
}

export function retryScheduleOf(policy: RetryPolicy | undefined): RetrySchedule {
  const initialMs = msOptionalToNumber(policy?.initialInterval) ?? 1000;
  return {
    initialMs,
    coefficient: policy?.backoffCoefficient ?? 2,
    maximumMs: msOptionalToNumber(policy?.maximumInterval) ?? 100 * initialMs,
  };
}

/**
 * The delay before the next attempt when a receiver asked for one (Retry-After): never shorter
 * than the schedule's own step after this attempt (a `Retry-After: 0` must not turn the backoff
 * into a hammering loop, and a zero delay ends the activity on the server), never longer than the
 * cap. Undefined when the receiver asked nothing: the schedule applies as it is.
 */
export function retryDelayMs(
  requestedMs: number | undefined,
  attempt: number,
  schedule: RetrySchedule,
): number | undefined {
  if (requestedMs === undefined) return undefined;
  const step = Math.min(schedule.initialMs * schedule.coefficient ** Math.max(0, attempt - 1), schedule.maximumMs);
  return Math.max(schedule.initialMs, step, Math.min(requestedMs, MAX_RETRY_AFTER_MS));
}

/** A network failure as a code (ECONNREFUSED, TimeoutError, …), never its message. */
export function networkErrorCode(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown; name?: unknown } }).cause;
  if (typeof cause?.code === 'string') return cause.code;
  if (typeof cause?.name === 'string' && cause.name !== 'Error') return cause.name;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  return err instanceof Error ? err.name : 'unknown error';
}

/** 408, 429 and 5xx are worth retrying; any other non-2xx (410 Gone included) waits for an operator. */
export const isRetryableStatus = (status: number): boolean => status === 408 || status === 429 || status >= 500;

/**
 * How long an idle connection to a receiver stays open: under the 5 s that Node and Apache servers
 * keep one by default (a server's own shorter `Keep-Alive: timeout` hint is honoured too), so a
 * request rarely meets a connection the server is closing.
 */
const IDLE_CONNECTION_MS = 4_000;

/** The request option naming the addresses a connection was checked for. */
interface PinnedRequestArgs extends ClientRequestArgs {
  checkedAddresses?: string;
}

/**
 * An agent that keeps connections to receivers open between attempts (a fan-out or a wave sends
 * many events to the same receivers). A connection is keyed by its origin and by every address the
 * check allowed: it is reused only while the name still resolves to exactly those addresses, so a
 * name that now resolves elsewhere gets a new connection, made through the new pinned lookup.
 */
class PinnedHttpAgent extends HttpAgent {
  override getName(options?: PinnedRequestArgs): string {
    return `${super.getName(options)}|${options?.checkedAddresses ?? ''}`;
  }
}
class PinnedHttpsAgent extends HttpsAgent {
  override getName(options?: PinnedRequestArgs): string {
    return `${super.getName(options)}|${options?.checkedAddresses ?? ''}`;
  }
}

/** A worker's connections to receivers (one pair of agents per worker, shared by its attempts). */
export interface ReceiverAgents {
  http: HttpAgent;
  https: HttpsAgent;
}

export function createReceiverAgents(): ReceiverAgents {
  const options = { keepAlive: true, timeout: IDLE_CONNECTION_MS };
  return { http: new PinnedHttpAgent(options), https: new PinnedHttpsAgent(options) };
}

export interface DeliveryDeps {
  pool: StorePool;
  keyring: MasterKeyring;
  /** Address ranges receivers may use besides public ones. */
  receiverAllow: readonly ReceiverAllowance[];
  agents: ReceiverAgents;
}

/**
 * POSTs to the URL, connecting only to `addresses` (already checked). Redirects are not followed:
 * a 3xx is an answer like any other. Resolves once the status is known; the body is discarded.
 */
function post(
  agents: ReceiverAgents,
  url: URL,
  addresses: readonly LookupAddress[],
  headers: Record<string, string>,
  body: string,
  signal: AbortSignal,
): Promise<{ status: number; retryAfter: string | undefined }> {
  const https = url.protocol === 'https:';
  const send = https ? httpsRequest : httpRequest;
  const options: PinnedRequestArgs = {
    method: 'POST',
    headers: { ...headers, 'content-length': String(Buffer.byteLength(body)) },
    agent: https ? agents.https : agents.http,
    lookup: pinnedLookup(addresses),
    checkedAddresses: addresses
      .map((a) => `${a.family}/${a.address}`)
      .sort()
      .join(','),
    signal,
  };
  return new Promise((resolve, reject) => {
    const req = send(url, options, (res) => {
      res.on('error', () => {}); // the status is all we need; a body cut short changes nothing
      res.resume();
      resolve({ status: res.statusCode ?? 0, retryAfter: res.headers['retry-after'] });
    });
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * One attempt at delivering the token's revocation event to one receiver. The event id and body
 * come from the outbox row, identical on every attempt; the signature is computed afresh each time
 * (receivers reject stale timestamps). The outcome of every attempt is recorded before returning.
 */
export async function deliverRevocation(
  deps: DeliveryDeps,
  input: { eventId: string; receiverId: string },
): Promise<DeliveryView> {
  const { eventId, receiverId } = input;
  // The workflow starts deliveries together with its kill: the outbox row appears when a kill
  // commits, usually within milliseconds. A few reads with growing pauses (about 1.3 s in all), then
  // the attempt fails and is retried a second later.
  let loaded = await loadAttempt(deps.pool, eventId, receiverId);
  for (let pause = 10; !loaded && pause <= 640; pause *= 2) {
    await setTimeout(pause);
    loaded = await loadAttempt(deps.pool, eventId, receiverId);
  }
  if (!loaded) {
    // Expected and transient: benign, so the worker logs it at debug level, without a stack trace.
    throw ApplicationFailure.create({
      message: `no outbox row for ${eventId} to ${receiverId}: the token's kill has not committed`,
      type: 'OutboxRowNotYetWritten',
      // About a second, but never shorter than the retry schedule's current step.
      nextRetryDelay: retryDelayMs(
        1000,
        Context.current().info.attempt,
        retryScheduleOf(Context.current().info.retryPolicy),
      ),
      category: ApplicationFailureCategory.BENIGN,
    });
  }
  // Settled by an earlier attempt whose result was lost, or forced by an operator: nothing to send.
  if (!['pending', 'failed'].includes(loaded.delivery.status)) return toDeliveryView(loaded.delivery);
  // A rejection is final until an operator asks again: an attempt retried after a crash (the
  // rejection recorded, the result lost) or a restarted run must not send it on its own.
  if (loaded.delivery.status === 'failed' && !loaded.retryRequested) {
    throw ApplicationFailure.nonRetryable(
      `${loaded.delivery.lastError ?? `receiver ${receiverId} rejected the event`}; not retried until an operator runs retryPropagation or forceComplete`,
      RECEIVER_REJECTED,
    );
  }

  const stored = loaded.receiver;
  if (!stored || stored.record.removedAt) {
    const cancelled = await recordDeliveryAttempt(deps.pool, eventId, receiverId, {
      kind: 'cancelled',
      error: `receiver ${receiverId} was removed`,
    });
    return toDeliveryView(cancelled);
  }
  const secret = deps.keyring.decrypt(stored.keyId, stored.ciphertext, receiverId);
  if (secret === undefined) {
    // Retryable: fixing the worker's configuration and restarting it resumes delivery.
    throw ApplicationFailure.retryable(
      `cannot decrypt the signing secret of receiver ${receiverId}: no key of the worker's TOKENWARDEN_MASTER_KEY or TOKENWARDEN_PREVIOUS_MASTER_KEYS has id ${stored.keyId}`,
      'SigningKeyUnavailable',
    );
  }

  // One deadline for the whole attempt, name resolution included.
  const signal = AbortSignal.any([AbortSignal.timeout(HTTP_TIMEOUT_MS), Context.current().cancellationSignal]);
  // The address is checked at every attempt: the policy may have changed since the receiver was
  // added, and a name may resolve elsewhere now (DNS rebinding).
  const checked = checkReceiverUrl(stored.record.url, deps.receiverAllow);
  let resolved: Awaited<ReturnType<typeof resolveReceiver>> | undefined;
  try {
    if (checked.url) resolved = await resolveReceiver(checked.url, deps.receiverAllow, signal);
  } catch (err) {
    const error = `receiver ${receiverId} unreachable: ${networkErrorCode(err)}`;
    await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'retryable', statusCode: null, error });
    throw ApplicationFailure.retryable(error, RECEIVER_UNAVAILABLE);
  }
  if (!checked.url || !resolved?.addresses) {
    const error = `receiver ${receiverId} refused: ${checked.problem ?? resolved?.problem}`;
    await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'rejected', statusCode: null, error });
    throw ApplicationFailure.nonRetryable(
      `${error}; not retried until an operator runs retryPropagation (after fixing the receiver or TOKENWARDEN_RECEIVER_ALLOW) or forceComplete`,
      RECEIVER_REJECTED,
    );
  }

  const timestamp = Math.floor(Date.now() / 1000);
  let response: { status: number; retryAfter: string | undefined };
  try {
    response = await post(
      deps.agents,
      checked.url,
      resolved.addresses,
      {
        'content-type': 'application/json',
        'user-agent': 'tokenwarden',
        'webhook-id': eventId,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': signWebhook(secret, eventId, timestamp, loaded.body),
      },
      loaded.body,
      signal,
    );
  } catch (err) {
    // Error codes only: a raw message can quote the URL, and a URL can carry credentials.
    const error = `receiver ${receiverId} unreachable: ${networkErrorCode(err)}`;
    await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'retryable', statusCode: null, error });
    throw ApplicationFailure.retryable(error, RECEIVER_UNAVAILABLE);
  }

  if (response.status >= 200 && response.status < 300) {
    const delivered = await recordDeliveryAttempt(deps.pool, eventId, receiverId, {
      kind: 'delivered',
      statusCode: response.status,
    });
    return toDeliveryView(delivered);
  }
  const error = `receiver ${receiverId} answered HTTP ${response.status}`;
  if (isRetryableStatus(response.status)) {
    await recordDeliveryAttempt(deps.pool, eventId, receiverId, {
      kind: 'retryable',
      statusCode: response.status,
      error,
    });
    const info = Context.current().info;
    throw ApplicationFailure.create({
      message: error,
      type: RECEIVER_UNAVAILABLE,
      nextRetryDelay: retryDelayMs(
        parseRetryAfter(response.retryAfter, Date.now()),
        info.attempt,
        retryScheduleOf(info.retryPolicy),
      ),
    });
  }
  await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'rejected', statusCode: response.status, error });
  throw ApplicationFailure.nonRetryable(
    `${error}; not retried until an operator runs retryPropagation (after fixing the receiver) or forceComplete`,
    RECEIVER_REJECTED,
  );
}

/** One receiver's outcome of a first attempt made together with the others (never thrown). */
export type FirstAttemptOutcome =
  | { receiverId: string; kind: 'result'; row: DeliveryView }
  | {
      receiverId: string;
      kind: 'rejected' | 'ended';
      message: string;
      row: DeliveryView | null;
      /** The pause the receiver asked for (Retry-After), bounded like any attempt's. */
      retryAfterMs?: number;
    };

/**
 * The first attempt at every receiver of one event, in parallel inside one activity: one activity
 * per receiver waits for the server to dispatch each in turn (milliseconds apiece), so the fiftieth
 * receiver heard of a revocation several times later than the first. Each receiver's outcome is
 * returned with its store row; the workflow retries those not settled one by one.
 */
export async function deliverRevocationToAll(
  deps: DeliveryDeps,
  input: { eventId: string; receiverIds: string[] },
): Promise<FirstAttemptOutcome[]> {
  const { eventId } = input;
  // Heartbeats let the server notice a lost worker within the heartbeat timeout, and bring a
  // cancellation (or the activity's own timeout) to the attempts in flight.
  const ctx = Context.current();
  const beat = setInterval(() => ctx.heartbeat(), 1_000);
  try {
    return await Promise.all(
      input.receiverIds.map(async (receiverId): Promise<FirstAttemptOutcome> => {
        try {
          return { receiverId, kind: 'result', row: await deliverRevocation(deps, { eventId, receiverId }) };
        } catch (err) {
          // The attempt's own failures carry messages written for history (no URL, no secret).
          const failure = err instanceof ApplicationFailure ? err : undefined;
          const kind = failure?.type === RECEIVER_REJECTED && failure.nonRetryable ? 'rejected' : 'ended';
          const message = failure?.message ?? `delivery to ${receiverId} failed: ${networkErrorCode(err)}`;
          const retryAfterMs = msOptionalToNumber(failure?.nextRetryDelay ?? undefined);
          const loaded = await loadAttempt(deps.pool, eventId, receiverId).catch(() => undefined);
          return {
            receiverId,
            kind,
            message,
            row: loaded ? toDeliveryView(loaded.delivery) : null,
            ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
          };
        } finally {
          ctx.heartbeat();
        }
      }),
    );
  } finally {
    clearInterval(beat);
  }
}
