/**
 * extend / shorten in the real store: the new expiry is now + ttl on the database clock, bounded by
 * the policy's max lifetime and the global maximum (refused naming `ttl` and the limit, nothing
 * written), extend never earlier and shorten never later, idempotent by request id, and the NOTIFY
 * drops answers a verifier cached under the old expiry.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { InvalidInputError } from '../common/errors.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';
import { waitUntil } from './support/wait.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

let ctx: TestContext;
const open: Verifier[] = [];
before(async () => {
  ctx = await TestContext.create('expiry_change');
  await ctx.sql.query(`INSERT INTO policy (name, max_lifetime_ms) VALUES ('short-lived', $1)`, [2 * HOUR]);
});
after(async () => {
  for (const v of open) await v.close().catch(() => {});
  await ctx?.close();
});

async function newToken(ttlMs: number, policy: string | null = null) {
  const token = generateTokenString();
  const record = await insertTokenRow(ctx.pool, { subject: 'usr_exp', secretHash: hashToken(token), ttlMs });
  if (policy) await ctx.sql.query('UPDATE token SET policy = $2 WHERE id = $1', [record.id, policy]);
  return { token, record };
}

const change = (tokenId: string, ttlMs: number, mode: 'extend' | 'shorten', requestId = randomUUID()) =>
  store.changeExpiry(ctx.pool, {
    tokenId,
    ttlMs,
    mode,
    maxLifetimeMs: 30 * DAY,
    actor: 'admin:alice',
    reason: 'project runs longer',
    requestId,
  });

/** Asserts a refusal on field `ttl` matching `message`, and that nothing was written. */
async function refused(tokenId: string, attempt: () => Promise<unknown>, message: RegExp) {
  const before = await store.requireToken(ctx.pool, tokenId);
  const audit = (await store.readAudit(ctx.pool, tokenId)).length;
  await assert.rejects(attempt(), (err: unknown) => {
    assert.ok(err instanceof InvalidInputError, String(err));
    assert.equal(err.fields[0]?.path, 'ttl');
    assert.match(err.message, /^ttl: /);
    assert.match(err.message, message);
    return true;
  });
  assert.equal((await store.requireToken(ctx.pool, tokenId)).expiresAt, before.expiresAt, 'expiry unchanged');
  assert.equal((await store.readAudit(ctx.pool, tokenId)).length, audit, 'nothing audited');
}

describe('changeExpiry', () => {
  it('should extend to now + ttl on the database clock, once per request id', async () => {
    const { record } = await newToken(HOUR);
    const t0 = ((await ctx.sql.query('SELECT now() AS now')).rows[0].now as Date).getTime();
    const requestId = randomUUID();
    const extended = await change(record.id, 5 * HOUR, 'extend', requestId);
    const t1 = ((await ctx.sql.query('SELECT now() AS now')).rows[0].now as Date).getTime();
    assert.equal(extended.changed, true);
    assert.equal(extended.previousExpiresAt, record.expiresAt);
    const at = Date.parse(extended.token.expiresAt);
    assert.ok(at >= t0 + 5 * HOUR && at <= t1 + 5 * HOUR, 'now + ttl on the database clock');
    const retried = await change(record.id, 5 * HOUR, 'extend', requestId);
    assert.equal(retried.changed, false);
    assert.equal(retried.token.expiresAt, extended.token.expiresAt, 'a retry is the same change');
    assert.equal(retried.previousExpiresAt, record.expiresAt);
    const kinds = (await store.readAudit(ctx.pool, record.id)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.expiry_changed']);
  });

  it("should refuse beyond the policy's max lifetime, naming ttl and the limit", async () => {
    const { record } = await newToken(HOUR, 'short-lived');
    const limit = new Date(Date.parse(record.issuedAt) + 2 * HOUR).toISOString();
    await refused(
      record.id,
      () => change(record.id, 3 * HOUR, 'extend'),
      new RegExp(`policy's max lifetime.*${limit}`),
    );
    assert.equal((await change(record.id, 90 * 60_000, 'extend')).changed, true, 'within the policy');
  });

  it('should refuse beyond the global maximum lifetime', async () => {
    const { record } = await newToken(HOUR);
    const limit = new Date(Date.parse(record.issuedAt) + 30 * DAY).toISOString();
    await refused(record.id, () => change(record.id, 31 * DAY, 'extend'), new RegExp(`TOKENWARDEN_MAX_TTL.*${limit}`));
  });

  it('should refuse an earlier expiry to extend and a later one to shorten', async () => {
    const { record } = await newToken(HOUR);
    await refused(record.id, () => change(record.id, 10 * 60_000, 'extend'), /extend cannot move the expiry earlier/);
    await refused(record.id, () => change(record.id, 2 * HOUR, 'shorten'), /shorten cannot move the expiry later/);
    await refused(record.id, () => change(record.id, 0, 'shorten'), /positive whole number/);
  });

  it('should drop cached answers on shorten, so none outlives the new expiry', async () => {
    const v = await createVerifier({
      databaseUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      cacheTtlMs: 60_000,
    });
    open.push(v);
    const { token, record } = await newToken(HOUR);
    assert.equal((await v.verify(token)).active, true);
    const shortened = await change(record.id, 1_000, 'shorten');
    await waitUntil(() => v.stats().changes >= 1, 'the NOTIFY heard');
    await waitUntil(
      async () =>
        (await ctx.sql.query('SELECT now() >= $1::timestamptz AS past', [shortened.token.expiresAt])).rows[0]
          .past as boolean,
      'the new expiry passed',
      10_000,
    );
    assert.deepEqual(await v.verify(token), { active: false });
  });

  it("should shorten to the policy's limit itself (issued_at + max), never later, once", async () => {
    const { record } = await newToken(3 * HOUR, 'short-lived');
    const limit = new Date(Date.parse(record.issuedAt) + 2 * HOUR).toISOString();
    const shorten = () =>
      store.shortenToPolicyLimit(ctx.pool, { tokenId: record.id, actor: 'system:policy:short-lived', reason: 'r' });
    const shortened = await shorten();
    assert.equal(shortened.changed, true);
    assert.equal(shortened.previousExpiresAt, record.expiresAt);
    assert.equal(shortened.token.expiresAt, limit, 'the limit itself, whatever the clock read before');
    const again = await shorten();
    assert.equal(again.changed, false);
    assert.equal(again.token.expiresAt, limit);
    const kinds = (await store.readAudit(ctx.pool, record.id)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.expiry_changed']);

    const within = await newToken(HOUR, 'short-lived');
    const untouched = await store.shortenToPolicyLimit(ctx.pool, {
      tokenId: within.record.id,
      actor: 'system:policy:short-lived',
      reason: 'r',
    });
    assert.equal(untouched.changed, false, 'never later');
    assert.equal(untouched.token.expiresAt, within.record.expiresAt);
  });
});
