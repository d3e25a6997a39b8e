/**
 * Verified propagation on the real engine: receivers with a verification probe (the example
 * receiver's), real Temporal dev server, real PostgreSQL, real HTTP on loopback. A delivery to a
 * probing receiver is confirmed only when the probe says the token is rejected.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { generateSigningSecret } from '../common/secrets.js';
import { credentialRevocationEventId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { startReceiver, type ExampleReceiver } from '../examples/receiver/receiver.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;
const closers: (() => Promise<void>)[] = [];
let counter = 0;

before(async () => {
  // A short escalation deadline; retries capped at 1 s so a probe is asked again within the wait.
  ctx = await TestContext.create('probe', { escalateAfterMs: 3_000, retryInitialMs: 200, retryMaxMs: 1_000 });
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  for (const close of closers) await close();
  await ctx?.close();
});

/** The example receiver with a secret the registry imports (as `receiver add --secret-stdin` would). */
async function exampleReceiver(): Promise<{ secret: string; example: ExampleReceiver }> {
  const secret = generateSigningSecret();
  const example = await startReceiver({ secrets: [secret] });
  closers.push(() => example.close());
  return { secret, example };
}

/** A receiver whose events and probe are both the example's: it drops revoked tokens. */
async function probingReceiver() {
  const { secret, example } = await exampleReceiver();
  const id = `prb-${++counter}`;
  await ctx.warden.addReceiver({ id, url: example.eventsUrl, probeUrl: example.probeUrl, secret });
  return { id, example };
}

/**
 * A receiver whose event endpoint acknowledges without acting (a test receiver) while its probe is
 * the example's: the service still accepts the token after the ack, until it is fixed.
 */
async function ackingButAccepting() {
  const { secret, example } = await exampleReceiver();
  const events = await TestReceiver.start();
  events.secret = secret;
  closers.push(() => events.close());
  const id = `prb-${++counter}`;
  await ctx.warden.addReceiver({ id, url: events.url, probeUrl: example.probeUrl, secret });
  return { id, example, events };
}

async function revokedToken(receiverIds: string[], accept: ExampleReceiver[]): Promise<string> {
  const { tokenId } = await ctx.warden.issue({ subject: 'usr_probe', receivers: receiverIds, ttl: '1h' });
  for (const example of accept) example.accept(tokenId);
  await ctx.warden.revoke({ tokenId, reason: 'offboarded' });
  return tokenId;
}

const propagationIs = (tokenId: string, state: string) =>
  waitUntil(
    async () => (await store.requireToken(ctx.pool, tokenId)).propagation === state,
    `propagation of ${tokenId} ${state}`,
  );

const deliveryTo = async (tokenId: string, receiverId: string) =>
  (await ctx.warden.show(tokenId)).deliveries.find((d) => d.receiverId === receiverId)!;

const ISO = /^\d{4}-\d\d-\d\dT/;

describe('verified propagation', () => {
  it('should complete once the probe says the token is rejected: delivered and verified set', async () => {
    const probing = await probingReceiver();
    // A receiver without a probe on the same token: its acknowledgement is its confirmation.
    const plain = await TestReceiver.start();
    closers.push(() => plain.close());
    plain.secret = (await ctx.warden.addReceiver({ id: `plain-${++counter}`, url: plain.url })).secret;
    const plainId = `plain-${counter}`;

    const tokenId = await revokedToken([probing.id, plainId], [probing.example]);
    await propagationIs(tokenId, 'complete');

    assert.equal(probing.example.accepts(tokenId), false);
    const verified = await deliveryTo(tokenId, probing.id);
    assert.equal(verified.status, 'delivered');
    assert.match(String(verified.delivered), ISO);
    assert.match(verified.verified, ISO, `verified: ${verified.verified}`);
    assert.ok(Date.parse(verified.verified) >= Date.parse(verified.delivered!));
    assert.ok(verified.probes >= 1);
    assert.equal(verified.attempts, 1);
    const unprobed = await deliveryTo(tokenId, plainId);
    assert.equal(unprobed.status, 'delivered');
    assert.match(String(unprobed.delivered), ISO);
    assert.equal(unprobed.verified, 'no probe');

    const audit = (await store.readAudit(ctx.pool, tokenId)).filter(
      (e) => e.kind.startsWith('delivery.') && e.canonical.includes(`"receiverId":"${probing.id}"`),
    );
    assert.deepEqual(
      audit.map((e) => e.kind),
      ['delivery.acknowledged', 'delivery.delivered'],
    );
    assert.match(audit[1]!.canonical, /"verified":true/);
  });

  it('should escalate to stuck while the probe still accepts the token, POSTing the event once; force completes it', async () => {
    const { id, example, events } = await ackingButAccepting();
    const tokenId = await revokedToken([id], [example]);
    await propagationIs(tokenId, 'stuck');
    // The probe keeps being asked while stuck; the acknowledged event is never sent again.
    const probesAtStuck = example.counts.probes;
    await waitUntil(() => example.counts.probes > probesAtStuck + 1, 'probes to continue while stuck');
    assert.equal(events.requestsFor(tokenId).length, 1, 'the event is POSTed once');
    assert.ok(events.requestsFor(tokenId)[0]!.verified);

    const stuck = await deliveryTo(tokenId, id);
    assert.equal(stuck.status, 'pending');
    assert.equal(stuck.attempts, 1);
    assert.ok(stuck.probes >= 2, `${stuck.probes} probes`);
    assert.match(String(stuck.delivered), ISO);
    assert.equal(stuck.verified, 'pending');
    assert.match(String(stuck.lastError), /acknowledged the event but its probe still accepts token/);
    const stuckEvent = (await store.readAudit(ctx.pool, tokenId)).find((e) => e.kind === 'propagation.stuck');
    assert.match(stuckEvent!.canonical, /still accepts/);

    const forced = await ctx.warden.forceComplete(tokenId, { reason: 'the service is retired' });
    assert.deepEqual(forced.forced, [id]);
    await propagationIs(tokenId, 'complete');
    const settled = await deliveryTo(tokenId, id);
    assert.equal(settled.status, 'forced');
    assert.equal(settled.verified, 'not verified');
    assert.equal(events.requestsFor(tokenId).length, 1);
  });

  it('should complete on an operator retry once the receiver is fixed, still without a second POST', async () => {
    const { id, example, events } = await ackingButAccepting();
    const tokenId = await revokedToken([id], [example]);
    await propagationIs(tokenId, 'stuck');

    // The fix: the service acts on the event it acknowledged (the same signed request, still fresh).
    const [request] = events.requestsFor(tokenId);
    const headers = Object.fromEntries(
      ['webhook-id', 'webhook-timestamp', 'webhook-signature'].map((h) => [h, String(request!.headers[h])]),
    );
    const replay = await fetch(example.eventsUrl, { method: 'POST', headers, body: request!.body });
    assert.equal(replay.status, 204);
    assert.equal(example.accepts(tokenId), false);

    // The stuck delivery keeps probing on its slow schedule: that probe may confirm the fix first,
    // completing propagation (and closing the workflow) before the operator's retry reaches it.
    const retried = await ctx.warden
      .retryPropagation(tokenId, { reason: 'service fixed' })
      .catch(async (err: unknown) => {
        if ((await deliveryTo(tokenId, id)).status === 'delivered') return undefined;
        throw err;
      });
    if (retried) assert.deepEqual(retried.retrying, [id]);
    await propagationIs(tokenId, 'complete');
    const delivery = await deliveryTo(tokenId, id);
    assert.equal(delivery.status, 'delivered');
    assert.match(delivery.verified, ISO);
    assert.equal(delivery.attempts, 1);
    assert.equal(events.requestsFor(tokenId).length, 1, 'the event is POSTed once');
  });

  it("should record a probe's nonsense answer as the delivery's error and wait for an operator", async () => {
    // The probe URL points at a plain test receiver: it answers 204 to everything.
    const { secret, example } = await exampleReceiver();
    const notAProbe = await TestReceiver.start();
    closers.push(() => notAProbe.close());
    const id = `prb-${++counter}`;
    await ctx.warden.addReceiver({ id, url: example.eventsUrl, probeUrl: notAProbe.url, secret });
    const tokenId = await revokedToken([id], [example]);
    await propagationIs(tokenId, 'stuck');
    const failed = await deliveryTo(tokenId, id);
    assert.equal(failed.status, 'failed');
    assert.equal(failed.verified, 'pending');
    assert.match(
      String(failed.lastError),
      /probe of receiver prb-\d+ answered nonsense: expected 200 with JSON \{"tokenId":"tok_[0-9a-f]+","accepted":true\|false\}, got HTTP 204/,
    );
    const probeRequest = notAProbe.requests.at(-1)!;
    assert.equal(probeRequest.headers['user-agent'], 'tokenwarden');
    assert.match(String(probeRequest.headers['webhook-signature']), /^v1,/);
    await ctx.warden.forceComplete(tokenId, { reason: 'probe misconfigured' });
    await propagationIs(tokenId, 'complete');
  });
  it('should check the probe address again at probe time, after the event was acknowledged', async () => {
    const probing = await probingReceiver();
    // The stored probe URL now points somewhere the rules refuse (as a name that resolves elsewhere would).
    await ctx.sql.query('UPDATE receiver SET probe_url = $2 WHERE id = $1', [
      probing.id,
      'http://169.254.169.254/probe',
    ]);
    const tokenId = await revokedToken([probing.id], [probing.example]);
    await propagationIs(tokenId, 'stuck');
    const refused = await deliveryTo(tokenId, probing.id);
    assert.equal(refused.status, 'failed');
    assert.match(String(refused.delivered), ISO, 'the event itself was acknowledged');
    assert.match(String(refused.lastError), /^probe of receiver prb-\d+ refused: 169\.254\.169\.254 is a link-local/);
    assert.equal(probing.example.counts.probes, 0, 'no probe request was sent');
    await ctx.warden.forceComplete(tokenId, { reason: 'probe address refused' });
    await propagationIs(tokenId, 'complete');
  });
});

describe('credential events to a probing receiver', () => {
  it('should settle a credential.revoked event by its acknowledgement, while the probe still accepts the living token', async () => {
    const { id, example, events } = await ackingButAccepting();
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_probe', receivers: [id], ttl: '1h' });
    example.accept(tokenId);
    const [first] = await store.listCredentials(ctx.pool, tokenId);
    await ctx.warden.rotate(tokenId, { grace: '1s' });
    const eventId = credentialRevocationEventId(first!.id);
    await waitUntil(
      async () =>
        (await ctx.sql.query('SELECT status FROM delivery WHERE event_id = $1 AND receiver_id = $2', [eventId, id]))
          .rows[0]?.status === 'delivered',
      'the credential.revoked event settled by its acknowledgement',
    );
    assert.equal(example.accepts(tokenId), true, 'the token itself is still accepted, as it should be');
    assert.equal(example.counts.probes, 0, 'the probe is not asked about a credential event');
    const posted = events.requests.filter((r) => JSON.parse(r.body).id === eventId);
    assert.equal(posted.length, 1);
    assert.equal(JSON.parse(posted[0]!.body).type, 'credential.revoked');
    assert.ok(posted[0]!.verified, "signed with the receiver's secret");
  });
});

describe('probe URL checks at receiver add', () => {
  it('should refuse a probe URL that fails the address checks, naming the field', async () => {
    const { example } = await exampleReceiver();
    for (const [probeUrl, problem] of [
      ['http://169.254.169.254/latest/meta-data/', /link-local, metadata/],
      ['http://metadata.google.internal/probe', /cloud metadata service/],
      ['https://user:pw@127.0.0.1/probe', /credentials in the URL/],
      ['ftp://127.0.0.1/probe', /expected an http\(s\) URL/],
      ['http://10.0.0.7/probe', /private address/],
    ] as const) {
      await assert.rejects(
        ctx.warden.addReceiver({ id: `bad-${++counter}`, url: example.eventsUrl, probeUrl }),
        (err: Error) => /probeUrl: /.test(err.message) && problem.test(err.message),
        probeUrl,
      );
    }
    // A name resolving to a forbidden address is refused too (localhost is loopback; not allowed here).
    const cli = await runCli(
      [
        'receiver',
        'add',
        `bad-${++counter}`,
        '--url',
        'https://example.invalid/',
        '--probe-url',
        'http://localhost:1/probe',
      ],
      { ...ctx.childEnv(), TOKENWARDEN_RECEIVER_ALLOW: '' },
    );
    assert.equal(cli.code, 2, cli.stderr);
    assert.match(cli.stderr, /probeUrl: localhost resolves to a forbidden address/);
    assert.deepEqual(
      (await ctx.warden.listReceivers()).filter((r) => r.id.startsWith('bad-')),
      [],
      'nothing registered',
    );
  });

  it('should store and list an accepted probe URL (CLI)', async () => {
    const { example } = await exampleReceiver();
    const id = `cli-${++counter}`;
    const added = await runCli(
      ['receiver', 'add', id, '--url', example.eventsUrl, '--probe-url', example.probeUrl, '--json'],
      ctx.childEnv(),
    );
    assert.equal(added.code, 0, added.stderr);
    assert.equal(JSON.parse(added.stdout).probeUrl, example.probeUrl);
    const listed = await runCli(['receiver', 'list'], ctx.childEnv());
    assert.match(listed.stdout, new RegExp(`${id}  \\S+  probe ${example.probeUrl}`));
  });
});
