/**
 * Bulk issue: `tokenwarden issue --from <file> --out <file>`. The raw tokens reach the out file
 * (mode 0600) and nothing else; the out file is written ahead of issuing, so a SIGKILLed run and its
 * rerun issue every record exactly once and every valid token is in the out file.
 */
import assert from 'node:assert/strict';
import { lstat, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { tokenWorkflowId } from '../common/names.js';
import { hashToken, isWellFormedToken } from '../common/secrets.js';
import { executionsOnceListed, issuedEventsPerToken, lookup, spawnCli } from './support/bulk.js';
import { runCli, type CliRun } from './support/cli.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { SecretScan } from './support/secret-scan.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let receiver: TestReceiver;
let dir: string;
const scan = new SecretScan();
const outputs: Array<{ where: string; text: string }> = [];

before(async () => {
  ctx = await TestContext.create('bulk_issue');
  receiver = await TestReceiver.start();
  await ctx.warden.addReceiver({ id: 'billing', url: receiver.url });
  dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bulk-issue-'));
});
after(async () => {
  await ctx?.close();
  await receiver?.close();
  await rm(dir, { recursive: true, force: true });
});

interface Entry {
  line: number;
  tokenId: string;
  subject: string;
  name?: string;
  token: string;
}

async function entriesOf(file: string): Promise<Entry[]> {
  return (await readFile(file, 'utf8'))
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Entry);
}

async function issueCli(args: string[]): Promise<CliRun> {
  const run = await runCli(['issue', ...args], ctx.childEnv());
  outputs.push({ where: `the output of tokenwarden issue ${args.join(' ')}`, text: run.stdout + run.stderr });
  return run;
}

const jsonl = (records: unknown[]) => records.map((r) => JSON.stringify(r)).join('\n') + '\n';

describe('tokenwarden issue --from --out', () => {
  it('should write the raw tokens only to a new 0600 out file, each verifying; a rerun issues nothing again', async () => {
    const from = path.join(dir, 'team.jsonl');
    const out = path.join(dir, 'team.tokens.jsonl');
    await writeFile(
      from,
      jsonl([
        { subject: 'usr_1', ttl: '1h', receivers: ['billing'], name: 'deploy', scopes: ['deploy'] },
        { subject: 'usr_2', ttl: '2h' },
        { subject: 'usr_3', ttl: '1h', expiresAt: '2030-01-01T00:00:00Z' },
        { subject: 'usr_4', ttl: 'forever' },
        { subject: 'usr_5', ttl: '1h', receivers: ['nope'] },
      ]),
    );
    const run = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(run.code, 1, run.stderr);
    const summary = JSON.parse(run.stdout) as Record<string, unknown>;
    assert.deepEqual(
      [summary.started, summary.existing, summary.invalid, summary.failed, summary.outFile],
      [2, 0, 2, 1, out],
    );
    assert.equal((await stat(out)).mode & 0o777, 0o600, 'the out file is 0600');
    const entries = await entriesOf(out);
    // Line 5's token was written ahead of its issue, which the store refused: it is not valid.
    assert.deepEqual(
      entries.map((e) => [e.line, e.subject]),
      [
        [1, 'usr_1'],
        [2, 'usr_2'],
        [5, 'usr_5'],
      ],
    );
    for (const e of entries) {
      scan.addToken(`line ${e.line}`, e.token);
      assert.ok(isWellFormedToken(e.token));
    }
    assert.equal(await lookup(ctx.sql, hashToken(entries[0]!.token)), entries[0]!.tokenId);
    assert.equal(await lookup(ctx.sql, hashToken(entries[1]!.token)), entries[1]!.tokenId);
    assert.equal(await lookup(ctx.sql, hashToken(entries[2]!.token)), undefined);
    const errors = (await readFile(summary.errorsFile as string, 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.deepEqual(
      errors.map((e: { line: number; field: string }) => [e.line, e.field]),
      [
        [3, 'expiresAt'],
        [4, 'ttl'],
        [5, 'receivers'],
      ],
    );
    outputs.push({ where: 'the errors file', text: await readFile(summary.errorsFile as string, 'utf8') });
    const { rows } = await ctx.sql.query(
      `SELECT canonical::jsonb -> 'data' ? 'imported' AS marked FROM audit_event WHERE token_id = $1 AND kind = 'token.issued'`,
      [entries[0]!.tokenId],
    );
    assert.deepEqual(rows, [{ marked: false }], 'an issued token is not marked imported');

    // The same command again: every record found in the out file, nothing issued twice.
    const again = await issueCli(['--from', from, '--out', out, '--json']);
    const second = JSON.parse(again.stdout) as Record<string, unknown>;
    assert.deepEqual([second.started, second.existing, second.failed, second.resumed], [0, 2, 1, 3]);
    assert.deepEqual(await entriesOf(out), entries, 'the out file is unchanged');

    // Once the receiver exists, line 5 is issued with the token already in the out file.
    await ctx.warden.addReceiver({ id: 'nope', url: receiver.url });
    const third = await issueCli(['--from', from, '--out', out, '--json']);
    assert.deepEqual((JSON.parse(third.stdout) as { started: number }).started, 1);
    assert.equal(await lookup(ctx.sql, hashToken(entries[2]!.token)), entries[2]!.tokenId);
  });

  it('should refuse an out file others can read, a symbolic link, or a file that is not an out file', async () => {
    const from = path.join(dir, 'one.jsonl');
    await writeFile(from, jsonl([{ subject: 'usr_refused', ttl: '1h' }]));
    const open = path.join(dir, 'open.jsonl');
    await writeFile(open, '', { mode: 0o644 });
    const target = path.join(dir, 'target');
    await writeFile(target, '', { mode: 0o600 });
    const link = path.join(dir, 'link.jsonl');
    await symlink(target, link);
    const other = path.join(dir, 'notes.txt');
    await writeFile(other, 'my notes\n', { mode: 0o600 });
    for (const [out, why] of [
      [open, /others may read it \(mode 644\)/],
      [link, /is a symbolic link/],
      [other, /line 1 is not an entry/],
    ] as const) {
      const run = await issueCli(['--from', from, '--out', out]);
      assert.equal(run.code, 2, run.stderr);
      assert.match(run.stderr, why);
    }
    assert.equal(await readFile(other, 'utf8'), 'my notes\n', 'left untouched');
    assert.equal(await readFile(target, 'utf8'), '');
    assert.ok((await lstat(link)).isSymbolicLink());
    const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM token WHERE subject = 'usr_refused'`);
    assert.equal(rows[0].n, 0);

    const single = await issueCli(['--subject', 'usr_refused', '--ttl', '1h', '--out', open]);
    assert.equal(single.code, 2);
    assert.match(single.stderr, /--out goes with --from only/);
  });

  it('should issue every record exactly once, each valid token in the out file, when a run is SIGKILLed and run again', async () => {
    const total = 400;
    const from = path.join(dir, 'many.jsonl');
    const out = path.join(dir, 'many.tokens.jsonl');
    await writeFile(
      from,
      jsonl(Array.from({ length: total }, (_, i) => ({ subject: `usr_many_${i % 7}`, ttl: '1h' }))),
    );
    const first = spawnCli(['issue', '--from', from, '--out', out, '--concurrency', '1'], ctx.childEnv());
    await waitUntil(
      async () => {
        const { rows } = await ctx.sql.query(
          `SELECT count(*)::int AS n FROM token WHERE subject LIKE 'usr_many_%' AND workflow_started_at IS NOT NULL`,
        );
        return rows[0].n >= 20;
      },
      'the first run part way',
      60_000,
      20,
    );
    first.child.kill('SIGKILL');
    assert.equal((await first.exited).signal, 'SIGKILL');
    outputs.push({ where: 'the output of the killed bulk issue', text: first.output() });
    const { rows: before } = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE subject LIKE 'usr_many_%'`,
    );
    const { rows: marked } = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE subject LIKE 'usr_many_%' AND workflow_started_at IS NOT NULL`,
    );
    const journaled = (await entriesOf(out)).length;
    assert.ok(before[0].n < total, `killed before the end (${before[0].n} rows)`);
    assert.ok(journaled >= before[0].n, 'every token written to the store was in the out file first');

    const rerun = await issueCli(['--from', from, '--out', out, '--json', '--concurrency', '8']);
    assert.equal(rerun.code, 0, rerun.stderr);
    const summary = JSON.parse(rerun.stdout) as {
      started: number;
      existing: number;
      resumed: number;
      invalid: number;
      failed: number;
    };
    assert.deepEqual(
      [summary.started + summary.existing, summary.existing, summary.resumed, summary.invalid, summary.failed],
      [total, marked[0].n, journaled, 0, 0],
    );

    const entries = await entriesOf(out);
    assert.deepEqual(
      entries.map((e) => e.line),
      Array.from({ length: total }, (_, i) => i + 1),
      'one entry per line, none twice',
    );
    const { rows: stored } = await ctx.sql.query(`SELECT id FROM token WHERE subject LIKE 'usr_many_%' ORDER BY id`);
    assert.deepEqual(
      stored.map((r: { id: string }) => r.id),
      entries.map((e) => e.tokenId).sort(),
      'no token issued that the out file lacks',
    );
    for (const e of entries) {
      scan.addToken(`line ${e.line} of many`, e.token);
      assert.equal(await lookup(ctx.sql, hashToken(e.token)), e.tokenId);
    }
    const ids = entries.map((e) => e.tokenId);
    const events = await issuedEventsPerToken(ctx.sql, ids);
    assert.ok(
      ids.every((id) => events.get(id) === 1),
      'one token.issued per token',
    );
    const runs = await executionsOnceListed(ctx.client, ctx.settings.temporal.taskQueue, ids.map(tokenWorkflowId));
    assert.deepEqual(
      ids.filter((id) => runs.get(tokenWorkflowId(id)) !== 1),
      [],
      'one workflow execution per token',
    );
  });

  it('should have the out file on disk before the store sees a batch: a batch the store refuses is issued by the rerun with the same tokens', async () => {
    const out = path.join(dir, 'refused.tokens.jsonl');
    const records = Array.from({ length: 3 }, (_, i) => ({ subject: `usr_refused_batch_${i}`, ttl: '1h' }));
    // The store refuses every token row, as a crash right after the out file was written would leave it.
    await ctx.sql.query(`CREATE FUNCTION refuse_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'refused by the test'; END $$`);
    await ctx.sql.query(
      `CREATE TRIGGER refuse_tokens BEFORE INSERT ON token FOR EACH ROW EXECUTE FUNCTION refuse_tokens()`,
    );
    let first;
    try {
      first = await ctx.warden.issueMany(records, { out });
    } finally {
      await ctx.sql.query(`DROP TRIGGER refuse_tokens ON token`);
    }
    assert.deepEqual([first.started, first.failed], [0, 3]);
    assert.match(
      first.errors[0]!.message,
      /may not have been written to the store \(rerun to finish\): refused by the test/,
    );
    const entries = await entriesOf(out);
    assert.deepEqual(
      entries.map((e) => e.line),
      [1, 2, 3],
      'written before the store was asked',
    );
    for (const e of entries) scan.addToken(`refused batch line ${e.line}`, e.token);

    const second = await ctx.warden.issueMany(records, { out });
    assert.deepEqual([second.started, second.failed, second.resumed], [3, 0, 3]);
    assert.deepEqual(await entriesOf(out), entries, 'the same tokens, nothing appended');
    for (const e of entries) assert.equal(await lookup(ctx.sql, hashToken(e.token)), e.tokenId);
  });

  it('should leave no raw token in any output, history or table but the out file', async () => {
    // Tokens of its own, so the search below never searches for nothing.
    const from = path.join(dir, 'scanned.jsonl');
    const out = path.join(dir, 'scanned.tokens.jsonl');
    await writeFile(from, jsonl([{ subject: 'usr_scanned', ttl: '1h', receivers: ['billing'] }]));
    const run = await issueCli(['--from', from, '--out', out, '--json']);
    assert.equal(run.code, 0, run.stderr);
    const [entry] = await entriesOf(out);
    scan.addToken('the scanned run', entry!.token);
    for (const { where, text } of outputs) scan.searchOutput(where, text);
    const { rows } = await ctx.sql.query(`SELECT id FROM token ORDER BY id DESC LIMIT 20`);
    assert.ok(rows.some((r: { id: string }) => r.id === entry!.tokenId));
    await scan.searchHistories(
      ctx.client,
      rows.map((r: { id: string }) => tokenWorkflowId(r.id)),
    );
    await scan.searchTables(ctx.sql, 'the store');
    assert.ok(scan.counts.tokens >= 1, 'raw tokens were searched for');
    assert.deepEqual(scan.hits(), []);
  });
});
