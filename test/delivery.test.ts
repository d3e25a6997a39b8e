/**
 * Delivery on the real engine: retry pacing when a receiver asks for none, and a master key roll
 * with deliveries pending. Real Temporal dev server, real PostgreSQL, real receivers on loopback.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { parseRetryAfter, retryDelayMs, retryScheduleOf } from '../activities/propagation.js';
import { TokenWarden } from '../client/index.js';
import type { Settings } from '../common/config.js';
import { tokenWorkflowId } from '../common/names.js';
import { masterKeyId } from '../common/secrets.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { historyTimeline } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
const receivers: TestReceiver[] = [];
let counter = 0;

before(async () => {
  // Escalation far away (beyond every wait below): these tests watch retries, not the stuck path.
  ctx = await TestContext.create('delivery', { escalateAfterMs: 600_000, retryInitialMs: 200, retryMaxMs: 1_000 });
});
after(async () => {
  for (const r of receivers) await r.close();
  await ctx?.close();
});

async function addReceiver(): Promise<{ id: string; receiver: TestReceiver }> {
  const receiver = await TestReceiver.start();
  receivers.push(receiver);
  const id = `dlv-${++counter}`;
  receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
  return { id, receiver };
}

async function revokedToken(receiverIds: string[]): Promise<string> {
  const { tokenId } = await ctx.warden.issue({ subject: 'usr_delivery', receivers: receiverIds, ttl: '1h' });
  await ctx.warden.revoke({ tokenId, reason: 'offboarded' });
  return tokenId;
}

const propagated = (tokenId: string, timeoutMs = 20_000) =>
  waitUntil(
    async () => (await ctx.warden.show(tokenId)).propagation === 'complete',
    `propagation of ${tokenId}`,
    timeoutMs,
  );

describe('retry pacing', () => {
  const schedule = { initialMs: 200, coefficient: 2, maximumMs: 1_000 };

  it('should never wait less than the schedule says, whatever Retry-After asks', () => {
    assert.equal(retryDelayMs(0, 1, schedule), 200, 'Retry-After: 0 on the first attempt');
    assert.equal(retryDelayMs(0, 3, schedule), 800, 'the backoff keeps growing');
    assert.equal(retryDelayMs(0, 30, schedule), 1_000, 'up to the maximum interval');
    assert.equal(retryDelayMs(50, 1, schedule), 200, 'a small value is floored');
    const now = Date.parse('2026-01-01T00:00:00Z');
    const past = parseRetryAfter('Wed, 31 Dec 2025 23:00:00 GMT', now);
    assert.equal(past, 0);
    assert.equal(retryDelayMs(past, 2, schedule), 400, 'a date in the past is floored');
  });

  it('should honour a longer Retry-After, capped', () => {
    assert.equal(retryDelayMs(30_000, 1, schedule), 30_000);
    assert.equal(retryDelayMs(365 * 86_400_000, 1, schedule), 6 * 3_600_000);
    assert.equal(retryDelayMs(undefined, 5, schedule), undefined, 'nothing asked: the schedule applies');
  });

  it("should read the schedule from the activity's retry policy, with Temporal's defaults", () => {
    assert.deepEqual(retryScheduleOf({ initialInterval: 200, backoffCoefficient: 3, maximumInterval: 5_000 }), {
      initialMs: 200,
      coefficient: 3,
      maximumMs: 5_000,
    });
    assert.deepEqual(retryScheduleOf(undefined), { initialMs: 1_000, coefficient: 2, maximumMs: 100_000 });
  });

  it('should retry a receiver answering 503 Retry-After: 0 a handful of times, then deliver', async (t) => {
    const worker = await ctx.startWorker();
    try {
      const { id, receiver } = await addReceiver();
      const unavailableMs = 4_000;
      let firstAt: number | undefined;
      receiver.behaviour = () => {
        firstAt ??= Date.now();
        return Date.now() - firstAt < unavailableMs
          ? { status: 503, headers: { 'retry-after': '0' } }
          : { status: 204 };
      };
      const tokenId = await revokedToken([id]);
      await propagated(tokenId);

      const attempts = receiver.requests;
      t.diagnostic(`attempts ${attempts.length}, gaps ${attempts.slice(1).map((r, i) => r.at - attempts[i]!.at)} ms`);
      // The schedule (200 ms doubling to 1 s; the dev server fires retry timers about once a second)
      // gives four or five attempts in 4 s. One means the activity gave up; dozens mean Retry-After: 0
      // turned the backoff into a loop.
      assert.ok(attempts.length >= 3 && attempts.length <= 15, `${attempts.length} attempts`);
      for (let i = 1; i < attempts.length; i++) {
        const gap = attempts[i]!.at - attempts[i - 1]!.at;
        assert.ok(gap >= 150, `attempt ${i + 1} came ${gap} ms after the previous one`);
      }
      assert.equal(attempts.at(-1)!.answered, 204);
      assert.ok(attempts.every((r) => r.verified));
      const [delivery] = (await ctx.warden.show(tokenId)).deliveries;
      assert.equal(delivery!.status, 'delivered');
      assert.equal(delivery!.attempts, attempts.length);
    } finally {
      await worker.stop();
    }
  });
});

describe('master key roll', () => {
  let worker: RunningWorker | undefined;
  after(async () => {
    await worker?.stop();
  });

  it('should lose nothing when the key changes with deliveries pending', async (t) => {
    const oldKey = ctx.settings.masterKey!;
    const newKey = randomBytes(32);
    const a = await addReceiver();
    const b = await addReceiver();
    for (const r of [a, b]) r.receiver.behaviour = () => ({ status: 503 });

    // A workflow task the server puts on a stopped worker's sticky queue waits there for the worker's
    // sticky timeout (60 s by default) before another worker may take it: short here, so the roll
    // loses at most that, plus one delivery attempt handed to the stopped worker's last poll (retried
    // after its 15 s start-to-close).
    const withShortSticky = (settings: Settings): Settings => ({
      ...settings,
      worker: { ...settings.worker, stickyTimeoutMs: 2_000 },
    });
    worker = await ctx.startWorker(withShortSticky(ctx.settings));
    const tokens = [await revokedToken([a.id, b.id]), await revokedToken([a.id, b.id])];
    await waitUntil(async () => {
      const shown = await Promise.all(tokens.map((t) => ctx.warden.show(t)));
      return shown.every((t) => t.deliveries.every((d) => d.status === 'pending' && d.attempts >= 1));
    }, 'every delivery tried at least once while the receivers are down');

    // The roll: workers restart with the new key current and the old one kept for decryption.
    const stoppingAt = Date.now();
    await worker.stop();
    const rolled: Settings = withShortSticky({ ...ctx.settings, masterKey: newKey, previousMasterKeys: [oldKey] });
    worker = await ctx.startWorker(rolled);
    // One receiver comes back before the secrets are re-encrypted: the old key still signs for it.
    a.receiver.behaviour = () => ({ status: 204 });
    // One deadline for the roll: a sticky timeout and a lost attempt, twice over for a loaded machine.
    const rollDeadline = stoppingAt + 2 * (2_000 + 15_000) + 15_000;
    /** Waits within the roll's deadline; a timeout shows the token's history (ids, types, times). */
    const withinRoll = (tokenId: string, probe: () => Promise<boolean>, what: string) =>
      waitUntil(probe, what, Math.max(1_000, rollDeadline - Date.now())).catch(async (err: Error) => {
        const timeline = await historyTimeline(
          ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)),
          stoppingAt,
        ).catch((e: Error) => `(history unavailable: ${e.message})`);
        throw new Error(`${err.message}; its history, from the worker's stop:\n${timeline}`);
      });
    for (const token of tokens) {
      await withinRoll(
        token,
        async () =>
          (await ctx.warden.show(token)).deliveries.find((d) => d.receiverId === a.id)?.status === 'delivered',
        `delivery of ${token} to ${a.id} during the roll`,
      );
    }
    t.diagnostic(`delivered to ${a.id} ${Date.now() - stoppingAt} ms after the worker's stop began`);

    const operator = await TokenWarden.connect(rolled);
    try {
      const rekeyed = await operator.rekeyReceivers();
      assert.deepEqual(rekeyed.failed, []);
      assert.ok([a.id, b.id].every((id) => rekeyed.rekeyed.includes(id)));
      assert.equal(rekeyed.keyId, masterKeyId(newKey));
      assert.deepEqual((await operator.rekeyReceivers()).rekeyed, [], 'a second run has nothing to do');
    } finally {
      await operator.close();
    }
    const { rows } = await ctx.sql.query('SELECT DISTINCT secret_key_id FROM receiver');
    assert.deepEqual(
      rows.map((r) => r.secret_key_id),
      [masterKeyId(newKey)],
    );
    tokens.push(await revokedToken([a.id, b.id]));

    b.receiver.behaviour = () => ({ status: 204 });
    for (const token of tokens) await propagated(token, 45_000);

    // Only the new key from now on: secrets were re-encrypted, so nothing needs the old one.
    await worker.stop();
    worker = await ctx.startWorker({ ...ctx.settings, masterKey: newKey, previousMasterKeys: [] });
    tokens.push(await revokedToken([a.id, b.id]));
    await propagated(tokens.at(-1)!);

    for (const { receiver } of [a, b]) {
      const acked = receiver.acked();
      assert.ok(
        acked.every((r) => r.verified),
        'every delivered event is signed with the receiver’s unchanged secret',
      );
      const events = new Set(acked.map((r) => JSON.parse(r.body).token_id as string));
      assert.deepEqual([...events].sort(), [...tokens].sort(), 'every token’s event reached every receiver');
      assert.equal(acked.length, tokens.length, 'once each');
    }
  });
});
