/** Delivery of signed revocation events to receivers (Standard Webhooks). I/O and error classification only. */
import type { LookupAddress } from 'node:dns';
import { randomUUID } from 'node:crypto';
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
/** The receiver acknowledged the event but its probe still accepts the token: retried like a failure. */
export const TOKEN_STILL_ACCEPTED = 'TokenStillAccepted';

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

/** A probe's answer is a few dozen bytes; anything much longer is not one. */
const MAX_PROBE_ANSWER_BYTES = 4096;

/**
 * Sends one request to the URL, connecting only to `addresses` (already checked). Redirects are
 * not followed: a 3xx is an answer like any other. Resolves once the status is known, with the
 * body when `readBody` (at most MAX_PROBE_ANSWER_BYTES; `tooLong` past that), discarded otherwise.
 */
export function send(
  agents: ReceiverAgents,
  url: URL,
  addresses: readonly LookupAddress[],
  request: { method: 'POST' | 'GET'; headers: Record<string, string>; body?: string; readBody?: boolean },
  signal: AbortSignal,
): Promise<{ status: number; retryAfter: string | undefined; body: string; tooLong: boolean }> {
  const https = url.protocol === 'https:';
  const transport = https ? httpsRequest : httpRequest;
  const body = request.body ?? '';
  const options: PinnedRequestArgs = {
    method: request.method,
    headers: {
      ...request.headers,
      ...(request.body !== undefined ? { 'content-length': String(Buffer.byteLength(body)) } : {}),
    },
    agent: https ? agents.https : agents.http,
    lookup: pinnedLookup(addresses),
    checkedAddresses: addresses
      .map((a) => `${a.family}/${a.address}`)
      .sort()
      .join(','),
    signal,
  };
  return new Promise((resolve, reject) => {
    const req = transport(url, options, (res) => {
      const answer = { status: res.statusCode ?? 0, retryAfter: res.headers['retry-after'] };
      if (!request.readBody) {
        res.on('error', () => {}); // the status is all we need; a body cut short changes nothing
        res.resume();
        resolve({ ...answer, body: '', tooLong: false });
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_PROBE_ANSWER_BYTES) {
          res.destroy();
          resolve({ ...answer, body: '', tooLong: true });
        } else chunks.push(chunk);
      });
      res.on('error', reject);
      res.on('end', () => resolve({ ...answer, body: Buffer.concat(chunks).toString('utf8'), tooLong: false }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** The probe's address for one token: `<probeUrl>/<tokenId>` (its query string kept). */
export function probeUrlFor(probeUrl: URL, tokenId: string): URL {
  const url = new URL(probeUrl.href);
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/${encodeURIComponent(tokenId)}`;
  return url;
}

/**
 * Reads a probe's answer: 200 with JSON `{"tokenId": <the token asked about>, "accepted": boolean}`.
 * A string when the answer is anything else (said in the delivery's last error), never quoting
 * more than a short, printable excerpt of what came back.
 */
export function readProbeAnswer(
  tokenId: string,
  answer: { status: number; body: string; tooLong: boolean },
): { accepted: boolean } | string {
  const expected = `expected 200 with JSON {"tokenId":"${tokenId}","accepted":true|false}`;
  if (answer.status !== 200) return `${expected}, got HTTP ${answer.status}`;
  if (answer.tooLong) return `${expected}, got a body over ${MAX_PROBE_ANSWER_BYTES} bytes`;
  let parsed: unknown;
  try {
    parsed = JSON.parse(answer.body);
  } catch {
    const excerpt = answer.body.slice(0, 40).replace(/[^\x20-\x7e]/g, '?');
    return `${expected}, got a body that is not JSON (${JSON.stringify(excerpt)}${answer.body.length > 40 ? '…' : ''})`;
  }
  const p = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as Record<string, unknown>;
  if (typeof p.accepted !== 'boolean') return `${expected}, got no boolean "accepted"`;
  if (p.tokenId !== tokenId) return `${expected}, got an answer about another token`;
  return { accepted: p.accepted };
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

  // One deadline for the whole attempt (the event and the probe), name resolution included.
  const signal = AbortSignal.any([AbortSignal.timeout(HTTP_TIMEOUT_MS), Context.current().cancellationSignal]);
  const attempt: Attempt = { deps, eventId, receiverId, secret, signal };
  // A probe answers whether the TOKEN is still accepted, which stays true after a credential.revoked
  // event (the token lives on with its current credential): its acknowledgement settles it.
  const probeUrl = isCredentialEvent(loaded.body) ? null : stored.record.probeUrl;
  // An event acknowledged earlier is never POSTed again: later attempts only ask the probe.
  if (loaded.delivery.ackedAt === null) {
    const posted = await postEvent(attempt, stored.record.url, loaded.body, probeUrl !== null);
    if (posted.status !== 'pending') return toDeliveryView(posted);
  }
  if (probeUrl === null) {
    // Acknowledged, and no probe to ask (none when the acknowledgement was recorded either).
    const delivered = await recordDeliveryAttempt(deps.pool, eventId, receiverId, {
      kind: 'delivered',
      statusCode: loaded.delivery.lastStatusCode ?? 200,
    });
    return toDeliveryView(delivered);
  }
  return toDeliveryView(await probe(attempt, probeUrl, loaded.delivery.tokenId));
}

/** A credential's revocation (rotation, end of grace), not the token's: the outbox row's body says which. */
function isCredentialEvent(body: string): boolean {
  return (JSON.parse(body) as { type?: unknown }).type === 'credential.revoked';
}

/** What the steps of one attempt share. */
interface Attempt {
  deps: DeliveryDeps;
  eventId: string;
  receiverId: string;
  secret: string;
  signal: AbortSignal;
}

/** The address checks of every attempt: the URL's own, then each address its name resolves to. */
async function checkedAddresses(
  a: Attempt,
  urlText: string,
): Promise<
  | { url: URL; addresses: LookupAddress[]; refused?: undefined; unreachable?: undefined }
  | { refused: string; unreachable?: undefined }
  | { unreachable: string; refused?: undefined }
> {
  // The address is checked at every attempt: the policy may have changed since the receiver was
  // added, and a name may resolve elsewhere now (DNS rebinding).
  const checked = checkReceiverUrl(urlText, a.deps.receiverAllow);
  if (!checked.url) return { refused: checked.problem };
  try {
    const resolved = await resolveReceiver(checked.url, a.deps.receiverAllow, a.signal);
    return resolved.addresses ? { url: checked.url, addresses: resolved.addresses } : { refused: resolved.problem };
  } catch (err) {
    return { unreachable: networkErrorCode(err) };
  }
}

/** Records a retryable outcome and throws the failure that retries the activity (Retry-After honoured). */
async function retryLater(
  a: Attempt,
  outcome: { kind: 'retryable' | 'probe-retryable'; statusCode: number | null; error: string },
  type: string,
  retryAfter?: string,
): Promise<never> {
  await recordDeliveryAttempt(a.deps.pool, a.eventId, a.receiverId, outcome);
  const info = Context.current().info;
  throw ApplicationFailure.create({
    message: outcome.error,
    type,
    nextRetryDelay: retryDelayMs(
      parseRetryAfter(retryAfter, Date.now()),
      info.attempt,
      retryScheduleOf(info.retryPolicy),
    ),
  });
}

/** Records a rejection and throws the failure that waits for an operator. */
async function waitForOperator(
  a: Attempt,
  outcome: { kind: 'rejected' | 'probe-rejected'; statusCode: number | null; error: string },
  fix: string,
): Promise<never> {
  await recordDeliveryAttempt(a.deps.pool, a.eventId, a.receiverId, outcome);
  throw ApplicationFailure.nonRetryable(
    `${outcome.error}; not retried until an operator runs retryPropagation (${fix}) or forceComplete`,
    RECEIVER_REJECTED,
  );
}

/**
 * POSTs the signed event. A 2xx settles the delivery, or, when a probe is to confirm, is recorded
 * as acknowledged (still pending). Any other outcome is recorded, then thrown.
 */
async function postEvent(a: Attempt, eventUrl: string, body: string, probed: boolean): Promise<DeliveryRecord> {
  const { receiverId } = a;
  const target = await checkedAddresses(a, eventUrl);
  if (target.unreachable !== undefined) {
    const error = `receiver ${receiverId} unreachable: ${target.unreachable}`;
    return retryLater(a, { kind: 'retryable', statusCode: null, error }, RECEIVER_UNAVAILABLE);
  }
  if (target.refused !== undefined) {
    const error = `receiver ${receiverId} refused: ${target.refused}`;
    return waitForOperator(
      a,
      { kind: 'rejected', statusCode: null, error },
      'after fixing the receiver or TOKENWARDEN_RECEIVER_ALLOW',
    );
  }
  const timestamp = Math.floor(Date.now() / 1000);
  let response: { status: number; retryAfter: string | undefined };
  try {
    response = await send(
      a.deps.agents,
      target.url,
      target.addresses,
      {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'user-agent': 'tokenwarden',
          'webhook-id': a.eventId,
          'webhook-timestamp': String(timestamp),
          'webhook-signature': signWebhook(a.secret, a.eventId, timestamp, body),
        },
        body,
      },
      a.signal,
    );
  } catch (err) {
    // Error codes only: a raw message can quote the URL, and a URL can carry credentials.
    const error = `receiver ${receiverId} unreachable: ${networkErrorCode(err)}`;
    return retryLater(a, { kind: 'retryable', statusCode: null, error }, RECEIVER_UNAVAILABLE);
  }
  if (response.status >= 200 && response.status < 300) {
    return recordDeliveryAttempt(a.deps.pool, a.eventId, receiverId, {
      kind: probed ? 'acknowledged' : 'delivered',
      statusCode: response.status,
    });
  }
  const error = `receiver ${receiverId} answered HTTP ${response.status}`;
  if (isRetryableStatus(response.status)) {
    return retryLater(
      a,
      { kind: 'retryable', statusCode: response.status, error },
      RECEIVER_UNAVAILABLE,
      response.retryAfter,
    );
  }
  return waitForOperator(a, { kind: 'rejected', statusCode: response.status, error }, 'after fixing the receiver');
}

/**
 * Asks the receiver's probe whether it still accepts the token, with a request signed like an
 * event (a fresh `webhook-id`; the signed payload is the request's path, so a signature answers
 * for one token only). Rejected there → verified (settled); still accepted, a network failure or
 * 408/429/5xx → retried like a failed delivery; any other answer waits for an operator.
 */
async function probe(a: Attempt, probeUrl: string, tokenId: string): Promise<DeliveryRecord> {
  const { receiverId } = a;
  const target = await checkedAddresses(a, probeUrl);
  if (target.unreachable !== undefined) {
    const error = `probe of receiver ${receiverId} unreachable: ${target.unreachable}`;
    return retryLater(a, { kind: 'probe-retryable', statusCode: null, error }, RECEIVER_UNAVAILABLE);
  }
  if (target.refused !== undefined) {
    const error = `probe of receiver ${receiverId} refused: ${target.refused}`;
    return waitForOperator(
      a,
      { kind: 'probe-rejected', statusCode: null, error },
      'after fixing the receiver or TOKENWARDEN_RECEIVER_ALLOW',
    );
  }
  const url = probeUrlFor(target.url, tokenId);
  const probeId = `probe_${randomUUID()}`;
  const timestamp = Math.floor(Date.now() / 1000);
  let answer: Awaited<ReturnType<typeof send>>;
  try {
    answer = await send(
      a.deps.agents,
      url,
      target.addresses,
      {
        method: 'GET',
        headers: {
          accept: 'application/json',
          'user-agent': 'tokenwarden',
          'webhook-id': probeId,
          'webhook-timestamp': String(timestamp),
          'webhook-signature': signWebhook(a.secret, probeId, timestamp, `${url.pathname}${url.search}`),
        },
        readBody: true,
      },
      a.signal,
    );
  } catch (err) {
    const error = `probe of receiver ${receiverId} unreachable: ${networkErrorCode(err)}`;
    return retryLater(a, { kind: 'probe-retryable', statusCode: null, error }, RECEIVER_UNAVAILABLE);
  }
  if (isRetryableStatus(answer.status)) {
    const error = `probe of receiver ${receiverId} answered HTTP ${answer.status}`;
    return retryLater(
      a,
      { kind: 'probe-retryable', statusCode: answer.status, error },
      RECEIVER_UNAVAILABLE,
      answer.retryAfter,
    );
  }
  const verdict = readProbeAnswer(tokenId, answer);
  if (typeof verdict === 'string') {
    const error = `probe of receiver ${receiverId} answered nonsense: ${verdict}`;
    return waitForOperator(a, { kind: 'probe-rejected', statusCode: answer.status, error }, 'after fixing its probe');
  }
  if (verdict.accepted) {
    const error = `receiver ${receiverId} acknowledged the event but its probe still accepts token ${tokenId}`;
    return retryLater(a, { kind: 'probe-retryable', statusCode: answer.status, error }, TOKEN_STILL_ACCEPTED);
  }
  return recordDeliveryAttempt(a.deps.pool, a.eventId, receiverId, { kind: 'verified', statusCode: answer.status });
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
