/**
 * Rotation on the real engine: a manual rotation keeps the old credential valid through its grace,
 * then the workflow ends the grace and tells every receiver (credential.revoked); an automatic
 * rotation delivers the new secret out of band (a 0600 file) and never into history; suspicious
 * activity rotates or revokes as the policy says, with the evidence in the audit trail.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure, WorkflowUpdateFailedError } from '@temporalio/client';
import proto from '@temporalio/proto';
import { Worker } from '@temporalio/worker';
import {
  describeQuery,
  reportSuspiciousSignal,
  revokeSignal,
  rotateUpdate,
  type TokenLifecycleResult,
} from '../common/messages.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { WORKFLOWS_PATH } from '../worker/worker.js';
import { INVALID_LIFECYCLE_REQUEST, TOKEN_NOT_ACTIVE } from '../workflows/lifecycle-state.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { historyText, maybeRecordHistory, decodedHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { insertPolicy, newSecret, ownerFolder, startToken, isValid } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';
import { retriedUpdate } from './support/updates.js';

let ctx: TestContext;
let worker: RunningWorker;
const receivers: TestReceiver[] = [];
let counter = 0;

before(async () => {
  ctx = await TestContext.create('rotation');
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
  const id = `rcv-rot-${++counter}`;
  const added = await ctx.warden.addReceiver({ id, url: receiver.url });
  receiver.secret = added.secret;
  return { id, receiver };
}

const credentialRevokedAt = (receiver: TestReceiver, credentialId: string) =>
  receiver.requests.some(
    (r) => r.verified && r.answered === 204 && r.body.includes(credentialId) && r.body.includes('revoke'),
  );

async function rejection(update: Promise<unknown>): Promise<ApplicationFailure> {
  const err = await update.then(
    () => assert.fail('the update was accepted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof WorkflowUpdateFailedError, String(err));
  assert.ok(err.cause instanceof ApplicationFailure, String(err.cause));
  return err.cause;
}

const auditOf = async (tokenId: string) =>
  (await store.readAudit(ctx.pool, tokenId)).map((e) => ({ kind: e.kind, data: JSON.parse(e.canonical).data }));

/** Every run's history as text (rotations continue as new). */
async function historyJson(tokenId: string): Promise<string> {
  const texts: string[] = [];
  for (const runId of await runsOf(tokenWorkflowId(tokenId))) {
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(tokenId), runId);
    const history = proto.temporal.api.history.v1.History.fromObject(await decodedHistory(handle));
    texts.push(...historyText(history.toJSON()));
  }
  return texts.join('\n');
}

/** The runs of a workflow, oldest first. */
const runsOf = async (workflowId: string): Promise<string[]> => {
  const runs: { runId: string; at: number }[] = [];
  for await (const w of ctx.client.workflow.list({ query: `WorkflowId = '${workflowId}'` })) {
    runs.push({ runId: w.runId, at: w.startTime.getTime() });
  }
  return runs.sort((a, b) => a.at - b.at).map((r) => r.runId);
};

describe('rotation', () => {
  it('should keep the old credential valid through its grace, then revoke it and tell every receiver', async () => {
    const a = await addReceiver();
    const b = await addReceiver();
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: [a.id, b.id] });
    const fresh = newSecret();

    const rotated = await retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 3_000, actor: 'alice' }],
    });
    assert.equal(rotated.credentialId, fresh.credentialId);
    assert.equal(rotated.previousCredentialId, t.credentialId);
    assert.ok(rotated.previousValidUntil, 'the old credential has a grace');

    // A retried Update with the same credential id is the same rotation.
    const again = await retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 3_000 }],
    });
    assert.equal(again.credentialId, fresh.credentialId);

    // During the grace both are valid.
    assert.equal(await isValid(ctx, t.token), true, 'old valid during grace');
    assert.equal(await isValid(ctx, fresh.token), true, 'new valid');

    // After it: the old one is rejected, the new one still valid, every receiver told.
    await waitUntil(async () => !(await isValid(ctx, t.token)), 'the old credential rejected', 20_000);
    await waitUntil(
      () => credentialRevokedAt(a.receiver, t.credentialId) && credentialRevokedAt(b.receiver, t.credentialId),
      'credential.revoked at every receiver',
      20_000,
    );
    assert.equal(await isValid(ctx, fresh.token), true, 'the new credential stays valid');
    const view = await t.handle.query(describeQuery);
    assert.equal(view.phase, 'active');
    // The rotation continued as new: its run, and the run that ended the grace.
    const runs = await runsOf(t.handle.workflowId);
    await maybeRecordHistory(ctx.client.workflow.getHandle(t.handle.workflowId, runs[0]), 'rotation-manual');
    await maybeRecordHistory(t.handle, 'rotation-grace-end');
  });

  it('should store a manual rotation in the workflow task that accepts it, with only its hash in history', async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const fresh = newSecret();
    await retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 1_000 }],
    });
    // The rotation continues as new: its run is closed, and holds the whole Update.
    const runs = await waitUntil(async () => {
      const ids = await runsOf(t.handle.workflowId);
      return ids.length >= 2 ? ids : undefined;
    }, 'the rotation continued as new');
    const rotationRun = ctx.client.workflow.getHandle(t.handle.workflowId, runs[0]);
    const events = (await decodedHistory(rotationRun)).events ?? [];
    const accepted = events.findIndex((e) => e.workflowExecutionUpdateAcceptedEventAttributes);
    const completed = events.findIndex((e) => e.workflowExecutionUpdateCompletedEventAttributes);
    assert.ok(accepted >= 0 && completed > accepted, 'the Update accepted, then completed');
    const tasksBetween = events
      .slice(accepted, completed)
      .filter((e) => e.eventType === proto.temporal.api.enums.v1.EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED);
    assert.equal(tasksBetween.length, 0, 'completed in the workflow task that accepted it');
    assert.ok(
      !events.some((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'rotateCredential'),
      'no rotateCredential activity through the server',
    );
    const text = historyText(events).join('\n');
    assert.ok(!text.includes(fresh.token), 'the new secret is not in history');
    assert.ok(text.includes(fresh.secretHash), 'its hash is');
    assert.equal(await isValid(ctx, fresh.token), true, 'the new credential valid');
    await maybeRecordHistory(rotationRun, 'rotation-manual-local');
  });

  it("should let a revoke that arrives during the rotation's local store write wait for it", async () => {
    const t = await startToken(ctx, { ttlMs: 120_000 });
    const fresh = newSecret();
    const lock = await ctx.sql.connect();
    try {
      // The token's row held: the rotation's local write waits, its workflow task is heartbeated
      // (every 8 s), and the revoke Signal reaches the run in the next task.
      await lock.query('BEGIN');
      await lock.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [t.tokenId]);
      const rotating = retriedUpdate(t.handle, rotateUpdate, {
        args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 1_000 }],
      });
      const waitingOnTheRow = async (routine: string) =>
        (
          await ctx.sql.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE $1`,
            [`%${routine}%`],
          )
        ).rows[0]!.n;
      await waitUntil(async () => (await waitingOnTheRow('rotate_credential')) > 0, 'the rotation writing');
      await t.handle.signal(revokeSignal, { reason: 'revoked during a rotation', actor: 'test' });
      const { EventType } = proto.temporal.api.enums.v1;
      // The task that handled the Signal was itself heartbeated: the run had its chance to start the kill.
      await waitUntil(
        async () => {
          const events = (await decodedHistory(t.handle)).events ?? [];
          const signalled = events.findIndex((e) => e.workflowExecutionSignaledEventAttributes);
          return (
            signalled >= 0 &&
            events.slice(signalled).some((e) => e.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
          );
        },
        'a workflow task completed after the Signal',
        40_000,
        200,
      );
      assert.equal(await waitingOnTheRow('kill_token'), 0, 'no kill in the store while the rotation is being written');
      await lock.query('ROLLBACK');
      const rotated = await rotating;
      assert.equal(rotated.credentialId, fresh.credentialId);
      const done = (await t.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'revoked');
      assert.equal(await isValid(ctx, fresh.token), false, 'the new credential died with the token');
      // The two local calls, one after the other, resolve the same way on replay.
      const bundle = process.env.TOKENWARDEN_TEST_WORKFLOW_BUNDLE;
      await Worker.runReplayHistory(
        bundle ? { workflowBundle: { codePath: bundle } } : { workflowsPath: WORKFLOWS_PATH },
        await decodedHistory(t.handle),
      );
    } finally {
      await lock.query('ROLLBACK').catch(() => {});
      lock.release();
    }
  });

  it('should adopt its own rotation when the local write is retried after its first attempt committed', async () => {
    const a = await addReceiver();
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: [a.id] });
    const fresh = newSecret();
    const lock = await ctx.sql.connect();
    try {
      await lock.query('BEGIN');
      await lock.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [t.tokenId]);
      const rotating = retriedUpdate(t.handle, rotateUpdate, {
        args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 500 }],
      });
      // The first attempt timed out (10 s) still waiting on the row; the second waits behind it.
      const { rows } = await waitUntil(
        async () => {
          const r = await ctx.sql.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE '%rotate_credential%'`,
          );
          return r.rows[0]!.n >= 2 ? r : undefined;
        },
        'a second attempt of the rotation',
        25_000,
        100,
      );
      assert.equal(rows[0]!.n, 2);
      // The first attempt commits; the second, the one recorded, finds the rotation made (changed=false).
      await lock.query('ROLLBACK');
      assert.equal((await rotating).credentialId, fresh.credentialId);
      // The run knows its rotation: the old credential's grace ends and every receiver is told.
      await waitUntil(() => credentialRevokedAt(a.receiver, t.credentialId), 'credential.revoked delivered', 20_000);
      assert.equal(await isValid(ctx, t.token), false);
      assert.equal(await isValid(ctx, fresh.token), true);
    } finally {
      await lock.query('ROLLBACK').catch(() => {});
      lock.release();
    }
  });

  it('should still end the grace of the real previous credential after a stale retried rotate', async () => {
    const a = await addReceiver();
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: [a.id] });
    const first = newSecret();
    const second = newSecret();
    const rotateTo = (s: ReturnType<typeof newSecret>, graceMs: number) =>
      retriedUpdate(t.handle, rotateUpdate, {
        args: [{ credentialId: s.credentialId, secretHash: s.secretHash, graceMs }],
      });
    await rotateTo(first, 500);
    await waitUntil(() => credentialRevokedAt(a.receiver, t.credentialId), 'the first grace ended and told', 20_000);
    await rotateTo(second, 2_000);
    // The first rotation's Update again (a client retry): the store answers with that rotation's old facts.
    const stale = await rotateTo(first, 500);
    assert.equal(stale.previousCredentialId, t.credentialId);
    // The credential really in grace is `first`: its grace still ends and every receiver hears of it.
    await waitUntil(() => credentialRevokedAt(a.receiver, first.credentialId), 'the grace of `first` ended', 15_000);
    assert.equal(await isValid(ctx, second.token), true);
    assert.equal(await isValid(ctx, first.token), false);
  });

  it("should not end a grace before the database clock reaches valid_until, even when the workflow's clock is ahead", async () => {
    const a = await addReceiver();
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: [a.id] });
    const fresh = newSecret();
    await retriedUpdate(t.handle, rotateUpdate, {
      args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash, graceMs: 1_000 }],
    });
    // The workflow's timer fires at the valid_until the rotation answered; moving valid_until 3 s
    // later in the store is PostgreSQL's clock running 3 s behind the workflow's.
    await ctx.sql.query(`UPDATE credential SET valid_until = valid_until + interval '3 seconds' WHERE id = $1`, [
      t.credentialId,
    ]);
    const endGraceTried = async () => {
      const events = (await decodedHistory(t.handle)).events ?? [];
      const scheduled = events
        .filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'endGrace')
        .map((e) => Number(e.eventId));
      return events.some((e) => scheduled.includes(Number(e.activityTaskCompletedEventAttributes?.scheduledEventId)));
    };
    await waitUntil(endGraceTried, "the workflow's end of grace ran", 20_000);
    const { rows } = await ctx.sql.query(
      `SELECT state, valid_until > now() AS in_grace FROM credential WHERE id = $1`,
      [t.credentialId],
    );
    assert.deepEqual(rows[0], { state: 'previous', in_grace: true }, 'still previous inside its grace');
    assert.equal(await isValid(ctx, t.token), true, 'a client on the old credential is no reuse');
    await waitUntil(
      async () => !(await isValid(ctx, t.token)),
      'the old credential rejected after valid_until',
      20_000,
    );
    await waitUntil(
      () => credentialRevokedAt(a.receiver, t.credentialId),
      'credential.revoked at the receiver',
      20_000,
    );
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active', 'the token lives on');
    assert.equal(await isValid(ctx, fresh.token), true);
  });

  it('should refuse a malformed rotation naming the field, and a rotation of a dead token', async () => {
    // A receiver that keeps failing holds the workflow in propagation after the revoke.
    const stuck = await addReceiver();
    stuck.receiver.behaviour = () => ({ status: 503 });
    const t = await startToken(ctx, { ttlMs: 120_000, receivers: [stuck.id] });
    const bad = await rejection(
      retriedUpdate(t.handle, rotateUpdate, { args: [{ credentialId: 'nope', secretHash: 'a'.repeat(64) }] }),
    );
    assert.equal(bad.type, INVALID_LIFECYCLE_REQUEST);
    assert.match(bad.message, /^credentialId:/);

    await ctx.warden.revoke({ tokenId: t.tokenId, reason: 'done' });
    await waitUntil(async () => (await t.handle.query(describeQuery)).phase !== 'active', 'the workflow killing');
    const fresh = newSecret();
    const dead = await rejection(
      retriedUpdate(t.handle, rotateUpdate, {
        args: [{ credentialId: fresh.credentialId, secretHash: fresh.secretHash }],
      }),
    );
    assert.equal(dead.type, TOKEN_NOT_ACTIVE);
  });

  it('should rotate automatically, deliver the secret to a 0600 file and keep it out of history', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, {
      name: 'auto-rotate',
      rotateEveryMs: 2_000,
      graceMs: 1_000,
      ownerDir: dir,
    });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    const secretFile = await waitUntil(
      () => readdirSync(dir).find((f) => f.startsWith(`${t.tokenId}.cred_`) && f.endsWith('.json')),
      'the rotated secret in the owner folder',
      20_000,
    );
    const file = path.join(dir, secretFile);
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.equal(statSync(dir).mode & 0o777, 0o700);
    const delivered = JSON.parse(readFileSync(file, 'utf8')) as { token: string; credential_id: string };
    await waitUntil(async () => await isValid(ctx, delivered.token), 'the delivered secret valid');
    await waitUntil(async () => !(await isValid(ctx, t.token)), 'the old secret rejected after its grace');
    // Rotations continue as new: read every run of the workflow.
    const text = await historyJson(t.tokenId);
    assert.ok(!text.includes(delivered.token), 'the rotated secret is not in history');
    assert.ok(!text.includes(t.token), 'the issued secret is not in history');
    const runs = await runsOf(t.handle.workflowId);
    await maybeRecordHistory(ctx.client.workflow.getHandle(t.handle.workflowId, runs[0]), 'rotation-automatic');
  });
});

describe('suspicious activity', () => {
  it('should revoke by default, with the evidence in the audit trail', async () => {
    const policy = await insertPolicy(ctx, { name: 'suspicious-revoke', onSuspicious: 'revoke' });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    await t.handle.signal(reportSuspiciousSignal, {
      reason: 'used from two continents',
      evidence: { ips: ['192.0.2.1', '198.51.100.7'] },
      actor: 'siem',
      reportId: 'rep-1',
    });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    const shown = await store.requireToken(ctx.pool, t.tokenId);
    assert.equal(shown.revokeReason, 'suspicious_activity');
    const audit = await auditOf(t.tokenId);
    const report = audit.find((e) => e.kind === 'token.suspicious');
    assert.deepEqual(report?.data.evidence, { ips: ['192.0.2.1', '198.51.100.7'] });
    assert.equal(report?.data.action, 'revoke');
    await maybeRecordHistory(t.handle, 'suspicious-revoke');
  });

  it('should keep a secret sent by raw Signal out of the audit activity and the audit trail', async () => {
    const policy = await insertPolicy(ctx, { name: 'suspicious-secret', onSuspicious: 'revoke' });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    const leaked = newSecret().token;
    const signingSecret = 'whsec_' + 'A'.repeat(32);
    // Past the library: a Signal sent straight to the workflow, secrets in evidence, reason and actor.
    await t.handle.signal(reportSuspiciousSignal, {
      reason: `seen with Bearer ${leaked}`,
      evidence: { request: { headers: { authorization: `Bearer ${leaked}` } }, [signingSecret]: 1, n: 1 },
      actor: `siem ${signingSecret}`,
      reportId: leaked,
    });
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    // Payload bytes decoded as UTF-8 (JSON): the activities' inputs as the worker sent them.
    const events = (await decodedHistory(t.handle)).events ?? [];
    const scheduled = historyText(events.filter((e) => e.activityTaskScheduledEventAttributes)).join('\n');
    assert.ok(scheduled.includes('token.suspicious'), 'the audit activity ran');
    assert.equal(scheduled.includes(leaked), false, 'no raw token in any activity input');
    assert.equal(scheduled.includes(signingSecret), false, 'no signing secret in any activity input');
    const rows = await ctx.sql.query(
      `SELECT idempotency_key || ' ' || canonical AS canonical FROM audit_event WHERE token_id = $1`,
      [t.tokenId],
    );
    const audit = rows.rows.map((r: { canonical: string }) => r.canonical).join('\n');
    assert.equal(audit.includes(leaked), false, 'no raw token in the audit trail');
    assert.equal(audit.includes(signingSecret), false, 'no signing secret in the audit trail');
    const report = (await auditOf(t.tokenId)).find((e) => e.kind === 'token.suspicious');
    assert.deepEqual(report?.data.evidence, {
      request: { headers: { authorization: '[redacted: a tokenwarden token]' } },
      '[redacted key 1]': 1,
      n: 1,
    });
    assert.equal(report?.data.reason, '[redacted: a tokenwarden token]');
  });

  it('should rotate with no grace when the policy says rotate', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, { name: 'suspicious-rotate', onSuspicious: 'rotate', ownerDir: dir });
    const t = await startToken(ctx, { ttlMs: 120_000, policy });
    await t.handle.signal(reportSuspiciousSignal, { reason: 'leaked in a log', evidence: { line: 42 } });
    const secretFile = await waitUntil(
      () => readdirSync(dir).find((f) => f.startsWith(`${t.tokenId}.cred_`)),
      'the new secret delivered',
    );
    const delivered = JSON.parse(readFileSync(path.join(dir, secretFile), 'utf8')) as { token: string };
    await waitUntil(async () => !(await isValid(ctx, t.token)), 'the suspect secret rejected at once', 5_000);
    assert.equal(await isValid(ctx, delivered.token), true);
    const audit = await auditOf(t.tokenId);
    assert.equal(audit.find((e) => e.kind === 'token.suspicious')?.data.action, 'rotate');
    assert.equal((await t.handle.query(describeQuery)).phase, 'active');
    // The rotation continued as new: the run that received the report.
    const runs = await runsOf(t.handle.workflowId);
    await maybeRecordHistory(ctx.client.workflow.getHandle(t.handle.workflowId, runs[0]), 'suspicious-rotate');
  });
});
