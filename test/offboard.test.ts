/** Offboarding a subject: every active token dead in the store in one transaction, then propagated. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { InvalidInputError, TokenWarden, type OffboardReport } from '../client/index.js';
import type { ReconcileInput, ReconcileReport } from '../common/messages.js';
import { WORKFLOW_TYPE } from '../common/names.js';
import { freePort } from '../dev/processes.js';
import { runCli } from './support/cli.js';
import { TestContext } from './support/context.js';
import { TestReceiver, tokenIdOf } from './support/receiver.js';
import { issueInOpenTransaction, waitingOnIssuanceBarrier } from './support/open-issue.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
const receivers: Record<string, TestReceiver> = {};

before(async () => {
  ctx = await TestContext.create('offboard');
  for (const id of ['billing', 'search', 'audit']) {
    receivers[id] = await TestReceiver.start();
    await ctx.warden.addReceiver({ id, url: receivers[id]!.url });
  }
  await ctx.startWorker();
});
after(async () => {
  await ctx?.close();
  for (const r of Object.values(receivers)) await r.close();
});

async function issueFor(subject: string, receiverSets: string[][]): Promise<string[]> {
  const ids: string[] = [];
  for (const set of receiverSets) ids.push((await ctx.warden.issue({ subject, ttl: '1h', receivers: set })).tokenId);
  return ids;
}

async function rowsOf(subject: string) {
  const { rows } = await ctx.sql.query(
    `SELECT id, status, propagation, revoke_reason, propagation_started_at IS NOT NULL AS taken_over,
            (status = 'active' AND expires_at > now()) AS valid
       FROM token WHERE subject = $1 ORDER BY id`,
    [subject],
  );
  return rows as {
    id: string;
    status: string;
    propagation: string;
    revoke_reason: string;
    taken_over: boolean;
    valid: boolean;
  }[];
}

const requestsAbout = (tokenId: string) =>
  Object.fromEntries(Object.entries(receivers).map(([id, r]) => [id, r.requestsFor(tokenId).length]));

async function propagated(tokenIds: string[]): Promise<void> {
  await waitUntil(async () => {
    const { rows } = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE id = ANY($1) AND propagation = 'complete'`,
      [tokenIds],
    );
    return rows[0].n === tokenIds.length;
  }, `propagation complete for ${tokenIds.length} token(s)`);
}

describe('offboard', () => {
  it('should kill every active token of the subject in the store before returning, then reach each receiver once per token with the operation id', async () => {
    const sets = [['billing'], ['billing', 'search'], ['search', 'audit'], ['billing', 'search', 'audit'], []];
    const ids = await issueFor('usr_leaver', sets);
    const [other] = await issueFor('usr_stayer', [['billing']]);
    const earlier = await ctx.warden.revoke({ tokenId: ids[4]!, reason: 'lost laptop' });
    assert.equal(earlier.changed, true);
    // Its workflow has taken over (else offboarding would rightly tell it again).
    await waitUntil(
      async () => (await rowsOf('usr_leaver')).find((r) => r.id === ids[4])!.taken_over,
      'the earlier revoke taken over',
    );

    const report = await ctx.warden.offboard({ subject: 'usr_leaver', reason: 'left the company', actor: 'hr-sync' });

    // Dead in the store when the call returns: nothing of theirs verifies.
    const rows = await rowsOf('usr_leaver');
    assert.deepEqual(
      rows.map((r) => r.valid),
      rows.map(() => false),
    );
    assert.deepEqual([...report.revoked].sort(), ids.slice(0, 4).sort());
    assert.deepEqual(report.alreadyDead, [ids[4]]);
    assert.equal(report.aborted, false);
    assert.deepEqual(report.notSignalled, []);
    assert.equal(report.signalled, 4);
    assert.equal(rows.find((r) => r.id === ids[4])!.revoke_reason, 'lost laptop', 'an earlier kill keeps its facts');
    assert.equal((await rowsOf('usr_stayer'))[0]!.valid, true, "another subject's token is untouched");

    await propagated(ids.slice(0, 4));
    for (const [i, set] of sets.slice(0, 4).entries()) {
      const tokenId = ids[i]!;
      const expected = Object.fromEntries(Object.keys(receivers).map((r) => [r, set.includes(r) ? 1 : 0]));
      assert.deepEqual(requestsAbout(tokenId), expected, `one event per receiver of ${tokenId}`);
      for (const r of set) {
        const body = JSON.parse(receivers[r]!.requestsFor(tokenId)[0]!.body) as { txn: string; reason: string };
        assert.equal(body.txn, report.operationId, 'the event carries the operation id');
        assert.equal(body.reason, 'left the company');
      }
    }
    assert.deepEqual(requestsAbout(other!), { billing: 0, search: 0, audit: 0 });

    // The audit trail ties the kills together.
    const { rows: audits } = await ctx.sql.query(
      `SELECT token_id, canonical::jsonb -> 'data' ->> 'correlationId' AS correlation
         FROM audit_event WHERE token_id = ANY($1) AND idempotency_key = 'killed'`,
      [ids.slice(0, 4)],
    );
    assert.equal(audits.length, 4);
    for (const a of audits) assert.equal(a.correlation, report.operationId);

    // Twice is harmless: nothing killed, nothing told again, no event sent again.
    const again = await ctx.warden.offboard({ subject: 'usr_leaver', reason: 'left the company' });
    assert.deepEqual(again.revoked, []);
    assert.deepEqual([...again.alreadyDead].sort(), [...ids].sort());
    assert.equal(again.signalled, 0);
    for (const [i, set] of sets.slice(0, 4).entries()) {
      assert.equal(
        Object.values(requestsAbout(ids[i]!)).reduce((a, b) => a + b, 0),
        set.length,
      );
    }
  });

  it('should resume an aborted offboarding: the kill stays, a second run tells the workflows it did not', async () => {
    const ids = await issueFor('usr_aborted', [['billing'], ['search'], ['audit']]);
    const stop = new AbortController();
    stop.abort();
    const first = await ctx.warden.offboard({ subject: 'usr_aborted', reason: 'contract ended', signal: stop.signal });
    assert.equal(first.aborted, true);
    assert.equal(first.signalled, 0);
    assert.deepEqual([...first.notSignalled].sort(), [...ids].sort());
    assert.match(first.warnings.join('\n'), /run offboard again/);
    assert.ok(
      (await rowsOf('usr_aborted')).every((r) => !r.valid),
      'dead in the store although no workflow was told',
    );
    assert.ok(
      (await rowsOf('usr_aborted')).every((r) => !r.taken_over),
      'no workflow took over',
    );

    const second = await ctx.warden.offboard({ subject: 'usr_aborted', reason: 'contract ended' });
    assert.deepEqual(second.revoked, []);
    assert.equal(second.signalled, 3);
    assert.equal(second.aborted, false);
    await propagated(ids);
    for (const [i, r] of ['billing', 'search', 'audit'].entries()) {
      assert.equal(receivers[r]!.requestsFor(ids[i]!).length, 1);
      const body = JSON.parse(receivers[r]!.requestsFor(ids[i]!)[0]!.body) as { txn: string };
      assert.equal(body.txn, first.operationId, 'the events are those of the kill, the first run');
    }
  });

  it('should leave the workflows an aborted run did not tell to the reconciler, which tells them', async () => {
    const ids = await issueFor('usr_unattended', [['audit'], ['audit'], ['audit'], ['audit']]);
    const stop = new AbortController();
    const report = await ctx.warden.offboard({
      subject: 'usr_unattended',
      reason: 'offboarded',
      concurrency: 1,
      signal: stop.signal,
      onProgress: () => stop.abort(),
    });
    assert.equal(report.signalled, 1);
    assert.equal(report.notSignalled.length, 3);
    assert.equal(report.aborted, true);
    const pass: ReconcileReport = await ctx.client.workflow.execute(WORKFLOW_TYPE.reconcile, {
      workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
      taskQueue: ctx.settings.temporal.taskQueue,
      args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
    });
    for (const id of report.notSignalled) assert.ok(pass.signalled.includes(id), `the reconciler told ${id}`);
    await propagated(ids);
    for (const id of ids) assert.equal(receivers.audit!.requestsFor(id).length, 1);
  });

  it('should kill everything and stop telling workflows after failures in a row when Temporal is unreachable', async () => {
    const ids = await issueFor(
      'usr_outage',
      Array.from({ length: 40 }, () => ['billing']),
    );
    const address = `127.0.0.1:${await freePort()}`;
    const down = await TokenWarden.connect({
      ...ctx.settings,
      temporal: { ...ctx.settings.temporal, connectionOptions: { address } },
    });
    let report: OffboardReport;
    try {
      report = await down.offboard({ subject: 'usr_outage', reason: 'left', concurrency: 2 });
    } finally {
      await down.close();
    }
    assert.ok(
      (await rowsOf('usr_outage')).every((r) => !r.valid),
      'all dead in the store',
    );
    assert.equal(report.revoked.length, 40);
    assert.equal(report.signalled, 0);
    assert.deepEqual([...report.notSignalled].sort(), [...ids].sort());
    assert.match(report.warnings.join('\n'), /stopped after 8 failures in a row, \d+ not tried/);
    assert.equal(report.aborted, false);

    const resumed = await ctx.warden.offboard({ subject: 'usr_outage', reason: 'left' });
    assert.equal(resumed.signalled, 40);
    await propagated(ids);
  });

  it('should resolve a revoke racing the offboarding to one kill', async () => {
    const ids = await issueFor('usr_race', [['billing'], ['billing'], ['billing']]);
    const [report, single] = await Promise.all([
      ctx.warden.offboard({ subject: 'usr_race', reason: 'offboarded' }),
      ctx.warden.revoke({ tokenId: ids[1]!, reason: 'revoked alone' }),
    ]);
    const offboardKilled = report.revoked.includes(ids[1]!);
    assert.notEqual(offboardKilled, single.changed, 'exactly one of the two killed it');
    assert.equal(report.revoked.length + report.alreadyDead.length, 3);
    await propagated(ids);
    const events = receivers.billing!.requests.filter((r) => tokenIdOf(r) === ids[1]);
    assert.equal(events.length, 1, 'one event for the token both killed');
    const reason = (JSON.parse(events[0]!.body) as { reason: string }).reason;
    assert.equal(reason, offboardKilled ? 'offboarded' : 'revoked alone', 'the event tells the kill that committed');
  });

  it('should kill a token of the subject issued in a transaction that commits during the offboarding', async () => {
    const open = await issueInOpenTransaction(ctx.sql, 'usr_window', null);
    const [other] = await issueFor('usr_window', [['billing']]);
    let settled = false;
    const running = ctx.warden
      .offboard({ subject: 'usr_window', reason: 'offboarded' })
      .finally(() => (settled = true));
    // The kill waits for the open issue (the subject's barrier) or, without one, runs to its end.
    await waitUntil(
      async () => settled || (await waitingOnIssuanceBarrier(ctx.sql, true)),
      "the offboarding waiting on the subject's issuance barrier, or done",
    );
    await open.commit();
    const report = await running;
    const valid = (await rowsOf('usr_window')).filter((r) => r.valid).map((r) => r.id);
    assert.deepEqual(valid, [], 'nothing of theirs verifies when offboard returns');
    assert.deepEqual([...report.revoked].sort(), [open.tokenId, other!].sort());
  });

  it('should still find and offboard a subject stored with a secret-shaped value (refused for new tokens only)', async () => {
    // Stored before such subjects were refused (the store's own function takes any text).
    const leaked = `ghp_${'a1B2c3D4'.repeat(5)}`;
    const stored = await issueInOpenTransaction(ctx.sql, leaked, null);
    await stored.commit();
    await assert.rejects(ctx.warden.issue({ subject: leaked, ttl: '1h' }), /looks like a secret \(a GitHub token\)/);
    assert.deepEqual(
      (await ctx.warden.list({ subject: leaked })).map((t) => t.id),
      [stored.tokenId],
    );
    const report = await ctx.warden.offboard({ subject: leaked, reason: 'subject leaked a secret' });
    assert.deepEqual(report.revoked, [stored.tokenId]);
  });

  it('should refuse bad input naming the field, and change nothing', async () => {
    const [tokenId] = await issueFor('usr_kept', [['billing']]);
    const cases: [Record<string, unknown>, string][] = [
      [{ subject: 'someone@example.com', reason: 'x' }, 'subject'],
      [{ subject: 'usr_kept' }, 'reason'],
      [{ subject: 'usr_kept', reason: 'x', rate: 0 }, 'rate'],
      [{ subject: 'usr_kept', reason: 'x', concurrency: 1.5 }, 'concurrency'],
      [{ subject: 'usr_kept', reason: 'x', initiatingEntity: 'robot' }, 'initiatingEntity'],
    ];
    for (const [input, field] of cases) {
      const err = await ctx.warden.offboard(input as never).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, `${field}: ${String(err)}`);
      assert.ok(
        err.fields.some((f) => f.path === field),
        `${field} named in ${JSON.stringify(err.fields)}`,
      );
    }
    assert.equal((await rowsOf('usr_kept'))[0]!.valid, true);
    assert.equal(receivers.billing!.requestsFor(tokenId!).length, 0);
  });

  it('should offboard from the CLI with a JSON report', async () => {
    const ids = await issueFor('usr_cli', [['search'], ['audit']]);
    const run = await runCli(['offboard', 'usr_cli', '--reason', 'account closed', '--json'], ctx.childEnv());
    assert.equal(run.code, 0, run.stderr);
    const report = JSON.parse(run.stdout) as OffboardReport;
    assert.deepEqual([...report.revoked].sort(), [...ids].sort());
    assert.equal(report.signalled, 2);
    assert.ok((await rowsOf('usr_cli')).every((r) => !r.valid));
    await propagated(ids);

    const bad = await runCli(['offboard', 'usr_cli', '--reason', 'x', '--rate', 'fast'], ctx.childEnv());
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--rate/);
  });
});
