/** Delivery activity crash points, with MockActivityEnvironment, real Postgres and a real receiver. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import dnsPromises from 'node:dns/promises';
import { syncBuiltinESMExports } from 'node:module';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger, type LogEntry } from '@temporalio/worker';
import {
  createReceiverAgents,
  deliverRevocation,
  RECEIVER_UNAVAILABLE,
  type DeliveryDeps,
} from '../activities/propagation.js';
import { revocationEventId } from '../common/ids.js';
import { MasterKeyring } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import type { DeliveryView } from '../common/messages.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let receiver: TestReceiver;
/** One worker's connections, shared by every attempt here as by a worker's. */
const agents = createReceiverAgents();

before(async () => {
  ctx = await TestContext.create('activities');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
});
after(async () => {
  await receiver?.close();
  await ctx?.close();
});

async function revokedToken(): Promise<{ tokenId: string; eventId: string }> {
  const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['billing'], ttl: '1h' });
  await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
  const [d] = await store.listDeliveries(ctx.pool, tokenId);
  return { tokenId, eventId: d!.eventId };
}

/** One attempt in a mock activity context; `log` collects what the worker would log. */
const run = (
  masterKey: Buffer | undefined,
  input: { eventId: string; receiverId: string },
  log: LogEntry[] = [],
  pool: DeliveryDeps['pool'] = ctx.pool,
): Promise<DeliveryView> => {
  const deps: DeliveryDeps = {
    pool,
    keyring: new MasterKeyring(masterKey),
    receiverAllow: ctx.settings.receiverAllow,
    agents,
  };
  const logger = new DefaultLogger('DEBUG', (entry) => log.push(entry));
  return new MockActivityEnvironment(undefined, { logger }).run(
    deliverRevocation,
    deps,
    input,
  ) as Promise<DeliveryView>;
};

const failureLogs = (log: LogEntry[]) => log.filter((e) => e.message === 'Activity failed');

describe('deliverRevocation', () => {
  it('should not send again when the receiver acknowledged but the result was lost', async () => {
    const { eventId } = await revokedToken();
    const first = await run(ctx.settings.masterKey, { eventId, receiverId: 'billing' });
    assert.equal(first.status, 'delivered');
    const sent = receiver.requests.length;
    // The worker died after the ack was recorded: the retried attempt finds it settled.
    const retried = await run(ctx.settings.masterKey, { eventId, receiverId: 'billing' });
    assert.equal(retried.status, 'delivered');
    assert.equal(retried.attempts, 1);
    assert.equal(receiver.requests.length, sent);
  });

  it('should not send a rejected event again until an operator asks for a retry', async () => {
    const { tokenId, eventId } = await revokedToken();
    receiver.behaviour = () => ({ status: 400 });
    try {
      const rejected = (err: unknown) =>
        err instanceof ApplicationFailure && err.type === 'ReceiverRejected' && err.nonRetryable;
      await assert.rejects(run(ctx.settings.masterKey, { eventId, receiverId: 'billing' }), rejected);
      const sent = receiver.requests.length;
      // The worker died after recording the rejection; Temporal retries the attempt, or a new run starts.
      await assert.rejects(run(ctx.settings.masterKey, { eventId, receiverId: 'billing' }), rejected);
      assert.equal(receiver.requests.length, sent, 'nothing sent without an operator');
      receiver.behaviour = () => ({ status: 204 });
      await store.recordAudit(ctx.pool, tokenId, 'retry:test', 'propagation.retry-requested', { reason: 'fixed' });
      const delivered = await run(ctx.settings.masterKey, { eventId, receiverId: 'billing' });
      assert.equal(delivered.status, 'delivered');
      assert.equal(receiver.requests.length, sent + 1);
    } finally {
      receiver.behaviour = () => ({ status: 204 });
    }
  });

  it('should wait for the outbox row of a kill that commits while it runs', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['billing'], ttl: '1h' });
    // The store pool, counting the attempt's statements: the kill commits once it has read no row twice.
    let statements = 0;
    const counting = Object.assign(Object.create(ctx.pool) as typeof ctx.pool, {
      query: (...args: Parameters<typeof ctx.pool.query>) => (statements++, ctx.pool.query(...args)),
    });
    const attempt = run(
      ctx.settings.masterKey,
      { eventId: revocationEventId(tokenId), receiverId: 'billing' },
      [],
      counting,
    );
    await waitUntil(() => statements >= 2, 'the attempt to wait for its outbox row');
    await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
    assert.equal((await attempt).status, 'delivered');
  });

  it('should fail retryably, and quietly, when no kill ever wrote the outbox row', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['billing'], ttl: '1h' });
    const log: LogEntry[] = [];
    const err = await run(
      ctx.settings.masterKey,
      { eventId: revocationEventId(tokenId), receiverId: 'billing' },
      log,
    ).catch((e: unknown) => e);
    assert.ok(err instanceof ApplicationFailure);
    assert.equal(err.type, 'OutboxRowNotYetWritten');
    assert.equal(err.nonRetryable, false);
    // An expected, transient wait: logged at debug level, not as a warning with a stack trace.
    assert.deepEqual(
      failureLogs(log).map((e) => e.level),
      ['DEBUG'],
    );
  });

  it('should still warn about a real failure', async () => {
    const { eventId } = await revokedToken();
    receiver.behaviour = () => ({ status: 503 });
    const log: LogEntry[] = [];
    try {
      const err = await run(ctx.settings.masterKey, { eventId, receiverId: 'billing' }, log).catch((e: unknown) => e);
      assert.ok(err instanceof ApplicationFailure);
      assert.equal(err.type, RECEIVER_UNAVAILABLE);
    } finally {
      receiver.behaviour = () => ({ status: 204 });
    }
    assert.deepEqual(
      failureLogs(log).map((e) => e.level),
      ['WARN'],
    );
  });

  it('should refuse to sign with the wrong master key, without revealing any secret', async () => {
    const { eventId } = await revokedToken();
    const err = await run(randomBytes(32), { eventId, receiverId: 'billing' }).catch((e: unknown) => e);
    assert.ok(err instanceof ApplicationFailure);
    assert.equal(err.type, 'SigningKeyUnavailable');
    assert.equal(err.nonRetryable, false);
    assert.match(err.message, /TOKENWARDEN_MASTER_KEY/);
    assert.ok(!err.message.includes(receiver.secret!.slice(6)));
    assert.ok(!err.message.includes(ctx.settings.masterKey!.toString('base64')));
  });

  it('should cancel, with an audit event, a delivery to a removed receiver', async () => {
    const other = await TestReceiver.start();
    try {
      await ctx.warden.addReceiver({ id: 'legacy', url: other.url });
      const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['legacy'], ttl: '1h' });
      await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
      const [d] = await store.listDeliveries(ctx.pool, tokenId);
      await ctx.warden.removeReceiver('legacy');
      const result = await run(ctx.settings.masterKey, { eventId: d!.eventId, receiverId: 'legacy' });
      assert.equal(result.status, 'cancelled');
      assert.equal(other.requests.length, 0);
      assert.ok((await store.readAudit(ctx.pool, tokenId)).some((e) => e.kind === 'delivery.cancelled'));
    } finally {
      await other.close();
    }
  });
});

describe('store statements', () => {
  it('should cost two statements and no transaction per attempt', async () => {
    const { eventId } = await revokedToken();
    const counts = { statements: 0, checkouts: 0 };
    const counting = Object.assign(Object.create(ctx.pool) as typeof ctx.pool, {
      query: (...args: Parameters<typeof ctx.pool.query>) => (counts.statements++, ctx.pool.query(...args)),
      connect: () => (counts.checkouts++, ctx.pool.connect()),
    });
    const delivered = await run(ctx.settings.masterKey, { eventId, receiverId: 'billing' }, [], counting);
    assert.equal(delivered.status, 'delivered');
    // Read the row, receiver and secret together; record the outcome and its audit event together.
    assert.deepEqual(counts, { statements: 2, checkouts: 0 });
  });
});

describe('connections to receivers', () => {
  it("should send a worker's attempts to a receiver over the connection it keeps open", async () => {
    const kept = await TestReceiver.start();
    try {
      kept.secret = (await ctx.warden.addReceiver({ id: 'kept', url: kept.url })).secret;
      for (let i = 0; i < 3; i++) {
        const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['kept'], ttl: '1h' });
        await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
        const [d] = await store.listDeliveries(ctx.pool, tokenId);
        assert.equal(
          (await run(ctx.settings.masterKey, { eventId: d!.eventId, receiverId: 'kept' })).status,
          'delivered',
        );
      }
      assert.equal(kept.requests.length, 3);
      assert.ok(kept.requests.every((r) => r.verified));
      assert.equal(kept.connections, 1);
    } finally {
      await kept.close();
    }
  });

  it('should not reach a receiver whose name now resolves elsewhere over a connection to its old address', async () => {
    // Two servers on one port, at two loopback addresses; the name's answer moves from one to the other.
    const before = await TestReceiver.start({ host: '127.0.0.1' });
    const now = await TestReceiver.start({ host: '127.0.0.2', port: Number(new URL(before.url).port) });
    const name = 'moving-receiver.test';
    let answer = before.host;
    const realLookup = dnsPromises.lookup;
    // The resolver's answers, under the test's control (no DNS server to run here); connections
    // still go through the delivery's own pinned lookup.
    dnsPromises.lookup = ((hostname: string, options: object) =>
      hostname === name
        ? Promise.resolve([{ address: answer, family: 4 }])
        : realLookup(hostname, options)) as typeof dnsPromises.lookup;
    syncBuiltinESMExports();
    try {
      const { secret } = await ctx.warden.addReceiver({ id: 'moving', url: before.url.replace(before.host, name) });
      before.secret = now.secret = secret;
      const deliver = async () => {
        const { tokenId } = await ctx.warden.issue({ subject: 'usr_act', receivers: ['moving'], ttl: '1h' });
        await store.killToken(ctx.pool, { tokenId, reason: 'test', actor: 'admin', initiatingEntity: 'admin' });
        const [d] = await store.listDeliveries(ctx.pool, tokenId);
        assert.equal(
          (await run(ctx.settings.masterKey, { eventId: d!.eventId, receiverId: 'moving' })).status,
          'delivered',
        );
      };
      await deliver();
      await deliver();
      assert.deepEqual([before.requests.length, before.connections], [2, 1], 'kept open while the name stays');
      answer = now.host;
      await deliver();
      assert.equal(before.requests.length, 2, 'nothing more over the open connection to the old address');
      assert.deepEqual([now.requests.length, now.connections], [1, 1]);
      assert.ok(now.requests[0]!.verified);
    } finally {
      dnsPromises.lookup = realLookup;
      syncBuiltinESMExports();
      await before.close();
      await now.close();
    }
  });
});
