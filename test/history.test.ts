/**
 * `history`: a token's life read back from its workflow's history (every run of its workflow id,
 * payloads decoded through the client's data converter), and the store's audit events when
 * Temporal no longer holds it. Real dev server, real Postgres, real receivers on loopback.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { Payload, PayloadCodec } from '@temporalio/common';
import { loadDataConverter } from '@temporalio/common/lib/internal-non-workflow/index.js';
import proto from '@temporalio/proto';
import { tokenWorkflowId } from '../common/names.js';
import { signalRevoke } from '../common/temporal.js';
import { revokeSignal } from '../common/messages.js';
import { printable } from '../client/cli.js';
import { formatTimeline, renderRuns, type HistoryEntry } from '../client/history.js';
import { TokenWarden } from '../client/index.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { runCli } from './support/cli.js';
import { loadHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';
import * as store from '../common/store/index.js';

let ctx: TestContext;
let worker: RunningWorker;
const receivers: TestReceiver[] = [];
let counter = 0;

before(async () => {
  ctx = await TestContext.create('history');
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  for (const r of receivers) await r.close();
  await ctx?.close();
});

async function addReceiver(): Promise<{ id: string; receiver: TestReceiver }> {
  const receiver = await TestReceiver.start();
  receivers.push(receiver);
  const id = `rcv-h${++counter}`;
  const added = await ctx.warden.addReceiver({ id, url: receiver.url });
  receiver.secret = added.secret;
  return { id, receiver };
}

const handleOf = (tokenId: string) => ctx.client.workflow.getHandle(tokenWorkflowId(tokenId));

/** The token's workflow has continued as new at least once: its current run is not `firstRunId`. */
const continuedFrom = (tokenId: string, firstRunId: string) => async () =>
  (await handleOf(tokenId).describe()).runId !== firstRunId;

const ofKind = (entries: HistoryEntry[], kind: string) => entries.filter((e) => e.kind === kind);

/** Deletes one run of the token's workflow, as retention does, and waits until Temporal no longer serves it. */
async function deleteRun(tokenId: string, runId: string): Promise<void> {
  const workflowId = tokenWorkflowId(tokenId);
  const started = Date.now();
  await ctx.client.workflowService.deleteWorkflowExecution({
    namespace: ctx.settings.temporal.namespace,
    workflowExecution: { workflowId, runId },
  });
  await waitUntil(
    async () =>
      ctx.client.workflowService
        .getWorkflowExecutionHistory({ namespace: ctx.settings.temporal.namespace, execution: { workflowId, runId } })
        .then(
          (r) => {
            throw new Error(`still served: ${r.history?.events?.length} events`);
          },
          (err: { code?: number; message?: string }) => {
            if (err.code === 5) return true;
            throw new Error(`code ${err.code}: ${err.message}`);
          },
        ),
    `run ${runId} deleted`,
    // The server deletes a run asynchronously: 10-60 s after the call here.
    120_000,
    250,
  );
  deletions.push(Date.now() - started);
}

/** How long each deletion took to show (reported by the fallback test, for the design notes). */
const deletions: number[] = [];

describe('history of a token', () => {
  it('should show a failing receiver, an operator retry and the revocation, across a continue-as-new, in the library and the CLI', async () => {
    const failing = await addReceiver();
    const flaky = await addReceiver();
    failing.receiver.behaviour = () => ({ status: 400 });
    flaky.receiver.behaviour = (n) => (n === 1 ? { status: 503 } : { status: 204 });
    const issued = await ctx.warden.issue({
      subject: 'usr_history',
      receivers: [failing.id, flaky.id],
      ttl: '1h',
    });
    const firstRunId = (await handleOf(issued.tokenId).describe()).runId;

    // A rotation continues the workflow as new: the history must follow into the next run.
    const rotated = await ctx.warden.rotate(issued.tokenId, { grace: '1h', reason: 'quarterly', actor: 'ops:alice' });
    await waitUntil(continuedFrom(issued.tokenId, firstRunId), 'the workflow continued as new');

    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'contract ended', actor: 'admin:bob' });
    await waitUntil(
      async () => (await store.requireToken(ctx.pool, issued.tokenId)).propagation === 'stuck',
      'propagation stuck on the failing receiver',
    );
    failing.receiver.behaviour = () => ({ status: 204 });
    await ctx.warden.retryPropagation(issued.tokenId, { reason: 'receiver fixed', actor: 'ops:carol' });
    await handleOf(issued.tokenId).result();

    const entries = await ctx.warden.history(issued.tokenId);
    try {
      await checkStory();
    } catch (err) {
      // The timeline read back is what explains a failure on a loaded machine.
      throw new Error(`${String(err)}\n${formatTimeline(issued.tokenId, entries).join('\n')}`, { cause: err });
    }

    async function checkStory(): Promise<void> {
      const kinds = entries.map((e) => e.kind);

      // The story, in order (other entries, e.g. timers, come between).
      const story = [
        'issued',
        'operator',
        'rotated',
        'run.continued',
        'revoke.requested',
        'killed',
        'escalated',
        'operator',
        'propagation',
        'completed',
      ];
      let from = 0;
      for (const kind of story) {
        const at = kinds.indexOf(kind as HistoryEntry['kind'], from);
        assert.ok(at >= 0, `${kind} after position ${from} in ${kinds.join(',')}`);
        from = at + 1;
      }
      // Times never go back.
      const historyTimes = entries.filter((e) => e.source === 'history').map((e) => Date.parse(e.at));
      assert.deepEqual(
        historyTimes,
        [...historyTimes].sort((a, b) => a - b),
      );

      // Two runs: the issue's, and the one it continued as.
      const runIds = [...new Set(entries.flatMap((e) => (e.runId ? [e.runId] : [])))];
      assert.equal(runIds.length, 2);
      const [issuedEntry] = ofKind(entries, 'issued');
      assert.equal(issuedEntry!.runId, firstRunId);
      assert.equal(issuedEntry!.subject, 'usr_history');
      assert.deepEqual(issuedEntry!.receivers, [failing.id, flaky.id].sort());
      const [continued] = ofKind(entries, 'run.continued');
      assert.equal(continued!.previousRunId, firstRunId);
      assert.equal(continued!.previousRunRetained, true);

      const [rotation] = ofKind(entries, 'rotated');
      assert.equal(rotation!.credentialId, rotated.credentialId);
      const rotateRequest = ofKind(entries, 'operator').find((e) => e.action === 'rotate')!;
      assert.deepEqual([rotateRequest.actor, rotateRequest.reason], ['ops:alice', 'quarterly']);

      // Who asked, and why, decoded from the signal's payload.
      const [revoke] = ofKind(entries, 'revoke.requested');
      assert.deepEqual(
        [revoke!.actor, revoke!.reason, revoke!.initiatingEntity],
        ['admin:bob', 'contract ended', 'admin'],
      );
      const [killed] = ofKind(entries, 'killed');
      assert.deepEqual([killed!.status, killed!.by, killed!.reason], ['revoked', 'admin:bob', 'contract ended']);

      // Every delivery with its HTTP status: the failing receiver's 400, then its 204 after the retry;
      // the flaky one's 503, then its 204.
      const deliveries = (receiverId: string) =>
        ofKind(entries, 'delivery')
          .filter((e) => e.receiverId === receiverId && e.credentialEvent === false)
          .map((e) => [e.outcome, e.statusCode]);
      assert.deepEqual(deliveries(failing.id), [
        ['rejected', 400],
        ['delivered', 204],
      ]);
      assert.deepEqual(deliveries(flaky.id), [
        ['failed', 503],
        ['delivered', 204],
      ]);
      const lastToFlaky = ofKind(entries, 'delivery')
        .filter((e) => e.receiverId === flaky.id)
        .at(-1)!;
      assert.equal(lastToFlaky.storeAttempts, 2, 'the store counts both POSTs');

      const [escalated] = ofKind(entries, 'escalated');
      // The failing receiver is named (the flaky one too when its retry was still under way).
      assert.ok(
        (escalated!.receivers as { receiverId: string }[]).some((r) => r.receiverId === failing.id),
        JSON.stringify(escalated),
      );
      const retry = ofKind(entries, 'operator').find((e) => e.action === 'retryPropagation')!;
      assert.deepEqual([retry.actor, retry.reason], ['ops:carol', 'receiver fixed']);
      const retried = ofKind(entries, 'operator.done').find((e) => e.action === 'retryPropagation')!;
      // A rejection escalates at once: the flaky receiver may still be waiting for its own retry then.
      assert.ok(record(retried.result).retrying instanceof Array, JSON.stringify(retried));
      assert.ok((record(retried.result).retrying as string[]).includes(failing.id), JSON.stringify(retried));
      const [completed] = ofKind(entries, 'completed');
      assert.deepEqual([completed!.status, completed!.propagation, completed!.forced], ['revoked', 'complete', false]);

      // The store's rows close the timeline: every POST counted.
      const states = ofKind(entries, 'delivery.state').filter((e) => e.receiverId !== undefined);
      assert.deepEqual(
        states.map((e) => [e.receiverId, e.status, e.attempts, e.source]),
        [
          [failing.id, 'delivered', 2, 'store'],
          [flaky.id, 'delivered', 2, 'store'],
        ].sort(),
      );

      // The CLI: the same entries as JSON; an aligned timeline for people; no secret anywhere.
      const env = ctx.childEnv();
      const asJson = await runCli(['history', issued.tokenId, '--json'], env);
      assert.equal(asJson.code, 0, asJson.stderr);
      assert.deepEqual(
        (JSON.parse(asJson.stdout) as HistoryEntry[]).map((e) => e.kind),
        kinds,
      );
      const human = await runCli(['history', issued.tokenId], env);
      assert.equal(human.code, 0, human.stderr);
      const lines = human.stdout.trimEnd().split('\n');
      assert.match(lines[0]!, new RegExp(`^history of ${issued.tokenId}: 2 run\\(s\\)`));
      const entryLines = lines.filter((l) => /^\d{4}-\d\d-\d\dT/.test(l));
      assert.equal(entryLines.length, entries.length);
      // The description column starts at the same place on every line.
      const column = (line: string) => /^\S+ {2}\S+ +/.exec(line)![0].length;
      assert.equal(new Set(entryLines.map(column)).size, 1, entryLines.join('\n'));
      assert.ok(
        entryLines.some((l) => l.includes(`revocation to ${failing.id}: rejected, HTTP 400`)),
        human.stdout,
      );
      assert.ok(
        entryLines.some((l) => /retryPropagation by ops:carol: receiver fixed/.test(l)),
        human.stdout,
      );
      for (const output of [asJson.stdout, human.stdout]) {
        assert.ok(!output.includes(issued.token) && !output.includes(rotated.token), 'no raw token in the history');
        for (const r of [failing, flaky]) assert.ok(!output.includes(r.receiver.secret!), 'no signing secret');
      }
    }
  });

  it("should fall back to the store's audit events, and say so, for runs Temporal no longer holds", async (t) => {
    const receiver = await addReceiver();
    const issued = await ctx.warden.issue({ subject: 'usr_retention', receivers: [receiver.id], ttl: '1h' });
    const firstRunId = (await handleOf(issued.tokenId).describe()).runId;
    await ctx.warden.rotate(issued.tokenId, { grace: '1h', reason: 'monthly' });
    await waitUntil(continuedFrom(issued.tokenId, firstRunId), 'the workflow continued as new');

    // The first run gone: the store stands in for it, and the timeline says where Temporal's begins.
    await deleteRun(issued.tokenId, firstRunId);
    const partial = await ctx.warden.history(issued.tokenId);
    assert.equal(partial[0]!.kind, 'history.partial', partial.map((e) => e.kind).join(','));
    assert.equal(partial[0]!.source, 'store');
    const firstHistory = partial.findIndex((e) => e.source === 'history');
    const stoodIn = partial.slice(1, firstHistory);
    assert.ok(
      stoodIn.every((e) => e.kind === 'audit' && e.source === 'store'),
      JSON.stringify(stoodIn),
    );
    assert.ok(
      stoodIn.some((e) => e.event === 'token.issued'),
      JSON.stringify(stoodIn),
    );
    assert.equal(partial[firstHistory]!.kind, 'run.continued');
    assert.equal(partial[firstHistory]!.previousRunRetained, false);
    assert.equal(ofKind(partial, 'issued').length, 0, 'the issue is not claimed from a run that is gone');

    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'left the company', actor: 'admin:dana' });
    const last = handleOf(issued.tokenId);
    await last.result();
    await deleteRun(issued.tokenId, (await last.describe()).runId);

    const entries = await ctx.warden.history(issued.tokenId);
    assert.equal(entries[0]!.kind, 'history.unavailable');
    assert.match(String(entries[0]!.reason), /Temporal holds no history/);
    assert.ok(
      entries.every((e) => e.source === 'store'),
      'nothing claimed from history',
    );
    const audit = ofKind(entries, 'audit');
    const revoked = audit.find((e) => e.event === 'token.revoked')!;
    assert.deepEqual(
      [record(revoked.data).actor, record(revoked.data).reason],
      ['admin:dana', 'left the company'],
      JSON.stringify(revoked),
    );
    assert.ok(audit.some((e) => e.event === 'propagation.complete'));
    assert.deepEqual(
      audit.map((e) => e.seq),
      audit.map((_, i) => i + 1),
      'every audit event, in chain order',
    );

    const human = await runCli(['history', issued.tokenId], ctx.childEnv());
    assert.equal(human.code, 0, human.stderr);
    assert.match(
      human.stdout,
      /^history of tok_\w+: from the store's audit events only \(Temporal holds no history of token:tok_\w+ \(its retention has passed, or it was deleted\)\)\n/,
    );
    assert.match(human.stdout, /audit +token\.revoked/);
    t.diagnostic(`deletions took ${deletions.join(', ')} ms to show`);
  });

  it('should show a delivery still retrying (attempt, last answer), then the operator forcing it complete', async () => {
    const down = await addReceiver();
    down.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_history_force', receivers: [down.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'key leaked', actor: 'admin:frank' });

    // History closes an activity's events only when it ends: the attempt under way comes from the server.
    const retrying = await waitUntil(async () => {
      const entries = await ctx.warden.history(issued.tokenId);
      const last = ofKind(entries, 'delivery').at(-1);
      return last?.outcome === 'in-flight' && Number(last.activityAttempts) >= 2 && last.statusCode === 503
        ? { last, entries }
        : undefined;
    }, 'a delivery retrying with its last answer');
    assert.match(String(retrying.last.error), new RegExp(`receiver ${down.id} answered HTTP 503`));
    const [state] = ofKind(retrying.entries, 'delivery.state');
    assert.equal(state!.status, 'pending');
    assert.ok(Number(state!.attempts) >= 2, JSON.stringify(state));

    await waitUntil(
      async () => (await store.requireToken(ctx.pool, issued.tokenId)).propagation === 'stuck',
      'propagation stuck',
    );
    await ctx.warden.forceComplete(issued.tokenId, { reason: 'receiver retired', actor: 'ops:erin' });
    await handleOf(issued.tokenId).result();

    const entries = await ctx.warden.history(issued.tokenId);
    try {
      const [forced] = ofKind(entries, 'forced');
      assert.deepEqual([forced!.receivers, forced!.actor, forced!.reason], [[down.id], 'ops:erin', 'receiver retired']);
      const force = ofKind(entries, 'operator').find((e) => e.action === 'forceComplete')!;
      assert.deepEqual([force.actor, force.reason], ['ops:erin', 'receiver retired']);
      // The retrying delivery was cancelled (TRY_CANCEL): either the run recorded only the cancel, or
      // the attempt in flight ended after the force and returned the row the force settled.
      assert.ok(
        ['interrupted', 'forced'].includes(String(ofKind(entries, 'delivery').at(-1)!.outcome)),
        'the retrying delivery was cancelled',
      );
      const [completed] = ofKind(entries, 'completed');
      assert.equal(completed!.forced, true);
      assert.deepEqual(
        ofKind(entries, 'delivery.state').map((e) => [e.receiverId, e.status]),
        [[down.id, 'forced']],
      );
    } catch (err) {
      throw new Error(`${String(err)}\n${formatTimeline(issued.tokenId, entries).join('\n')}`, { cause: err });
    }
  });

  it('should follow a later run of the same workflow id (a run lost mid-propagation, restarted as the reconciler does)', async () => {
    const receiver = await addReceiver();
    receiver.receiver.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({ subject: 'usr_history_restart', receivers: [receiver.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'rotation of staff', actor: 'admin:hal' });
    await waitUntil(
      async () => (await store.listDeliveries(ctx.pool, issued.tokenId))[0]?.attempts,
      'a first delivery attempt',
    );
    const lost = await handleOf(issued.tokenId).describe();
    await handleOf(issued.tokenId).terminate('drill: the worker fleet lost this run');
    receiver.receiver.behaviour = () => ({ status: 204 });
    const token = await store.requireToken(ctx.pool, issued.tokenId);
    await signalRevoke(
      ctx.client,
      token,
      { reason: token.revokeReason!, actor: token.revokedBy!, initiatingEntity: token.initiatingEntity! },
      ctx.settings.temporal.taskQueue,
      ctx.settings.timing,
    );
    await handleOf(issued.tokenId).result();

    const entries = await ctx.warden.history(issued.tokenId);
    try {
      const runIds = [...new Set(entries.flatMap((e) => (e.runId ? [e.runId] : [])))];
      assert.equal(runIds.length, 2);
      assert.equal(runIds[0], lost.runId);
      const [ended] = ofKind(entries, 'run.ended');
      assert.deepEqual(
        [ended!.runId, ended!.status, ended!.reason],
        [lost.runId, 'terminated', 'drill: the worker fleet lost this run'],
      );
      // The second run's start (on a loaded machine the first may itself have been started by the revoke).
      const started = ofKind(entries, 'run.started').find((e) => e.runId === runIds[1]);
      assert.ok(started, 'the second run has its run.started entry');
      assert.match(String(started!.why), /started with a revoke/);
      assert.ok(entries.indexOf(ended!) < entries.indexOf(started!));
      // The new run adopts the kill the first made, and delivers.
      const kills = ofKind(entries, 'killed').map((e) => [e.runId, e.byThisRun, e.by, e.reason]);
      assert.deepEqual(kills.at(-1), [runIds[1], false, 'admin:hal', 'rotation of staff']);
      assert.deepEqual(
        ofKind(entries, 'delivery')
          .filter((e) => e.runId === runIds[1])
          .map((e) => [e.outcome, e.statusCode])
          .at(-1),
        ['delivered', 204],
      );
      assert.equal(ofKind(entries, 'completed')[0]!.runId, runIds[1]);
    } catch (err) {
      throw new Error(`${String(err)}\n${formatTimeline(issued.tokenId, entries).join('\n')}`, { cause: err });
    }
  });

  it('should keep a value from history on its own line, escaped (a Signal sent straight to Temporal is not validated)', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_history_forged', receivers: [], ttl: '1h' });
    const forged = '2026-01-01T00:00:00.000Z  completed         revoked, propagation complete';
    await handleOf(issued.tokenId).signal(revokeSignal, {
      reason: `left\n${forged}`,
      actor: 'ops\u001b[2Jerin',
      initiatingEntity: 'admin',
    });
    await waitUntil(
      async () => ofKind(await ctx.warden.history(issued.tokenId), 'revoke.requested').length > 0,
      'the revoke in history',
    );
    const human = await runCli(['history', issued.tokenId], ctx.childEnv());
    assert.equal(human.code, 0, human.stderr);
    const lines = human.stdout.split('\n');
    assert.ok(!lines.some((l) => l.startsWith(forged)), human.stdout);
    const revoke = lines.find((l) => l.includes('revoke.requested'))!;
    assert.ok(revoke.includes('\\x0a2026-01-01T00:00:00.000Z') && revoke.includes('ops\\x1b[2Jerin'), revoke);
    const asJson = await runCli(['history', issued.tokenId, '--json'], ctx.childEnv());
    const [entry] = ofKind(JSON.parse(asJson.stdout) as HistoryEntry[], 'revoke.requested');
    assert.equal(entry!.reason, `left\n${forged}`, 'JSON keeps the value itself');
    // The actor is only what the sender wrote: the client identity Temporal recorded is shown too.
    assert.ok(typeof entry!.identity === 'string' && entry!.identity.length > 0, JSON.stringify(entry));
    assert.ok(revoke.includes(`sent by client ${entry!.identity as string}`), revoke);
  });

  it('should escape a backslash, so a typed escape never reads as the character it names', () => {
    assert.equal(printable('left\\x0anext'), 'left\\\\x0anext');
    assert.notEqual(printable('left\\x0anext'), printable('left\nnext'));
    assert.equal(printable('left\nnext'), 'left\\x0anext');
  });

  it("should give the store's audit events, and say why, when Temporal cannot be reached", async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_history_down', receivers: [], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'temporal drill', actor: 'admin:gus' });
    await handleOf(issued.tokenId).result();
    // Nothing listens on port 1: every Temporal call fails within the call deadline.
    const offline = await TokenWarden.connect({
      ...ctx.settings,
      temporal: { ...ctx.settings.temporal, connectionOptions: { address: '127.0.0.1:1' } },
    });
    try {
      const entries = await offline.history(issued.tokenId);
      assert.equal(entries[0]!.kind, 'history.unavailable');
      assert.match(String(entries[0]!.reason), /^Temporal could not be read \(/);
      assert.ok(
        ofKind(entries, 'audit').some((e) => e.event === 'token.revoked'),
        JSON.stringify(entries),
      );
    } finally {
      await offline.close();
    }
  });

  it('should name the field of a malformed token id, and say when the token does not exist', async () => {
    const bad = await runCli(['history', 'not-a-token'], ctx.childEnv());
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /expected a token id/);
    const unknown = await runCli(['history', `tok_${'0'.repeat(32)}`], ctx.childEnv());
    assert.equal(unknown.code, 3, unknown.stderr);
  });

  // A plaintext recording (made before payload encryption): read with no codec at all.
  it('should render a recorded history with the default converter (no server): stuck, retried, complete', async () => {
    const { events } = loadHistory('before-pending-receivers/revoke-stuck-retry.json');
    const entries = await renderRuns(loadDataConverter(), 'default', 'token:tok_x', [
      { runId: 'recorded', events: events ?? [] },
    ]);
    const deliveries = ofKind(entries, 'delivery').map((e) => [e.receiverId, e.outcome, e.statusCode, e.storeAttempts]);
    assert.deepEqual(deliveries, [
      ['rcv-10', 'rejected', 400, 1],
      ['rcv-11', 'delivered', 204, 1],
      ['rcv-10', 'delivered', 204, 2],
    ]);
    assert.deepEqual(
      ofKind(entries, 'operator').map((e) => [e.action, e.actor, e.reason]),
      [['retryPropagation', 'ops:carol', 'receiver fixed']],
    );
    assert.deepEqual(
      ofKind(entries, 'propagation').map((e) => e.state),
      ['pending', 'complete'],
    );
  });

  it("should decode every payload through the client's codecs (a sealed history reads as the plain one)", async () => {
    const plain = loadHistory('before-pending-receivers/revoke-stuck-retry.json');
    const sealed = loadHistory('before-pending-receivers/revoke-stuck-retry.json');
    await sealPayloads(sealed, sealingCodec);
    assert.ok(
      !JSON.stringify(sealed.toJSON()).includes(Buffer.from('contract ended').toString('base64').slice(0, 12)),
      'the sealed copy holds no plaintext reason',
    );
    const render = (history: typeof plain, codecs: PayloadCodec[]) =>
      renderRuns(loadDataConverter({ payloadCodecs: codecs }), 'default', 'token:tok_x', [
        { runId: 'recorded', events: history.events ?? [] },
      ]);
    const expected = await render(plain, []);
    assert.deepEqual(await render(sealed, [sealingCodec]), expected);
    // Without the codec, the sealed payloads are unreadable, and the timeline says so rather than fail.
    const unsealed = await render(sealed, []);
    assert.equal(ofKind(unsealed, 'revoke.requested')[0]!.malformed, true);
  });

  it('should show a revoke signal that could not be read as such', async () => {
    const { events } = loadHistory('malformed-revoke.json');
    const entries = await renderRuns(loadDataConverter(), 'default', 'token:tok_x', [
      { runId: 'recorded', events: events ?? [] },
    ]);
    const [revoke] = ofKind(entries, 'revoke.requested');
    assert.equal(revoke!.malformed, true);
    assert.ok(ofKind(entries, 'killed').length === 1);
  });
});

const record = (value: unknown): Record<string, unknown> => (value ?? {}) as Record<string, unknown>;

const { Payload: ProtoPayload } = proto.temporal.api.common.v1;
const SEALED = 'binary/test-sealed';

/** A codec that hides every payload (its bytes reversed inside another payload), as an encrypting one would. */
const sealingCodec: PayloadCodec = {
  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => ({
      metadata: { encoding: new TextEncoder().encode(SEALED) },
      data: Uint8Array.from(ProtoPayload.encode(p).finish()).reverse(),
    }));
  },
  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) =>
      new TextDecoder().decode(p.metadata?.encoding ?? new Uint8Array()) === SEALED
        ? ProtoPayload.decode(Uint8Array.from(p.data ?? new Uint8Array()).reverse())
        : p,
    );
  },
};

const isPayload = (value: object): value is Payload =>
  'data' in value && value.data instanceof Uint8Array && 'metadata' in value;

/** Runs every payload of a recorded history through `codec`, in place, as a worker with that codec would have written it. */
async function sealPayloads(value: unknown, codec: PayloadCodec): Promise<void> {
  if (!value || typeof value !== 'object') return;
  // The proto module's types are reflection objects, not classes: a payload is known by its shape.
  if (isPayload(value)) {
    const [sealed] = await codec.encode([value]);
    value.metadata = sealed!.metadata ?? {};
    value.data = sealed!.data ?? new Uint8Array();
    return;
  }
  for (const child of Object.values(value)) await sealPayloads(child, codec);
}
