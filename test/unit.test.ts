import assert from 'node:assert/strict';
import { EMAIL_ADDRESS } from '../common/secret-shapes.js';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import { Webhook } from 'standardwebhooks';
import type { z } from 'zod';
import { createActivities } from '../activities/index.js';
import { isRetryableStatus, networkErrorCode, parseRetryAfter } from '../activities/propagation.js';
import { formatDuration, parseDuration } from '../common/durations.js';
import { ACTIVITY_NAMES } from '../common/names.js';
import {
  decryptSecret,
  encryptSecret,
  generateSigningSecret,
  generateTokenString,
  isWellFormedToken,
  signWebhook,
} from '../common/secrets.js';
import { InvalidInputError } from '../common/errors.js';
import { actorSchema, nameSchema, parseInput, reasonSchema, subjectSchema, ttlSchema } from '../common/validation.js';
import { loadSettings, WORKER_TUNING_DEFAULTS, type WorkerTuning } from '../common/config.js';
import { CACHED_WORKFLOWS_CAP, tuningOptions } from '../worker/worker.js';
import { DefaultLogger } from '@temporalio/worker';
import { compileWorkerOptions } from '@temporalio/worker/lib/worker-options.js';
import { ConfigError } from '../common/errors.js';
import {
  INVALID_LIFECYCLE_REQUEST,
  INVALID_OPERATOR_REQUEST,
  LifecycleState,
  NOT_PROPAGATING,
  TOKEN_NOT_ACTIVE,
  RUN_PREDATES_REQUEST,
  runPredatesRequest,
  parseSuspiciousReport,
  formatMs,
  isReceiverRejection,
  msUntil,
  parseRevokeSignal,
  pauseAfterEnding,
  propagationVerdict,
  validateOperatorRequest,
} from '../workflows/lifecycle-state.js';
import type { DeliveryView, TokenWorkflowInput } from '../common/messages.js';
import {
  ActivityFailure,
  ApplicationFailure,
  noopMetricMeter,
  RetryState,
  TimeoutFailure,
  TimeoutType,
} from '@temporalio/common';
import { RECEIVER_REJECTED } from '../common/names.js';
import { ServiceError, WorkflowUpdateFailedError } from '@temporalio/client';
import Fastify from 'fastify';
import { handleError } from '../client/api/problems.js';
import {
  abortedByWorkflowTaskFailure,
  sendWithAbortRetries,
  UPDATE_ABORT_ATTEMPTS,
  updateRefusal,
} from '../client/errors.js';
import { NotPropagatingError, TokenNotActiveError, TokenStateConflictError } from '../common/errors.js';

describe('durations', () => {
  it('should parse the units people write', () => {
    assert.equal(parseDuration('500ms'), 500);
    assert.equal(parseDuration('30s'), 30_000);
    assert.equal(parseDuration('15m'), 900_000);
    assert.equal(parseDuration('2h'), 7_200_000);
    assert.equal(parseDuration('90d'), 90 * 86_400_000);
  });
  it('should refuse what is not a duration', () => {
    for (const bad of ['', '5', '5x', '-5s', '0s', '1.5h', 's', '5 s m'])
      assert.equal(parseDuration(bad), undefined, bad);
  });
});

describe('token format', () => {
  it('should produce tw_<43 base62>_<6 checksum> tokens that pass the offline check', () => {
    const token = generateTokenString();
    assert.match(token, /^tw_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}$/);
    assert.ok(isWellFormedToken(token));
  });
  it('should reject a lookalike whose checksum does not match', () => {
    const token = generateTokenString();
    const body = token.slice(3, 46);
    const flipped = body[0] === 'a' ? 'b' + body.slice(1) : 'a' + body.slice(1);
    assert.equal(isWellFormedToken(`tw_${flipped}${token.slice(46)}`), false);
    assert.equal(isWellFormedToken(token.replace(/^tw_/, 'tx_')), false);
  });
  it('should never repeat', () => {
    const seen = new Set(Array.from({ length: 1000 }, generateTokenString));
    assert.equal(seen.size, 1000);
  });
});

describe('receiver secrets', () => {
  it('should sign exactly as the Standard Webhooks reference implementation verifies', () => {
    const secret = generateSigningSecret();
    const ts = Math.floor(Date.now() / 1000);
    const body = '{"id":"evt_1","type":"token.revoked"}';
    const signature = signWebhook(secret, 'evt_1', ts, body);
    const headers = { 'webhook-id': 'evt_1', 'webhook-timestamp': String(ts), 'webhook-signature': signature };
    assert.deepEqual(new Webhook(secret).verify(body, headers), JSON.parse(body));
    assert.throws(() => new Webhook(generateSigningSecret()).verify(body, headers));
  });
  it('should encrypt at rest and refuse a ciphertext moved to another receiver', () => {
    const key = Buffer.alloc(32, 7);
    const blob = encryptSecret(key, 'whsec_abc', 'billing');
    assert.equal(blob.includes(Buffer.from('whsec_abc')), false);
    assert.equal(decryptSecret(key, blob, 'billing'), 'whsec_abc');
    assert.throws(() => decryptSecret(key, blob, 'crm'));
  });
});

describe('lifecycle decisions', () => {
  it('should turn a malformed revoke signal into a revoke with reason unspecified', () => {
    for (const payload of [undefined, null, 42, 'x', { reason: '' }, { reason: 7 }]) {
      const r = parseRevokeSignal(payload);
      assert.equal(r.reason, 'unspecified');
      assert.equal(r.malformed, true);
      assert.equal(r.initiatingEntity, 'admin');
    }
    // A Signal bypasses the library's checks: control characters become spaces, cuts keep characters whole.
    assert.equal(parseRevokeSignal({ reason: 'nul\u0000byte' }).reason, 'nul byte');
    const hostile = parseRevokeSignal({ reason: 'a\u001b[31mb\r\nc\u009b', actor: 'hr\u0007' });
    assert.equal(hostile.reason, 'a [31mb  c');
    assert.equal(hostile.actor, 'hr');
    const long = parseRevokeSignal({ reason: '🔑'.repeat(600) }).reason;
    assert.equal([...long].length, 500);
    assert.doesNotMatch(long, /[\ud800-\udbff](?![\udc00-\udfff])/);
    const ok = parseRevokeSignal({ reason: ' left ', actor: 'hr', initiatingEntity: 'policy' });
    assert.deepEqual(ok, { reason: 'left', actor: 'hr', initiatingEntity: 'policy', malformed: false });
  });
  it('should reject operator requests without a reason, with a non-retryable failure naming the field', () => {
    const rejects = (request: unknown, field: RegExp) =>
      assert.throws(
        () => validateOperatorRequest(request),
        (e: unknown) =>
          e instanceof ApplicationFailure &&
          e.nonRetryable &&
          e.type === INVALID_OPERATOR_REQUEST &&
          field.test(e.message),
      );
    rejects({}, /^reason: /);
    rejects({ reason: '  ' }, /^reason: /);
    rejects({ reason: 'x', actor: '' }, /^actor: /);
    rejects({ undecodablePayload: { encoding: 'binary/bogus', error: 'ValueError' } }, /^request: .*binary\/bogus/);
    assert.doesNotThrow(() => validateOperatorRequest({ reason: 'receiver fixed' }));
  });
  it('should compute time left until a deadline', () => {
    assert.equal(msUntil('2026-01-01T00:00:10.000Z', Date.parse('2026-01-01T00:00:00.000Z')), 10_000);
    assert.ok(msUntil('2026-01-01T00:00:00.000Z', Date.parse('2026-01-01T00:00:01.000Z')) < 0);
  });
  it('should decide complete, stuck or wait', () => {
    assert.deepEqual(propagationVerdict([{ status: 'delivered' }, { status: 'forced' }], 0, 10), { kind: 'complete' });
    assert.deepEqual(propagationVerdict([], 0, 10), { kind: 'complete' });
    assert.deepEqual(propagationVerdict([{ status: 'delivered' }, { status: 'pending' }], 4, 10), {
      kind: 'wait',
      ms: 6,
    });
    assert.deepEqual(propagationVerdict([{ status: 'pending' }], 10, 10), { kind: 'stuck' });
    assert.deepEqual(propagationVerdict([{ status: 'failed' }, { status: 'pending' }], 0, 10), { kind: 'stuck' });
  });
});

describe('delivery endings', () => {
  const ended = (cause: Error, retryState: RetryState) =>
    new ActivityFailure('activity failed', 'deliverRevocation', '3', retryState, 'worker', cause);
  it("should take only a receiver's non-retryable answer for a rejection", () => {
    const rejected = ApplicationFailure.nonRetryable('receiver answered HTTP 410', RECEIVER_REJECTED);
    assert.equal(isReceiverRejection(ended(rejected, RetryState.NON_RETRYABLE_FAILURE)), true);
    const byPolicy = ApplicationFailure.retryable('receiver answered HTTP 400', RECEIVER_REJECTED);
    assert.equal(isReceiverRejection(ended(byPolicy, RetryState.NON_RETRYABLE_FAILURE)), true);
    // The server ended the activity (Retry-After: 0 became a zero delay): not the receiver's answer.
    const unavailable = ApplicationFailure.create({ message: 'HTTP 503', type: 'ReceiverUnavailable' });
    assert.equal(isReceiverRejection(ended(unavailable, RetryState.TIMEOUT)), false);
    const otherType = ApplicationFailure.nonRetryable('worker misconfigured', 'SomethingElse');
    assert.equal(isReceiverRejection(ended(otherType, RetryState.NON_RETRYABLE_FAILURE)), false);
    const timeout = new TimeoutFailure('timed out', undefined, TimeoutType.START_TO_CLOSE);
    assert.equal(isReceiverRejection(ended(timeout, RetryState.TIMEOUT)), false);
  });
  it('should pause on the retry schedule, growing and capped, so a delivery never spins', () => {
    const timing = { retryInitialMs: 1_000, retryMaxMs: 5_000 };
    assert.deepEqual(
      [1, 2, 3, 4, 50].map((n) => pauseAfterEnding(n, timing)),
      [1_000, 2_000, 4_000, 5_000, 5_000],
    );
  });
});

describe('lifecycle state', () => {
  const input: TokenWorkflowInput = {
    version: 1,
    tokenId: 'tok_1',
    subject: 'usr_1',
    receivers: ['crm', 'billing'],
    expiresAt: '2026-01-01T01:00:00.000Z',
    revocationEventId: 'evt_1',
  };
  const timing = { escalateAfterMs: 3_600_000, retryInitialMs: 1_000, retryMaxMs: 600_000, source: 'worker' as const };
  const row = (receiverId: string, over: Partial<DeliveryView>): DeliveryView => ({
    receiverId,
    eventId: 'evt_1',
    status: 'pending',
    attempts: 0,
    lastStatusCode: null,
    lastError: null,
    ...over,
  });
  const killedFacts = (propagation: 'pending' | 'stuck') => ({
    status: 'revoked' as const,
    propagation,
    revokedAt: '2026-01-01T00:00:00.000Z',
    revokedBy: 'admin:alice',
    revokeReason: 'left',
  });
  const now = Date.parse('2026-01-01T00:00:01.000Z');

  it('should say forced when a restarted run finds a delivery an operator forced, and not when nothing was', () => {
    const resumed = new LifecycleState(input);
    resumed.timingKnown(timing);
    resumed.resumedFromStore([row('crm', { status: 'forced', attempts: 3 }), row('billing', { status: 'delivered' })]);
    assert.equal(resumed.forced, true);

    const observed = new LifecycleState(input);
    observed.timingKnown(timing);
    observed.deliveryObserved(row('crm', { status: 'forced', attempts: 1 }));
    assert.equal(observed.forced, true);

    // The store forced nothing (every receiver confirmed meanwhile): nothing is reported as forced.
    const raced = new LifecycleState(input);
    raced.timingKnown(timing);
    raced.forcedComplete([]);
    assert.equal(raced.forced, false);
  });

  it('should resume from the store: settled stays settled, rejected waits, stuck stays stuck', () => {
    const state = new LifecycleState(input);
    state.timingKnown(timing);
    state.resumedFromStore([
      row('crm', { status: 'failed', attempts: 1, lastStatusCode: 410, lastError: 'receiver crm answered HTTP 410' }),
      row('billing', { status: 'delivered', attempts: 2, lastStatusCode: 200 }),
    ]);
    state.killed(killedFacts('stuck'), now);
    assert.equal(state.phase, 'stuck');
    assert.deepEqual(
      state.all().map((d) => [d.receiverId, d.status, d.attempts]),
      [
        ['crm', 'failed', 1],
        ['billing', 'delivered', 2],
      ],
    );
    assert.deepEqual(state.verdict(now), { kind: 'stuck' });
    const details = state.details();
    assert.match(details, /^\*\*revoked\*\* at 2026-01-01T00:00:00.000Z by admin:alice: left\./);
    // One paragraph per line (the Web UI's markdown joins single line breaks).
    assert.match(details, /left\.\n\nPropagation \*\*stuck\*\*[^\n]*\n\n- `crm`: rejected[^\n]*\n\n- `billing`: /);
    assert.match(details, /Propagation \*\*stuck\*\*: 1 of 2 receivers confirmed\./);
    assert.match(
      details,
      /`crm`: rejected after 1 attempt; last: receiver crm answered HTTP 410; waits for an operator/,
    );
    assert.match(details, /`billing`: confirmed after 2 attempts/);
    assert.match(details, /Timing \(from the worker\): escalate after 1 h; retries from 1 s, doubling up to 10 min\./);
    assert.equal(state.view().escalateAt, null, 'no deadline while stuck');
  });

  it('should keep an operator-retried delivery pending when a store read still shows it failed', () => {
    const state = new LifecycleState(input);
    state.timingKnown(timing);
    state.killed(killedFacts('pending'), now);
    state.deliveryRejected('crm', 'HTTP 400', row('crm', { status: 'failed', attempts: 1, lastStatusCode: 400 }));
    state.retryRequested();
    state.deliveryRetrying('crm');
    state.deliveryObserved(row('crm', { status: 'failed', attempts: 1, lastStatusCode: 400 }));
    assert.equal(state.delivery('crm').status, 'pending');
    // Attempts only go forward; a settled row wins and is never moved back.
    state.deliveryObserved(row('crm', { status: 'pending', attempts: 3, lastStatusCode: 503 }));
    state.deliveryObserved(row('crm', { status: 'pending', attempts: 2, lastStatusCode: 503 }));
    assert.equal(state.delivery('crm').attempts, 3);
    state.deliveryObserved(row('crm', { status: 'delivered', attempts: 4, lastStatusCode: 204 }));
    state.deliveryRejected('crm', 'late failure');
    assert.equal(state.delivery('crm').status, 'delivered');
  });

  it('should tell a forced completion from a confirmed one, and report pending with its deadline', () => {
    const details: string[] = [];
    const state = new LifecycleState(input, (s) => details.push(s.details()));
    state.timingKnown(timing);
    state.killed(killedFacts('pending'), now);
    assert.match(
      details.at(-1)!,
      /Propagation \*\*pending\*\*: 0 of 2 receivers confirmed; escalates to stuck at 2026-01-01T01:00:01.000Z/,
    );
    assert.equal(state.view().escalateAt, '2026-01-01T01:00:01.000Z');
    state.deliveryObserved(row('billing', { status: 'delivered', attempts: 1, lastStatusCode: 204 }));
    state.forcedComplete(['crm'], { actor: 'alice', reason: 'crm retired' });
    state.completed('complete');
    // Who forced it and why, as the Web UI's current details show it.
    assert.match(
      details.at(-1)!,
      /Propagation \*\*complete\*\*, forced by alice \(crm retired\): 1 of 2 receivers confirmed, 1 forced/,
    );
    assert.doesNotMatch(details.at(-1)!, /every receiver confirmed/);
    const view = state.view();
    assert.equal(view.forced, true);
    assert.equal(view.phase, 'complete');
  });

  it('should refuse operator requests unless a revocation is propagating something unsettled', () => {
    const state = new LifecycleState(input);
    assert.match(state.operatorRefusal()!, /not propagating a revocation \(phase active\)/);
    state.revokeRequested({ reason: 'left' });
    state.killing('revoke');
    assert.equal(state.operatorRefusal(), undefined, 'deliveries run while the kill commits');
    state.timingKnown(timing);
    state.killed(killedFacts('pending'), now);
    state.forcedComplete(['crm', 'billing']);
    assert.match(state.operatorRefusal()!, /every receiver has already confirmed/);
  });

  it('should write durations as an operator reads them', () => {
    assert.deepEqual([3_600_000, 600_000, 1_000, 200, 1_500, 86_400_000].map(formatMs), [
      '1 h',
      '10 min',
      '1 s',
      '200 ms',
      '1.5 s',
      '1 d',
    ]);
  });
});

describe('HTTP answers', () => {
  it('should retry 408, 429 and 5xx only', () => {
    for (const s of [408, 429, 500, 502, 503]) assert.ok(isRetryableStatus(s), String(s));
    for (const s of [400, 401, 403, 404, 410, 422]) assert.ok(!isRetryableStatus(s), String(s));
  });
  it('should describe network failures by code, never by a message that could quote the URL', async () => {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    await new Promise((resolve) => server.close(resolve));
    const refused = await fetch(`http://127.0.0.1:${port}/`).catch((e: unknown) => e);
    assert.equal(networkErrorCode(refused), 'ECONNREFUSED');
    const withCredentials = await fetch(`http://user:hunter2@127.0.0.1:${port}/`).catch((e: unknown) => e);
    assert.match(String((withCredentials as Error).message), /hunter2/, 'the raw message would leak it');
    assert.ok(!networkErrorCode(withCredentials).includes('hunter2'));
    assert.equal(networkErrorCode(new DOMException('x', 'TimeoutError')), 'TimeoutError');
  });
  it('should honour Retry-After in seconds or as a date', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    assert.equal(parseRetryAfter('7', now), 7000);
    assert.equal(parseRetryAfter('Thu, 01 Jan 2026 00:00:30 GMT', now), 30_000);
    assert.equal(parseRetryAfter(null, now), undefined);
    assert.equal(parseRetryAfter('soon', now), undefined);
  });
});

describe('wire contract', () => {
  it('should expose exactly the activity names listed in common/names', () => {
    const activities = createActivities({
      pool: {} as never,
      client: {} as never,
      settings: {
        masterKey: undefined,
        previousMasterKeys: [],
        receiverAllow: [],
        reconcileGraceMs: 0,
        timing: {} as never,
        temporal: {} as never,
      },
    });
    assert.deepEqual(Object.keys(activities).sort(), [...ACTIVITY_NAMES].sort());
  });
});

describe('input validation', () => {
  it('should name the field and what was expected', () => {
    assert.throws(
      () => parseInput(subjectSchema, 'jane@example.com', 'subject'),
      (err: unknown) => err instanceof InvalidInputError && /not an email/.test(err.message),
    );
  });
  it('should say which setting is missing or malformed', () => {
    assert.throws(
      () => loadSettings({ TOKENWARDEN_DATA_DIR: '/nonexistent' }),
      (e: unknown) => e instanceof ConfigError && /DATABASE_URL/.test(e.message),
    );
    assert.throws(
      () => loadSettings({ DATABASE_URL: 'postgres://x/y', TOKENWARDEN_ESCALATE_AFTER: 'soon' }),
      (e: unknown) => e instanceof ConfigError && /TOKENWARDEN_ESCALATE_AFTER/.test(e.message),
    );
    const s = loadSettings({
      DATABASE_URL: 'postgres://x/y',
      TOKENWARDEN_DATA_DIR: '/nonexistent',
      TOKENWARDEN_RETRY_MAX: '2m',
    });
    assert.equal(s.timing.retryMaxMs, 120_000);
    assert.equal(s.temporal.namespace, 'tokenwarden');
  });

  it("should read a worker's capacity from the environment, refusing nonsense with the variable named", () => {
    const base = { DATABASE_URL: 'postgres://x/y', TOKENWARDEN_DATA_DIR: '/nonexistent' };
    // What the SDK makes of our options (its own defaults filled in), without a server.
    const compiled = (t: WorkerTuning) =>
      compileWorkerOptions({ taskQueue: 'q', ...tuningOptions(t) }, new DefaultLogger('ERROR'), noopMetricMeter);
    const defaults = loadSettings(base).worker;
    assert.deepEqual(defaults, WORKER_TUNING_DEFAULTS);
    // No cache size of our own: the SDK's, scaled from the heap limit, capped.
    const sdkCache = compileWorkerOptions(
      { taskQueue: 'q' },
      new DefaultLogger('ERROR'),
      noopMetricMeter,
    ).maxCachedWorkflows;
    assert.equal(compiled(defaults).maxCachedWorkflows, Math.min(sdkCache, CACHED_WORKFLOWS_CAP));
    const tuned = loadSettings({
      ...base,
      TOKENWARDEN_WORKFLOW_TASK_SLOTS: '8',
      TOKENWARDEN_WORKFLOW_TASK_POLLERS: '4',
      TOKENWARDEN_ACTIVITY_SLOTS: '6',
      TOKENWARDEN_ACTIVITY_POLLERS: '3',
      TOKENWARDEN_CACHED_WORKFLOWS: '500',
      TOKENWARDEN_STICKY_TIMEOUT: '30s',
      TOKENWARDEN_DB_POOL: '100',
    }).worker;
    assert.deepEqual(
      [tuned.workflowTaskSlots, tuned.cachedWorkflows, tuned.stickyTimeoutMs, tuned.dbPoolSize],
      [8, 500, 30_000, 100],
    );
    const sdk = compiled(tuned);
    assert.equal(sdk.maxCachedWorkflows, 500);
    assert.equal(sdk.stickyQueueScheduleToStartTimeoutMs, 30_000);
    assert.deepEqual(sdk.workflowTaskPollerBehavior, { type: 'simple-maximum', maximum: 4 });
    assert.deepEqual(sdk.activityTaskPollerBehavior, { type: 'simple-maximum', maximum: 3 });
    for (const [name, value, why] of [
      ['TOKENWARDEN_WORKFLOW_TASK_SLOTS', 'ten', /whole number/],
      ['TOKENWARDEN_WORKFLOW_TASK_SLOTS', '1', /between 2 and/],
      ['TOKENWARDEN_WORKFLOW_TASK_POLLERS', '1', /between 2 and/],
      ['TOKENWARDEN_ACTIVITY_SLOTS', '0', /between 1 and/],
      ['TOKENWARDEN_WORKFLOW_THREADS', '-2', /whole number/],
      ['TOKENWARDEN_STICKY_TIMEOUT', 'forever', /duration/],
      ['TOKENWARDEN_STICKY_TIMEOUT', '6m', /from 1s to 5m/],
      ['TOKENWARDEN_STICKY_TIMEOUT', '999ms', /from 1s to 5m/],
      ['TOKENWARDEN_DB_POOL', '101', /between 1 and 100: PostgreSQL's default max_connections is 100/],
    ] as const) {
      assert.throws(
        () => loadSettings({ ...base, [name]: value }),
        (e: unknown) => e instanceof ConfigError && e.message.includes(name) && why.test(e.message),
        `${name}=${value}`,
      );
    }
    // Fewer slots than the default pollers: the pollers follow them down, as the SDK's default does.
    const few = loadSettings({ ...base, TOKENWARDEN_WORKFLOW_TASK_SLOTS: '4', TOKENWARDEN_ACTIVITY_SLOTS: '3' }).worker;
    assert.deepEqual([few.workflowTaskPollers, few.activityPollers], [4, 3]);
    // More pollers set than slots, set or default.
    for (const [env, pollers, slots] of [
      [
        { TOKENWARDEN_WORKFLOW_TASK_POLLERS: '5', TOKENWARDEN_WORKFLOW_TASK_SLOTS: '4' },
        'WORKFLOW_TASK_POLLERS',
        'WORKFLOW_TASK_SLOTS',
      ],
      [{ TOKENWARDEN_WORKFLOW_TASK_POLLERS: '41' }, 'WORKFLOW_TASK_POLLERS', 'WORKFLOW_TASK_SLOTS'],
      [{ TOKENWARDEN_ACTIVITY_POLLERS: '10', TOKENWARDEN_ACTIVITY_SLOTS: '9' }, 'ACTIVITY_POLLERS', 'ACTIVITY_SLOTS'],
    ] as const) {
      assert.throws(
        () => loadSettings({ ...base, ...env }),
        (e: unknown) =>
          e instanceof ConfigError &&
          e.message.includes(`TOKENWARDEN_${pollers} (`) &&
          e.message.includes(`must not exceed TOKENWARDEN_${slots} (`),
        JSON.stringify(env),
      );
    }
  });
});

describe('input bounds: lifetimes, free text, settings', () => {
  const year = 365 * 86_400_000;
  const field = (schema: z.ZodType, value: unknown) => {
    try {
      parseInput(schema, value, 'input');
      return undefined;
    } catch (err) {
      assert.ok(err instanceof InvalidInputError);
      return err.fields[0]?.message;
    }
  };

  it('should bound a lifetime by the configured maximum, whatever its spelling', () => {
    assert.equal(parseInput(ttlSchema(year), '365d', 'ttl'), year);
    assert.equal(parseInput(ttlSchema(year), year, 'ttl'), year);
    for (const tooLong of ['366d', '53w', '99999999d', '3000000d', '300000d', year + 1]) {
      assert.equal(field(ttlSchema(year), tooLong), 'at most 365d (TOKENWARDEN_MAX_TTL)', String(tooLong));
    }
    assert.equal(field(ttlSchema(3_600_000), '61m'), 'at most 1h (TOKENWARDEN_MAX_TTL)');
    assert.match(field(ttlSchema(year), '5x') ?? '', /expected a duration/);
  });

  it('should refuse characters that steer a terminal in free text, and keep printable Unicode', () => {
    for (const bad of [
      '\u001b[31m',
      '\u0007',
      '\r',
      'a\nb',
      '\t',
      '\u0000',
      '\u0085',
      '\u009b',
      '\u007f',
      '\u202e',
      '\u2066',
      '\u2028',
    ]) {
      assert.match(
        field(reasonSchema, `x${bad}y`) ?? '',
        /^must not contain control characters \(found U\+[0-9A-F]{4}\)$/,
        JSON.stringify(bad),
      );
      assert.ok(field(actorSchema, `x${bad}y`), JSON.stringify(bad));
      assert.ok(field(nameSchema, `x${bad}y`), JSON.stringify(bad));
    }
    for (const good of ['left the company', 'Zoë’s 🧑‍💻 laptop', '退職しました', 'מחק את המפתח']) {
      assert.equal(parseInput(reasonSchema, good, 'reason'), good);
    }
    assert.equal(parseInput(reasonSchema, '  trailing newline\n', 'reason'), 'trailing newline');
  });

  it('should read TOKENWARDEN_MAX_TTL, bounded itself, and a master key from a file', () => {
    const base = { DATABASE_URL: 'postgres://x/y', TOKENWARDEN_DATA_DIR: '/nonexistent' };
    assert.equal(loadSettings(base).maxTtlMs, year);
    assert.equal(loadSettings({ ...base, TOKENWARDEN_MAX_TTL: '30d' }).maxTtlMs, 30 * 86_400_000);
    assert.equal(loadSettings({ ...base, TOKENWARDEN_MAX_TTL: '3650d' }).maxTtlMs, 3650 * 86_400_000);
    assert.throws(
      () => loadSettings({ ...base, TOKENWARDEN_MAX_TTL: '3651d' }),
      (e: unknown) => e instanceof ConfigError && /TOKENWARDEN_MAX_TTL must be at most 3650d/.test(e.message),
    );
    const dir = mkdtempSync(path.join(os.tmpdir(), 'tokenwarden-key-'));
    try {
      const key = randomBytes(32);
      writeFileSync(path.join(dir, 'key'), `${key.toString('base64')}\n`);
      writeFileSync(path.join(dir, 'short'), randomBytes(16).toString('base64'));
      const s = loadSettings({ ...base, TOKENWARDEN_MASTER_KEY_FILE: path.join(dir, 'key') });
      assert.deepEqual(s.masterKey, key);
      assert.throws(
        () => loadSettings({ ...base, TOKENWARDEN_MASTER_KEY_FILE: path.join(dir, 'short') }),
        (e: unknown) =>
          e instanceof ConfigError && /must be 32 bytes/.test(e.message) && !e.message.includes('base64,'),
      );
      assert.throws(
        () => loadSettings({ ...base, TOKENWARDEN_MASTER_KEY_FILE: path.join(dir, 'missing') }),
        (e: unknown) => e instanceof ConfigError && /TOKENWARDEN_MASTER_KEY_FILE: cannot read/.test(e.message),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('should read TOKENWARDEN_EXPIRY_SWEEP_INTERVAL within what a timer can hold', () => {
    const base = { DATABASE_URL: 'postgres://x/y', TOKENWARDEN_DATA_DIR: '/nonexistent' };
    assert.equal(loadSettings(base).expirySweepIntervalMs, 1_000);
    assert.equal(loadSettings({ ...base, TOKENWARDEN_EXPIRY_SWEEP_INTERVAL: '250ms' }).expirySweepIntervalMs, 250);
    for (const bad of ['30d', '10ms', 'often']) {
      assert.throws(
        () => loadSettings({ ...base, TOKENWARDEN_EXPIRY_SWEEP_INTERVAL: bad }),
        (e: unknown) => e instanceof ConfigError && /TOKENWARDEN_EXPIRY_SWEEP_INTERVAL/.test(e.message),
        bad,
      );
    }
  });

  it('should print a duration the way people write it', () => {
    assert.equal(formatDuration(year), '365d');
    assert.equal(formatDuration(14 * 86_400_000), '2w');
    assert.equal(formatDuration(3_600_000), '1h');
    assert.equal(formatDuration(1500), '1500ms');
  });
});

describe('listen addresses', () => {
  it('should count only localhost, 127.0.0.0/8 and ::1 as loopback', async () => {
    const { isLoopbackHost } = await import('../common/addresses.js');
    for (const host of ['localhost', '127.0.0.1', '127.8.9.10', '::1']) assert.equal(isLoopbackHost(host), true, host);
    for (const host of ['0.0.0.0', '::', '10.0.0.1', 'example.com', '128.0.0.1', '::ffff:10.0.0.1']) {
      assert.equal(isLoopbackHost(host), false, host);
    }
  });
});

describe('email addresses in reasons', () => {
  // Quadratic backtracking here would wedge a token: the workflow's validators run it on whatever a
  // raw Update carries. A 200 KB text took minutes with the unbounded pattern; it must take moments.
  it('should find an address, and scan a long text without one in linear time', { timeout: 20_000 }, () => {
    assert.equal(EMAIL_ADDRESS.test('asked by jane.doe@example.com'), true);
    assert.equal(EMAIL_ADDRESS.test('asked by usr_8f3a21 (ticket 4411)'), false);
    for (const text of ['a'.repeat(200_000) + '@', 'a@' + 'a.'.repeat(100_000) + '1', 'x@' + 'a-'.repeat(100_000)]) {
      assert.equal(EMAIL_ADDRESS.test(text), false);
      assert.equal(reasonSchema.safeParse(text).success, false, 'refused (too long), without hanging');
    }
  });
});

describe('raw Signal reasons: masked, then cut', () => {
  it('should mask addresses before cutting, so a reason stays within 500 and no address is cut in half', () => {
    const many = parseRevokeSignal({ reason: 'a@b.cc '.repeat(70).trim() });
    assert.ok([...many.reason].length <= 500, `${[...many.reason].length} code points`);
    assert.match(many.reason, /^\[an email address\] \[an email address\]/);
    // Cut first, the 500th code point fell inside the address: its local part was kept unmasked.
    const straddling = parseRevokeSignal({ reason: `${'x'.repeat(490)} jane.doe@example.com` });
    assert.doesNotMatch(straddling.reason, /jane/);
    assert.ok([...straddling.reason].length <= 500);
    const report = parseSuspiciousReport({ reason: `${'y'.repeat(490)} jane.doe@example.com` });
    assert.doesNotMatch(report.reason, /jane/);
  });

  it('should keep the old reading for a Signal received before the masked-reasons patch (replay)', () => {
    const reason = `${'x'.repeat(490)} jane.doe@example.com and more`;
    assert.equal(parseRevokeSignal({ reason }, false).reason, reason.slice(0, 500));
    assert.equal(
      parseSuspiciousReport({ reason: 'ask jane.doe@example.com' }, false).reason,
      'ask jane.doe@example.com',
    );
    assert.equal(parseSuspiciousReport({ reason: 'ask jane.doe@example.com' }).reason, 'ask [an email address]');
  });
});

describe('operator text in current details', () => {
  const input: TokenWorkflowInput = {
    version: 1,
    tokenId: 'tok_md',
    subject: 'usr_md',
    receivers: ['crm'],
    expiresAt: '2026-01-01T01:00:00.000Z',
    revocationEventId: 'evt_md',
  };
  const image = '![x](https://attacker.example/p.png)';
  const unescaped = /!\[x\]\(https/;

  it('should show markdown in reasons, actors and receiver answers as text, never as an image or link', () => {
    const state = new LifecycleState(input);
    state.revokeRequested({ reason: `left ${image}`, actor: `<img src=x>${image}` });
    state.killing('revoke');
    assert.doesNotMatch(state.details(), unescaped);
    assert.doesNotMatch(state.details(), /(?<!\\)<img/);
    state.timingKnown({ escalateAfterMs: 60_000, retryInitialMs: 1_000, retryMaxMs: 10_000, source: 'worker' });
    state.killed(
      {
        status: 'revoked',
        propagation: 'pending',
        revokedAt: '2026-01-01T00:00:00.000Z',
        revokedBy: `ops:${image}`,
        revokeReason: `left ${image}`,
      },
      Date.parse('2026-01-01T00:00:01.000Z'),
    );
    state.deliveryObserved({
      receiverId: 'crm',
      eventId: 'evt_md',
      status: 'pending',
      attempts: 1,
      lastStatusCode: 400,
      lastError: `HTTP 400: ${image}`,
    });
    assert.doesNotMatch(state.details(), unescaped);
    assert.match(state.details(), /HTTP 400: \\!\\\[x\\\]\(https:\/\/attacker\.example\/p\.png\)/);
    state.forcedComplete(['crm'], { actor: `ops:${image}`, reason: `gone\n# ${image}` });
    state.completed('complete');
    const details = state.details();
    assert.doesNotMatch(details, unescaped);
    assert.match(details, /forced by ops:\\!\\\[x\\\]\(https:\/\/attacker\.example\/p\.png\) \(gone # \\!\\\[x/);
  });
});

describe('workflow refusals of Updates, by failure type', () => {
  const refused = (message: string, type: string) =>
    updateRefusal(
      new WorkflowUpdateFailedError('Workflow Update failed', ApplicationFailure.nonRetryable(message, type)),
      {
        tokenId: 'tok_1',
        kind: 'retry',
        fields: { reason: 'reason', actor: 'actor', request: 'request' },
      },
    );

  it('should name the field of a validator refusal, and make a state refusal a conflict', () => {
    const field = refused('reason: a non-empty reason is required', INVALID_OPERATOR_REQUEST);
    assert.ok(field instanceof InvalidInputError, String(field));
    assert.deepEqual(field.fields, [{ path: 'reason', message: 'a non-empty reason is required' }]);
    const undecodable = refused(
      'request: the payload could not be decoded (encoding binary/encrypted)',
      INVALID_OPERATOR_REQUEST,
    );
    assert.ok(undecodable instanceof InvalidInputError);
    assert.equal(undecodable.fields[0]?.path, 'request');
    const lifecycle = refused('reason: too long', INVALID_LIFECYCLE_REQUEST);
    assert.ok(lifecycle instanceof InvalidInputError);

    const notPropagating = refused('token tok_1 is not propagating a revocation (phase active)', NOT_PROPAGATING);
    assert.ok(notPropagating instanceof NotPropagatingError, String(notPropagating));
    assert.ok(notPropagating instanceof TokenStateConflictError);
    assert.equal(notPropagating.tokenId, 'tok_1');
    const notActive = refused('token tok_1 is not active (phase killing)', TOKEN_NOT_ACTIVE);
    assert.ok(notActive instanceof TokenNotActiveError, String(notActive));
    assert.ok(notActive instanceof TokenStateConflictError);
    // A run started by an earlier release cannot take the request: the token's state, not the caller's input.
    const tooOld = refused(runPredatesRequest('rotate').message, RUN_PREDATES_REQUEST);
    assert.ok(tooOld instanceof TokenStateConflictError, String(tooOld));
    assert.equal(tooOld.tokenId, 'tok_1');
    assert.equal(
      tooOld.message,
      'token tok_1: its workflow run was started by an earlier release and cannot take this request (retry); it still expires and can be revoked',
    );
  });

  it('should leave a failure of the handler itself to the caller, not call it bad input', () => {
    assert.equal(refused('activity failed', 'PostgresError'), undefined);
    const untyped = new WorkflowUpdateFailedError('Workflow Update failed', new Error('workflow completed'));
    assert.equal(updateRefusal(untyped, { tokenId: 'tok_1', kind: 'force', fields: {} }), undefined);
  });

  it('should answer a conflict with the token state as HTTP 409, a problem naming it', async () => {
    const app = Fastify();
    app.setErrorHandler(handleError);
    app.get('/conflict', async () => {
      throw new NotPropagatingError('tok_1', 'token tok_1 is not propagating a revocation (phase active)');
    });
    app.get('/dead', async () => {
      throw new TokenNotActiveError('tok_1', 'token tok_1 is not active');
    });
    try {
      for (const url of ['/conflict', '/dead']) {
        const answer = await app.inject({ method: 'GET', url });
        assert.equal(answer.statusCode, 409, answer.body);
        assert.equal(answer.headers['content-type'], 'application/problem+json; charset=utf-8');
        assert.equal(answer.json<{ type: string }>().type, 'urn:tokenwarden:problem:token-state-conflict');
      }
    } finally {
      await app.close();
    }
  });
});

describe('an Update aborted on a failed workflow task', () => {
  // The server's WorkflowNotReady as the SDK hands it on: a ServiceError caused by the gRPC status.
  // Not provoked against the dev server: a transient workflow-task failure cannot be caused on demand.
  const grpcError = (code: number, details: string) =>
    new ServiceError('Workflow Update failed', {
      cause: Object.assign(new Error(`${code} ${details}`), { code, details, metadata: {} }),
    });
  const aborted = () =>
    grpcError(9, 'Unable to perform workflow execution update due to unexpected workflow task failure.');

  it('should send it again, the same call, a bounded number of times', async () => {
    let calls = 0;
    const applied = await sendWithAbortRetries(async () => {
      if (++calls < UPDATE_ABORT_ATTEMPTS) throw aborted();
      return 'applied';
    }, Date.now() + 15_000);
    assert.deepEqual([applied, calls], ['applied', UPDATE_ABORT_ATTEMPTS]);

    calls = 0;
    const always = await sendWithAbortRetries(async () => {
      calls++;
      throw aborted();
    }, Date.now() + 15_000).catch((e: unknown) => e);
    assert.ok(abortedByWorkflowTaskFailure(always), String(always));
    assert.equal(calls, UPDATE_ABORT_ATTEMPTS);
  });

  it('should not resend other failures, nor past the deadline', async () => {
    for (const err of [grpcError(9, 'some other precondition'), grpcError(14, 'unavailable'), new Error('boom')]) {
      let calls = 0;
      await assert.rejects(
        sendWithAbortRetries(async () => {
          calls++;
          throw err;
        }, Date.now() + 15_000),
      );
      assert.equal(calls, 1, err.message);
    }
    let calls = 0;
    await assert.rejects(
      sendWithAbortRetries(async () => {
        calls++;
        throw aborted();
      }, Date.now() + 100),
    );
    assert.equal(calls, 1, 'no resend that would end past the deadline');
  });
});
