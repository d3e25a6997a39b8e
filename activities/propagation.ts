/** Delivery of signed revocation events to receivers (Standard Webhooks). I/O and error classification only. */
import { setTimeout } from 'node:timers/promises';
import { ApplicationFailure, Context } from '@temporalio/activity';
import type { StorePool } from '../common/db.js';
import { decryptSecret, masterKeyId, signWebhook } from '../common/secrets.js';
import {
  loadDeliveryForAttempt,
  loadReceiverSecret,
  recordDeliveryAttempt,
  type DeliveryRecord,
} from '../common/store/index.js';
import type { DeliveryView } from '../workflows/messages.js';
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
export function parseRetryAfter(value: string | null, nowMs: number): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Math.min(Number(trimmed) * 1000, MAX_RETRY_AFTER_MS);
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? undefined : Math.min(Math.max(0, at - nowMs), MAX_RETRY_AFTER_MS);
}

/** A network failure as a code (ECONNREFUSED, TimeoutError, …), never its message. */
export function networkErrorCode(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown; name?: unknown } }).cause;
  if (typeof cause?.code === 'string') return cause.code;
  if (typeof cause?.name === 'string' && cause.name !== 'Error') return cause.name;
  return err instanceof Error ? err.name : 'unknown error';
}

/** 408, 429 and 5xx are worth retrying; any other non-2xx (410 Gone included) waits for an operator. */
export const isRetryableStatus = (status: number): boolean => status === 408 || status === 429 || status >= 500;

export interface DeliveryDeps {
  pool: StorePool;
  masterKey: Buffer | undefined;
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
  let loaded = await loadDeliveryForAttempt(deps.pool, eventId, receiverId);
  for (let pause = 10; !loaded && pause <= 640; pause *= 2) {
    await setTimeout(pause);
    loaded = await loadDeliveryForAttempt(deps.pool, eventId, receiverId);
  }
  if (!loaded) {
    throw ApplicationFailure.create({
      message: `no outbox row for ${eventId} to ${receiverId}: the token's kill has not committed`,
      type: 'OutboxRowNotYetWritten',
      nextRetryDelay: 1000,
    });
  }
  // Settled by an earlier attempt whose result was lost, or forced by an operator: nothing to send.
  if (!['pending', 'failed'].includes(loaded.delivery.status)) return toDeliveryView(loaded.delivery);

  const stored = await loadReceiverSecret(deps.pool, receiverId);
  if (!stored || stored.receiver.removedAt) {
    const cancelled = await recordDeliveryAttempt(deps.pool, eventId, receiverId, {
      kind: 'cancelled',
      error: `receiver ${receiverId} was removed`,
    });
    return toDeliveryView(cancelled);
  }
  if (!deps.masterKey || masterKeyId(deps.masterKey) !== stored.keyId) {
    // Retryable: fixing the worker's configuration and restarting it resumes delivery.
    throw ApplicationFailure.retryable(
      `cannot decrypt the signing secret of receiver ${receiverId}: the worker's TOKENWARDEN_MASTER_KEY is ${deps.masterKey ? 'a different key' : 'not set'} (key id ${stored.keyId} expected)`,
      'SigningKeyUnavailable',
    );
  }
  const secret = decryptSecret(deps.masterKey, stored.ciphertext, receiverId);
  const timestamp = Math.floor(Date.now() / 1000);
  let response: Response;
  try {
    response = await fetch(stored.receiver.url, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        'user-agent': 'tokenwarden',
        'webhook-id': eventId,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': signWebhook(secret, eventId, timestamp, loaded.body),
      },
      body: loaded.body,
      signal: AbortSignal.any([AbortSignal.timeout(HTTP_TIMEOUT_MS), Context.current().cancellationSignal]),
      redirect: 'error',
    });
    await response.body?.cancel();
  } catch (err) {
    // Error codes only: a raw message can quote the URL, and a URL can carry credentials.
    const error = `receiver ${receiverId} unreachable: ${networkErrorCode(err)}`;
    await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'retryable', statusCode: null, error });
    throw ApplicationFailure.retryable(error, RECEIVER_UNAVAILABLE);
  }

  if (response.ok) {
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
    throw ApplicationFailure.create({
      message: error,
      type: RECEIVER_UNAVAILABLE,
      nextRetryDelay: parseRetryAfter(response.headers.get('retry-after'), Date.now()),
    });
  }
  await recordDeliveryAttempt(deps.pool, eventId, receiverId, { kind: 'rejected', statusCode: response.status, error });
  throw ApplicationFailure.nonRetryable(
    `${error}; not retried until an operator runs retryPropagation (after fixing the receiver) or forceComplete`,
    RECEIVER_REJECTED,
  );
}
