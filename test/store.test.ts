import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { checkout, createPool, migrate, quoteIdent } from '../common/db.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { timeStatements } from '../bench/statement-timer.js';
import { InvalidInputError, NotFoundError } from '../common/errors.js';
import * as store from '../common/store/index.js';
import { insertTokenRow } from './support/tokens.js';
import { TestContext } from './support/context.js';
import { waitUntil } from './support/wait.js';
import { recordStoreMade, recordStoreSecrets } from './support/run-record.js';

let ctx: TestContext;
before(async () => {
  ctx = await TestContext.create('store');
  await store.insertReceiver(ctx.pool, {
    id: 'billing',
    url: 'http://127.0.0.1:1/x',
    secretCiphertext: Buffer.from('x'),
    secretKeyId: 'k',
  });
  await store.insertReceiver(ctx.pool, {
    id: 'crm',
    url: 'http://127.0.0.1:1/y',
    secretCiphertext: Buffer.from('y'),
    secretKeyId: 'k',
  });
});
after(async () => ctx?.close());

const newToken = (overrides: Partial<store.NewToken> = {}, pool = ctx.pool) =>
  insertTokenRow(pool, { subject: 'usr_store', receivers: ['billing', 'crm'], ...overrides });

const kill = (tokenId: string, reason = 'left the company') =>
  store.killToken(ctx.pool, { tokenId, reason, actor: 'admin:alice', initiatingEntity: 'admin' });

describe('central store', () => {
  it('should issue an active, valid token whose expiry comes from the database clock', async () => {
    const t = await newToken();
    assert.equal(t.status, 'active');
    assert.equal(t.valid, true);
    assert.equal(t.propagation, 'none');
    const lifetime = Date.parse(t.expiresAt) - Date.parse(t.issuedAt);
    assert.equal(lifetime, 60_000);
  });

  it('should write the token, its credential and its issued event in one statement', async () => {
    const statements: string[] = [];
    const counted = timeStatements(ctx.pool, (statement) => statements.push(statement));
    const credentialId = newCredentialId();
    const secretHash = randomBytes(32);
    const t = await newToken({ credentialId, secretHash, scopes: ['read', 'write'] }, counted);
    assert.equal(statements.length, 1, `one round trip, no transaction of its own: ${statements.join(' | ')}`);

    const { rows } = await ctx.sql.query(
      'SELECT id, token_id, secret_hash, state FROM credential WHERE token_id = $1',
      [t.id],
    );
    assert.deepEqual(rows, [{ id: credentialId, token_id: t.id, secret_hash: secretHash, state: 'current' }]);
    const [issued, ...rest] = await store.readAudit(ctx.pool, t.id);
    assert.deepEqual(rest, []);
    assert.equal(issued!.kind, 'token.issued');
    assert.deepEqual(JSON.parse(issued!.canonical).data, {
      subject: 'usr_store',
      credentialId,
      receivers: ['billing', 'crm'],
      scopes: ['read', 'write'],
      expiresAt: t.expiresAt,
    });
  });

  it('should refuse an unknown or removed receiver, naming them, and write nothing', async () => {
    await store.insertReceiver(ctx.pool, {
      id: 'gone',
      url: 'http://127.0.0.1:1/z',
      secretCiphertext: Buffer.from('z'),
      secretKeyId: 'k',
    });
    await store.removeReceiver(ctx.pool, 'gone');
    const tokenId = newTokenId();
    const secretHash = randomBytes(32);
    await assert.rejects(
      newToken({ tokenId, secretHash, receivers: ['billing', 'nope', 'gone'] }),
      (e: unknown) =>
        e instanceof InvalidInputError &&
        e.message === 'invalid token request: receivers: unknown or removed receiver nope, gone' &&
        e.fields.length === 1 &&
        e.fields[0]!.path === 'receivers',
    );
    assert.equal(await store.getToken(ctx.pool, tokenId), undefined);
    const { rows } = await ctx.sql.query(
      `SELECT (SELECT count(*) FROM credential WHERE secret_hash = $1)::int AS credentials,
              (SELECT count(*) FROM audit_event WHERE token_id = $2)::int AS events`,
      [secretHash, tokenId],
    );
    assert.deepEqual(rows[0], { credentials: 0, events: 0 });
  });

  it('should mark many workflows started in one statement, keeping a mark already written', async () => {
    const [a, b, c] = [await newToken(), await newToken(), await newToken()];
    await store.markWorkflowStarted(ctx.pool, a.id);
    const first = (await store.requireToken(ctx.pool, a.id)).workflowStartedAt;
    const statements: string[] = [];
    await store.markWorkflowsStarted(
      timeStatements(ctx.pool, (statement) => statements.push(statement)),
      [a.id, b.id, c.id, newTokenId()],
    );
    assert.equal(statements.length, 1);
    assert.equal((await store.requireToken(ctx.pool, a.id)).workflowStartedAt, first);
    assert.ok((await store.requireToken(ctx.pool, b.id)).workflowStartedAt);
    assert.ok((await store.requireToken(ctx.pool, c.id)).workflowStartedAt);
  });

  it('should treat an active row past its expiry as expired and invalid, with no worker involved', async () => {
    const t = await newToken({ ttlMs: 1 });
    await ctx.sql.query('SELECT pg_sleep(0.01)');
    const now = await store.requireToken(ctx.pool, t.id);
    assert.equal(now.status, 'active');
    assert.equal(now.effectiveStatus, 'expired');
    assert.equal(now.valid, false);
    const listed = await store.listTokens(ctx.pool, { subject: 'usr_store', status: 'active', limit: 1000 });
    assert.ok(!listed.some((x) => x.id === t.id));
  });

  it('should show and list a token as expired from its expiry instant, before any worker records it', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_view', ttl: 1 }); // no worker runs in this file
    await ctx.sql.query('SELECT pg_sleep(0.01)');
    const shown = await ctx.warden.show(tokenId);
    assert.equal(shown.status, 'expired');
    assert.equal(shown.recordedStatus, 'active');
    assert.equal(shown.valid, false);
    const [listed] = await ctx.warden.list({ subject: 'usr_view', status: 'expired' });
    assert.equal(listed?.id, tokenId);
    assert.deepEqual(await ctx.warden.list({ subject: 'usr_view', status: 'active' }), []);
  });

  it('should kill once: revoked credentials, one outbox row per receiver, audit, and idempotent repeats', async () => {
    const t = await newToken();
    const first = await kill(t.id);
    assert.equal(first.changed, true);
    assert.equal(first.token.status, 'revoked');
    assert.equal(first.token.valid, false);
    assert.equal(first.token.propagation, 'pending');
    const second = await kill(t.id, 'a different reason');
    assert.equal(second.changed, false);
    assert.equal(second.token.revokedAt, first.token.revokedAt);
    assert.equal(second.token.revokeReason, 'left the company');
    const deliveries = await store.listDeliveries(ctx.pool, t.id);
    assert.deepEqual(
      deliveries.map((d) => [d.receiverId, d.status]),
      [
        ['billing', 'pending'],
        ['crm', 'pending'],
      ],
    );
    assert.equal(new Set(deliveries.map((d) => d.eventId)).size, 1);
    const { rows } = await ctx.sql.query('SELECT state FROM credential WHERE token_id = $1', [t.id]);
    assert.deepEqual(
      rows.map((r) => r.state),
      ['revoked'],
    );
    const audit = await store.readAudit(ctx.pool, t.id);
    assert.deepEqual(
      audit.map((a) => a.kind),
      ['token.issued', 'token.revoked'],
    );
  });

  it('should record the request id of the kill that committed, whichever path sent it', async () => {
    const t = await newToken();
    const first = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'r',
      actor: 'workflow',
      initiatingEntity: 'admin',
      requestId: 'req-1',
    });
    const second = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'r',
      actor: 'client',
      initiatingEntity: 'admin',
      requestId: 'req-2',
    });
    assert.equal(first.token.revokeRequestId, 'req-1');
    assert.equal(second.changed, false);
    assert.equal(second.token.revokeRequestId, 'req-1');
  });

  it('should store hostile text verbatim (the kill sends values as escaped literals)', async () => {
    const t = await newToken();
    const reason = String.raw`it's \ "quoted" '); DROP TABLE token; -- \x00ff ünïcødé` + `\n E'\\'`;
    const result = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason,
      actor: "o'brien\\",
      initiatingEntity: 'admin',
    });
    assert.equal(result.token.revokeReason, reason);
    assert.equal(result.token.revokedBy, "o'brien\\");
    const [delivery] = await ctx.sql.query('SELECT body FROM delivery WHERE token_id = $1', [t.id]).then((r) => r.rows);
    assert.equal(JSON.parse(delivery.body).reason, reason);
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, t.id)), null);
    assert.ok((await store.getToken(ctx.pool, t.id))!.revokedAt);
    await assert.rejects(
      ctx.warden.revoke({ tokenId: t.id, reason: 'nul \u0000 byte' }),
      (e: unknown) =>
        e instanceof InvalidInputError &&
        /reason: must not contain control characters \(found U\+0000\)/.test(e.message),
    );
  });

  it('should record expired, not revoked, when the kill comes after expiry', async () => {
    const t = await newToken({ ttlMs: 1 });
    await ctx.sql.query('SELECT pg_sleep(0.01)');
    const result = await kill(t.id);
    assert.equal(result.token.status, 'expired');
    assert.equal(result.token.revokeReason, 'expired');
    assert.equal(result.token.initiatingEntity, 'system');
  });

  it('should not let the expiry kill fire before the database clock says expired', async () => {
    const t = await newToken({ ttlMs: 60_000 });
    const result = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'expired',
      actor: 'system',
      initiatingEntity: 'system',
      onlyIfExpired: true,
    });
    assert.equal(result.changed, false);
    assert.ok(result.notYetExpiredMs! > 50_000 && result.notYetExpiredMs! <= 60_000);
    assert.equal((await store.requireToken(ctx.pool, t.id)).status, 'active');
  });

  it('should resolve concurrent kills to exactly one', async () => {
    const t = await newToken();
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => kill(t.id, `racer ${i}`)));
    assert.equal(results.filter((r) => r.changed).length, 1);
    assert.equal(new Set(results.map((r) => r.token.revokeReason)).size, 1);
    assert.equal((await store.listDeliveries(ctx.pool, t.id)).length, 2);
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, t.id)), null);
  });

  it('should refuse a row it does not understand instead of passing on a wrong fact', async () => {
    // Such a row needs the token constraints dropped: in a schema of its own, so that every other
    // test keeps the status/revoked_at invariant.
    const schema = `${ctx.settings.databaseSchema}_unchecked`;
    await migrate(ctx.settings.databaseUrl, schema);
    recordStoreMade(schema);
    const pool = createPool(ctx.settings.databaseUrl, schema, 1);
    try {
      const t = await newToken({ receivers: [] }, pool);
      await pool.query(
        `ALTER TABLE ${pool.tables.token} DROP CONSTRAINT token_status_check, DROP CONSTRAINT token_check`,
      );
      await pool.query(`UPDATE ${pool.tables.token} SET status = 'zombie' WHERE id = $1`, [t.id]);
      await assert.rejects(store.getToken(pool, t.id), /unexpected token row in the store: status/);
    } finally {
      if (await recordStoreSecrets(pool, schema, { master: [ctx.settings.masterKey!], payload: [] })) {
        await pool.query(`DROP SCHEMA ${quoteIdent(schema)} CASCADE`);
      }
      await pool.end();
    }
  });

  it('should kill correctly when another writer extends the audit chain while the kill waits for the row', async () => {
    const t = await newToken();
    const other = await checkout(ctx.pool);
    try {
      await other.query('BEGIN');
      await store.appendAudit(other, t.id, 'concurrent', 'test.concurrent', {}); // holds the row lock
      const killing = kill(t.id); // blocks on the row lock with a snapshot taken before the append
      await waitUntil(async () => {
        const { rows } = await ctx.sql.query(
          `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()`,
        );
        return rows.length > 0;
      }, 'the kill to wait for the row lock');
      await other.query('COMMIT');
      const result = await killing;
      assert.equal(result.changed, true);
    } finally {
      other.release();
    }
    const events = await store.readAudit(ctx.pool, t.id);
    assert.deepEqual(
      events.map((e) => e.kind),
      ['token.issued', 'test.concurrent', 'token.revoked'],
    );
    assert.equal(store.findBrokenAuditLink(events), null);
  });

  it('should say not found for an unknown token', async () => {
    await assert.rejects(kill(newTokenId()), NotFoundError);
  });

  it('should refuse complete while a delivery is unsettled', async () => {
    const t = await newToken();
    await kill(t.id);
    await assert.rejects(store.setPropagation(ctx.pool, t.id, 'complete', 'complete', {}), /billing, crm unsettled/);
    assert.equal((await store.requireToken(ctx.pool, t.id)).propagation, 'pending');
  });
});

describe('delivery attempts', () => {
  /** A killed token's outbox row to billing, and the audit events' kinds and data after the kill. */
  async function pendingDelivery(): Promise<{ tokenId: string; eventId: string }> {
    const t = await newToken();
    await kill(t.id);
    const [d] = await store.listDeliveries(ctx.pool, t.id);
    return { tokenId: t.id, eventId: d!.eventId };
  }
  const deliveryEvents = async (tokenId: string) =>
    (await store.readAudit(ctx.pool, tokenId))
      .filter((e) => e.kind.startsWith('delivery.'))
      .map((e) => ({ kind: e.kind, data: (JSON.parse(e.canonical) as { data: unknown }).data }));

  /** The store pool, counting statements and checkouts (a transaction checks a connection out). */
  function countingPool() {
    const counts = { statements: 0, checkouts: 0 };
    const pool = Object.assign(Object.create(ctx.pool) as typeof ctx.pool, {
      query: (...args: Parameters<typeof ctx.pool.query>) => (counts.statements++, ctx.pool.query(...args)),
      connect: () => (counts.checkouts++, ctx.pool.connect()),
    });
    return { pool, counts };
  }

  it('should record an attempt in one statement, without a transaction of its own', async () => {
    const { eventId } = await pendingDelivery();
    const { pool, counts } = countingPool();
    const recorded = await store.recordDeliveryAttempt(pool, eventId, 'billing', {
      kind: 'delivered',
      statusCode: 204,
    });
    assert.equal(recorded.status, 'delivered');
    assert.deepEqual(counts, { statements: 1, checkouts: 0 });
  });

  it('should read all an attempt needs in one statement', async () => {
    const { tokenId, eventId } = await pendingDelivery();
    const { pool, counts } = countingPool();
    const loaded = await store.loadAttempt(pool, eventId, 'billing');
    assert.deepEqual(counts, { statements: 1, checkouts: 0 });
    assert.equal(loaded!.delivery.tokenId, tokenId);
    assert.equal(loaded!.delivery.status, 'pending');
    assert.equal(JSON.parse(loaded!.body).token_id, tokenId);
    assert.equal(loaded!.receiver!.record.url, 'http://127.0.0.1:1/x');
    assert.deepEqual([loaded!.receiver!.ciphertext, loaded!.receiver!.keyId], [Buffer.from('x'), 'k']);
    assert.equal(loaded!.retryRequested, false);
    assert.equal(await store.loadAttempt(pool, eventId, 'nobody'), undefined);
  });

  it("should see an operator's retry only when it is newer than the rejected attempt", async () => {
    const { tokenId, eventId } = await pendingDelivery();
    await store.recordAudit(ctx.pool, tokenId, 'retry:early', 'propagation.retry-requested', { reason: 'early' });
    await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', { kind: 'rejected', statusCode: 400, error: 'no' });
    assert.equal((await store.loadAttempt(ctx.pool, eventId, 'billing'))!.retryRequested, false);
    await store.recordAudit(ctx.pool, tokenId, 'retry:late', 'propagation.retry-requested', { reason: 'late' });
    assert.equal((await store.loadAttempt(ctx.pool, eventId, 'billing'))!.retryRequested, true);
  });

  it('should count attempts, keep the last answer, and audit delivered and cancelled once each', async () => {
    const { tokenId, eventId } = await pendingDelivery();
    const failed = await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', {
      kind: 'retryable',
      statusCode: 503,
      error: 'receiver billing answered HTTP 503',
    });
    assert.deepEqual(
      [failed.status, failed.attempts, failed.lastStatusCode, failed.lastError, failed.ackedAt],
      ['pending', 1, 503, 'receiver billing answered HTTP 503', null],
    );
    const rejected = await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', {
      kind: 'rejected',
      statusCode: 400,
      error: 'receiver billing answered HTTP 400',
    });
    assert.deepEqual([rejected.status, rejected.attempts], ['failed', 2]);
    // A rejected delivery sent again after an operator's retry.
    const delivered = await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', {
      kind: 'delivered',
      statusCode: 204,
    });
    assert.deepEqual(
      [delivered.status, delivered.attempts, delivered.lastStatusCode, delivered.lastError],
      ['delivered', 3, 204, null],
    );
    assert.ok(delivered.ackedAt);
    const cancelled = await store.recordDeliveryAttempt(ctx.pool, eventId, 'crm', {
      kind: 'cancelled',
      error: 'receiver crm was removed',
    });
    assert.deepEqual([cancelled.status, cancelled.attempts, cancelled.ackedAt], ['cancelled', 0, null]);
    assert.deepEqual(await deliveryEvents(tokenId), [
      { kind: 'delivery.delivered', data: { attempts: 3, eventId, receiverId: 'billing', statusCode: 204 } },
      {
        kind: 'delivery.cancelled',
        data: { attempts: 0, detail: 'receiver crm was removed', eventId, receiverId: 'crm' },
      },
    ]);
    assert.equal(store.findBrokenAuditLink(await store.readAudit(ctx.pool, tokenId)), null);
  });

  it('should never move a settled delivery back, nor audit it again', async () => {
    const { tokenId, eventId } = await pendingDelivery();
    const delivered = await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', {
      kind: 'delivered',
      statusCode: 200,
    });
    await store.forceCompleteDeliveries(ctx.pool, tokenId, 'force', 'gone for good', 'operator');
    const late: store.AttemptOutcome[] = [
      { kind: 'delivered', statusCode: 204 },
      { kind: 'retryable', statusCode: 503, error: 'late 503' },
      { kind: 'rejected', statusCode: 400, error: 'late 400' },
      { kind: 'cancelled', error: 'late removal' },
    ];
    for (const outcome of late) {
      // A lost result retried, or an attempt still running when an operator forced completion.
      assert.deepEqual(await store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', outcome), delivered);
      const forced = await store.recordDeliveryAttempt(ctx.pool, eventId, 'crm', outcome);
      assert.deepEqual([forced.status, forced.attempts, forced.lastError], ['forced', 0, null]);
    }
    assert.deepEqual(
      (await deliveryEvents(tokenId)).map((e) => e.kind),
      ['delivery.delivered'],
    );
  });

  it('should settle concurrent records of one delivery once', async () => {
    const { tokenId, eventId } = await pendingDelivery();
    const rows = await Promise.all(
      [200, 201, 202, 203].map((statusCode) =>
        store.recordDeliveryAttempt(ctx.pool, eventId, 'billing', { kind: 'delivered', statusCode }),
      ),
    );
    assert.equal(new Set(rows.map((r) => r.lastStatusCode)).size, 1, 'every caller sees the one that settled it');
    assert.ok(rows.every((r) => r.attempts === 1));
    assert.equal((await deliveryEvents(tokenId)).length, 1);
  });

  it('should refuse an unknown delivery', async () => {
    await assert.rejects(
      store.recordDeliveryAttempt(ctx.pool, 'evt_unknown', 'billing', { kind: 'delivered', statusCode: 204 }),
      /delivery evt_unknown\/billing does not exist/,
    );
  });
});

describe('database connections', () => {
  it('should survive the server closing an idle pooled connection', async () => {
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    try {
      const { rows } = await pool.query('SELECT pg_backend_pid() AS pid');
      await ctx.sql.query('SELECT pg_terminate_backend($1)', [rows[0].pid]);
      await waitUntil(() => pool.totalCount === 0, 'the pool to drop the closed connection');
      assert.equal((await pool.query('SELECT 1 AS one')).rows[0].one, 1);
    } finally {
      await pool.end();
    }
  });

  it('should survive the server closing a connection checked out between two statements', async () => {
    // As inside a transaction when the server restarts: the error must reach the caller's next
    // statement, not crash the process as an unhandled 'error' event.
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    try {
      const client = await pool.connect();
      await client.query('BEGIN');
      const { rows } = await client.query('SELECT pg_backend_pid() AS pid');
      await ctx.pool.query('SELECT pg_terminate_backend($1)', [rows[0].pid]);
      await waitUntil(async () => {
        const gone = await ctx.pool.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [rows[0].pid]);
        return gone.rowCount === 0;
      }, 'the terminated backend to be gone');
      await assert.rejects(client.query('SELECT 1'));
      client.release(true);
      assert.equal((await pool.query('SELECT 1 AS one')).rows[0].one, 1);
    } finally {
      await pool.end();
    }
  });
});

describe('audit trail', () => {
  it('should chain events by hash and skip a repeated idempotency key', async () => {
    const t = await newToken();
    await store.recordAudit(ctx.pool, t.id, 'note-1', 'test.note', { n: 1 });
    await store.recordAudit(ctx.pool, t.id, 'note-1', 'test.note', { n: 1 });
    await Promise.all([2, 3, 4, 5].map((n) => store.recordAudit(ctx.pool, t.id, `note-${n}`, 'test.note', { n })));
    const events = await store.readAudit(ctx.pool, t.id);
    assert.deepEqual(
      events.map((e) => e.seq),
      [1, 2, 3, 4, 5, 6],
    );
    assert.equal(store.findBrokenAuditLink(events), null);
    const body = JSON.parse(events[1]!.canonical);
    assert.equal(body.prevHash, events[0]!.hash);
  });

  it('should detect a tampered event', async () => {
    const t = await newToken();
    await kill(t.id);
    const events = await store.readAudit(ctx.pool, t.id);
    const tampered = events.map((e, i) =>
      i === 0 ? { ...e, canonical: e.canonical.replace('usr_store', 'usr_other') } : e,
    );
    assert.equal(store.findBrokenAuditLink(tampered), 1);
  });

  it('should reject UPDATE, DELETE and TRUNCATE of audit events', async () => {
    const t = await newToken();
    await assert.rejects(
      ctx.sql.query(`UPDATE audit_event SET kind = 'x' WHERE token_id = $1`, [t.id]),
      /append-only: UPDATE/,
    );
    await assert.rejects(ctx.sql.query(`DELETE FROM audit_event WHERE token_id = $1`, [t.id]), /append-only: DELETE/);
    await assert.rejects(ctx.sql.query('TRUNCATE audit_event CASCADE'), /append-only: TRUNCATE/);
    assert.equal((await store.readAudit(ctx.pool, t.id)).length, 1);
  });
});

describe('token invariants', () => {
  // Runs last: no earlier test may have loosened the schema the rest of the file relies on.
  it('should still refuse an unknown status and an active row with a revocation time', async () => {
    const t = await newToken();
    await assert.rejects(
      ctx.sql.query(`UPDATE token SET status = 'zombie', revoked_at = now() WHERE id = $1`, [t.id]),
      (e: unknown) => (e as { constraint?: string }).constraint === 'token_status_check',
    );
    await assert.rejects(
      ctx.sql.query('UPDATE token SET revoked_at = now() WHERE id = $1', [t.id]),
      (e: unknown) => (e as { constraint?: string }).constraint === 'token_check',
    );
  });

  it('should refuse a lifetime beyond ten years from any writer', async () => {
    const t = await newToken();
    await assert.rejects(
      ctx.sql.query(`UPDATE token SET expires_at = issued_at + interval '3651 days' WHERE id = $1`, [t.id]),
      (e: unknown) => (e as { constraint?: string }).constraint === 'token_lifetime_bounded',
    );
    await ctx.sql.query(`UPDATE token SET expires_at = issued_at + interval '3650 days' WHERE id = $1`, [t.id]);
  });
});
