/**
 * Suspension in the real store and through the verifier: a suspended token fails verification (and
 * `show`'s valid) without dying, a resume restores it, and the NOTIFY drops answers a verifier cached.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { TokenNotActiveError } from '../common/errors.js';
import { CHANGE_CHANNEL } from '../common/names.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
const open: Verifier[] = [];
before(async () => {
  ctx = await TestContext.create('suspension');
});
after(async () => {
  for (const v of open) await v.close().catch(() => {});
  await ctx?.close();
});

async function verifier(): Promise<Verifier> {
  const v = await createVerifier({
    databaseUrl: ctx.settings.databaseUrl,
    schema: ctx.settings.databaseSchema,
    cacheTtlMs: 60_000,
  });
  open.push(v);
  return v;
}

async function newToken() {
  const token = generateTokenString();
  const record = await insertTokenRow(ctx.pool, {
    subject: 'usr_susp',
    secretHash: hashToken(token),
    ttlMs: 3_600_000,
  });
  return { token, tokenId: record.id };
}

const suspend = (tokenId: string, suspended = true) =>
  store.setSuspended(ctx.pool, { tokenId, suspended, actor: 'admin:alice', reason: 'investigating' });

const storeValid = async (tokenId: string) =>
  (
    await ctx.sql.query('SELECT token_valid(status, expires_at, suspended_at) AS valid FROM token WHERE id = $1', [
      tokenId,
    ])
  ).rows[0].valid as boolean;

describe('suspension', () => {
  it('should fail verification while suspended, drop cached answers on the NOTIFY, and resume', async () => {
    const v = await verifier();
    const { token, tokenId } = await newToken();
    assert.equal((await v.verify(token)).active, true);
    assert.equal((await v.verify(token)).active, true);
    assert.equal(v.stats().cacheHits, 1, 'the answer is cached');

    const suspended = await suspend(tokenId);
    assert.equal(suspended.changed, true);
    assert.equal(suspended.token.status, 'active', 'suspended is not dead');
    assert.equal(suspended.token.valid, false, "show's valid");
    assert.equal(await storeValid(tokenId), false, "the store's token_valid, which the verifier's lookup uses");
    assert.equal(suspended.token.suspendedBy, 'admin:alice');
    assert.equal(suspended.token.suspendReason, 'investigating');
    await waitUntil(() => v.stats().changes >= 1, 'the NOTIFY heard');
    assert.deepEqual(await v.verify(token), { active: false }, 'the cached answer was dropped');
    assert.equal(v.stats().reuseDetected, 0, 'a suspended current credential is no reuse');

    assert.equal((await suspend(tokenId)).changed, false, 'a repeated suspend changes nothing');
    const resumed = await suspend(tokenId, false);
    assert.equal(resumed.changed, true);
    assert.equal(resumed.token.valid, true);
    assert.equal(await storeValid(tokenId), true);
    assert.equal(resumed.token.suspendedAt, null);
    assert.equal((await v.verify(token)).active, true, 'verifies again after the resume');
    assert.equal((await store.requireToken(ctx.pool, tokenId)).valid, true);
    const kinds = (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.suspended', 'token.resumed']);
  });

  it('should audit each of a suspend, resume and suspend within one instant', async () => {
    const { tokenId } = await newToken();
    const client = await ctx.sql.connect();
    try {
      // One transaction: now(), and so suspended_at, is the same instant for all three.
      await client.query('BEGIN');
      for (const suspended of [true, false, true]) {
        const { rows } = await client.query(
          `SELECT changed FROM set_suspended($1, $2, $3, 'admin:alice', 'flapping', $4)`,
          [ctx.settings.databaseSchema, tokenId, suspended, CHANGE_CHANNEL],
        );
        assert.equal(rows[0].changed, true);
      }
      await client.query('COMMIT');
    } finally {
      client.release();
    }
    const kinds = (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.suspended', 'token.resumed', 'token.suspended']);
  });

  it('should carry out a request once: its retry after a later resume suspends nothing and audits nothing', async () => {
    const { tokenId } = await newToken();
    const operator = { actor: 'admin:alice', reason: 'investigating' };
    const first = await store.setSuspended(ctx.pool, { tokenId, suspended: true, requestId: 'upd_1', ...operator });
    assert.equal(first.changed, true);
    assert.equal(
      (await store.setSuspended(ctx.pool, { tokenId, suspended: false, requestId: 'upd_2', ...operator })).changed,
      true,
    );
    const retry = await store.setSuspended(ctx.pool, { tokenId, suspended: true, requestId: 'upd_1', ...operator });
    assert.equal(retry.changed, false, 'the same request again');
    assert.equal(retry.token.suspendedAt, null, 'still resumed');
    assert.equal(
      (await store.setSuspended(ctx.pool, { tokenId, suspended: false, requestId: 'upd_2', ...operator })).changed,
      false,
    );
    const kinds = (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);
    assert.deepEqual(kinds, ['token.issued', 'token.suspended', 'token.resumed']);
    const again = await store.setSuspended(ctx.pool, { tokenId, suspended: true, requestId: 'upd_3', ...operator });
    assert.equal(again.changed, true, 'a new request suspends again');
  });

  it("should answer show's valid by the store's token_valid, the verifier's one path", async () => {
    const { tokenId } = await newToken();
    assert.equal((await store.requireToken(ctx.pool, tokenId)).valid, true);
    const define = (body: string) =>
      ctx.sql
        .query(`CREATE OR REPLACE FUNCTION token_valid(status text, expires_at timestamptz, suspended_at timestamptz)
                     RETURNS boolean LANGUAGE sql STABLE AS $$ ${body} $$`);
    // A validity rule changed in the store alone changes what show answers.
    await define('SELECT false');
    try {
      assert.equal((await store.requireToken(ctx.pool, tokenId)).valid, false);
    } finally {
      await define(
        `SELECT token_valid.status = 'active' AND token_valid.expires_at > now() AND token_valid.suspended_at IS NULL`,
      );
    }
    assert.equal((await store.requireToken(ctx.pool, tokenId)).valid, true);
  });

  it('should record and clear a scheduled revocation for show', async () => {
    const { tokenId } = await newToken();
    const at = new Date(Date.now() + 3_600_000).toISOString();
    const scheduled = await store.setScheduledRevoke(ctx.pool, { tokenId, at, reason: 'contract ends' });
    assert.deepEqual([scheduled.revokeScheduledAt, scheduled.revokeScheduledReason], [at, 'contract ends']);
    const cleared = await store.setScheduledRevoke(ctx.pool, { tokenId, at: null, reason: null });
    assert.deepEqual([cleared.revokeScheduledAt, cleared.revokeScheduledReason], [null, null]);
  });

  it('should refuse to suspend a dead token, writing nothing', async () => {
    const { tokenId } = await newToken();
    await store.killToken(ctx.pool, { tokenId, reason: 'x', actor: 'admin', initiatingEntity: 'admin' });
    await assert.rejects(suspend(tokenId), TokenNotActiveError);
    const row = await store.requireToken(ctx.pool, tokenId);
    assert.equal(row.suspendedAt, null);
    assert.equal((await store.readAudit(ctx.pool, tokenId)).length, 2);
  });
});
