/**
 * An issue under a policy against the real store: it takes its subject's issuance lock before the
 * policy row, so a `policy set` never waits behind an offboarding of some subject, and it returns
 * the policy as the row was written under it.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { quoteIdent } from '../common/identifiers.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { waitingOnIssuanceBarrier } from './support/open-issue.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let holder: pg.Client | undefined;
before(async () => {
  ctx = await TestContext.create('policy_issue_lock');
});
after(async () => {
  await holder?.end().catch(() => {});
  await ctx?.close();
});

const policy = (name: string, maxLifetimeMs: number): store.PolicyInput => ({
  name,
  maxLifetimeMs,
  idleTimeoutMs: null,
  rotateEveryMs: null,
  graceMs: 600_000,
  warnBeforeMs: [],
  allowedScopes: null,
  onSuspicious: 'revoke',
  ownerReceiverId: null,
  ownerDir: null,
});

const issue = (subject: string, policyName: string | null) =>
  store.insertToken(ctx.pool, {
    tokenId: newTokenId(),
    credentialId: newCredentialId(),
    subject,
    name: null,
    scopes: [],
    receivers: [],
    ttlMs: 60_000,
    secretHash: randomBytes(32),
    policy: policyName,
  });

/** Settles with 'timed out' when `promise` has not settled within ms. */
const within = <T>(promise: Promise<T>, ms: number) =>
  Promise.race([promise, new Promise<'timed out'>((resolve) => setTimeout(() => resolve('timed out'), ms).unref())]);

describe('issue under a policy', () => {
  it("should not hold the policy row while waiting on its subject's issuance lock", async () => {
    await store.upsertPolicy(ctx.pool, policy('lock-order', 3_600_000));
    const subject = 'usr_offboarding';
    holder = new pg.Client({
      connectionString: ctx.settings.databaseUrl,
      options: `-c search_path=${quoteIdent(ctx.settings.databaseSchema)}`,
    });
    await holder.connect();
    // What an offboarding of the subject holds for its whole transaction.
    await holder.query('BEGIN');
    await holder.query('SELECT pg_advisory_xact_lock(issuance_lock_class(true), hashtext($1))', [subject]);
    let released = false;
    try {
      const issued = issue(subject, 'lock-order');
      issued.catch(() => {});
      await waitUntil(() => waitingOnIssuanceBarrier(ctx.sql, true), 'the issue waiting on the subject lock');
      const set = await within(store.upsertPolicy(ctx.pool, policy('lock-order', 1_800_000)), 5_000);
      assert.notEqual(set, 'timed out', 'policy set did not wait for the offboarding');
      assert.equal(set !== 'timed out' && set.version, 2);

      await holder.query('COMMIT');
      released = true;
      const record = await issued;
      // Read after the lock: the row and the policy returned are the version set meanwhile.
      assert.equal(record.issuedUnder?.version, 2);
      assert.equal(record.issuedUnder?.maxLifetimeMs, 1_800_000);
      const { rows } = await ctx.sql.query('SELECT policy_version FROM token WHERE id = $1', [record.id]);
      assert.equal(rows[0].policy_version, 2);
    } finally {
      if (!released) await holder.query('COMMIT');
    }
  });

  it('should return the policy the row was written under, and none without one', async () => {
    await store.upsertPolicy(ctx.pool, policy('returned', 3_600_000));
    await store.upsertPolicy(ctx.pool, policy('returned', 7_200_000));
    const record = await issue('usr_returned', 'returned');
    assert.deepEqual(
      record.issuedUnder && store.policySnapshot(record.issuedUnder),
      store.policySnapshot(await store.requirePolicy(ctx.pool, 'returned')),
    );
    assert.equal(record.issuedUnder?.version, 2);
    assert.equal(record.policy, 'returned');
    const without = await issue('usr_returned', null);
    assert.equal(without.issuedUnder, undefined);
  });

  it('should keep issue_token callable as the previous release calls it (a rolling deploy)', async () => {
    const tokenId = newTokenId();
    const { rows } = await ctx.sql.query(
      `SELECT issued.id, issued.subject, issued.status, issued.expires_at > issued.issued_at AS later
         FROM issue_token($1, $2, $3, $4, $5, $6, $7, $8) AS issued`,
      [tokenId, newCredentialId(), 'usr_previous_release', null, ['read'], [], 60_000, randomBytes(32)],
    );
    assert.deepEqual(rows, [{ id: tokenId, subject: 'usr_previous_release', status: 'active', later: true }]);
    const { rows: credentials } = await ctx.sql.query('SELECT state FROM credential WHERE token_id = $1', [tokenId]);
    assert.deepEqual(credentials, [{ state: 'current' }]);
  });
});
