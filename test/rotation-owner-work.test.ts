/**
 * Rotations against an owner that is slow or failing, on the real engine: a manual rotate whose
 * activity is retried after it committed is still recorded; a periodic rotation cancelled while its
 * secret is on the way to the owner is promoted, never left pending; a suspicious report does not
 * wait behind a periodic rotation that cannot deliver: it revokes.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure, Context } from '@temporalio/activity';
import { sendToOwner, type OwnerDeps } from '../activities/owner.js';
import {
  changeExpiryUpdate,
  describeQuery,
  reportSuspiciousSignal,
  rotateUpdate,
  scheduleRevokeUpdate,
} from '../common/messages.js';
import * as store from '../common/store/index.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { maybeRecordHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { insertPolicy, isValid, newSecret, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: RunningWorker;
const receivers: TestReceiver[] = [];
/** Tokens whose manual rotate loses its first attempt's result after the store committed it. */
const loseFirstRotateResult = new Set<string>();
/** Tokens whose automatic rotation attempt has learned of the workflow's cancellation. */
const cancellationSeen = new Set<string>();
/** Tokens whose manual rotate waits for the test before it reaches the store. */
const heldRotates = new Map<string, Promise<void>>();
/**
 * Tokens whose extend answers late: after the store committed it, the answer waits until a later
 * change of the same token has committed too (or 3 s, when none can start while it is unanswered).
 */
const lateExtends = new Set<string>();
const expiryChangesStarted = new Map<string, number>();
const expiryChangesCommitted = new Map<string, number>();

before(async () => {
  ctx = await TestContext.create('rotation-owner-work');
  worker = await ctx.startWorker(ctx.settings, {
    // A cancellation reaches a heartbeating attempt within half a second.
    maxHeartbeatThrottleMs: 500,
    wrapActivities: (real) => ({
      ...real,
      rotateCredential: async (input) => {
        const gate = heldRotates.get(input.tokenId);
        if (gate) {
          // An attempt that timed out while held is abandoned: only the live attempt reaches the store.
          const { cancellationSignal } = Context.current();
          await Promise.race([
            gate,
            new Promise((_, reject) =>
              cancellationSignal.addEventListener('abort', () => reject(new Error('attempt abandoned')), {
                once: true,
              }),
            ),
          ]);
        }
        const result = await real.rotateCredential(input);
        if (loseFirstRotateResult.delete(input.tokenId)) throw new Error('the worker lost the committed result');
        return result;
      },
      changeExpiry: async (input) => {
        expiryChangesStarted.set(input.tokenId, (expiryChangesStarted.get(input.tokenId) ?? 0) + 1);
        const result = await real.changeExpiry(input);
        const n = (expiryChangesCommitted.get(input.tokenId) ?? 0) + 1;
        expiryChangesCommitted.set(input.tokenId, n);
        if (input.mode === 'extend' && lateExtends.has(input.tokenId)) {
          const laterCommitted = () => (expiryChangesCommitted.get(input.tokenId) ?? 0) > n;
          await waitUntil(laterCommitted, 'a later expiry change', 3_000).catch(() => undefined);
        }
        return result;
      },
      rotateAutomatically: async (input) => {
        Context.current().cancellationSignal.addEventListener('abort', () => cancellationSeen.add(input.tokenId));
        return real.rotateAutomatically(input);
      },
    }),
  });
});
after(async () => {
  await worker?.stop();
  for (const r of receivers) await r.close();
  await ctx?.close();
});

async function addReceiver(id: string): Promise<TestReceiver> {
  const receiver = await TestReceiver.start();
  receivers.push(receiver);
  receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
  return receiver;
}

const rotatedSecretsFor = (owner: TestReceiver, tokenId: string) =>
  owner
    .requestsFor(tokenId)
    .map((r) => JSON.parse(r.body) as { type: string; credential_id: string })
    .filter((b) => b.type === 'token.rotated');

/** A request held by the receiver until `release()`. */
function held(): { until: Promise<void>; release: () => void } {
  let release!: () => void;
  const until = new Promise<void>((resolve) => (release = resolve));
  return { until, release };
}

describe('rotations with a slow or failing owner', () => {
  it('should record a manual rotate whose activity is retried after the store committed it', async () => {
    const receiver = await addReceiver('rcv-owner-work-1');
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: ['rcv-owner-work-1'] });
    loseFirstRotateResult.add(t.tokenId);
    const fresh = newSecret();
    const answer = await retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 500 }],
    });
    assert.equal(loseFirstRotateResult.has(t.tokenId), false, 'the first attempt lost its result');
    assert.equal(answer.credentialId, fresh.credentialId);
    // The retry answered changed=false; the run still ends the old credential's grace and tells receivers.
    await waitUntil(
      () =>
        receiver.requests.some(
          (r) => r.verified && r.answered === 204 && r.body.includes(t.credentialId) && r.body.includes('revoke'),
        ),
      "the receiver told of the old credential's revocation at the end of its grace",
      20_000,
    );
    const [old] = (await store.listCredentials(ctx.pool, t.tokenId)).filter((c) => c.id === t.credentialId);
    assert.equal(old?.state, 'revoked');
    assert.equal(await isValid(ctx, fresh.token), true);
  });

  it('should promote a secret the owner received even when a manual rotate cancels its rotation mid-send', async () => {
    const owner = await addReceiver('owner-slow');
    const hold = held();
    let first = true;
    // The first secret's POST is answered only once the attempt has learned of the cancellation.
    owner.behaviour = (_n, req) => {
      if (first && req.body.includes('token.rotated')) {
        first = false;
        return { status: 204, after: hold.until };
      }
      return { status: 204 };
    };
    const policy = await insertPolicy(ctx, {
      name: 'slow-owner',
      rotateEveryMs: 2_000,
      graceMs: 60_000,
      ownerReceiverId: 'owner-slow',
    });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    await waitUntil(() => rotatedSecretsFor(owner, t.tokenId).length > 0, 'the owner receiving a secret', 20_000);
    const sending = (await t.handle.describe()).runId;
    const [received] = rotatedSecretsFor(owner, t.tokenId);
    const manual = newSecret();
    const rotated = retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: manual.credentialId, secretHash: manual.secretHash }],
    });
    await waitUntil(() => cancellationSeen.has(t.tokenId), 'the sending attempt told of the cancellation', 15_000);
    hold.release();
    await rotated;
    assert.equal(await isValid(ctx, manual.token), true);
    // Every secret the owner received was promoted (current, then previous or revoked): none is pending.
    await waitUntil(
      async () => {
        const states = new Map((await store.listCredentials(ctx.pool, t.tokenId)).map((c) => [c.id, c.state]));
        return rotatedSecretsFor(owner, t.tokenId).every((b) => states.get(b.credential_id) !== 'pending');
      },
      'no secret the owner received left pending',
      15_000,
    );
    const states = new Map((await store.listCredentials(ctx.pool, t.tokenId)).map((c) => [c.id, c.state]));
    assert.ok(['current', 'previous', 'revoked'].includes(states.get(received!.credential_id)!));
    const run = ctx.client.workflow.getHandle(t.handle.workflowId, sending);
    await waitUntil(async () => (await run.describe()).status.name !== 'RUNNING', 'the run continued as new', 20_000);
    await maybeRecordHistory(run, 'rotation-cancelled-mid-send');
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over' });
  });

  it('should revoke at once on a suspicious report when the periodic rotation fails to deliver', async () => {
    const owner = await addReceiver('owner-failing');
    const hold = held();
    // The owner is down: the rotation's POST fails, after the report arrived.
    owner.behaviour = () => ({ status: 503, after: hold.until });
    const policy = await insertPolicy(ctx, {
      name: 'failing-owner',
      rotateEveryMs: 1_000,
      graceMs: 1_000,
      onSuspicious: 'rotate',
      ownerReceiverId: 'owner-failing',
    });
    const t = await startToken(ctx, { ttlMs: 300_000, policy });
    await waitUntil(() => rotatedSecretsFor(owner, t.tokenId).length > 0, 'the periodic rotation sending', 20_000);
    await t.handle.signal(reportSuspiciousSignal, { reason: 'leaked in a log', actor: 'scanner' });
    await waitUntil(() => cancellationSeen.has(t.tokenId), 'the periodic rotation cancelled', 15_000);
    hold.release();
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, t.tokenId)).status === 'revoked',
      'the token revoked, not left valid behind the periodic rotation',
      20_000,
    );
    const kinds = (await store.readAudit(ctx.pool, t.tokenId)).map((e) => e.kind);
    assert.ok(kinds.includes('token.suspicious'), kinds.join(','));
    assert.equal(await isValid(ctx, t.token), false);
  });

  it('should kill at once on a revoke while a rotation is sending to a slow owner', async () => {
    const owner = await addReceiver('owner-stalled');
    const hold = held();
    // The owner holds the secret's POST until its 10 s timeout would end it.
    owner.behaviour = () => ({ status: 204, after: hold.until });
    const policy = await insertPolicy(ctx, {
      name: 'stalled-owner',
      rotateEveryMs: 1_000,
      ownerReceiverId: 'owner-stalled',
    });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    try {
      await waitUntil(() => rotatedSecretsFor(owner, t.tokenId).length > 0, 'the rotation sending', 20_000);
      const revokedAt = Date.now();
      await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'compromised' });
      // Well inside the send's 10 s: the kill does not wait for it.
      await waitUntil(
        async () => (await t.handle.query(describeQuery)).phase !== 'active',
        'the workflow past its alive phase',
        6_000,
      );
      assert.ok(Date.now() - revokedAt < 6_000);
    } finally {
      hold.release();
    }
  });

  it('should audit a rotation skipped because the owner destination refuses it', async () => {
    const owner = await addReceiver('owner-refusing');
    owner.behaviour = () => ({ status: 400 });
    const policy = await insertPolicy(ctx, {
      name: 'refusing-owner',
      rotateEveryMs: 1_000,
      ownerReceiverId: 'owner-refusing',
    });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    await waitUntil(
      async () => (await store.readAudit(ctx.pool, t.tokenId)).some((e) => e.kind === 'rotation.skipped'),
      'rotation.skipped in the audit trail',
      20_000,
    );
    const skipped = (await store.readAudit(ctx.pool, t.tokenId)).find((e) => e.kind === 'rotation.skipped');
    assert.match(JSON.stringify(skipped), /answered HTTP 400/);
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over' });
  });

  it('should revoke at the scheduled instant while continue-as-new waits for a handler stuck on the owner', async () => {
    const owner = await addReceiver('owner-down-drain');
    owner.behaviour = () => ({ status: 503 });
    const policy = await insertPolicy(ctx, {
      name: 'down-owner-drain',
      onSuspicious: 'rotate',
      ownerReceiverId: 'owner-down-drain',
    });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    const runBefore = (await t.handle.describe()).runId;
    const rotate = held();
    heldRotates.set(t.tokenId, rotate.until);
    const manual = newSecret();
    const rotated = retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: manual.credentialId, secretHash: manual.secretHash }],
    });
    // The report's rotation queues behind the manual one; once that one is recorded, continue-as-new
    // is due and waits for the report's handler, whose rotation retries against the down owner. The
    // report reaches the run at the held task's next heartbeat (8 s; later on a loaded machine).
    await t.handle.signal(reportSuspiciousSignal, { reason: 'leaked in a log', actor: 'scanner' });
    await waitUntil(
      async () => (await store.readAudit(ctx.pool, t.tokenId)).some((e) => e.kind === 'token.suspicious'),
      'the report audited',
      30_000,
    );
    rotate.release();
    await rotated;
    await waitUntil(
      () => owner.requestsFor(t.tokenId).length > 0,
      "the report's rotation trying the down owner",
      15_000,
    );
    // The scenario, checked: the run is draining (alive, not continued as new), held by the rotation.
    assert.equal((await t.handle.query(describeQuery)).phase, 'active');
    const draining = await t.handle.describe();
    assert.equal(draining.runId, runBefore, 'not continued as new while a handler runs');
    assert.ok(
      draining.raw.pendingActivities?.some((a) => a.activityType?.name === 'rotateAutomatically'),
      "the report's rotation still runs",
    );
    // A deadline of the token's own that only the workflow acts on (the reconciler does not), set
    // while the run drains: it must not wait for the handler.
    const scheduledAt = Date.now() + 3_000;
    await retriedUpdate(t.handle, scheduleRevokeUpdate, {
      args: [{ at: new Date(scheduledAt).toISOString(), reason: 'offboarding' }],
    });
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, t.tokenId)).status === 'revoked',
      'the token revoked at the scheduled instant',
      20_000,
    );
    const row = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal(row.revokeReason, 'offboarding');
    const revokedAt = Date.parse(row.revokedAt!);
    // The database and the test share a clock; `at` is kept to the millisecond.
    assert.ok(revokedAt >= scheduledAt - 1_000, `revoked ${scheduledAt - revokedAt} ms before the instant`);
  });
});

describe('expiry changes', () => {
  it('should adopt the expiry the store committed last when an earlier change answers late', async () => {
    const t = await startToken(ctx, { ttlMs: 60_000 });
    lateExtends.add(t.tokenId);
    const extend = retriedUpdate(t.handle, changeExpiryUpdate, {
      args: [{ ttlMs: 120_000, mode: 'extend', reason: 'more time' }],
    });
    await waitUntil(() => (expiryChangesStarted.get(t.tokenId) ?? 0) >= 1, 'the extend started', 15_000);
    // Committed after the extend in the store, whatever order the answers reach the run in.
    await waitUntil(
      async () =>
        (await store.requireToken(ctx.pool, t.tokenId)).expiresAt > new Date(Date.now() + 90_000).toISOString(),
      'the extend committed',
      15_000,
    );
    const shorten = retriedUpdate(t.handle, changeExpiryUpdate, {
      args: [{ ttlMs: 30_000, mode: 'shorten', reason: 'less time' }],
    });
    await Promise.all([extend, shorten]);
    const stored = Date.parse((await store.requireToken(ctx.pool, t.tokenId)).expiresAt);
    assert.ok(stored < Date.now() + 60_000, 'the shorten committed last');
    const adopted = Date.parse((await t.handle.query(describeQuery)).expiresAt);
    assert.equal(adopted, stored, "the run's expiry is the store's");
    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over' });
  });
});

describe('owner folders', () => {
  it('should make no folder outside the root through a symbolic link inside it', async () => {
    const root = mkdtempSync(path.join(os.tmpdir(), 'tw-root-'));
    const outside = mkdtempSync(path.join(os.tmpdir(), 'tw-outside-'));
    symlinkSync(outside, path.join(root, 'link'));
    const deps = { ownerDirRoot: root } as OwnerDeps;
    const err = await sendToOwner(
      deps,
      { kind: 'dir', dir: path.join(root, 'link', 'team', 'secrets') },
      { tokenId: 'tok_x', messageId: 'cred_x', body: '{}' },
    ).then(
      () => assert.fail('sent'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof ApplicationFailure && err.type === 'OwnerRefused', String(err));
    assert.equal(existsSync(path.join(outside, 'team')), false, 'no folder made outside the root');
  });
});
