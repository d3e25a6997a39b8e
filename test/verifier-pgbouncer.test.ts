/**
 * The verifier's lookups and last-use writes through a real PgBouncer in transaction mode (one
 * server session shared by every client), its listener on the direct URL (`listenUrl`): LISTEN
 * needs a session of its own. Skipped, with the reason, where pgbouncer is not installed.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import { killToken } from '../common/store/kill.js';
import { findPgBouncer, startPgBouncer, type PgBouncer } from '../dev/pgbouncer.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';
import { waitUntil } from './support/wait.js';

const binary = findPgBouncer();
const skip = binary
  ? false
  : `pgbouncer not found (${process.env.TOKENWARDEN_PGBOUNCER ?? 'Debian package pgbouncer'}): the verifier was NOT tested behind a transaction-mode pooler`;

let ctx: TestContext;
let bouncer: PgBouncer | undefined;
let verifier: Verifier | undefined;
before(async () => {
  if (skip) return;
  ctx = await TestContext.create('verifier_pgbouncer');
  bouncer = await startPgBouncer({ serverUrl: ctx.settings.databaseUrl, poolSize: 1, binary });
});
after(async () => {
  await verifier?.close();
  await bouncer?.stop();
  await ctx?.close();
});

it(
  'should verify, cache and refuse after a kill through a transaction-mode pooler, listening on the direct URL',
  { skip },
  async () => {
    const errors: Error[] = [];
    verifier = await createVerifier({
      databaseUrl: bouncer!.databaseUrl,
      listenUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      cacheTtlMs: 60_000,
      lastUseIntervalMs: 1,
      onError: (err) => errors.push(err),
    });
    assert.equal(verifier.listening, true);
    const token = generateTokenString();
    const { id: tokenId } = await insertTokenRow(ctx.pool, { secretHash: hashToken(token) });
    const other = generateTokenString();
    await insertTokenRow(ctx.pool, { secretHash: hashToken(other) });
    // Lookups of several clients of the pool share the one server session, one transaction after another.
    await Promise.all([verifier.verify(token), verifier.verify(other), verifier.verify(other)]);
    assert.equal((await verifier.verify(token)).active, true);
    assert.ok(verifier.stats().cacheHits >= 1);
    await waitUntil(() => verifier!.stats().lastUseWrites >= 2, 'last use written through the pooler');

    await killToken(ctx.pool, { tokenId, reason: 'test', actor: 'test', initiatingEntity: 'admin' });
    await waitUntil(() => verifier!.stats().kills === 1, 'the kill heard on the direct listener');
    assert.deepEqual(await verifier.verify(token), { active: false });
    assert.equal((await verifier.verify(other)).active, true);
    assert.deepEqual(errors, []);
  },
);
