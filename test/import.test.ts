/**
 * Bulk import of existing tokens: the CLI and the library's startMany against the real stack. Bad
 * records are named by line and field, a SIGKILLed import and an aborted startMany resume, and every
 * token ends with exactly one workflow execution and one `token.issued` event.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createVerifier } from '../client/verifier.js';
import { tokenWorkflowId } from '../common/names.js';
import { hashToken } from '../common/secrets.js';
import { runCli, type CliRun } from './support/cli.js';
import { executionsOnceListed, issuedEventsPerToken, lookup, spawnCli } from './support/bulk.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { SecretScan } from './support/secret-scan.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let receiver: TestReceiver;
let dir: string;
const scan = new SecretScan();
const outputs: CliRun[] = [];

before(async () => {
  ctx = await TestContext.create('import');
  receiver = await TestReceiver.start();
  await ctx.warden.addReceiver({ id: 'billing', url: receiver.url });
  dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-import-'));
});
after(async () => {
  await ctx?.close();
  await receiver?.close();
  await rm(dir, { recursive: true, force: true });
});

/** A token of another system (imports accept any printable format). */
const foreignToken = (label: string) => {
  const token = `ghp_${randomBytes(24).toString('base64url')}`;
  scan.addToken(label, token);
  return token;
};
const hashHex = (token: string) => hashToken(token).toString('hex');
const jsonl = (records: unknown[]) =>
  records.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n';

async function importCli(args: string[], stdin?: string): Promise<CliRun> {
  const run = await runCli(['import', ...args], ctx.childEnv(), stdin);
  outputs.push(run);
  return run;
}

interface Summary {
  started: number;
  existing: number;
  invalid: number;
  failed: number;
  errorsFile: string | null;
  aborted: boolean;
  valid?: number;
}
const summaryOf = (run: CliRun) => JSON.parse(run.stdout) as Summary;

async function errorLines(file: string) {
  return (await readFile(file, 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { line: number; field: string | null; message: string; kind: string });
}

async function tokenCount(subject: string): Promise<number> {
  const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM token WHERE subject = $1`, [subject]);
  return rows[0].n as number;
}

describe('tokenwarden import', () => {
  it('should import the valid lines, name each bad one by line and field, and start each token once; a rerun finds them existing', async () => {
    const worker = await ctx.startWorker();
    const withId = foreignToken('line 1');
    const byHash = foreignToken('line 2');
    const inJson = foreignToken('line 6');
    const givenId = 'tok_0000000000000000000000000000a001';
    const file = path.join(dir, 'mixed.jsonl');
    const lines = [
      /* 1 */ {
        tokenId: givenId,
        token: withId,
        subject: 'usr_a',
        receivers: ['billing'],
        ttl: '1h',
        name: 'ci key',
        scopes: ['read'],
      },
      /* 2 */ {
        secretHash: hashHex(byHash),
        subject: 'usr_a',
        expiresAt: new Date(Date.now() + 3_600_000).toISOString(),
      },
      /* 3 */ '',
      /* 4 */ { token: foreignToken('line 4'), subject: 'jane@example.com', ttl: '1h' },
      /* 5 */ { token: foreignToken('line 5'), secretHash: hashHex('x'), subject: 'usr_a', ttl: '1h' },
      /* 6 */ `{"token": "${inJson}", "subject": `,
      /* 7 */ { token: foreignToken('line 7'), subject: 'usr_a', expiresAt: '2001-01-01T00:00:00Z' },
      /* 8 */ { token: foreignToken('line 8'), subject: 'usr_a', ttl: '1h', receivers: ['nope'] },
      /* 9 */ { token: foreignToken('line 9'), subject: 'usr_a', expires_at: '2030-01-01T00:00:00Z', ttl: '1h' },
      /* 10 */ { tokenId: givenId, token: foreignToken('line 10'), subject: 'usr_a', ttl: '1h' },
      /* 11 */ { tokenId: 'tok_0000000000000000000000000000a011', token: withId, subject: 'usr_a', ttl: '1h' },
    ];
    await writeFile(file, jsonl(lines));

    const run = await importCli([file, '--json', '--concurrency', '4']);
    assert.equal(run.code, 1, `exit 1: records were invalid or failed\n${run.stderr}`);
    const summary = summaryOf(run);
    assert.deepEqual(
      { ...summary, durationMs: undefined },
      {
        started: 2,
        existing: 0,
        invalid: 5,
        failed: 3,
        errorsFile: `${file}.errors.jsonl`,
        aborted: false,
        durationMs: undefined,
      },
    );
    const errors = await errorLines(summary.errorsFile!);
    assert.deepEqual(
      errors.map((e) => [e.line, e.kind, e.field]),
      [
        [4, 'invalid', 'subject'],
        [5, 'invalid', 'secretHash'],
        [6, 'invalid', '(line)'],
        [7, 'invalid', 'expiresAt'],
        [9, 'invalid', 'expires_at'],
        [8, 'failed', 'receivers'],
        [10, 'failed', 'tokenId'],
        [11, 'failed', 'secret'],
      ].sort((a, b) => (a[1] === b[1] ? 0 : a[1] === 'invalid' ? -1 : 1)),
    );
    assert.match(errors.find((e) => e.line === 8)!.message, /unknown or removed receiver nope/);
    assert.match(errors.find((e) => e.line === 11)!.message, new RegExp(`already managed as token ${givenId}`));
    scan.searchOutput('the errors file', await readFile(summary.errorsFile!, 'utf8'));

    // The valid ones verify by their secret, under the given id or a fresh one.
    const derivedId = (await lookup(ctx.sql, hashToken(byHash)))!;
    assert.equal(await lookup(ctx.sql, hashToken(withId)), givenId);
    assert.match(derivedId, /^tok_[0-9a-f]{32}$/);
    // And through the verifier a service runs, which looks up foreign formats when told to.
    const verifier = await createVerifier({
      databaseUrl: ctx.settings.databaseUrl,
      schema: ctx.settings.databaseSchema,
      foreignTokens: true,
      cacheTtlMs: 0,
    });
    try {
      const answer = await verifier.verify(withId);
      assert.equal(answer.active && answer.tokenId, givenId, 'the verifier accepts the imported token');
    } finally {
      await verifier.close();
    }
    const ids = [givenId, derivedId];
    const { rows } = await ctx.sql.query(
      `SELECT id, name, scopes, receivers, canonical::jsonb -> 'data' ->> 'imported' AS imported
         FROM token JOIN audit_event a ON a.token_id = token.id AND a.kind = 'token.issued' WHERE id = ANY($1) ORDER BY id`,
      [ids],
    );
    assert.deepEqual(rows, [
      { id: givenId, name: 'ci key', scopes: ['read'], receivers: ['billing'], imported: 'true' },
      { id: derivedId, name: null, scopes: [], receivers: [], imported: 'true' },
    ]);
    const wfIds = ids.map(tokenWorkflowId);
    const runs = await executionsOnceListed(ctx.client, ctx.settings.temporal.taskQueue, wfIds);
    assert.deepEqual(
      wfIds.map((id) => runs.get(id)),
      [1, 1],
    );

    // A rerun: nothing written or started again; the same lines reported.
    const again = await importCli([file, '--json']);
    assert.equal(again.code, 1);
    assert.deepEqual(
      { ...summaryOf(again), durationMs: undefined },
      {
        started: 0,
        existing: 2,
        invalid: 5,
        failed: 3,
        errorsFile: `${file}.errors.jsonl`,
        aborted: false,
        durationMs: undefined,
      },
    );
    assert.equal((await errorLines(summary.errorsFile!)).length, 8, 'the errors file holds this run only');
    assert.deepEqual([...(await issuedEventsPerToken(ctx.sql, ids)).values()], [1, 1]);

    // The imported token is managed like any other: revoked, its receiver is told.
    const revoked = await ctx.warden.revoke({ tokenId: givenId, reason: 'migrated and rotated' });
    assert.equal(revoked.changed, true);
    await waitUntil(() => receiver.requestsFor(givenId).length === 1, 'the receiver told of the imported token');
    assert.equal(await lookup(ctx.sql, hashToken(withId)), undefined);
    await worker.stop();
  });

  it('should start every token exactly once when the import is SIGKILLed half way and run again (records without ids)', async () => {
    const total = 500;
    const subject = 'usr_killed';
    const tokens = Array.from({ length: total }, (_, i) => foreignToken(`killed ${i}`));
    const file = path.join(dir, 'killed.jsonl');
    await writeFile(
      file,
      jsonl(
        tokens.map((t, i) =>
          i % 2 ? { token: t, subject, ttl: '1h' } : { secretHash: hashHex(t), subject, ttl: '2h' },
        ),
      ),
    );
    const first = spawnCli(['import', file, '--json', '--concurrency', '1'], ctx.childEnv());
    // Caught mid-way: some workflows started and recorded, the rest not.
    await waitUntil(
      async () => {
        const { rows } = await ctx.sql.query(
          `SELECT count(*)::int AS n FROM token WHERE subject = $1 AND workflow_started_at IS NOT NULL`,
          [subject],
        );
        return rows[0].n >= 20;
      },
      'the first run part way',
      60_000,
      20,
    );
    first.child.kill('SIGKILL');
    assert.equal((await first.exited).signal, 'SIGKILL');
    outputs.push({ args: ['import', file, '(killed)'], code: null, stdout: first.output(), stderr: '' });
    const written = await tokenCount(subject);
    assert.ok(written < total, `killed before the end (${written} of ${total} rows written)`);

    const { rows: markedRows } = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE subject = $1 AND workflow_started_at IS NOT NULL`,
      [subject],
    );
    const marked = markedRows[0].n as number;

    const rerun = await importCli([file, '--json', '--concurrency', '8']);
    assert.equal(rerun.code, 0, rerun.stderr);
    const summary = summaryOf(rerun);
    // Rows the killed run wrote but did not record started are started (or found running) by the rerun.
    assert.deepEqual(
      { ...summary, durationMs: undefined },
      {
        started: total - marked,
        existing: marked,
        invalid: 0,
        failed: 0,
        errorsFile: null,
        aborted: false,
        durationMs: undefined,
      },
    );
    assert.equal(await tokenCount(subject), total);
    const ids: string[] = [];
    for (const t of tokens) ids.push((await lookup(ctx.sql, hashToken(t)))!);
    assert.equal(new Set(ids).size, total);
    const events = await issuedEventsPerToken(ctx.sql, ids);
    assert.ok(
      ids.every((id) => events.get(id) === 1),
      'one token.issued per token',
    );
    const runs = await executionsOnceListed(ctx.client, ctx.settings.temporal.taskQueue, ids.map(tokenWorkflowId));
    const twice = ids.filter((id) => runs.get(tokenWorkflowId(id)) !== 1);
    assert.deepEqual(twice, [], 'one workflow execution per token');
    const { rows } = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE subject = $1 AND workflow_started_at IS NULL`,
      [subject],
    );
    assert.equal(rows[0].n, 0, 'every start recorded');
  });

  it('should read csv (with a header, ;-separated lists, quoted fields) and jsonl from stdin; --dry-run touches nothing', async () => {
    const a = foreignToken('csv a');
    const b = foreignToken('csv b');
    const csv = [
      'subject,token,ttl,receivers,scopes,name',
      `usr_csv,${a},1h,billing,read;write,"Ops, nightly"`,
      `usr_csv,${b},2h,,,`,
      `usr_csv,,1h,,,missing secret`,
      `usr_csv,"unterminated,1h,,,`,
    ].join('\r\n');
    const dry = await importCli(
      ['-', '--format', 'csv', '--dry-run', '--json', '--errors', path.join(dir, 'dry.errors')],
      csv,
    );
    assert.equal(dry.code, 1);
    assert.deepEqual(
      { ...summaryOf(dry), durationMs: undefined },
      {
        started: 0,
        existing: 0,
        invalid: 2,
        failed: 0,
        errorsFile: path.join(dir, 'dry.errors'),
        aborted: false,
        durationMs: undefined,
        valid: 2,
        dryRun: true,
      },
    );
    assert.equal(await tokenCount('usr_csv'), 0, 'a dry run writes nothing');

    const run = await importCli(['-', '--format', 'csv', '--json', '--errors', path.join(dir, 'csv.errors')], csv);
    assert.equal(run.code, 1);
    assert.deepEqual([summaryOf(run).started, summaryOf(run).invalid], [2, 2]);
    assert.deepEqual(
      (await errorLines(path.join(dir, 'csv.errors'))).map((e) => [e.line, e.field]),
      [
        [4, 'token'],
        [5, '(line)'],
      ],
    );
    const { rows } = await ctx.sql.query(`SELECT name, scopes, receivers FROM token WHERE id = $1`, [
      await lookup(ctx.sql, hashToken(a)),
    ]);
    assert.deepEqual(rows[0], { name: 'Ops, nightly', scopes: ['read', 'write'], receivers: ['billing'] });
    assert.ok(await lookup(ctx.sql, hashToken(b)));

    const missing = await importCli([path.join(dir, 'nowhere.jsonl'), '--json']);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /invalid input file .*nowhere\.jsonl: cannot be read \(ENOENT\)/);

    const c = foreignToken('stdin c');
    const fromStdin = await importCli(['-', '--json'], jsonl([{ token: c, subject: 'usr_stdin', ttl: '1h' }]));
    assert.equal(fromStdin.code, 0, fromStdin.stderr);
    assert.deepEqual([summaryOf(fromStdin).started, summaryOf(fromStdin).errorsFile], [1, null]);
    assert.ok(await lookup(ctx.sql, hashToken(c)));
  });

  it('should stop startMany on its AbortSignal with a report marked aborted, and a rerun completes it', async () => {
    const subject = 'usr_aborted';
    const tokens = Array.from({ length: 300 }, (_, i) => foreignToken(`aborted ${i}`));
    const records = () => tokens.map((token) => ({ token, subject, ttl: '1h' }));
    const stop = new AbortController();
    const first = await ctx.warden.startMany(records(), {
      concurrency: 2,
      signal: stop.signal,
      onProgress: (p) => {
        if (p.done >= 50) stop.abort();
      },
    });
    assert.equal(first.aborted, true);
    assert.ok(first.started >= 50 && first.started < 300, `part of it started (${first.started})`);
    assert.equal(first.failed + first.invalid, 0);
    // In flight when it stopped: every row written got its start.
    assert.equal(await tokenCount(subject), first.started);

    const second = await ctx.warden.startMany(records(), { concurrency: 8 });
    assert.deepEqual(
      [second.aborted, second.started, second.existing, second.failed, second.invalid],
      [false, 300 - first.started, first.started, 0, 0],
    );
    const ids: string[] = [];
    for (const t of tokens) ids.push((await lookup(ctx.sql, hashToken(t)))!);
    const runs = await executionsOnceListed(ctx.client, ctx.settings.temporal.taskQueue, ids.map(tokenWorkflowId));
    assert.deepEqual(
      ids.filter((id) => runs.get(tokenWorkflowId(id)) !== 1),
      [],
    );

    // Records given as objects are numbered by position; a bad one is reported, never thrown.
    const bad = await ctx.warden.startMany([{ subject, ttl: '1h' }]);
    assert.deepEqual(
      bad.errors.map((e) => [e.line, e.field]),
      [[1, 'token']],
    );

    // A callback that throws stops the run; its error reaches the caller once the work in flight ended.
    const full = new Error('disk full');
    await assert.rejects(
      ctx.warden.startMany([{ subject, ttl: '1h' }], {
        onError: () => {
          throw full;
        },
      }),
      full,
    );
  });

  it('should stop on Ctrl-C (SIGINT) with a partial summary and exit 130, plain progress lines on a non-terminal; a rerun finishes', async () => {
    // Enough batches that Ctrl-C lands well before the end even on a loaded machine.
    const total = 1000;
    const subject = 'usr_interrupted';
    const tokens = Array.from({ length: total }, (_, i) => foreignToken(`interrupted ${i}`));
    const file = path.join(dir, 'interrupted.jsonl');
    await writeFile(file, jsonl(tokens.map((token) => ({ token, subject, ttl: '1h' }))));
    const first = spawnCli(
      ['import', file, '--json', '--concurrency', '1', '--progress-every', '100ms'],
      ctx.childEnv(),
    );
    await waitUntil(async () => (await tokenCount(subject)) > 0, 'the first batch written', 60_000, 20);
    await waitUntil(
      () => new RegExp(`importing: \\d+/${total} \\(\\d+%\\) records · \\d+/s`).test(first.output()),
      'a progress line',
    );
    first.child.kill('SIGINT');
    const exited = await first.exited;
    assert.equal(exited.code, 130, first.output());
    const partial = JSON.parse(
      first
        .output()
        .split('\n')
        .find((l) => l.startsWith('{'))!,
    ) as Summary;
    assert.equal(partial.aborted, true);
    assert.ok(partial.started > 0 && partial.started < total, `part of it (${partial.started})`);
    // Every row written got its start before the process ended: none left for the reconciler.
    assert.equal(await tokenCount(subject), partial.started);
    outputs.push({ args: ['import', file, '(interrupted)'], code: exited.code, stdout: first.output(), stderr: '' });

    const rerun = await importCli([file, '--json']);
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.deepEqual([summaryOf(rerun).started, summaryOf(rerun).existing], [total - partial.started, partial.started]);
  });

  it('should write each token once when two runs import the same records at the same time, in different orders', async () => {
    const subject = 'usr_concurrent';
    const tokens = Array.from({ length: 200 }, (_, i) => foreignToken(`concurrent ${i}`));
    const records = tokens.map((token) => ({ token, subject, ttl: '1h' }));
    const [a, b] = await Promise.all([
      ctx.warden.startMany(records, { concurrency: 4, batchSize: 200 }),
      ctx.warden.startMany([...records].reverse(), { concurrency: 4, batchSize: 200 }),
    ]);
    assert.deepEqual([a.failed, b.failed, a.errors, b.errors], [0, 0, [], []]);
    assert.deepEqual([a.started + a.existing, b.started + b.existing], [200, 200]);
    const ids: string[] = [];
    for (const t of tokens) ids.push((await lookup(ctx.sql, hashToken(t)))!);
    assert.equal(new Set(ids).size, 200, 'each secret stored once');
    const events = await issuedEventsPerToken(ctx.sql, ids);
    assert.ok(
      ids.every((id) => events.get(id) === 1),
      'one token.issued per token',
    );
  });

  it('should leave no raw token in any output', () => {
    for (const run of outputs) {
      scan.searchOutput(`the output of tokenwarden ${run.args.join(' ')}`, run.stdout);
      scan.searchOutput(`the error output of tokenwarden ${run.args.join(' ')}`, run.stderr);
    }
    assert.deepEqual(scan.hits(), []);
  });
});
