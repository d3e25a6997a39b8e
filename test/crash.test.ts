/**
 * A worker process killed with SIGKILL (no shutdown, connections dropped) with three revocations
 * at three points of their delivery: before the POST, while the receiver holds the POST, and after
 * the receiver answered but before the answer is recorded. Each receiver then has exactly one
 * logical event. The dead attempts block their retries until their start-to-close timeouts.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type pg from 'pg';
import type { RevokeOutcome } from '../client/index.js';
import { TestContext } from './support/context.js';
import { workflowResults } from './support/fault.js';
import { propagationProblems, readFacts, receiverProblems } from './support/invariants.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';
import { WorkerProcess } from './support/worker-process.js';

let ctx: TestContext;
const receivers: TestReceiver[] = [];
const workers: WorkerProcess[] = [];
const locks: pg.PoolClient[] = [];
const backendPids = new Map<pg.PoolClient, number>();

before(async () => {
  // No escalation while the dead attempts time out: this file is about delivery, not `stuck`.
  ctx = await TestContext.create('crash', { escalateAfterMs: 600_000 });
});
after(async () => {
  for (const lock of locks) lock.release(true);
  for (const w of workers) await w.kill();
  for (const r of receivers) await r.close();
  await ctx?.close();
});

async function addReceiver(id: string): Promise<TestReceiver> {
  const receiver = await TestReceiver.start();
  receivers.push(receiver);
  receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
  return receiver;
}

async function issue(receiverId: string): Promise<string> {
  return (await ctx.warden.issue({ subject: 'usr_crash', receivers: [receiverId], ttl: '1h' })).tokenId;
}

/** A transaction of the test's own holding row locks, so that the worker blocks where the test wants. */
async function lockRows(sql: string, params: unknown[]): Promise<pg.PoolClient> {
  const client = await ctx.sql.connect();
  locks.push(client);
  await client.query('BEGIN');
  const { rows } = await client.query('SELECT pg_backend_pid() AS pid');
  backendPids.set(client, rows[0].pid as number);
  await client.query(sql, params);
  return client;
}

/**
 * How many other sessions wait for a lock this transaction holds, directly or behind another waiter
 * (a second waiter for a row queues behind the first one's tuple lock).
 */
async function blocked(lock: pg.PoolClient): Promise<number> {
  const { rows } = await ctx.pool.query(
    `WITH RECURSIVE waiting(pid) AS (
       SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))
       UNION SELECT a.pid FROM pg_stat_activity a JOIN waiting w ON w.pid = ANY(pg_blocking_pids(a.pid)))
     SELECT count(*)::int AS n FROM waiting`,
    [backendPids.get(lock)],
  );
  return rows[0].n as number;
}

const blocks = async (lock: pg.PoolClient) => (await blocked(lock)) > 0;

async function endLock(client: pg.PoolClient, how: 'COMMIT' | 'ROLLBACK'): Promise<void> {
  await client.query(how);
  locks.splice(locks.indexOf(client), 1);
  client.release();
}

describe('worker process crash', () => {
  it('should deliver one logical event per receiver when the worker is SIGKILLed before, during and after a POST', async () => {
    const beforePost = await addReceiver('before-post');
    const holding = await addReceiver('holding');
    const answered = await addReceiver('answered');
    const doomed = await WorkerProcess.start(ctx.childEnv(), ctx.client);
    workers.push(doomed);
    const [tokenA, tokenB, tokenC] = [await issue('before-post'), await issue('holding'), await issue('answered')];

    // A: the token's row is locked, so its kills wait (the caller's and the workflow's): the worker
    // has taken the revocation, nothing has been POSTed.
    const rowOfA = await lockRows('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [tokenA]);
    const revokingA = ctx.warden.revoke({ tokenId: tokenA, reason: 'crash before the POST' });
    // Two sessions wait for A's row: the caller's kill and the workflow's (a local activity of the
    // only worker, so it runs on the doomed one).
    await waitUntil(async () => (await blocked(rowOfA)) >= 2, 'the workflow’s kill of A waiting for the row', 60_000);

    // B: the receiver holds the POST unanswered.
    let answerB!: () => void;
    const heldB = new Promise<void>((resolve) => (answerB = resolve));
    holding.behaviour = (n) => (n === 1 ? { status: 204, after: heldB } : { status: 204 });
    const revokedB = await ctx.warden.revoke({ tokenId: tokenB, reason: 'crash while the receiver holds the POST' });
    await waitUntil(() => holding.requests.length === 1, 'the POST of B at its receiver', 60_000);

    // C: the receiver answers 204 once the test holds the delivery row, so recording the answer waits.
    let answerC!: () => void;
    const gateC = new Promise<void>((resolve) => (answerC = resolve));
    answered.behaviour = (n) => (n === 1 ? { status: 204, after: gateC } : { status: 204 });
    const revokedC = await ctx.warden.revoke({ tokenId: tokenC, reason: 'crash before the answer is recorded' });
    await waitUntil(() => answered.requests.length === 1, 'the POST of C at its receiver', 60_000);
    const deliveryOfC = await lockRows('SELECT 1 FROM delivery WHERE token_id = $1 FOR UPDATE', [tokenC]);
    answerC();
    await waitUntil(() => blocks(deliveryOfC), 'the worker recording C’s answer to wait for the delivery row', 60_000);

    assert.equal(beforePost.requests.length, 0, 'nothing of A was POSTed before the crash');
    await doomed.kill();
    assert.equal((await doomed.exited).signal, 'SIGKILL');
    // The dead worker's record of C is one statement already sent: it would still commit once the
    // row frees (a true answer, so nothing would be sent again). End it as the server does once it
    // notices the client is gone, so that C's answer is never recorded.
    await ctx.pool.query(
      'SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))',
      [backendPids.get(deliveryOfC)],
    );
    await endLock(rowOfA, 'COMMIT');
    answerB();
    await endLock(deliveryOfC, 'ROLLBACK');

    workers.push(await WorkerProcess.start(ctx.childEnv(), ctx.client));
    const outcomes: RevokeOutcome[] = [await revokingA, revokedB, revokedC];
    assert.deepEqual(
      outcomes.map((o) => [o.status, o.changed]),
      [
        ['revoked', true],
        ['revoked', true],
        ['revoked', true],
      ],
    );
    const tokenIds = [tokenA, tokenB, tokenC];
    await workflowResults(ctx.client, tokenIds, 120_000);
    assert.deepEqual(
      [
        ...(await readFacts(ctx.pool, tokenIds)).flatMap(propagationProblems),
        ...receiverProblems('before-post', beforePost, [tokenA]),
        ...receiverProblems('holding', holding, [tokenB]),
        ...receiverProblems('answered', answered, [tokenC]),
      ],
      [],
    );
    assert.ok(holding.requests.length >= 2, 'the held POST was sent again after the crash');
    assert.ok(answered.requests.length >= 2, 'the answer that was never recorded was asked for again');
  });
});
