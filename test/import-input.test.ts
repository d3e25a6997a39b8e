/**
 * The bulk commands' input as people get it wrong: a CSV without its header row, columns swapped
 * (a token where the subject goes), a pipe (`<(jq …)`), a whole export on one line, `--errors`
 * pointing at the out file. Dry runs of the real CLI (they connect to nothing) and the real reader.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { link, mkdtemp, readFile, rm, stat, symlink, writeFile, chmod } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { readRecords, type SourceLine } from '../client/bulk/reader.js';
import { issueSchema } from '../client/index.js';
import { PACKAGE_ROOT } from '../common/config.js';
import { generateTokenString } from '../common/secrets.js';
import { nameSchema, parseInput, subjectSchema, ttlSchema } from '../common/validation.js';
import { runCli, type CliRun } from './support/cli.js';
import { runOutput } from './support/run-record.js';
import { SecretScan } from './support/secret-scan.js';

let dir: string;
const scan = new SecretScan();
const outputs: CliRun[] = [];
/** A dry run reads settings but connects to nothing: no stack is needed. */
const env = {
  PATH: process.env.PATH ?? '',
  DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none',
  TOKENWARDEN_DATA_DIR: '/nonexistent',
};
/** The longest line the reader takes (a record is small). */
const MAX_LINE_BYTES = 64 * 1024;
const CLI = path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js');

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-import-input-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function cli(args: string[], stdin?: string): Promise<CliRun> {
  const run = await runCli(args, env, stdin);
  outputs.push(run);
  return run;
}

/** A command line run by bash in `dir`, for process substitution (`<(…)`). */
async function shell(script: string): Promise<CliRun> {
  const run = await new Promise<CliRun>((resolve) =>
    execFile('bash', ['-c', script], { cwd: dir, env: { ...env, CLI } }, (err, stdout, stderr) => {
      // The command's error output is its log (stdout carries issued tokens by design).
      runOutput('cli')(stderr);
      resolve({ args: [script], code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
    }),
  );
  outputs.push(run);
  return run;
}

const secret = (label: string, token: string) => {
  scan.addToken(label, token);
  return token;
};
const ghp = (label: string) => secret(label, `ghp_${randomBytes(24).toString('base64url').replace(/[-_]/g, 'x')}`);
const jsonl = (records: unknown[]) => records.map((r) => JSON.stringify(r)).join('\n') + '\n';
const errorLines = async (file: string) =>
  (await readFile(file, 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { line: number; field: string; message: string });

describe('bulk input', () => {
  it('should name a CSV header cell by its position, never quote a token found there', async () => {
    const token = ghp('headerless csv');
    const headerless = path.join(dir, 'headerless.csv');
    await writeFile(headerless, `${token},usr_a,1h\n`);
    const run = await cli(['import', headerless, '--dry-run']);
    assert.equal(run.code, 2, run.stderr);
    assert.match(run.stderr, /invalid CSV header \(line 1\): column 1 is no column name .*header row\?/);
    assert.match(run.stderr, /the columns are tokenId, secretHash, token, subject/);
    assert.ok(!run.stderr.includes(token.slice(0, 10)), run.stderr);

    // JSON Lines read as CSV: the first cell is `{"token":"ghp_…`.
    const other = ghp('jsonl read as csv');
    const asCsv = path.join(dir, 'records.jsonl');
    await writeFile(asCsv, jsonl([{ token: other, subject: 'usr_a', ttl: '1h' }]));
    const wrong = await cli(['import', asCsv, '--format', 'csv', '--dry-run']);
    assert.equal(wrong.code, 2);
    assert.ok(!wrong.stderr.includes(other.slice(0, 10)), wrong.stderr);

    // A plausible column name is quoted, to be fixed.
    const typo = path.join(dir, 'typo.csv');
    await writeFile(typo, 'subject,token,expires_at\n');
    const named = await cli(['import', typo, '--dry-run']);
    assert.match(named.stderr, /unknown column 3 "expires_at"/);
  });

  it('should refuse a subject or name that is a secret, on every path, without echoing it', async () => {
    const jwt = secret(
      'jwt',
      `eyJhbGciOiJIUzI1NiJ9.${Buffer.from('{"sub":"usr_a"}').toString('base64url')}.${randomBytes(32).toString('base64url')}`,
    );
    const shapes: Array<[string, string]> = [
      [ghp('subject github'), 'a GitHub token'],
      [secret('github pat', `github_pat_${'A1b2C3d4E5'.repeat(3)}`), 'a GitHub token'],
      [secret('stripe', `sk_live_${randomBytes(16).toString('hex')}`), 'a Stripe key'],
      [secret('slack', `xoxb-1234567890-${randomBytes(8).toString('hex')}`), 'a Slack token'],
      [secret('aws', 'AKIAIOSFODNN7EXAMPLE'), 'an AWS access key id'],
      [secret('gitlab', `glpat-${randomBytes(12).toString('hex')}`), 'a GitLab token'],
      [jwt, 'a JSON Web Token'],
      [secret('own', generateTokenString()), 'a tokenwarden token'],
    ];
    // The schema every path uses (issue, the API, import, filters).
    for (const [value, kind] of shapes) {
      assert.throws(
        () => parseInput(subjectSchema, value, 'subject'),
        (err: Error) =>
          err.message.includes(`looks like a secret (${kind}); a subject is an opaque user or service id`) &&
          !err.message.includes(value),
        kind,
      );
      assert.equal(issueSchema(3_600_000).safeParse({ subject: value, ttl: '1h' }).success, false, kind);
      assert.equal(nameSchema.safeParse(`deploy key ${value}`).success, false, `a name holding ${kind}`);
    }
    assert.equal(nameSchema.safeParse('-----BEGIN RSA PRIVATE KEY-----').success, false);
    // Ordinary ids and labels pass.
    for (const ok of ['usr_8f3a21', 'svc:batch', 'ghp', 'AKIA1234', 'acct.eyJ', 'sk_live']) {
      assert.equal(subjectSchema.safeParse(ok).success, true, ok);
    }
    assert.equal(nameSchema.safeParse('CI key (GitHub Actions)').success, true);

    // Import: columns swapped, a token of a format no shape knows stored as the subject or name.
    const foreign = secret('foreign', randomBytes(20).toString('hex'));
    const file = path.join(dir, 'swapped.jsonl');
    await writeFile(
      file,
      jsonl([
        { token: 'usr_a', subject: shapes[0]![0], ttl: '1h' },
        { token: foreign, subject: foreign, ttl: '1h' },
        { token: `${foreign}x`, subject: 'usr_a', name: `${foreign}x`, ttl: '1h' },
        { token: ghp('valid'), subject: 'usr_a', ttl: '1h', name: 'fine' },
      ]),
    );
    const run = await cli(['import', file, '--dry-run', '--json']);
    assert.equal(run.code, 1, run.stderr);
    const errors = await errorLines(`${file}.errors.jsonl`);
    assert.deepEqual(
      errors.map((e) => [e.line, e.field]),
      [
        [1, 'subject'],
        [2, 'subject'],
        [3, 'name'],
      ],
    );
    assert.match(errors[1]!.message, /is the record's token; a subject is an opaque user or service id/);
    scan.searchOutput('the errors file of swapped columns', await readFile(`${file}.errors.jsonl`, 'utf8'));

    // Bulk issue takes the same subject rule.
    const issue = path.join(dir, 'issue.csv');
    await writeFile(issue, `subject,ttl\n${shapes[2]![0]},1h\n`);
    const issued = await cli(['issue', '--from', issue, '--dry-run', '--json', '--errors', path.join(dir, 'i.err')]);
    assert.equal(issued.code, 1);
    assert.match((await errorLines(path.join(dir, 'i.err')))[0]!.message, /looks like a secret \(a Stripe key\)/);
  });

  it('should name an unknown field or a bad ttl without echoing what was written there', async () => {
    const token = ghp('as a field name');
    const short = secret('short ttl', 'ghp_shortsecret12345');
    const file = path.join(dir, 'fields.jsonl');
    await writeFile(
      file,
      jsonl([
        { token: 'abcdefghijklmnop', subject: 'usr_a', ttl: '1h', [token]: true },
        { token: 'abcdefghijklmnoq', subject: 'usr_a', ttl: short },
        { token: 'abcdefghijklmnor', subject: 'usr_a', ttl: { secret: short } },
        { token: 'abcdefghijklmnos', subject: 'usr_a', ttl: '5x', expires_at: 1 },
      ]),
    );
    const run = await cli(['import', file, '--dry-run', '--json']);
    assert.equal(run.code, 1);
    const text = await readFile(`${file}.errors.jsonl`, 'utf8');
    scan.searchOutput('the errors file of bad fields', text);
    assert.ok(!text.includes(token.slice(0, 10)) && !text.includes('shortsecret'), text);
    const errors = await errorLines(`${file}.errors.jsonl`);
    assert.deepEqual(
      errors.map((e) => [e.line, e.field]),
      [
        [1, `(${token.length} characters, not shown)`],
        [2, 'ttl'],
        [3, 'ttl'],
        [4, 'ttl'],
      ],
    );
    assert.match(errors[1]!.message, /got a string of 20 characters$/);
    assert.match(errors[2]!.message, /got an object$/);
    // A duration-shaped mistake is shown, to be fixed; and a known-wrong field name too.
    assert.match(errors[3]!.message, /got "5x"/);
    assert.match(text, /"field":"expires_at"/);
    assert.throws(
      () => parseInput(ttlSchema(3_600_000), -5, 'ttl'),
      /got a number that is not a positive whole number/,
    );
  });

  it('should read a pipe once, and say when it gave no records', async () => {
    const records = Array.from({ length: 5 }, (_, i) => ({ token: ghp(`pipe ${i}`), subject: 'usr_a', ttl: '1h' }));
    await writeFile(path.join(dir, 'pipe.jsonl'), jsonl(records));
    // `<(…)` is /dev/fd/63: its records were counted away before the fix, leaving an empty read.
    const piped = await shell('node "$CLI" import <(cat pipe.jsonl) --dry-run --json');
    assert.equal(piped.code, 0, piped.stderr);
    const summary = JSON.parse(piped.stdout) as { valid: number; invalid: number; errorsFile: string | null };
    assert.deepEqual([summary.valid, summary.invalid, summary.errorsFile], [5, 0, null]);

    const empty = await shell('node "$CLI" import <(true) --dry-run --json');
    assert.equal(empty.code, 1, 'nothing from a pipe is not a success');
    assert.match(empty.stderr, /no records read from \/dev\/fd\/\d+ \(did the command writing to it fail\?\)/);
    const fromStdin = await cli(['import', '-', '--dry-run', '--json'], '');
    assert.equal(fromStdin.code, 1);
    assert.match(fromStdin.stderr, /no records read from stdin/);

    // An empty file is a file without records: said, exit 0.
    await writeFile(path.join(dir, 'empty.csv'), 'subject,token,ttl\r\n');
    const emptyFile = await cli(['import', path.join(dir, 'empty.csv'), '--dry-run', '--json']);
    assert.equal(emptyFile.code, 0, emptyFile.stderr);
    assert.match(emptyFile.stderr, /no records read from .*empty\.csv \(the file holds none\)/);
  });

  it('should report a line longer than the limit and go on, without holding it in memory', async () => {
    const lineBytes = 96 * 1024 * 1024;
    const chunk = Buffer.alloc(64 * 1024, 'a');
    let peak = 0;
    const base = process.memoryUsage();
    const held = () => {
      const m = process.memoryUsage();
      peak = Math.max(peak, m.heapUsed - base.heapUsed + (m.arrayBuffers - base.arrayBuffers));
    };
    async function* source() {
      yield Buffer.from('\uFEFF{"subject":"usr_1"}\r\n["');
      for (let sent = 0; sent < lineBytes; sent += chunk.length) {
        held();
        yield chunk;
      }
      yield Buffer.from('"]\r\n\n');
      // Exactly at the limit (its CR aside), then one byte over; a character split between chunks.
      const at = `{"x":"${'b'.repeat(MAX_LINE_BYTES - 8)}"}`;
      yield Buffer.from(`${at}\r\n${at.replace('{', '{ ')}\n{"name":"caf`);
      yield Buffer.from('é', 'utf8').subarray(0, 1);
      yield Buffer.concat([Buffer.from('é', 'utf8').subarray(1), Buffer.from('"}')]);
    }
    const lines: SourceLine[] = [];
    for await (const line of readRecords(Readable.from(source(), { objectMode: false }), 'jsonl')) {
      held();
      lines.push(line);
    }
    assert.deepEqual(
      lines.map((l) => [l.line, l.problem?.message ?? (Object.keys(l.record as object).join() || '-')]),
      [
        [1, 'subject'],
        [2, `longer than ${MAX_LINE_BYTES} bytes; a JSON array? write one record per line`],
        [4, 'x'],
        [5, `longer than ${MAX_LINE_BYTES} bytes; a JSON array? write one record per line`],
        [6, 'name'],
      ],
    );
    assert.deepEqual(lines[4]!.record, { name: 'café' });
    assert.ok(peak < 16 * 1024 * 1024, `memory held while reading a ${lineBytes}-byte line: ${peak} bytes`);
  });

  it('should refuse --errors naming the input or the out file (through a link too), and keep it private', async () => {
    const input = path.join(dir, 'team.jsonl');
    await writeFile(input, jsonl([{ subject: 'usr_a', ttl: '1h' }]));
    const out = path.join(dir, 'team-tokens.jsonl');
    await writeFile(out, '{"line":1,"tokenId":"tok_x","token":"precious"}\n', { mode: 0o600 });
    await link(out, path.join(dir, 'hard.jsonl'));
    await symlink(out, path.join(dir, 'soft.jsonl'));
    for (const [errors, why] of [
      [out, 'it is the --out file'],
      [path.join(dir, 'hard.jsonl'), 'it is the --out file'],
      [path.join(dir, 'soft.jsonl'), 'it is the --out file'],
      [path.join(dir, '.', 'team.jsonl'), 'it is the input file'],
    ] as const) {
      const run = await cli(['issue', '--from', input, '--out', out, '--errors', errors, '--dry-run']);
      assert.equal(run.code, 2, run.stderr);
      assert.match(run.stderr, new RegExp(`invalid --errors .*: ${why}`));
    }
    assert.match(await readFile(out, 'utf8'), /precious/, 'the out file is untouched');
    // A symbolic link to anything else is not followed either.
    await symlink(path.join(dir, 'elsewhere'), path.join(dir, 'dangling.jsonl'));
    const viaLink = await cli(['import', input, '--dry-run', '--errors', path.join(dir, 'dangling.jsonl')]);
    assert.equal(viaLink.code, 2);
    assert.match(viaLink.stderr, /invalid --errors .*: is a symbolic link/);

    // Created 0600, and an existing one made 0600.
    const errors = path.join(dir, 'errors.jsonl');
    await writeFile(errors, '', { mode: 0o644 });
    await chmod(errors, 0o644);
    await writeFile(path.join(dir, 'bad.jsonl'), '{"subject":"usr_a"}\n');
    const bad = await cli(['import', path.join(dir, 'bad.jsonl'), '--dry-run', '--errors', errors]);
    assert.equal(bad.code, 1);
    assert.equal((await stat(errors)).mode & 0o777, 0o600);
  });

  it('should leave no raw token in any output', () => {
    for (const run of outputs) {
      scan.searchOutput(`the output of ${run.args.join(' ')}`, run.stdout);
      scan.searchOutput(`the error output of ${run.args.join(' ')}`, run.stderr);
    }
    assert.deepEqual(scan.hits(), []);
  });
});
