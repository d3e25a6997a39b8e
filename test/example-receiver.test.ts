/**
 * The example receiver (examples/receiver) on its own, over real HTTP on loopback: Standard
 * Webhooks signatures checked with the reference library, a secret roll, stale timestamps,
 * duplicate ids, and the signed verification probe before and after a revocation.
 */
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Webhook } from 'standardwebhooks';
import { startReceiver, type ExampleReceiver } from '../examples/receiver/receiver.js';

const secret = () => `whsec_${randomBytes(32).toString('base64')}`;
const tokenId = () => `tok_${randomBytes(16).toString('hex')}`;

/** Headers of a Standard Webhooks message signed with each of `secrets` (space-separated signatures). */
function signed(secrets: string[], payload: string, at = new Date(), id = `msg_${randomUUID()}`) {
  return {
    'webhook-id': id,
    'webhook-timestamp': String(Math.floor(at.getTime() / 1000)),
    'webhook-signature': secrets.map((s) => new Webhook(s).sign(id, at, payload)).join(' '),
  };
}

const eventBody = (token: string, id = `evt_${randomUUID()}`) =>
  JSON.stringify({ id, type: 'token.revoked', change_type: 'revoke', token_id: token, reason: 'test' });

async function postEvent(r: ExampleReceiver, body: string, headers: Record<string, string>) {
  const res = await fetch(r.eventsUrl, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body,
  });
  return { status: res.status, text: await res.text() };
}

async function probe(r: ExampleReceiver, token: string, headers: Record<string, string>) {
  const res = await fetch(`${r.probeUrl}/${token}`, { headers });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

const probeHeaders = (secrets: string[], token: string, at?: Date) => signed(secrets, `/probe/${token}`, at);

describe('example receiver', () => {
  const current = secret();
  let receiver: ExampleReceiver;
  before(async () => {
    receiver = await startReceiver({ secrets: [current] });
  });
  after(async () => {
    await receiver?.close();
  });

  it('should act on a correctly signed event: the token is no longer accepted', async () => {
    const token = tokenId();
    receiver.accept(token);
    const body = eventBody(token);
    const answer = await postEvent(receiver, body, signed([current], body));
    assert.equal(answer.status, 204);
    assert.equal(receiver.accepts(token), false);
    assert.ok(receiver.handled.some((e) => e.tokenId === token && e.type === 'token.revoked'));
  });

  it('should refuse a bad signature and keep the token', async () => {
    const token = tokenId();
    receiver.accept(token);
    const body = eventBody(token);
    const wrongSecret = await postEvent(receiver, body, signed([secret()], body));
    assert.equal(wrongSecret.status, 401);
    assert.match(wrongSecret.text, /no matching signature/i);
    // The right secret over other bytes: a tampered body.
    const tampered = await postEvent(receiver, body.replace('test', 'tampered'), signed([current], body));
    assert.equal(tampered.status, 401);
    const unsigned = await postEvent(receiver, body, {});
    assert.equal(unsigned.status, 401);
    assert.equal(receiver.accepts(token), true);
    assert.ok(!receiver.handled.some((e) => e.tokenId === token));
  });

  it('should refuse a timestamp more than 5 minutes old, or ahead, even correctly signed', async () => {
    const token = tokenId();
    receiver.accept(token);
    const body = eventBody(token);
    const stale = await postEvent(receiver, body, signed([current], body, new Date(Date.now() - 6 * 60_000)));
    assert.equal(stale.status, 401);
    assert.match(stale.text, /too old/);
    const ahead = await postEvent(receiver, body, signed([current], body, new Date(Date.now() + 6 * 60_000)));
    assert.equal(ahead.status, 401);
    assert.match(ahead.text, /too new/);
    assert.equal(receiver.accepts(token), true);
    // Within the tolerance it is fine.
    const recent = await postEvent(receiver, body, signed([current], body, new Date(Date.now() - 4 * 60_000)));
    assert.equal(recent.status, 204);
    assert.equal(receiver.accepts(token), false);
  });

  it('should accept every configured secret during a roll, and several signatures in one header', async () => {
    const old = secret();
    const next = secret();
    const rolling = await startReceiver({ secrets: [next, old] });
    try {
      for (const signer of [[old], [next], [secret(), next]]) {
        const token = tokenId();
        rolling.accept(token);
        const body = eventBody(token);
        assert.equal((await postEvent(rolling, body, signed(signer, body))).status, 204);
        assert.equal(rolling.accepts(token), false);
      }
      // The roll ends: the old secret no longer verifies.
      rolling.setSecrets([next]);
      const token = tokenId();
      rolling.accept(token);
      const body = eventBody(token);
      assert.equal((await postEvent(rolling, body, signed([old], body))).status, 401);
      assert.equal((await postEvent(rolling, body, signed([old, next], body))).status, 204);
    } finally {
      await rolling.close();
    }
  });

  it('should acknowledge a duplicate webhook-id again but act on it once', async () => {
    const token = tokenId();
    receiver.accept(token);
    const body = eventBody(token);
    const headers = signed([current], body);
    assert.equal((await postEvent(receiver, body, headers)).status, 204);
    // The token comes back (accepted again), then the same event is redelivered: not acted on again.
    receiver.accept(token);
    const duplicates = receiver.counts.duplicates;
    assert.equal(
      (await postEvent(receiver, body, signed([current], body, new Date(), headers['webhook-id']))).status,
      204,
    );
    assert.equal(receiver.counts.duplicates, duplicates + 1);
    assert.equal(receiver.handled.filter((e) => e.tokenId === token).length, 1);
    assert.equal(receiver.accepts(token), true);
  });

  it('should act on a retried event whose first delivery it refused (the id is remembered once acted on)', async () => {
    const token = tokenId();
    receiver.accept(token);
    const id = `msg_${randomUUID()}`;
    const garbled = '{"type": "token.revoked"';
    assert.equal((await postEvent(receiver, garbled, signed([current], garbled, new Date(), id))).status, 400);
    assert.equal(receiver.accepts(token), true);
    const body = eventBody(token);
    assert.equal((await postEvent(receiver, body, signed([current], body, new Date(), id))).status, 204);
    assert.equal(receiver.accepts(token), false, 'the retry was acted on, not taken for a duplicate');
  });

  it('should answer a signed probe before and after the revocation, and refuse unsigned or replayed ones', async () => {
    const token = tokenId();
    receiver.accept(token);
    const before = await probe(receiver, token, probeHeaders([current], token));
    assert.deepEqual(before, { status: 200, body: { tokenId: token, accepted: true } });

    const body = eventBody(token);
    assert.equal((await postEvent(receiver, body, signed([current], body))).status, 204);
    const afterRevocation = await probe(receiver, token, probeHeaders([current], token));
    assert.deepEqual(afterRevocation, { status: 200, body: { tokenId: token, accepted: false } });
    const unknown = tokenId();
    assert.deepEqual((await probe(receiver, unknown, probeHeaders([current], unknown))).body, {
      tokenId: unknown,
      accepted: false,
    });

    // Nobody else can enumerate tokens: unsigned, wrong key, a signature for another token, stale, replayed.
    const other = tokenId();
    receiver.accept(other);
    assert.equal((await probe(receiver, other, {})).status, 401);
    assert.equal((await probe(receiver, other, probeHeaders([secret()], other))).status, 401);
    assert.equal((await probe(receiver, other, probeHeaders([current], token))).status, 401);
    assert.equal(
      (await probe(receiver, other, probeHeaders([current], other, new Date(Date.now() - 6 * 60_000)))).status,
      401,
    );
    const once = probeHeaders([current], other);
    assert.equal((await probe(receiver, other, once)).status, 200);
    const replayed = await probe(receiver, other, once);
    assert.equal(replayed.status, 401);
    assert.match(String(replayed.body.error), /replayed/);
  });

  it('should refuse to start without a well-formed secret', async () => {
    await assert.rejects(startReceiver({ secrets: [] }), /at least one whsec_/);
    await assert.rejects(startReceiver({ secrets: ['hunter2'] }), /secret 1: expected whsec_/);
  });
});
