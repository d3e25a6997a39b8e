/**
 * The automatic rotation's activity retried after a crash, in a mock activity context with the real
 * store and a real owner folder: a retry after the promotion answers what the first attempt did,
 * the superseded credential's credential.revoked event included, so the workflow still delivers it.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createReceiverAgents } from '../activities/propagation.js';
import { createSelfManagingActivities, type RotationOutcome } from '../activities/self-managing.js';
import { credentialRevocationEventId, newCredentialId } from '../common/ids.js';
import { MasterKeyring } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { insertPolicy, ownerFolder } from './support/self-managing.js';
import { insertTokenRow } from './support/tokens.js';

let ctx: TestContext;
before(async () => {
  ctx = await TestContext.create('rotretry');
  await store.insertReceiver(ctx.pool, {
    id: 'billing',
    url: 'http://127.0.0.1:1/billing',
    secretCiphertext: Buffer.from('x'),
    secretKeyId: 'k',
  });
});
after(async () => ctx?.close());

const activities = () =>
  createSelfManagingActivities(ctx.pool, {
    pool: ctx.pool,
    keyring: new MasterKeyring(ctx.settings.masterKey),
    receiverAllow: ctx.settings.receiverAllow,
    agents: createReceiverAgents(),
    ownerDirRoot: ctx.settings.ownerDirRoot!,
    defaultGraceMs: 60_000,
    maxTtlMs: ctx.settings.maxTtlMs,
  });

describe('automatic rotation retried after a crash', () => {
  it('should answer a retry after the promotion as the first attempt did, the superseded event included', async () => {
    const dir = ownerFolder();
    await insertPolicy(ctx, { name: 'retry-rotate', ownerDir: dir, graceMs: 60_000 });
    const token = await insertTokenRow(ctx.pool, { subject: 'usr_retry', receivers: ['billing'] });
    await ctx.sql.query(`UPDATE token SET policy = 'retry-rotate' WHERE id = $1`, [token.id]);
    const [issued] = await store.listCredentials(ctx.pool, token.id);
    // A manual rotation first: the issued credential is previous, in its grace.
    const manual = await store.rotateCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      graceMs: 60_000,
      actor: 'admin:alice',
      reason: 'routine',
    });
    assert.equal(manual.previousCredentialId, issued!.id);

    const { rotateAutomatically } = activities();
    const input = { tokenId: token.id, rotationId: `${token.id}:rot:1`, why: 'rotation period' };
    const first = (await new MockActivityEnvironment().run(rotateAutomatically, input)) as RotationOutcome;
    // The issued credential was still previous: this rotation revoked it, with its own event.
    const eventId = credentialRevocationEventId(issued!.id);
    assert.deepEqual(first.revoked, [{ credentialId: issued!.id, eventId }]);
    assert.equal(first.previousCredentialId, manual.credentialId);
    const outbox = await ctx.sql.query('SELECT receiver_id FROM delivery WHERE event_id = $1', [eventId]);
    assert.deepEqual(
      outbox.rows.map((r: { receiver_id: string }) => r.receiver_id),
      ['billing'],
    );

    // Another rotation since: the current credential list no longer holds this rotation's facts.
    await store.rotateCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      graceMs: 60_000,
      actor: 'admin:alice',
      reason: 'again',
    });

    // The worker died after the promotion, before the result was recorded: the retry.
    const retried = (await new MockActivityEnvironment().run(rotateAutomatically, input)) as RotationOutcome;
    // The same facts, flagged as a rotation the store had already made.
    assert.equal(retried.changed, false);
    assert.deepEqual({ ...retried, changed: first.changed }, first);
    const files = readdirSync(dir).filter((f) => f.startsWith(`${token.id}.`));
    assert.equal(files.length, 1, 'the retry sent no second secret');
  });
});
