/**
 * Reruns of bulk import and bulk issue that must not go wrong quietly: an input changed under an out
 * file, two runs on one out file, a rerun with changed records, a token killed between its row and
 * its start, a dead token imported again; and what a resume keeps in memory.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { writeHeapSnapshot } from 'node:v8';
import { MockActivityEnvironment } from '@temporalio/testing';
import {
  createReconcilerActivities,
  type ReconcilePageInput,
  type ReconcilePageResult,
} from '../activities/reconciler.js';
import { tokenWorkflowId } from '../common/names.js';
import { hashToken } from '../common/secrets.js';
import { spawnCli, lookup } from './support/bulk.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let receiver: TestReceiver;
let worker: RunningWorker;
let dir: string;

before(async () => {
  ctx = await TestContext.create('import_resume');
  receiver = await TestReceiver.start();
  await ctx.warden.addReceiver({ id: 'billing', url: receiver.url });
  await ctx.warden.addReceiver({ id: 'search', url: receiver.url });
  worker = await ctx.startWorker();
  dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-import-resume-'));
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
  await receiver?.close();
  await rm(dir, { recursive: true, force: true });
});

const jsonl = (records: unknown[]) => records.map((r) => JSON.stringify(r)).join('\n') + '\n';
const foreignToken = () => `ghp_${randomBytes(24).toString('base64url')}`;

async function tokensOf(subjectPrefix: string): Promise<Array<{ id: string; subject: string }>> {
  const { rows } = await ctx.sql.query(`SELECT id, subject FROM token WHERE subject LIKE $1 ORDER BY id`, [
    `${subjectPrefix}%`,
  ]);
  return rows as Array<{ id: string; subject: string }>;
}

const issueCli = (args: string[]) => runCli(['issue', ...args], ctx.childEnv());

/** The workflow's latest run, which a second run would replace. */
async function latestRun(tokenId: string): Promise<{ runId: string; status: string }> {
  const d = await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).describe();
  return { runId: d.runId, status: d.status.name };
}

/**
 * A token revoked and its workflow closed while the store row still reads active and unstarted, as
 * an importer that read the row before the revoke holds it.
 */
async function killedBeforeItsStart(subject: string): Promise<{ tokenId: string; token: string; runId: string }> {
  const token = foreignToken();
  const tokenId = `tok_${randomBytes(16).toString('hex')}`;
  // Written as a crashed import leaves it: row stored, workflow never started.
  const { rows } = await ctx.sql.query(
    `SELECT r.outcome FROM import_tokens($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, false) AS r`,
    [
      [tokenId],
      [`cred_${randomBytes(16).toString('hex')}`],
      [true],
      [hashToken(token)],
      [subject],
      [null],
      ['[]'],
      ['[]'],
      [null],
      [3_600_000],
    ],
  );
  assert.deepEqual(rows, [{ outcome: 'inserted' }]);
  await ctx.warden.revoke({ tokenId, reason: 'leaked' });
  const closed = await waitUntil(async () => {
    const run = await latestRun(tokenId);
    return run.status === 'COMPLETED' && run;
  }, 'the revoked token’s workflow closed');
  await ctx.sql.query(
    `UPDATE token SET status = 'active', revoked_at = NULL, propagation = 'none', workflow_started_at = NULL
      WHERE id = $1`,
    [tokenId],
  );
  return { tokenId, token, runId: closed.runId };
}

describe('bulk issue resume', () => {
  it('should refuse a rerun whose input lost a line, issuing nothing (no second token for a shifted record)', async () => {
    const from = path.join(dir, 'shifted.jsonl');
    const out = path.join(dir, 'shifted.tokens.jsonl');
    const records = [
      { subject: 'usr_shift_1', ttl: '1h' },
      { subject: 'usr_shift_2', ttl: '1h' },
      { subject: 'usr_shift_3', ttl: 'forever' },
      { subject: 'usr_shift_4', ttl: '1h' },
      { subject: 'usr_shift_5', ttl: '1h' },
    ];
    await writeFile(from, jsonl(records));
    const first = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(first.code, 1, first.stderr);
    const before = await tokensOf('usr_shift_');
    const journal = await readFile(out, 'utf8');
    assert.equal(before.length, 4);

    // The user deletes the invalid line 3: old line 4 is now line 3, old line 5 line 4.
    await writeFile(from, jsonl(records.filter((_, i) => i !== 2)));
    const rerun = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(rerun.code, 2, rerun.stdout + rerun.stderr);
    assert.match(
      rerun.stderr,
      /the input changed since .*shifted\.tokens\.jsonl was written: line 4 is not the record that token tok_[0-9a-f]{32} was issued for.*use a new --out/,
    );
    assert.deepEqual(await tokensOf('usr_shift_'), before, 'no token issued');
    assert.equal(await readFile(out, 'utf8'), journal, 'the out file unchanged');
  });

  it('should refuse a rerun whose record changed after its token was journaled but not stored', async () => {
    const out = path.join(dir, 'edited.tokens.jsonl');
    const records = [
      { subject: 'usr_edit_alice', ttl: '1h' },
      { subject: 'usr_edit_carol', ttl: '1h' },
    ];
    // The store refuses the batch, as a crash between the out file's write and the store's leaves it.
    await ctx.sql.query(`CREATE FUNCTION refuse_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'refused by the test'; END $$`);
    await ctx.sql.query(
      `CREATE TRIGGER refuse_tokens BEFORE INSERT ON token FOR EACH ROW EXECUTE FUNCTION refuse_tokens()`,
    );
    try {
      const first = await ctx.warden.issueMany(records, { out });
      assert.equal(first.failed, 2);
    } finally {
      await ctx.sql.query(`DROP TRIGGER refuse_tokens ON token`);
      await ctx.sql.query(`DROP FUNCTION refuse_tokens()`);
    }
    await assert.rejects(
      ctx.warden.issueMany([{ subject: 'usr_edit_bob', ttl: '1h' }, records[1]!], { out }),
      /the input changed since .*edited\.tokens\.jsonl was written: line 1 is not the record that token tok_\w+ was issued for/,
    );
    assert.deepEqual(await tokensOf('usr_edit_'), [], 'nothing stored, under bob or anyone');

    // The unchanged input still resumes.
    const again = await ctx.warden.issueMany(records, { out });
    assert.deepEqual([again.started, again.resumed, again.failed], [2, 2, 0]);
  });

  it('should refuse a second run on an out file in use, and free it when the run holding it is killed', async () => {
    const from = path.join(dir, 'locked.jsonl');
    const out = path.join(dir, 'locked.tokens.jsonl');
    await writeFile(from, jsonl(Array.from({ length: 300 }, (_, i) => ({ subject: `usr_locked_${i}`, ttl: '1h' }))));
    const first = spawnCli(['issue', '--from', from, '--out', out, '--concurrency', '1'], ctx.childEnv());
    await waitUntil(async () => (await tokensOf('usr_locked_')).length > 0, 'the first run writing', 60_000, 20);
    const second = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(second.code, 2, second.stdout + second.stderr);
    assert.match(second.stderr, /invalid --out .*locked\.tokens\.jsonl: another bulk issue is writing to it now/);

    first.child.kill('SIGKILL');
    await first.exited;
    const rerun = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(rerun.code, 0, rerun.stderr);
    const entries = (await readFile(out, 'utf8')).trim().split('\n');
    assert.equal(entries.length, 300, 'one entry per line');
    assert.equal((await tokensOf('usr_locked_')).length, 300);
  });

  it("should refuse a run while a live process holds the out file's lock, leaving that run's errors file untouched", async () => {
    const from = path.join(dir, 'held.jsonl');
    const out = path.join(dir, 'held.tokens.jsonl');
    const errors = path.join(dir, 'held.errors.jsonl');
    await writeFile(from, jsonl([{ subject: 'usr_held', ttl: '1h' }]));
    // The lock of a run in progress (this test's own process: alive, same host), and its errors so far.
    await writeFile(`${out}.lock`, JSON.stringify({ pid: process.pid, host: os.hostname() }));
    await writeFile(errors, '{"line":7,"kind":"invalid"}\n');
    const refused = await issueCli(['--from', from, '--out', out, '--errors', errors, '--json']);
    assert.equal(refused.code, 2, refused.stdout + refused.stderr);
    assert.match(
      refused.stderr,
      new RegExp(`another bulk issue is writing to it now \\(held\\.tokens\\.jsonl\\.lock: pid ${process.pid}\\)`),
    );
    assert.equal(
      await readFile(errors, 'utf8'),
      '{"line":7,"kind":"invalid"}\n',
      'the running run keeps its errors file',
    );
    await rm(`${out}.lock`);
    const ran = await issueCli(['--from', from, '--out', out, '--errors', errors, '--json']);
    assert.equal(ran.code, 0, ran.stderr);
    await assert.rejects(
      readFile(errors, 'utf8'),
      { code: 'ENOENT' },
      'a run without errors removes the previous file',
    );
    await assert.rejects(readFile(`${out}.lock`, 'utf8'), { code: 'ENOENT' }, 'the lock is gone after the run');
  });

  it('should keep no raw token of the earlier run in memory while resuming', async () => {
    const from = path.join(dir, 'memory.jsonl');
    const out = path.join(dir, 'memory.tokens.jsonl');
    const records = Array.from({ length: 250 }, (_, i) => ({ subject: `usr_memory_${i}`, ttl: '1h' }));
    await writeFile(from, jsonl(records));
    // Issued by another process: this one never held the tokens.
    const first = await issueCli(['--from', from, '--out', out]);
    assert.equal(first.code, 0, first.stderr);
    let snapshot: string | undefined;
    const resumed = await ctx.warden.issueMany(records, {
      out,
      batchSize: 50,
      onProgress: () => {
        snapshot ??= writeHeapSnapshot(path.join(dir, 'resume.heapsnapshot'));
      },
    });
    assert.deepEqual([resumed.resumed, resumed.existing], [250, 250]);
    const heap = await readFile(snapshot!, 'utf8');
    const tokens = (await readFile(out, 'utf8'))
      .trim()
      .split('\n')
      .map((l) => (JSON.parse(l) as { line: number; token: string }).token);
    const inHeap = tokens.filter((t) => heap.includes(t));
    assert.deepEqual(inHeap.length, 0, `${inHeap.length} raw tokens in the heap while resuming`);
  });
});

describe('bulk import reruns', () => {
  it('should report a rerun with changed facts as failed, naming the field and never a value of a secret', async () => {
    const token = foreignToken();
    const other = foreignToken();
    const expiresAt = new Date(Date.now() + 3_600_000).toISOString();
    const record = { token, subject: 'usr_facts', receivers: ['billing'], ttl: '1h', name: 'ci', scopes: ['read'] };
    const absolute = { token: other, subject: 'usr_facts', expiresAt };
    const first = await ctx.warden.startMany([record, absolute]);
    assert.deepEqual([first.started, first.failed], [2, 0]);
    const tokenId = (await lookup(ctx.sql, hashToken(token)))!;

    const rerun = await ctx.warden.startMany([
      { ...record, receivers: ['search', 'billing'] },
      { ...absolute, expiresAt: new Date(Date.now() + 7_200_000).toISOString() },
      { ...record, ttl: '2h' }, // a ttl moves: not compared
      { ...record, scopes: ['read', 'write'], subject: 'usr_other' },
    ]);
    assert.deepEqual([rerun.started, rerun.existing, rerun.failed], [0, 1, 3]);
    assert.deepEqual(
      rerun.errors.map((e) => [e.line, e.field]),
      [
        [1, 'receivers'],
        [2, 'expiresAt'],
        [4, 'subject'],
      ],
    );
    assert.equal(
      rerun.errors[0]!.message,
      `token ${tokenId} is stored with other receivers; change it through the token's own commands (revoke and re-import)`,
    );
    assert.match(rerun.errors[1]!.message, /is stored with other expiry/);
    const { rows } = await ctx.sql.query(`SELECT receivers FROM token WHERE id = $1`, [tokenId]);
    assert.deepEqual(rows, [{ receivers: ['billing'] }], 'the stored facts unchanged');
  });

  it('should give imported tokens without an id time-ordered ids: the newest token is listed first', async () => {
    const tokens = Array.from({ length: 30 }, foreignToken);
    const imported = await ctx.warden.startMany(tokens.map((token) => ({ token, subject: 'usr_ordered', ttl: '1h' })));
    assert.equal(imported.started, 30);
    const issued = await ctx.warden.issue({ subject: 'usr_ordered', ttl: '1h' });
    const listed = await ctx.warden.list({ subject: 'usr_ordered', limit: 1 });
    assert.equal(listed[0]!.id, issued.tokenId, 'the token issued last comes first');
    // A rerun finds them by their hash.
    const rerun = await ctx.warden.startMany(tokens.map((token) => ({ token, subject: 'usr_ordered', ttl: '1h' })));
    assert.deepEqual([rerun.started, rerun.existing, rerun.failed], [0, 30, 0]);
  });

  it('should report a revoked token imported again as failed, not as managed', async () => {
    const token = foreignToken();
    const record = { token, subject: 'usr_dead', ttl: '1h' };
    assert.equal((await ctx.warden.startMany([record])).started, 1);
    const tokenId = (await lookup(ctx.sql, hashToken(token)))!;
    await ctx.warden.revoke({ tokenId, reason: 'leaked' });
    const again = await ctx.warden.startMany([record]);
    assert.deepEqual([again.existing, again.failed], [0, 1]);
    assert.equal(again.errors[0]!.message, `token ${tokenId} is revoked; a dead token is not brought back`);
  });
});

describe('a token killed between its row and its workflow start', () => {
  it('should not open a second run when the import resumes after the revoke closed its workflow', async () => {
    const { tokenId, token, runId } = await killedBeforeItsStart('usr_race_import');
    const report = await ctx.warden.startMany([{ tokenId, token, subject: 'usr_race_import', ttl: '1h' }]);
    assert.deepEqual([report.started, report.existing, report.failed], [0, 1, 0]);
    assert.deepEqual(await latestRun(tokenId), { runId, status: 'COMPLETED' }, 'no second run');
  });

  it('should not open a second run from the reconciler, nor fail its pass', async () => {
    const { tokenId, runId } = await killedBeforeItsStart('usr_race_reconcile');
    await ctx.sql.query(`UPDATE token SET workflow_started_at = now() WHERE id <> $1`, [tokenId]);
    const { reconcilePage } = createReconcilerActivities({
      pool: ctx.pool,
      client: ctx.client,
      settings: ctx.settings,
    });
    const input: ReconcilePageInput = { set: 'unstarted', afterId: null, batchSize: 10, graceMs: 0, sampleSize: 20 };
    const { report } = (await new MockActivityEnvironment({ heartbeatTimeoutMs: 30_000 }).run(
      reconcilePage,
      input,
    )) as ReconcilePageResult;
    assert.deepEqual([report.counts.errors, report.counts.started], [0, 0], JSON.stringify(report.errors));
    assert.deepEqual(await latestRun(tokenId), { runId, status: 'COMPLETED' }, 'no second run');
    const { rows } = await ctx.sql.query(`SELECT workflow_started_at IS NOT NULL AS marked FROM token WHERE id = $1`, [
      tokenId,
    ]);
    assert.deepEqual(rows, [{ marked: true }], 'marked started: it leaves the unstarted set');
  });
});
