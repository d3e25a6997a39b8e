/**
 * Warnings before expiry on the real engine: each of the policy's warnings reaches the owner
 * exactly once, also when the workflow continues as new between them (each rotation does).
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { rotateUpdate, type TokenLifecycleResult } from '../common/messages.js';
import * as store from '../common/store/index.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { maybeRecordHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';
import { insertPolicy, isValid, newSecret, ownerFolder, startToken } from './support/self-managing.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: RunningWorker;

before(async () => {
  ctx = await TestContext.create('warnings');
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

const warningsIn = (dir: string, tokenId: string) =>
  readdirSync(dir)
    .filter((f) => f.startsWith(`${tokenId}.ntc_`))
    .map(
      (f) => JSON.parse(readFileSync(path.join(dir, f), 'utf8')) as { type: string; reason: string; deadline: string },
    );

/** `promise`, or a failure naming `what` once `ms` have passed without it settling. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe('warnings', () => {
  it('should send a warning to an owner receiver as a signed webhook, one webhook-id across retries', async () => {
    const receiver = await TestReceiver.start();
    try {
      const added = await ctx.warden.addReceiver({ id: 'owner-hook', url: receiver.url });
      receiver.secret = added.secret;
      // The first attempt fails: the retried send carries the same webhook-id.
      receiver.behaviour = (n) => ({ status: n === 1 ? 503 : 204 });
      const policy = await insertPolicy(ctx, {
        name: 'warn-by-webhook',
        warnBeforeMs: [2_000],
        ownerReceiverId: 'owner-hook',
      });
      const t = await startToken(ctx, { ttlMs: 4_000, policy });
      const done = (await t.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'expired');
      const posts = receiver.requests.filter((r) => r.body.includes(t.tokenId));
      assert.equal(posts.length, 2, 'one failed attempt, one retry');
      assert.ok(
        posts.every((r) => r.verified),
        'signed with the owner receiver key',
      );
      assert.equal(new Set(posts.map((r) => r.headers['webhook-id'])).size, 1);
      const body = JSON.parse(posts[1]!.body) as { type: string; reason: string };
      assert.equal(body.type, 'token.expiring');
      assert.equal(body.reason, 'expiry');
      const notices = await ctx.sql.query('SELECT key FROM notice WHERE token_id = $1', [t.tokenId]);
      assert.equal(notices.rows.length, 1);
    } finally {
      await receiver.close();
    }
  });

  it('should drop a warning the owner receiver refuses, and still expire', async () => {
    const receiver = await TestReceiver.start();
    try {
      const added = await ctx.warden.addReceiver({ id: 'owner-refusing', url: receiver.url });
      receiver.secret = added.secret;
      receiver.behaviour = () => ({ status: 400 });
      const policy = await insertPolicy(ctx, {
        name: 'warn-refused',
        warnBeforeMs: [1_500],
        ownerReceiverId: 'owner-refusing',
      });
      const t = await startToken(ctx, { ttlMs: 3_000, policy });
      const done = (await t.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'expired');
      assert.equal(receiver.requests.filter((r) => r.body.includes(t.tokenId)).length, 1, 'a refusal is not retried');
    } finally {
      await receiver.close();
    }
  });

  it('should revoke and tell the receivers while the owner destination is down (warning due)', async () => {
    const owner = await TestReceiver.start();
    const svc = await TestReceiver.start();
    try {
      owner.secret = (await ctx.warden.addReceiver({ id: 'owner-down-warn', url: owner.url })).secret;
      svc.secret = (await ctx.warden.addReceiver({ id: 'svc-owner-down-warn', url: svc.url })).secret;
      owner.behaviour = () => ({ status: 503 });
      const policy = await insertPolicy(ctx, {
        name: 'warn-owner-down',
        warnBeforeMs: [59_000],
        ownerReceiverId: 'owner-down-warn',
      });
      const t = await startToken(ctx, { ttlMs: 60_000, policy, receivers: ['svc-owner-down-warn'] });
      const ownerPosts = () => owner.requests.filter((r) => r.body.includes(t.tokenId)).length;
      await waitUntil(() => ownerPosts() >= 2, 'the owner answering 503 twice');
      await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'leaked', actor: 'test' });
      await waitUntil(
        () => svc.requests.some((r) => r.body.includes(t.tokenId)),
        'the revocation at the service receiver while the owner is down',
        10_000,
      );
      const done = (await t.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'revoked');
      await maybeRecordHistory(t.handle, 'owner-down-warning-revoke');
    } finally {
      await owner.close();
      await svc.close();
    }
  });

  it('should revoke and tell the receivers while the owner destination is down (rotation due)', async () => {
    const owner = await TestReceiver.start();
    const svc = await TestReceiver.start();
    try {
      owner.secret = (await ctx.warden.addReceiver({ id: 'owner-down-rot', url: owner.url })).secret;
      svc.secret = (await ctx.warden.addReceiver({ id: 'svc-owner-down-rot', url: svc.url })).secret;
      owner.behaviour = () => ({ status: 503 });
      const policy = await insertPolicy(ctx, {
        name: 'rotate-owner-down',
        rotateEveryMs: 300,
        graceMs: 100,
        ownerReceiverId: 'owner-down-rot',
      });
      const t = await startToken(ctx, { ttlMs: 60_000, policy, receivers: ['svc-owner-down-rot'] });
      const ownerPosts = () => owner.requests.filter((r) => r.body.includes(t.tokenId)).length;
      // Four attempts: the rotation's next retry is 8 s away, longer than the revocation may take.
      await waitUntil(() => ownerPosts() >= 4, 'the owner answering 503 four times');
      await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'leaked', actor: 'test' });
      await waitUntil(
        () => svc.requests.some((r) => r.body.includes(t.tokenId)),
        'the revocation at the service receiver while the owner is down',
        5_000,
      );
      const done = (await t.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'revoked');
    } finally {
      await owner.close();
      await svc.close();
    }
  });

  it('should expire on time while the owner destination is down', async () => {
    const owner = await TestReceiver.start();
    try {
      owner.secret = (await ctx.warden.addReceiver({ id: 'owner-down-expiry', url: owner.url })).secret;
      owner.behaviour = () => ({ status: 503 });
      const policy = await insertPolicy(ctx, {
        name: 'warn-owner-down-expiry',
        warnBeforeMs: [2_500],
        ownerReceiverId: 'owner-down-expiry',
      });
      const t = await startToken(ctx, { ttlMs: 3_000, policy });
      const done = await within(
        t.handle.result() as Promise<TokenLifecycleResult>,
        10_000,
        'the expiry while the owner is down',
      );
      assert.equal(done.status, 'expired');
    } finally {
      await owner.close();
    }
  });

  it('should answer a manual rotate at once while a periodic rotation waits on a down owner', async () => {
    const owner = await TestReceiver.start();
    try {
      owner.secret = (await ctx.warden.addReceiver({ id: 'owner-down-manual', url: owner.url })).secret;
      owner.behaviour = () => ({ status: 503 });
      const policy = await insertPolicy(ctx, {
        name: 'rotate-owner-down-manual',
        rotateEveryMs: 300,
        graceMs: 100,
        ownerReceiverId: 'owner-down-manual',
      });
      const t = await startToken(ctx, { ttlMs: 60_000, policy });
      await waitUntil(
        () => owner.requests.filter((r) => r.body.includes(t.tokenId)).length >= 2,
        'the owner answering 503 twice',
      );
      const fresh = newSecret();
      const rotated = await within(
        retriedUpdate(t.handle, rotateUpdate, {
          args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 0 }],
        }),
        8_000,
        'the manual rotation answered',
      );
      assert.equal(rotated.credentialId, fresh.credentialId);
      assert.equal(await isValid(ctx, fresh.token), true);
      await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'test over', actor: 'test' });
      assert.equal(((await t.handle.result()) as TokenLifecycleResult).status, 'revoked');
    } finally {
      await owner.close();
    }
  });

  it('should send each warning before expiry exactly once', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, { name: 'warn-twice', warnBeforeMs: [4_000, 2_000], ownerDir: dir });
    const t = await startToken(ctx, { ttlMs: 6_000, policy });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
    const warnings = warningsIn(dir, t.tokenId);
    assert.equal(warnings.length, 2);
    const row = await store.requireToken(ctx.pool, t.tokenId);
    for (const w of warnings) {
      assert.equal(w.type, 'token.expiring');
      assert.equal(w.reason, 'expiry');
      assert.equal(Date.parse(w.deadline), Date.parse(row.expiresAt));
    }
    const notices = await ctx.sql.query('SELECT key FROM notice WHERE token_id = $1 ORDER BY key', [t.tokenId]);
    assert.equal(notices.rows.length, 2);
    const audited = (await store.readAudit(ctx.pool, t.tokenId)).filter((e) => e.kind === 'notice.sent');
    assert.equal(audited.length, 2);
    await maybeRecordHistory(t.handle, 'warnings-expire');
  });

  it('should send each warning once across continue-as-new', async () => {
    const dir = ownerFolder();
    // Rotating every 700 ms: the workflow continues as new after each rotation, between the warnings.
    const policy = await insertPolicy(ctx, {
      name: 'warn-rotating',
      warnBeforeMs: [4_000, 2_000],
      rotateEveryMs: 700,
      graceMs: 100,
      ownerDir: dir,
    });
    const t = await startToken(ctx, { ttlMs: 6_000, policy });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'expired');
    assert.equal(warningsIn(dir, t.tokenId).length, 2);
    const rotations = readdirSync(dir).filter((f) => f.startsWith(`${t.tokenId}.cred_`)).length;
    assert.ok(rotations >= 3, `rotated ${rotations} times`);
    const runs = await ctx.sql.query('SELECT count(*)::int AS n FROM notice WHERE token_id = $1', [t.tokenId]);
    assert.equal(runs.rows[0].n, 2);
  });
});
