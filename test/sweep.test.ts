/**
 * Mass expiry: the store records expired tokens dead in batches (kill_expired_tokens), with exactly
 * the facts of the one kill, safely from several sweepers at once; the expiry sweep records a wave
 * within a couple of intervals without any workflow task, and each token's workflow later adopts
 * those facts and propagates once.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { WorkflowNotFoundError } from '@temporalio/client';
import { DefaultLogger, type LogEntry } from '@temporalio/worker';
import { createPool } from '../common/db.js';
import { newTokenId, revocationEventId } from '../common/ids.js';
import { KILL_CHANNEL, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { freePort } from '../dev/processes.js';
import { startExpirySweeper } from '../worker/expiry-sweeper.js';
import { halfKillProblems, propagationProblems, readFacts, receiverProblems } from './support/invariants.js';
import { insertTokenRow } from './support/tokens.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';
import { listenForKills } from './support/kill-listener.js';

let ctx: TestContext;
const receivers: TestReceiver[] = [];
before(async () => {
  ctx = await TestContext.create('sweep');
  for (const id of ['billing', 'crm']) {
    const receiver = await TestReceiver.start();
    receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
    receivers.push(receiver);
  }
});
after(async () => {
  for (const r of receivers) await r.close();
  await ctx?.close();
});

const newToken = (overrides: Partial<store.NewToken> = {}) =>
  insertTokenRow(ctx.pool, { subject: 'usr_sweep', receivers: ['billing', 'crm'], ...overrides });

/** Tokens that expired `agoMs` before now on the database clock, all at the same instant. */
async function expiredTokens(n: number, agoMs = 3_600_000): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) ids.push((await newToken()).id);
  await ctx.sql.query(
    `UPDATE token SET issued_at = now() - ($2 + 60000) * interval '1 millisecond',
                      expires_at = now() - $2 * interval '1 millisecond'
      WHERE id = ANY($1)`,
    [ids, agoMs],
  );
  return ids;
}

/** Kills every expired token of the schema, so a test starts without another test's leftovers. */
async function sweepLeftovers(): Promise<void> {
  while ((await store.killExpiredTokens(ctx.pool, { limit: 1000 })).killed.length > 0);
}

/** A logger that keeps what the sweeper says. */
function listeningLogger(): { logger: DefaultLogger; entries: LogEntry[] } {
  const entries: LogEntry[] = [];
  return { logger: new DefaultLogger('INFO', (entry) => entries.push(entry)), entries };
}

/** Everything a kill wrote about a token, with the token's own ids replaced, to compare two kills. */
async function killRecord(tokenId: string) {
  const { rows: creds } = await ctx.sql.query('SELECT id FROM credential WHERE token_id = $1', [tokenId]);
  const anonymous = (text: string) =>
    creds
      .reduce((t: string, c: { id: string }) => t.replaceAll(c.id, '<credential>'), text)
      .replaceAll(revocationEventId(tokenId), '<event>')
      .replaceAll(tokenId, '<token>');
  const { rows: token } = await ctx.sql.query(
    `SELECT subject, receivers, status, propagation, issued_at, expires_at, revoked_at, revoked_by, revoke_reason,
            initiating_entity, revoke_request_id, propagation_started_at, propagation_completed_at
       FROM token WHERE id = $1`,
    [tokenId],
  );
  const { rows: credentials } = await ctx.sql.query(
    'SELECT state, revoked_at FROM credential WHERE token_id = $1 ORDER BY id',
    [tokenId],
  );
  const { rows: outbox } = await ctx.sql.query(
    `SELECT event_id, receiver_id, status, attempts, body FROM delivery WHERE token_id = $1 ORDER BY receiver_id`,
    [tokenId],
  );
  const audit = await store.readAudit(ctx.pool, tokenId);
  const { rows: keys } = await ctx.sql.query(
    'SELECT seq, idempotency_key FROM audit_event WHERE token_id = $1 ORDER BY seq',
    [tokenId],
  );
  return {
    token: token[0],
    credentials,
    outbox: outbox.map((d) => ({ ...d, event_id: anonymous(d.event_id), body: anonymous(d.body) })),
    // What the kill appended (the issue event holds the issue's own clock reading).
    audit: audit.flatMap((a, i) => {
      const { kind, seq, data } = JSON.parse(a.canonical) as { kind: string; seq: number; data: unknown };
      const key = keys[i].idempotency_key as string;
      return key === 'issued' ? [] : [{ kind, seq, key, data: anonymous(JSON.stringify(data)) }];
    }),
    chainBrokenAt: store.findBrokenAuditLink(audit),
  };
}

describe('the batched kill', () => {
  it('should kill exactly the active tokens past their expiry, leaving the first kill of a dead one standing', async () => {
    await sweepLeftovers();
    const [expired, alreadyExpired, alreadyRevoked] = await expiredTokens(3);
    const alive = await newToken({ ttlMs: 3_600_000 });
    const firstKills = [
      await store.killToken(ctx.pool, {
        tokenId: alreadyExpired!,
        reason: 'expired',
        actor: 'system',
        initiatingEntity: 'system',
        onlyIfExpired: true,
      }),
    ];
    // Revoked while alive, then its expiry passed: it stays revoked, by its revoker.
    await ctx.sql.query(`UPDATE token SET expires_at = now() + interval '1 hour' WHERE id = $1`, [alreadyRevoked]);
    firstKills.push(
      await store.killToken(ctx.pool, {
        tokenId: alreadyRevoked!,
        reason: 'left the company',
        actor: 'admin:alice',
        initiatingEntity: 'admin',
      }),
    );
    await ctx.sql.query(`UPDATE token SET expires_at = now() - interval '1 minute' WHERE id = $1`, [alreadyRevoked]);
    const auditBefore = await Promise.all(
      firstKills.map(async (k) => (await store.readAudit(ctx.pool, k.token.id)).length),
    );

    const { killed, failed } = await store.killExpiredTokens(ctx.pool, { limit: 100 });
    assert.deepEqual(failed, []);
    assert.deepEqual(
      killed.map((t) => t.id),
      [expired],
    );
    assert.equal(killed[0]!.status, 'expired');
    assert.equal(killed[0]!.revokedAt, killed[0]!.expiresAt);
    assert.equal(killed[0]!.revokedBy, 'system');
    assert.equal(killed[0]!.propagationStartedAt, null, 'no workflow has taken over yet');
    assert.equal((await store.requireToken(ctx.pool, alive.id)).status, 'active');
    for (const [i, first] of firstKills.entries()) {
      const now = await store.requireToken(ctx.pool, first.token.id);
      assert.equal(now.status, first.token.status);
      assert.equal(now.revokedAt, first.token.revokedAt);
      assert.equal(now.revokedBy, first.token.revokedBy);
      assert.equal((await store.readAudit(ctx.pool, first.token.id)).length, auditBefore[i]);
    }
    assert.equal((await store.requireToken(ctx.pool, alreadyRevoked!)).status, 'revoked');
    assert.deepEqual((await store.killExpiredTokens(ctx.pool, { limit: 100 })).killed, [], 'nothing left to kill');
  });

  it('should write exactly what the expiry kill writes: row, credentials, outbox, audit and NOTIFY', async () => {
    await sweepLeftovers();
    const [single, batched] = await expiredTokens(2);
    const listener = await listenForKills(ctx.settings.databaseUrl);
    const { payloads } = listener;
    try {
      // The expiry timer's kill, as the workflow's activity sends it (by a caller that is no workflow).
      await store.killToken(ctx.pool, {
        tokenId: single!,
        reason: 'expired',
        actor: 'system',
        initiatingEntity: 'system',
        onlyIfExpired: true,
      });
      const { killed } = await store.killExpiredTokens(ctx.pool, { limit: 10 });
      assert.deepEqual(
        killed.map((t) => t.id),
        [batched],
      );
      const [a, b] = [await killRecord(single!), await killRecord(batched!)];
      assert.equal(b.outbox.length, 2);
      assert.deepEqual(
        b.audit.map((e) => [e.seq, e.key, e.kind]),
        [[2, 'killed', 'token.expired']],
      );
      assert.equal(b.chainBrokenAt, null);
      assert.deepEqual(b, a);
      const schema = ctx.settings.databaseSchema;
      await waitUntil(() => payloads.includes(`${schema}:${batched}`), 'the batched kill NOTIFY');
      assert.deepEqual(payloads, [`${schema}:${single}`, `${schema}:${batched}`]);
    } finally {
      await listener.end();
    }
    // The store derives event ids as common/ids.ts does, whatever the token id.
    for (const id of [newTokenId(), newTokenId(), 'tok_ünïcödé', '']) {
      const { rows } = await ctx.sql.query('SELECT revocation_event_id($1) AS id', [id]);
      assert.equal(rows[0].id, revocationEventId(id));
    }
  });

  it('should never kill a token twice when two sweepers run at once: locked rows are skipped, not waited for', async () => {
    await sweepLeftovers();
    const ids = await expiredTokens(30);
    // A short statement timeout: a batch that waited on the other's locks would fail here.
    const other = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 2, undefined, { queryMs: 5_000 });
    const holder = await ctx.pool.connect();
    try {
      await holder.query('BEGIN');
      const { rows: held } = await holder.query(
        `SELECT id FROM ${ctx.settings.databaseSchema}.kill_expired_tokens($1, 10, 0, $2)`,
        [ctx.settings.databaseSchema, KILL_CHANNEL],
      );
      // Meanwhile a revoke of one of them waits for that batch and then finds it dead as expired.
      const revoke = store.killToken(other, {
        tokenId: held[0].id as string,
        reason: 'offboarding',
        actor: 'admin:bob',
        initiatingEntity: 'admin',
      });
      const { killed: rest, failed } = await store.killExpiredTokens(other, { limit: 100 });
      await holder.query('COMMIT');
      assert.deepEqual(failed, []);
      const revoked = await revoke;
      assert.equal(revoked.changed, false);
      assert.equal(revoked.token.status, 'expired');
      const heldIds = held.map((r) => r.id as string);
      assert.equal(heldIds.length, 10);
      assert.equal(rest.length, 20);
      assert.deepEqual([...heldIds, ...rest.map((t) => t.id)].sort(), [...ids].sort());

      // And two sweepers draining at once, in small batches.
      const more = await expiredTokens(40);
      const drain = async (pool: typeof other) => {
        const mine: string[] = [];
        for (;;) {
          const { killed } = await store.killExpiredTokens(pool, { limit: 3 });
          mine.push(...killed.map((t) => t.id));
          if (killed.length < 3) return mine;
        }
      };
      const [x, y] = await Promise.all([drain(ctx.pool), drain(other)]);
      assert.deepEqual([...x, ...y].sort(), [...more].sort(), 'each token killed by exactly one sweeper');
      const facts = await readFacts(ctx.pool, [...ids, ...more]);
      assert.deepEqual(facts.flatMap(halfKillProblems), [], 'one kill audit event and one outbox row per receiver');
      assert.ok(facts.every((f) => f.status === 'expired'));
    } finally {
      holder.release();
      await other.end();
    }
  });

  it('should report a token whose kill fails and still kill the others', async () => {
    await sweepLeftovers();
    const ids = await expiredTokens(3);
    const broken = ids[1]!;
    await ctx.sql.query(`CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'injected fault on %', OLD.id; END $$`);
    await ctx.sql.query(
      `CREATE TRIGGER refuse_update BEFORE UPDATE ON token FOR EACH ROW WHEN (OLD.id = '${broken}') EXECUTE FUNCTION refuse_update()`,
    );
    let result: store.ExpiredKills;
    try {
      result = await store.killExpiredTokens(ctx.pool, { limit: 10 });
    } finally {
      await ctx.sql.query('DROP TRIGGER refuse_update ON token');
      await ctx.sql.query('DROP FUNCTION refuse_update()');
    }
    assert.deepEqual(
      result.killed.map((t) => t.id),
      [ids[0], ids[2]],
    );
    assert.deepEqual(
      result.failed.map((f) => f.tokenId),
      [broken],
    );
    assert.match(result.failed[0]!.error, /injected fault/);
    assert.equal((await store.requireToken(ctx.pool, broken)).status, 'active');
    assert.deepEqual(
      (await store.killExpiredTokens(ctx.pool, { limit: 10 })).killed.map((t) => t.id),
      [broken],
    );
  });
});

describe('the expiry sweep', () => {
  it('should drain more expired tokens than one batch holds in one sweep', async () => {
    await sweepLeftovers();
    const ids = await expiredTokens(23);
    const { logger, entries } = listeningLogger();
    // An interval far longer than the test: only the sweep at start can record them.
    const sweeper = startExpirySweeper({ pool: ctx.pool, intervalMs: 3_600_000, batchSize: 5, logger });
    try {
      await waitUntil(async () => {
        const facts = await readFacts(ctx.pool, ids);
        return facts.every((f) => f.status === 'expired');
      }, 'every token recorded dead');
    } finally {
      await sweeper.stop();
    }
    const counted = entries.filter((e) => e.level === 'INFO').map((e) => e.meta?.count as number);
    assert.deepEqual(counted, [23], 'one sweep, one log line with its count');
  });

  it('should record a wave of expiries within a couple of intervals with no workflow running', async (t) => {
    await sweepLeftovers();
    const intervalMs = 200;
    const { logger, entries } = listeningLogger();
    const sweeper = startExpirySweeper({ pool: ctx.pool, intervalMs, logger });
    let ids: string[];
    try {
      // Bare rows as the issuer's first step writes them: no workflow exists for any of them.
      ids = [];
      for (let i = 0; i < 40; i++) ids.push((await newToken({ ttlMs: 1_500 + (i % 10) * 50 })).id);
      await waitUntil(
        async () => (await readFacts(ctx.pool, ids)).every((f) => f.status === 'expired'),
        'the wave recorded dead',
        10_000,
      );
    } finally {
      await sweeper.stop();
    }
    // The audit event's time is its transaction's start: when the sweep recorded the death.
    const { rows } = await ctx.sql.query(
      `SELECT max(extract(epoch FROM a.recorded_at - t.expires_at) * 1000)::int AS lag_ms, count(*)::int AS n
         FROM token t JOIN audit_event a ON a.token_id = t.id AND a.idempotency_key = 'killed'
        WHERE t.id = ANY($1)`,
      [ids],
    );
    t.diagnostic(
      `the last of 40 deaths was recorded ${rows[0].lag_ms} ms after its expiry (interval ${intervalMs} ms)`,
    );
    assert.equal(rows[0].n, 40);
    assert.ok(rows[0].lag_ms >= 0 && rows[0].lag_ms <= 2_000, `recorded ${rows[0].lag_ms} ms after expiry`);
    const facts = await readFacts(ctx.pool, ids);
    assert.deepEqual(facts.flatMap(halfKillProblems), []);
    for (const id of ids) {
      await assert.rejects(ctx.client.workflow.getHandle(tokenWorkflowId(id)).describe(), WorkflowNotFoundError);
    }
    const swept = entries.filter((e) => e.level === 'INFO').reduce((n, e) => n + (e.meta?.count as number), 0);
    assert.equal(swept, 40);
  });

  it("should leave propagation to the token's workflow, which adopts the sweep's facts when its timer fires", async () => {
    await sweepLeftovers();
    const worker = await ctx.startWorker();
    const issued = await ctx.warden.issue({ subject: 'usr_sweep', receivers: ['billing', 'crm'], ttl: '5s' });
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
    await waitUntil(
      async () => (await decodedHistory(handle)).events?.some((e) => e.timerStartedEventAttributes),
      'the workflow asleep until expiry',
    );
    // The backlog: no worker runs when the timer fires.
    await worker.stop();
    const sweeper = startExpirySweeper({ pool: ctx.pool, intervalMs: 200, logger: listeningLogger().logger });
    try {
      await waitUntil(
        async () => (await store.requireToken(ctx.pool, issued.tokenId)).status === 'expired',
        'the sweep to record the death',
      );
    } finally {
      await sweeper.stop();
    }
    const swept = await store.requireToken(ctx.pool, issued.tokenId);
    assert.equal(swept.propagationStartedAt, null);
    assert.equal(swept.propagation, 'pending');
    assert.equal(
      receivers.reduce((n, r) => n + r.requestsFor(issued.tokenId).length, 0),
      0,
      'nothing sent yet',
    );
    assert.ok(
      !(await decodedHistory(handle)).events?.some((e) => e.activityTaskScheduledEventAttributes),
      'the workflow has not run since it fell asleep',
    );

    const resumed = await ctx.startWorker();
    try {
      const done = (await handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'expired');
      assert.equal(done.propagation, 'complete');
    } finally {
      await resumed.stop();
    }
    const row = await store.requireToken(ctx.pool, issued.tokenId);
    assert.ok(row.propagationStartedAt, 'the workflow took over propagation');
    assert.equal(row.revokedAt, swept.revokedAt, "the sweep's facts stand");
    assert.deepEqual((await readFacts(ctx.pool, [issued.tokenId])).flatMap(propagationProblems), []);
    assert.deepEqual(
      receivers.flatMap((r, i) => receiverProblems(`receiver ${i}`, r, [issued.tokenId])),
      [],
    );
    for (const r of receivers) assert.equal(r.requestsFor(issued.tokenId).length, 1, 'each receiver told once');
  });

  it('should finish its statement in flight before it stops', async () => {
    await sweepLeftovers();
    const [id] = await expiredTokens(1);
    // A lock on the whole table holds the sweep's statement until the test lets it go.
    const locker = await ctx.pool.connect();
    const sweepPool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    try {
      await locker.query('BEGIN');
      await locker.query(`LOCK TABLE ${ctx.pool.tables.token} IN EXCLUSIVE MODE`);
      const lockerPid = (await locker.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
      const sweeper = startExpirySweeper({ pool: sweepPool, intervalMs: 3_600_000, logger: listeningLogger().logger });
      await waitUntil(
        async () =>
          (await ctx.sql.query('SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))', [lockerPid]))
            .rowCount === 1,
        'the sweep to wait on the lock',
      );
      let stopped = false;
      const stopping = sweeper.stop().then(() => (stopped = true));
      await new Promise((resolve) => setImmediate(resolve));
      assert.equal(stopped, false, 'stop waits for the statement in flight');
      await locker.query('COMMIT');
      await stopping;
      assert.equal((await store.requireToken(ctx.pool, id!)).status, 'expired', 'the statement in flight completed');
      assert.equal(sweepPool.idleCount, sweepPool.totalCount, 'no statement of the sweep left running');
    } finally {
      locker.release();
      await sweepPool.end();
    }
  });

  it('should log a failed sweep and try again at the next interval, without throwing', async () => {
    const unreachable = createPool(`postgres://tokenwarden@127.0.0.1:${await freePort()}/none`, 'none', 1);
    const { logger, entries } = listeningLogger();
    const sweeper = startExpirySweeper({ pool: unreachable, intervalMs: 100, logger });
    try {
      await waitUntil(
        () => entries.filter((e) => e.level === 'WARN' && /expiry sweep failed/.test(e.message)).length >= 2,
        'two failed sweeps logged',
      );
    } finally {
      await sweeper.stop();
      await unreachable.end();
    }
    assert.ok(entries.every((e) => e.level !== 'ERROR'));
  });
});
