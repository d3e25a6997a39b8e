/**
 * A token's credentials in the real store: rotation (current, previous with its grace on the
 * database clock, an older previous revoked at once with its own events), the end of a grace
 * (idempotent, one outbox row per receiver, deterministic event id), pending credentials of
 * automatic rotation, and refusals that write nothing.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { InvalidInputError, NotFoundError, TokenNotActiveError } from '../common/errors.js';
import { credentialRevocationEventId, newCredentialId, revocationEventId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';

let ctx: TestContext;
before(async () => {
  ctx = await TestContext.create('credentials');
  for (const id of ['billing', 'crm']) {
    await store.insertReceiver(ctx.pool, {
      id,
      url: `http://127.0.0.1:1/${id}`,
      secretCiphertext: Buffer.from('x'),
      secretKeyId: 'k',
    });
  }
});
after(async () => ctx?.close());

const newToken = (receivers = ['billing', 'crm']) => insertTokenRow(ctx.pool, { subject: 'usr_cred', receivers });

const rotate = (tokenId: string, graceMs = 60_000, credentialId = newCredentialId()) =>
  store.rotateCredential(ctx.pool, {
    tokenId,
    credentialId,
    secretHash: randomBytes(32),
    graceMs,
    actor: 'admin:alice',
    reason: 'routine',
  });

const dbNow = async () => ((await ctx.sql.query('SELECT now() AS now')).rows[0].now as Date).getTime();

async function deliveriesOf(eventId: string) {
  const { rows } = await ctx.sql.query(
    'SELECT receiver_id, body FROM delivery WHERE event_id = $1 ORDER BY receiver_id',
    [eventId],
  );
  return rows as { receiver_id: string; body: string }[];
}

const auditKinds = async (tokenId: string) => (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);

describe('rotation', () => {
  it('should make the new credential current and the old one previous until now + grace', async () => {
    const token = await newToken();
    const [issued] = await store.listCredentials(ctx.pool, token.id);
    const before = await dbNow();
    const rotated = await rotate(token.id, 60_000);
    const afterNow = await dbNow();
    assert.equal(rotated.changed, true);
    assert.equal(rotated.previousCredentialId, issued!.id);
    const validUntil = Date.parse(rotated.previousValidUntil!);
    assert.ok(validUntil >= before + 60_000 && validUntil <= afterNow + 60_000, 'grace counted on the database clock');

    const byId = new Map((await store.listCredentials(ctx.pool, token.id)).map((c) => [c.id, c]));
    assert.equal(byId.get(rotated.credentialId)?.state, 'current');
    assert.equal(byId.get(issued!.id)?.state, 'previous');
    assert.equal(byId.get(issued!.id)?.validUntil, rotated.previousValidUntil);
    assert.ok(byId.get(issued!.id)?.accepted, 'the previous credential is accepted in its grace');
    assert.equal(rotated.supersededCredentialId, null);

    // A retry of the same rotation (same credential id) changes nothing and returns the same facts.
    const retried = await store.rotateCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: rotated.credentialId,
      secretHash: randomBytes(32),
      graceMs: 60_000,
      actor: 'admin:alice',
      reason: 'routine',
    });
    assert.deepEqual(retried, { ...rotated, changed: false });
    assert.deepEqual(await auditKinds(token.id), ['token.issued', 'credential.pending', 'credential.rotated']);
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, token.id)), null);
  });

  it('should revoke the older previous at once, with its own credential.revoked events', async () => {
    const token = await newToken();
    const [first] = await store.listCredentials(ctx.pool, token.id);
    const second = await rotate(token.id, 60_000);
    const third = await rotate(token.id, 60_000);
    assert.equal(third.previousCredentialId, second.credentialId);
    assert.equal(third.supersededCredentialId, first!.id);
    const eventId = credentialRevocationEventId(first!.id);
    assert.equal(third.supersededEventId, eventId);
    const sqlEventId = (await ctx.sql.query('SELECT credential_revocation_event_id($1) AS id', [first!.id])).rows[0].id;
    assert.equal(sqlEventId, eventId, 'one derivation in SQL and in TypeScript');

    const states = new Map((await store.listCredentials(ctx.pool, token.id)).map((c) => [c.id, c.state]));
    assert.deepEqual(Object.fromEntries(states), {
      [first!.id]: 'revoked',
      [second.credentialId]: 'previous',
      [third.credentialId]: 'current',
    });
    const rows = await deliveriesOf(eventId);
    assert.deepEqual(
      rows.map((r) => r.receiver_id),
      ['billing', 'crm'],
    );
    const body = JSON.parse(rows[0]!.body);
    assert.equal(body.id, eventId);
    assert.equal(body.type, 'credential.revoked');
    assert.equal(body.change_type, 'revoke');
    assert.equal(body.token_id, token.id);
    assert.equal(body.credential_id, first!.id);
    assert.deepEqual(body.sub_id, { format: 'opaque', id: 'usr_cred' });
    assert.equal(body.reason, 'superseded');
    assert.equal(body.initiating_entity, 'admin');
    assert.equal(typeof body.event_timestamp, 'number');
    assert.equal((await store.getToken(ctx.pool, token.id))?.status, 'active', 'the token lives on');
    assert.equal((await auditKinds(token.id)).filter((k) => k === 'credential.revoked').length, 1);
  });

  it('should refuse to rotate a dead token, writing nothing', async () => {
    const token = await newToken();
    await store.killToken(ctx.pool, { tokenId: token.id, reason: 'x', actor: 'admin', initiatingEntity: 'admin' });
    const before = await store.readAudit(ctx.pool, token.id);
    const credentialId = newCredentialId();
    await assert.rejects(rotate(token.id, 1_000, credentialId), (err: unknown) => {
      assert.ok(err instanceof TokenNotActiveError, String(err));
      assert.match(err.message, /is not active \(revoked\)/);
      return true;
    });
    assert.equal((await store.readAudit(ctx.pool, token.id)).length, before.length);
    assert.ok(!(await store.listCredentials(ctx.pool, token.id)).some((c) => c.id === credentialId));
    await assert.rejects(rotate('tok_00000000000000000000000000000000'), NotFoundError);
  });
});

describe('end of grace', () => {
  it('should revoke the previous credential once, one outbox row per receiver, with a deterministic event id', async () => {
    const token = await newToken();
    const [first] = await store.listCredentials(ctx.pool, token.id);
    // Grace 0: over on the database clock by the time the grace is ended.
    await rotate(token.id, 0);
    const ended = await store.endGrace(ctx.pool, { tokenId: token.id, credentialId: first!.id });
    const eventId = credentialRevocationEventId(first!.id);
    assert.deepEqual(ended, { changed: true, eventId, receivers: ['billing', 'crm'] });
    const again = await store.endGrace(ctx.pool, { tokenId: token.id, credentialId: first!.id });
    assert.deepEqual(again, { changed: false, eventId, receivers: ['billing', 'crm'] });
    const rows = await deliveriesOf(eventId);
    assert.equal(rows.length, 2, 'one row per receiver, however often it is called');
    assert.equal(JSON.parse(rows[0]!.body).reason, 'grace_ended');
    assert.equal(JSON.parse(rows[0]!.body).initiating_entity, 'system');
    assert.equal((await auditKinds(token.id)).filter((k) => k === 'credential.revoked').length, 1);
    const revoked = (await store.listCredentials(ctx.pool, token.id)).find((c) => c.id === first!.id);
    assert.equal(revoked?.state, 'revoked');
    assert.equal(revoked?.accepted, false);
  });

  it('should revoke nothing before valid_until on the database clock, and say how long is left', async () => {
    const token = await newToken();
    const [first] = await store.listCredentials(ctx.pool, token.id);
    await rotate(token.id, 60_000);
    const early = await store.endGrace(ctx.pool, { tokenId: token.id, credentialId: first!.id });
    assert.equal(early.changed, false);
    assert.deepEqual(early.receivers, [], 'no outbox row yet');
    assert.ok(
      early.notYetEndedMs !== undefined && early.notYetEndedMs > 50_000 && early.notYetEndedMs <= 60_000,
      `remaining ${early.notYetEndedMs}`,
    );
    const still = (await store.listCredentials(ctx.pool, token.id)).find((c) => c.id === first!.id);
    assert.equal(still?.state, 'previous');
    assert.equal(still?.accepted, true);
    assert.equal((await deliveriesOf(credentialRevocationEventId(first!.id))).length, 0);
  });

  it('should write no credential event when the token kill revoked the credential first', async () => {
    const token = await newToken();
    const [first] = await store.listCredentials(ctx.pool, token.id);
    await rotate(token.id, 60_000);
    await store.killToken(ctx.pool, { tokenId: token.id, reason: 'x', actor: 'admin', initiatingEntity: 'admin' });
    assert.ok(
      (await store.listCredentials(ctx.pool, token.id)).every((c) => c.state === 'revoked'),
      'the kill revokes every credential',
    );
    const ended = await store.endGrace(ctx.pool, { tokenId: token.id, credentialId: first!.id });
    assert.deepEqual(ended, { changed: false, eventId: credentialRevocationEventId(first!.id), receivers: [] });
  });

  it("should settle a credential.revoked delivery still pending when the token dies, so only the token's event holds completion", async () => {
    const token = await newToken();
    const [first] = await store.listCredentials(ctx.pool, token.id);
    await rotate(token.id, 0);
    const ended = await store.endGrace(ctx.pool, { tokenId: token.id, credentialId: first!.id });
    await store.recordDeliveryAttempt(ctx.pool, ended.eventId, 'billing', { kind: 'delivered', statusCode: 200 });
    await store.killToken(ctx.pool, { tokenId: token.id, reason: 'x', actor: 'admin', initiatingEntity: 'admin' });
    const { rows } = await ctx.sql.query(
      'SELECT event_id, receiver_id, status FROM delivery WHERE token_id = $1 ORDER BY event_id <> $2, receiver_id',
      [token.id, ended.eventId],
    );
    const tokenEvent = revocationEventId(token.id);
    assert.deepEqual(rows, [
      { event_id: ended.eventId, receiver_id: 'billing', status: 'delivered' },
      { event_id: ended.eventId, receiver_id: 'crm', status: 'cancelled' },
      { event_id: tokenEvent, receiver_id: 'billing', status: 'pending' },
      { event_id: tokenEvent, receiver_id: 'crm', status: 'pending' },
    ]);
    for (const receiverId of ['billing', 'crm']) {
      await store.recordDeliveryAttempt(ctx.pool, tokenEvent, receiverId, { kind: 'delivered', statusCode: 200 });
    }
    const completed = await store.setPropagation(ctx.pool, token.id, 'complete', 'complete', {});
    assert.equal(completed.propagation, 'complete');
    assert.ok((await auditKinds(token.id)).includes('delivery.cancelled'), 'the cancellation is audited');
  });
});

describe('pending credentials (automatic rotation)', () => {
  it('should store, discard, promote idempotently, and refuse to promote an unknown credential', async () => {
    const token = await newToken([]);
    const rotationId = `${token.id}:rot:1`;
    assert.equal(await store.discardPendingCredential(ctx.pool, token.id, rotationId), null, 'nothing stored yet');
    const lost = await store.insertPendingCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      rotationId,
    });
    assert.equal(lost.state, 'pending');
    assert.equal(lost.accepted, false);
    // A crash lost its secret: the retry discards it and stores another under the same rotation id.
    assert.equal((await store.discardPendingCredential(ctx.pool, token.id, rotationId))?.id, lost.id);
    assert.ok(!(await store.listCredentials(ctx.pool, token.id)).some((c) => c.id === lost.id));
    const kept = await store.insertPendingCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      rotationId,
    });
    const promotion = { tokenId: token.id, credentialId: kept.id, graceMs: 30_000, actor: 'system', reason: 'policy' };
    const promoted = await store.promoteCredential(ctx.pool, promotion);
    assert.equal(promoted.changed, true);
    assert.deepEqual(await store.promoteCredential(ctx.pool, promotion), { ...promoted, changed: false });
    // After a promotion the retry's discard finds the rotation done and changes nothing.
    const done = await store.discardPendingCredential(ctx.pool, token.id, rotationId);
    assert.equal(done?.state, 'current');
    assert.equal(done?.id, kept.id);

    await assert.rejects(
      store.promoteCredential(ctx.pool, { ...promotion, credentialId: newCredentialId() }),
      (err: unknown) => err instanceof InvalidInputError && err.fields[0]?.path === 'credentialId',
    );
  });

  it('should refuse to promote a pending credential once a newer one was made current (a manual rotation meanwhile)', async () => {
    const token = await newToken([]);
    const rotationId = `${token.id}:rot:1`;
    const late = await store.insertPendingCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      rotationId,
    });
    const manual = await store.rotateCredential(ctx.pool, {
      tokenId: token.id,
      credentialId: newCredentialId(),
      secretHash: randomBytes(32),
      graceMs: 30_000,
      actor: 'admin:alice',
      reason: 'by hand',
    });
    await assert.rejects(
      store.promoteCredential(ctx.pool, {
        tokenId: token.id,
        credentialId: late.id,
        graceMs: 30_000,
        actor: 'system',
        reason: 'policy',
      }),
      (err: unknown) =>
        err instanceof InvalidInputError &&
        err.fields[0]?.path === 'credentialId' &&
        /superseded while pending/.test(err.message),
    );
    const states = Object.fromEntries((await store.listCredentials(ctx.pool, token.id)).map((c) => [c.id, c.state]));
    assert.equal(states[manual.credentialId], 'current', 'the manual rotation stays current');
    assert.equal(states[late.id], 'pending', 'the late one never becomes valid');
  });
});
