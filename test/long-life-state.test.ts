/**
 * The alive phase's pure decisions (workflows/lifecycle-state.ts, AliveState and the validators of
 * the self-managing Updates), without Temporal.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ApplicationFailure } from '@temporalio/common';
import type { PolicySnapshot } from '../common/messages.js';
import {
  AliveState,
  INVALID_LIFECYCLE_REQUEST,
  LifecycleState,
  MAX_TTL_CEILING_MS,
  parseSuspiciousReport,
  validateChangeExpiryRequest,
  validateRotateRequest,
  validateScheduleRevokeRequest,
  validateSuspendRequest,
  warningKey,
} from '../workflows/lifecycle-state.js';

const T0 = Date.parse('2030-01-01T00:00:00.000Z');
const iso = (ms: number) => new Date(ms).toISOString();
const MIN = 60_000;

const policy = (p: Partial<PolicySnapshot> = {}): PolicySnapshot => ({
  name: 'p',
  version: 1,
  maxLifetimeMs: null,
  idleTimeoutMs: null,
  rotateEveryMs: null,
  graceMs: 5 * MIN,
  warnBeforeMs: [],
  allowedScopes: null,
  onSuspicious: 'revoke',
  hasOwnerDestination: true,
  ...p,
});

const refusedOn = (field: string) => (err: unknown) =>
  err instanceof ApplicationFailure &&
  err.nonRetryable &&
  err.type === INVALID_LIFECYCLE_REQUEST &&
  err.message.startsWith(`${field}:`);

describe('alive phase deadlines', () => {
  it('should sleep until expiry when the token has no policy', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 60 * MIN) }, T0);
    assert.deepEqual(alive.next(T0), { kind: 'expiry', atMs: T0 + 60 * MIN });
    assert.equal(alive.due(T0), undefined);
    assert.deepEqual(alive.due(T0 + 60 * MIN), { kind: 'expiry', atMs: T0 + 60 * MIN });
  });

  it('should arm rotation and an immediate idle check from the policy', () => {
    const alive = new AliveState(
      { expiresAt: iso(T0 + 600 * MIN), policy: policy({ rotateEveryMs: 30 * MIN, idleTimeoutMs: 60 * MIN }) },
      T0,
    );
    assert.equal(alive.due(T0)?.kind, 'idleCheck');
    // Used 10 minutes ago: the idle deadline is 50 minutes ahead; the rotation comes first.
    assert.equal(alive.idleChecked(iso(T0 - 10 * MIN), T0), false);
    assert.equal(alive.carried.idleCheckAt, iso(T0 + 50 * MIN));
    assert.deepEqual(alive.next(T0), { kind: 'rotate', atMs: T0 + 30 * MIN });
  });

  it('should say revoke when the last activity is older than the idle timeout', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 600 * MIN), policy: policy({ idleTimeoutMs: 60 * MIN }) }, T0);
    assert.equal(alive.idleChecked(iso(T0 - 61 * MIN), T0), true);
  });

  it('should put the previous credential in grace after a rotation and end it at validUntil', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 600 * MIN), policy: policy({ rotateEveryMs: 30 * MIN }) }, T0);
    alive.rotated(
      {
        credentialId: 'cred_new00000',
        previousCredentialId: 'cred_old00000',
        previousValidUntil: iso(T0 + 5 * MIN),
        revoked: [],
      },
      T0,
    );
    assert.deepEqual(alive.next(T0), { kind: 'graceEnd', atMs: T0 + 5 * MIN, credentialId: 'cred_old00000' });
    assert.equal(alive.carried.rotations, 1);
    assert.equal(alive.nextRotationId('tok_1'), 'tok_1:rot:2');
    alive.graceEnded('cred_old00000', [{ credentialId: 'cred_old00000', eventId: 'evt_1' }]);
    assert.equal(alive.carried.previous, null);
    assert.deepEqual(alive.carried.credentialRevocations, [{ credentialId: 'cred_old00000', eventId: 'evt_1' }]);
    assert.deepEqual(alive.next(T0), { kind: 'rotate', atMs: T0 + 30 * MIN });
    alive.credentialRevocationSettled('evt_1');
    assert.deepEqual(alive.carried.credentialRevocations, []);
  });

  it('should fire a scheduled revoke before expiry, and not after it is cancelled', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 600 * MIN) }, T0);
    const changes = alive.changes;
    alive.revokeScheduled({ at: iso(T0 + 10 * MIN), reason: 'offboarding', actor: 'alice' });
    assert.notEqual(alive.changes, changes, 'the sleep wakes');
    assert.deepEqual(alive.due(T0 + 10 * MIN), { kind: 'scheduledRevoke', atMs: T0 + 10 * MIN });
    alive.revokeScheduled(null);
    assert.equal(alive.next(T0).kind, 'expiry');
  });

  it('should move the expiry deadline when the expiry changes', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 60 * MIN) }, T0);
    alive.expiryChanged(iso(T0 + 120 * MIN));
    assert.deepEqual(alive.next(T0), { kind: 'expiry', atMs: T0 + 120 * MIN });
  });

  it('should send each warning once, the nearest only when several are due at once', () => {
    const alive = new AliveState(
      { expiresAt: iso(T0 + 60 * MIN), policy: policy({ warnBeforeMs: [120 * MIN, 30 * MIN, 10 * MIN] }) },
      T0,
    );
    const expiry = iso(T0 + 60 * MIN);
    const first = alive.due(T0);
    assert.ok(first?.kind === 'warning');
    assert.equal(first.key, warningKey('expiry', expiry, 120 * MIN));
    alive.warningSent(first);
    const second = alive.next(T0);
    assert.ok(second.kind === 'warning');
    assert.equal(second.atMs, T0 + 30 * MIN);
    // Late (a worker was down): the 30 and 10 min warnings are both due; only the 10 min one is sent.
    const late = alive.due(T0 + 55 * MIN);
    assert.ok(late?.kind === 'warning');
    assert.equal(late.beforeMs, 10 * MIN);
    assert.deepEqual(late.superseded, [warningKey('expiry', expiry, 30 * MIN)]);
    alive.warningSent(late);
    assert.equal(alive.next(T0 + 55 * MIN).kind, 'expiry');
  });

  it('should send no inactivity warning to a token used every day, whatever the warnings', () => {
    const DAY = 86_400_000;
    const idle = policy({ idleTimeoutMs: 30 * DAY, warnBeforeMs: [30 * DAY, 7 * DAY, DAY] });
    const a = new AliveState({ expiresAt: iso(T0 + 365 * DAY), policy: idle }, T0);
    a.skipIdleWarningsBeyondTimeout = true;
    const lastUse = (now: number) => iso(Math.floor(now / DAY) * DAY);
    const sent: string[] = [];
    let now = T0;
    for (let step = 0; step < 2_000 && now < T0 + 200 * DAY; step++) {
      const due = a.due(now);
      if (!due) {
        now = a.next(now).atMs;
        continue;
      }
      if (due.kind === 'idleCheck') {
        assert.equal(a.idleChecked(lastUse(now), now), false, 'a token in use is never idle');
        continue;
      }
      assert.equal(due.kind, 'warning');
      if (due.kind !== 'warning') break;
      if (due.reason === 'inactivity') {
        // The workflow re-reads the last use first, as before any inactivity warning.
        a.idleChecked(lastUse(now), now);
        if (a.carried.idleCheckAt !== due.deadline) continue;
        sent.push(due.key);
      }
      a.warningSent(due);
    }
    assert.ok(now >= T0 + 200 * DAY, 'simulated 200 days');
    assert.deepEqual(sent, []);
  });

  it('should carry the sent warnings across continue-as-new', () => {
    const input = { expiresAt: iso(T0 + 60 * MIN), policy: policy({ warnBeforeMs: [30 * MIN] }) };
    const alive = new AliveState(input, T0);
    const w = alive.due(T0 + 31 * MIN);
    assert.ok(w?.kind === 'warning');
    alive.warningSent(w);
    const next = new AliveState({ ...input, carried: alive.toCarried() }, T0 + 31 * MIN);
    assert.equal(next.next(T0 + 31 * MIN).kind, 'expiry');
  });

  it('should warn again for a new deadline after an extension, forgetting the old keys', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 60 * MIN), policy: policy({ warnBeforeMs: [30 * MIN] }) }, T0);
    const w = alive.due(T0 + 40 * MIN);
    assert.ok(w?.kind === 'warning');
    alive.warningSent(w);
    alive.expiryChanged(iso(T0 + 120 * MIN));
    assert.deepEqual(alive.carried.warningsSent, []);
    const again = alive.next(T0 + 40 * MIN);
    assert.ok(again.kind === 'warning');
    assert.equal(again.atMs, T0 + 90 * MIN);
  });

  it('should let expiry win a tie', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 10 * MIN) }, T0);
    alive.revokeScheduled({ at: iso(T0 + 10 * MIN), reason: 'r', actor: 'a' });
    assert.equal(alive.due(T0 + 10 * MIN)?.kind, 'expiry');
  });

  it('should rearm the deadlines of a changed policy', () => {
    const alive = new AliveState({ expiresAt: iso(T0 + 600 * MIN) }, T0);
    alive.policyChanged(policy({ rotateEveryMs: 5 * MIN }), T0 + MIN);
    assert.deepEqual(alive.next(T0 + MIN), { kind: 'rotate', atMs: T0 + 6 * MIN });
    alive.policyChanged(undefined, T0 + 2 * MIN);
    assert.equal(alive.next(T0 + 2 * MIN).kind, 'expiry');
  });
});

describe('the workflow revokes by itself', () => {
  it('should take the first revoke and keep its reason and initiating entity', () => {
    const state = new LifecycleState({
      version: 1,
      tokenId: 'tok_1',
      subject: 's',
      receivers: [],
      expiresAt: iso(T0),
      revocationEventId: 'evt_x',
    });
    state.systemRevoke({ reason: 'inactive', actor: 'system:inactivity', initiatingEntity: 'system' });
    state.systemRevoke({ reason: 'policy', actor: 'x', initiatingEntity: 'policy' });
    assert.deepEqual(state.revokeRequest, {
      reason: 'inactive',
      actor: 'system:inactivity',
      initiatingEntity: 'system',
      malformed: false,
    });
  });
});

describe('self-managing Update validators', () => {
  const hash = 'a'.repeat(64);
  it('should accept a well-formed rotate and refuse each bad field by name', () => {
    validateRotateRequest({ credentialId: 'cred_0123456789abcdef', secretHash: hash });
    assert.throws(() => validateRotateRequest({ credentialId: 'x', secretHash: hash }), refusedOn('credentialId'));
    assert.throws(
      () => validateRotateRequest({ credentialId: 'cred_0123456789abcdef', secretHash: 'tw_secret' }),
      refusedOn('secretHash'),
    );
    assert.throws(
      () => validateRotateRequest({ credentialId: 'cred_0123456789abcdef', secretHash: hash, graceMs: -1 }),
      refusedOn('graceMs'),
    );
    assert.throws(() => validateRotateRequest(undefined), refusedOn('credentialId'));
  });

  it('should never quote a secret sent by mistake in the refusal', () => {
    const secret = 'tw_' + 'A'.repeat(43) + '_abcdef';
    assert.throws(
      () => validateRotateRequest({ credentialId: 'cred_0123456789abcdef', secretHash: secret }),
      (err: Error) => !err.message.includes(secret),
    );
  });

  it('should refuse a suspend without a reason', () => {
    validateSuspendRequest({ reason: 'incident' });
    assert.throws(() => validateSuspendRequest({ reason: ' ' }), refusedOn('reason'));
    assert.throws(() => validateSuspendRequest({ reason: 'x', actor: 3 }), refusedOn('actor'));
  });

  it('should refuse a scheduled revoke in the past or unparseable', () => {
    validateScheduleRevokeRequest({ at: iso(T0 + MIN), reason: 'leaving' }, T0);
    assert.throws(() => validateScheduleRevokeRequest({ at: iso(T0 - MIN), reason: 'r' }, T0), refusedOn('at'));
    assert.throws(() => validateScheduleRevokeRequest({ at: 'tomorrow', reason: 'r' }, T0), refusedOn('at'));
    assert.throws(() => validateScheduleRevokeRequest({ at: iso(T0 + MIN) }, T0), refusedOn('reason'));
  });

  it('should refuse a changeExpiry with a bad ttl or mode', () => {
    validateChangeExpiryRequest({ ttlMs: MIN, mode: 'extend', reason: 'r' });
    assert.throws(() => validateChangeExpiryRequest({ ttlMs: 0, mode: 'extend', reason: 'r' }), refusedOn('ttl'));
    assert.throws(() => validateChangeExpiryRequest({ ttlMs: 1.5, mode: 'extend', reason: 'r' }), refusedOn('ttl'));
    // Beyond PostgreSQL's interval: refused here, never an activity that retries for ever.
    assert.throws(() => validateChangeExpiryRequest({ ttlMs: 1e17, mode: 'extend', reason: 'r' }), refusedOn('ttl'));
    validateChangeExpiryRequest({ ttlMs: MAX_TTL_CEILING_MS, mode: 'extend', reason: 'r' });
    assert.throws(() => validateChangeExpiryRequest({ ttlMs: MIN, mode: 'longer', reason: 'r' }), refusedOn('mode'));
  });

  it('should act on a malformed suspicious report and bound its evidence', () => {
    assert.deepEqual(parseSuspiciousReport(undefined), {
      reason: 'unspecified',
      actor: 'unknown (via Temporal signal)',
      reportId: undefined,
      evidence: null,
      malformed: true,
    });
    const big = parseSuspiciousReport({ reason: 'r', evidence: { blob: 'x'.repeat(10_000) } });
    assert.deepEqual(big.evidence, { truncated: true, bytes: 10_011 });
  });

  it('should redact secret-shaped strings of a suspicious report that came by raw Signal', () => {
    const token = `tw_${'a'.repeat(43)}_${'b'.repeat(6)}`;
    const report = parseSuspiciousReport({
      reason: `seen ${token}`,
      actor: 'xoxb-0123456789-abcdef',
      reportId: token,
      evidence: { headers: [`Bearer ${token}`, 'ok'], n: 1.5 },
    });
    assert.equal(report.reason, '[redacted: a tokenwarden token]');
    assert.equal(report.actor, '[redacted: a Slack token]');
    assert.equal(report.reportId, undefined, 'a secret-shaped report id is dropped (it becomes an audit key)');
    assert.deepEqual(report.evidence, { headers: ['[redacted: a tokenwarden token]', 'ok'], n: '1.5' });
  });
});
