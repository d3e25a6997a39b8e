/**
 * The verifier after rotations, against the real store: the previous credential valid in its grace
 * and never served from cache past it, reuse of a credential past its grace or revoked killing that
 * token only (once), pending credentials never valid, and the reconciler telling the workflow of a
 * token killed by reuse detection.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { createVerifier, type Verifier, type VerifierOptions } from '../client/verifier.js';
import { credentialRevocationEventId, newCredentialId } from '../common/ids.js';
import { tokenWorkflowId, WORKFLOW_TYPE } from '../common/names.js';
import type { ReconcileInput, ReconcileReport, TokenLifecycleResult } from '../common/messages.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { recordTokenUse } from '../common/store/last-use.js';
import { killReusedCredential } from '../common/store/verification.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { insertTokenRow } from './support/tokens.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker | undefined;
let receiver: TestReceiver | undefined;
const open: Array<{ close(): Promise<void> }> = [];
before(async () => {
  ctx = await TestContext.create('verifier_reuse');
});
after(async () => {
  for (const o of open.reverse()) await o.close().catch(() => {});
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

const INACTIVE = { active: false };

async function verifier(options: Partial<VerifierOptions> = {}): Promise<Verifier> {
  const v = await createVerifier({
    databaseUrl: ctx.settings.databaseUrl,
    schema: ctx.settings.databaseSchema,
    cacheTtlMs: 60_000,
    ...options,
  });
  open.push(v);
  return v;
}

/** A token row and the raw token only this test holds. */
async function newToken(subject = 'usr_reuse') {
  const token = generateTokenString();
  const record = await insertTokenRow(ctx.pool, { subject, secretHash: hashToken(token), ttlMs: 3_600_000 });
  return { token, tokenId: record.id, credentialId: (await store.listCredentials(ctx.pool, record.id))[0]!.id };
}

/** Rotates to a new raw token; the old one enters a grace of graceMs. */
async function rotate(tokenId: string, graceMs: number) {
  const token = generateTokenString();
  const rotation = await store.rotateCredential(ctx.pool, {
    tokenId,
    credentialId: newCredentialId(),
    secretHash: hashToken(token),
    graceMs,
    actor: 'admin:test',
    reason: 'test',
  });
  return { token, ...rotation };
}

/** Waits until the database clock is past a previous credential's grace. */
const pastGrace = (validUntil: string) =>
  waitUntil(
    async () => (await ctx.sql.query('SELECT now() > $1::timestamptz AS past', [validUntil])).rows[0].past as boolean,
    'the grace over on the database clock',
    10_000,
  );

describe('the previous credential', () => {
  it('should verify inside its grace, never from cache past it, and be reuse after it', async () => {
    const reused: string[] = [];
    const v = await verifier({ onReuseDetected: (id) => reused.push(id) });
    const old = await newToken();
    const next = await rotate(old.tokenId, 1_500);
    // The rotation's NOTIFY heard first, so nothing but the grace's end can drop what is cached next.
    await waitUntil(() => v.stats().changes >= 1, "the rotation's NOTIFY");
    const inGrace = await v.verify(old.token);
    assert.equal(inGrace.active, true, 'the previous credential inside its grace');
    assert.equal(inGrace.active && inGrace.credentialId, old.credentialId);
    assert.equal((await v.verify(next.token)).active, true, 'the new current credential');
    assert.equal(reused.length, 0, 'the immediately previous credential inside its grace is no reuse');
    assert.equal((await v.verify(old.token)).active, true);
    assert.equal(v.stats().cacheHits, 1, 'the previous credential answered from cache inside its grace');

    await pastGrace(next.previousValidUntil!);
    const queries = v.stats().queries;
    assert.deepEqual(await v.verify(old.token), INACTIVE, 'rejected after its grace');
    assert.equal(v.stats().queries, queries + 1, 'asked the store: the cached answer ended with the grace');
    // Presented past its grace: reuse, the token dies.
    assert.deepEqual(reused, [old.tokenId]);
    assert.deepEqual(await v.verify(next.token), INACTIVE, 'the whole token is dead');
  });
});

describe('reuse detection', () => {
  it('should kill only the token of a credential presented past its grace, once', async () => {
    const reused: string[] = [];
    const v = await verifier({ onReuseDetected: (id) => reused.push(id) });
    const victim = await newToken('usr_shared');
    const sibling = await newToken('usr_shared');
    const next = await rotate(victim.tokenId, 0);
    await pastGrace(next.previousValidUntil!);

    assert.deepEqual(await v.verify(victim.token), INACTIVE);
    const dead = await store.requireToken(ctx.pool, victim.tokenId);
    assert.equal(dead.status, 'revoked');
    assert.equal(dead.revokeReason, 'reuse_detected');
    assert.equal(dead.revokedBy, 'system:reuse-detection');
    assert.equal(dead.initiatingEntity, 'system');
    assert.ok(
      (await store.listCredentials(ctx.pool, victim.tokenId)).every((c) => c.state === 'revoked'),
      'every credential of the token revoked, the current one too',
    );
    assert.equal((await v.verify(sibling.token)).active, true, 'another token of the same subject stays active');
    assert.equal((await store.requireToken(ctx.pool, sibling.tokenId)).status, 'active');

    // Presented again (here and straight to the store): nothing more happens.
    assert.deepEqual(await v.verify(victim.token), INACTIVE);
    assert.deepEqual(await killReusedCredential(ctx.pool, ctx.settings.databaseSchema, victim.credentialId), {
      tokenId: victim.tokenId,
      killed: false,
    });
    assert.deepEqual(reused, [victim.tokenId], 'told once');
    const kinds = (await store.readAudit(ctx.pool, victim.tokenId)).map((e) => e.kind);
    assert.equal(kinds.filter((k) => k === 'credential.reuse_detected').length, 1);
    assert.equal(kinds.filter((k) => k === 'token.revoked').length, 1);
  });

  it('should kill the token of a revoked credential presented while the token is active', async () => {
    const v = await verifier();
    const victim = await newToken();
    // Grace 0: over on the database clock by the time the grace is ended.
    await rotate(victim.tokenId, 0);
    const ended = await store.endGrace(ctx.pool, { tokenId: victim.tokenId, credentialId: victim.credentialId });
    assert.equal(ended.eventId, credentialRevocationEventId(victim.credentialId));
    assert.deepEqual(await v.verify(victim.token), INACTIVE);
    assert.equal((await store.requireToken(ctx.pool, victim.tokenId)).revokeReason, 'reuse_detected');
  });

  it('should not count a dead token revoked credential as reuse (the kill revoked every credential)', async () => {
    const v = await verifier();
    const t = await newToken();
    await store.killToken(ctx.pool, { tokenId: t.tokenId, reason: 'gone', actor: 'admin', initiatingEntity: 'admin' });
    const audit = await store.readAudit(ctx.pool, t.tokenId);
    assert.deepEqual(await v.verify(t.token), INACTIVE);
    assert.equal(v.stats().reuseDetected, 0);
    assert.equal((await store.readAudit(ctx.pool, t.tokenId)).length, audit.length, 'nothing written');
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).revokeReason, 'gone');
  });

  it('should not count an old credential of a token past its expiry as reuse, before the sweep records it', async () => {
    const reused: string[] = [];
    const v = await verifier({ onReuseDetected: (id) => reused.push(id) });
    const t = await newToken();
    const second = await rotate(t.tokenId, 0);
    await rotate(t.tokenId, 0);
    // The first credential is revoked (superseded), the second previous past its grace of 0.
    await ctx.sql.query(
      `UPDATE token SET issued_at = now() - interval '2 hours', expires_at = now() - interval '1 second' WHERE id = $1`,
      [t.tokenId],
    );
    const audit = await store.readAudit(ctx.pool, t.tokenId);
    assert.deepEqual(await v.verify(t.token), INACTIVE, 'a revoked credential of an expired token');
    assert.deepEqual(await v.verify(second.token), INACTIVE, 'a previous credential past its grace, expired token');
    assert.deepEqual(reused, [], 'the token is dead already: no reuse');
    assert.equal(v.stats().reuseDetected, 0);
    // The store's own re-check says the same, whoever calls it.
    const outcome = await killReusedCredential(ctx.pool, ctx.settings.databaseSchema, t.credentialId);
    assert.deepEqual(outcome, { tokenId: t.tokenId, killed: false });
    assert.equal((await store.readAudit(ctx.pool, t.tokenId)).length, audit.length, 'nothing written');
    const row = await store.requireToken(ctx.pool, t.tokenId);
    assert.deepEqual([row.status, row.effectiveStatus, row.revokeReason], ['active', 'expired', null]);
  });

  it('should never verify a pending credential, nor count it as reuse', async () => {
    const v = await verifier();
    const t = await newToken();
    const pending = generateTokenString();
    await store.insertPendingCredential(ctx.pool, {
      tokenId: t.tokenId,
      credentialId: newCredentialId(),
      secretHash: hashToken(pending),
      rotationId: `${t.tokenId}:rot:1`,
    });
    assert.deepEqual(await v.verify(pending), INACTIVE);
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active');
    assert.equal((await v.verify(t.token)).active, true, 'the current credential still verifies');
  });
});

describe('the workflow of a token killed by reuse detection', () => {
  it('should be told by the reconciler (its untold set)', async () => {
    worker = await ctx.startWorker();
    receiver = await TestReceiver.start();
    receiver.secret = (await ctx.warden.addReceiver({ id: 'audit', url: receiver.url })).secret;
    const issued = await ctx.warden.issue({ subject: 'usr_reuse_wf', receivers: ['audit'], ttl: '1h' });
    const oldCredentialId = (await store.listCredentials(ctx.pool, issued.tokenId))[0]!.id;
    const v = await verifier();
    const next = await rotate(issued.tokenId, 0);
    await pastGrace(next.previousValidUntil!);
    assert.deepEqual(await v.verify(issued.token), INACTIVE);
    assert.equal((await store.requireToken(ctx.pool, issued.tokenId)).revokeReason, 'reuse_detected');
    assert.ok(oldCredentialId);

    const untold = await store.findReconcilePage(ctx.pool, 'untold', { graceMs: 0, afterId: null, limit: 100 });
    assert.ok(
      untold.some((t) => t.id === issued.tokenId),
      'dead in the store, its workflow not yet told',
    );
    const report = await ctx.client.workflow.execute(WORKFLOW_TYPE.reconcile, {
      workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
      taskQueue: ctx.settings.temporal.taskQueue,
      args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
    });
    assert.ok((report as ReconcileReport).signalled.includes(issued.tokenId), JSON.stringify(report));
    const done = (await ctx.client.workflow
      .getHandle(tokenWorkflowId(issued.tokenId))
      .result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    assert.equal(done.propagation, 'complete');
    const event = receiver.requests.map((r) => JSON.parse(r.body)).find((e) => e.token_id === issued.tokenId);
    assert.equal(event?.reason, 'reuse_detected');
    assert.equal(event?.initiating_entity, 'system');
  });
});

describe('last use of a token whose policy has an idle timeout', () => {
  it('should be written at least every tenth of the idle timeout, whatever the verifier interval', async () => {
    await ctx.sql.query(`INSERT INTO policy (name, idle_timeout_ms) VALUES ('idle-2s', 2000)`);
    const v = await verifier({ lastUseIntervalMs: 60_000 });
    const t = await newToken();
    await ctx.sql.query(`UPDATE token SET policy = 'idle-2s' WHERE id = $1`, [t.tokenId]);
    const lastUsed = async () =>
      (await ctx.sql.query('SELECT last_used_at FROM token WHERE id = $1', [t.tokenId])).rows[0]
        .last_used_at as Date | null;
    assert.equal((await v.verify(t.token)).active, true);
    const first = await waitUntil(async () => (await lastUsed()) ?? undefined, 'the first use recorded');
    // Used on: within a few tenths of the idle timeout the store sees a later use.
    await waitUntil(
      async () => {
        await v.verify(t.token);
        return ((await lastUsed())?.getTime() ?? 0) > first.getTime();
      },
      'a later use recorded',
      1_500,
    );
    const read = await store.readLastUse(ctx.pool, ctx.settings.databaseSchema, t.tokenId);
    assert.ok(read && read.active && read.lastUsedAt && read.lastUsedAt > first.toISOString());
    // The store holds the cap itself, for any writer asking for a longer interval.
    await waitUntil(
      () => recordTokenUse(ctx.pool, ctx.settings.databaseSchema, t.tokenId, 60_000),
      'a write the store allows within a tenth of the idle timeout',
      1_500,
    );
  });
});
