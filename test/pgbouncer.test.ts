/**
 * The store behind a real PgBouncer in transaction mode (the distribution's binary, started here):
 * one server session shared by every client and wiped with DISCARD ALL between statements, so any
 * reliance on session state (prepared statements, search_path) fails. Skipped, with the reason,
 * where pgbouncer is not installed.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Worker } from '@temporalio/worker';
import { TokenWarden } from '../client/index.js';
import type { Settings } from '../common/config.js';
import { createPool, type StorePool } from '../common/db.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { findPgBouncer, startPgBouncer, type PgBouncer } from '../dev/pgbouncer.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { createTokenWorker } from '../worker/worker.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';

const binary = findPgBouncer();
const skip = binary
  ? false
  : `pgbouncer not found (${process.env.TOKENWARDEN_PGBOUNCER ?? 'Debian package pgbouncer, which .ci/run installs'}): the store was NOT tested behind a transaction-mode pooler`;

let ctx: TestContext;
let bouncer: PgBouncer | undefined;
/** The store through PgBouncer. */
let pool: StorePool;
let warden: TokenWarden;
let receiver: TestReceiver | undefined;

before(async () => {
  if (skip) return;
  ctx = await TestContext.create('pgbouncer');
  // One server connection: every client's transactions run in the same server session, one after another.
  bouncer = await startPgBouncer({ serverUrl: ctx.settings.databaseUrl, poolSize: 1, binary });
  const settings: Settings = { ...ctx.settings, databaseUrl: bouncer.databaseUrl };
  pool = createPool(settings.databaseUrl, settings.databaseSchema, 4);
  warden = await TokenWarden.connect(settings);
});
after(async () => {
  await warden?.close();
  await pool?.end();
  await receiver?.close();
  await bouncer?.stop();
  await ctx?.close();
});

/** Wipes the shared server session: prepared statements, settings, everything a session holds. */
const discardAll = () => pool.query('DISCARD ALL');

describe('behind PgBouncer in transaction mode', () => {
  it('should share and wipe one server session between clients (what the other tests rely on)', { skip }, async () => {
    const a = await pool.connect();
    const b = await pool.connect();
    try {
      await a.query('PREPARE tokenwarden_probe AS SELECT 1');
      assert.equal((await b.query('EXECUTE tokenwarden_probe')).rowCount, 1, 'another client, the same session');
      await b.query('DISCARD ALL');
      await assert.rejects(a.query('EXECUTE tokenwarden_probe'), { code: '26000' });
    } finally {
      a.release();
      b.release();
    }
  });

  it('should kill, append audit events and record attempts with DISCARD ALL between statements', { skip }, async () => {
    await store.insertReceiver(pool, {
      id: 'billing',
      url: 'http://127.0.0.1:1/x',
      secretCiphertext: Buffer.from('x'),
      secretKeyId: 'k',
    });
    for (let i = 0; i < 3; i++) {
      const t = await store.insertToken(pool, {
        tokenId: newTokenId(),
        credentialId: newCredentialId(),
        subject: 'usr_pooled',
        name: null,
        scopes: [],
        receivers: ['billing'],
        ttlMs: 60_000,
        secretHash: randomBytes(32),
      });
      await discardAll();
      const killed = await store.killToken(pool, {
        tokenId: t.id,
        reason: "it's pooled",
        actor: 'admin:alice',
        initiatingEntity: 'admin',
      });
      assert.equal(killed.changed, true);
      await discardAll();
      const again = await store.killToken(pool, {
        tokenId: t.id,
        reason: 'again',
        actor: 'b',
        initiatingEntity: 'admin',
      });
      assert.equal(again.changed, false);
      assert.equal(again.token.revokeReason, "it's pooled");
      await discardAll();
      const [delivery] = await store.listDeliveries(pool, t.id);
      const recorded = await store.recordDeliveryAttempt(pool, delivery!.eventId, 'billing', {
        kind: 'delivered',
        statusCode: 204,
      });
      assert.equal(recorded.status, 'delivered');
      await discardAll();
      await store.recordAudit(pool, t.id, 'note', 'test.note', { i });
      const events = await store.readAudit(pool, t.id);
      assert.deepEqual(
        events.map((e) => e.kind),
        ['token.issued', 'token.revoked', 'delivery.delivered', 'test.note'],
      );
      assert.equal(store.findBrokenAuditLink(events), null);
    }
  });

  it('should kill expired tokens in batches with DISCARD ALL between statements', { skip }, async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const t = await store.insertToken(pool, {
        tokenId: newTokenId(),
        credentialId: newCredentialId(),
        subject: 'usr_pooled_wave',
        name: null,
        scopes: [],
        receivers: ['billing'],
        ttlMs: 60_000,
        secretHash: randomBytes(32),
      });
      ids.push(t.id);
    }
    await ctx.sql.query(
      `UPDATE token SET issued_at = now() - interval '2 hours', expires_at = now() - interval '1 hour' WHERE id = ANY($1)`,
      [ids],
    );
    const killed: string[] = [];
    for (;;) {
      await discardAll();
      const batch = await store.killExpiredTokens(pool, { limit: 2 });
      assert.deepEqual(batch.failed, []);
      killed.push(...batch.killed.map((t) => t.id));
      if (batch.killed.length < 2) break;
    }
    assert.deepEqual(killed.sort(), [...ids].sort());
    for (const id of ids) {
      assert.equal(store.findBrokenAuditLink(await store.readAudit(pool, id)), null);
      assert.equal((await store.listDeliveries(pool, id)).length, 1);
    }
  });

  it('should issue, show, list, revoke and propagate end to end, every process on PgBouncer', { skip }, async () => {
    receiver = await TestReceiver.start();
    const added = await warden.addReceiver({ id: 'crm', url: receiver.url });
    receiver.secret = added.secret;
    const bundlePath = process.env.TOKENWARDEN_TEST_WORKFLOW_BUNDLE;
    const worker: Worker = await createTokenWorker({
      connection: ctx.nativeConnection,
      client: ctx.client,
      pool,
      settings: { ...ctx.settings, databaseUrl: bouncer!.databaseUrl },
      ...(bundlePath ? { workflowBundle: { codePath: bundlePath } } : {}),
    });
    const running = worker.run();
    // Meanwhile, the shared session is wiped between any two transactions of the worker and the library.
    let discarding = true;
    let discards = 0;
    const discarder = (async () => {
      for (; discarding; discards++) await discardAll();
    })();
    try {
      const issued = await warden.issue({ subject: 'usr_pooled', receivers: ['crm'], ttl: '1h' });
      const shown = await warden.show(issued.tokenId);
      assert.equal(shown.status, 'active');
      assert.equal(shown.valid, true);
      const listed = await warden.list({ subject: 'usr_pooled', status: 'active' });
      assert.deepEqual(
        listed.map((t) => t.id),
        [issued.tokenId],
      );

      const outcome = await warden.revoke({ tokenId: issued.tokenId, reason: 'pooled revoke', actor: 'admin:alice' });
      assert.equal(outcome.changed, true);
      assert.equal(outcome.status, 'revoked');
      const result = (await ctx.client.workflow
        .getHandle(tokenWorkflowId(issued.tokenId))
        .result()) as TokenLifecycleResult;
      assert.equal(result.propagation, 'complete');

      assert.equal(receiver.requests.length, 1);
      assert.equal(receiver.requests[0]!.verified, true);
      assert.equal(JSON.parse(receiver.requests[0]!.body).reason, 'pooled revoke');
      const after = await warden.show(issued.tokenId);
      assert.equal(after.status, 'revoked');
      assert.deepEqual(
        after.deliveries.map((d) => [d.receiverId, d.status, d.attempts]),
        [['crm', 'delivered', 1]],
      );
      const events = await store.readAudit(pool, issued.tokenId);
      assert.equal(store.findBrokenAuditLink(events), null);
      assert.deepEqual(
        events.map((e) => e.kind),
        ['token.issued', 'token.revoked', 'delivery.delivered', 'propagation.complete'],
      );
    } finally {
      discarding = false;
      await discarder;
      if (worker.getState() === 'RUNNING') worker.shutdown();
      await running;
    }
    assert.ok(discards > 10, `DISCARD ALL ran throughout the lifecycle (${discards} times)`);
  });
});
