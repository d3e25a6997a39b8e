/** The `tokenwarden` command as a user runs it: a child process, exit codes, stdout and stderr. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { PACKAGE_ROOT } from '../common/config.js';
import { newTokenId } from '../common/ids.js';
import { tokenWorkflowId } from '../common/names.js';
import { isWellFormedToken } from '../common/secrets.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('cli');
  worker = await ctx.startWorker();
  receiver = await TestReceiver.start();
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[], stdin?: string): Promise<Run> {
  const env = {
    ...ctx.childEnv(),
    TOKENWARDEN_ESCALATE_AFTER: '3s',
    TOKENWARDEN_RETRY_INITIAL: '200ms',
    TOKENWARDEN_RETRY_MAX: '1s',
  };
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args], { env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(stdin ?? '');
  });
}

const json = (run: Run) => {
  assert.equal(run.code, 0, run.stderr);
  return JSON.parse(run.stdout);
};

describe('tokenwarden CLI', () => {
  it('should walk through receiver add, issue, revoke, show and list', async () => {
    const added = json(await cli(['receiver', 'add', 'billing', '--url', receiver.url, '--json']));
    assert.equal(added.id, 'billing');
    assert.match(added.secret, /^whsec_/);
    receiver.secret = added.secret;

    const refused = await cli(['issue', '--subject', 'usr_8f3a21', '--receiver', 'nope', '--ttl', '30s']);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /receivers: unknown or removed receiver nope/);

    const issued = json(
      await cli(['issue', '--subject', 'usr_8f3a21', '--receiver', 'billing', '--ttl', '30s', '--json']),
    );
    assert.match(issued.tokenId, /^tok_[0-9a-f]{32}$/);
    assert.ok(isWellFormedToken(issued.token));
    const lifetime = Date.parse(issued.expiresAt) - Date.now();
    assert.ok(lifetime > 20_000 && lifetime <= 30_000, `expires in ~30s (${lifetime} ms)`);

    const active = json(await cli(['list', '--subject', 'usr_8f3a21', '--status', 'active', '--json']));
    assert.deepEqual(
      active.map((t: { id: string }) => t.id),
      [issued.tokenId],
    );

    const revoked = json(await cli(['revoke', issued.tokenId, '--reason', 'left the company', '--json']));
    assert.equal(revoked.status, 'revoked');
    assert.equal(revoked.changed, true);
    const again = json(await cli(['revoke', issued.tokenId, '--reason', 'twice', '--json']));
    assert.equal(again.changed, false);
    assert.equal(again.reason, 'left the company');

    await ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId)).result();
    const shown = json(await cli(['show', issued.tokenId, '--json']));
    assert.equal(shown.status, 'revoked');
    assert.equal(shown.propagation, 'complete');
    assert.equal(shown.revokeReason, 'left the company');
    assert.deepEqual(
      shown.deliveries.map((d: { receiverId: string; status: string }) => [d.receiverId, d.status]),
      [['billing', 'delivered']],
    );
    assert.ok(receiver.requests[0]?.verified);

    assert.deepEqual(json(await cli(['list', '--subject', 'usr_8f3a21', '--status', 'active', '--json'])), []);
    const human = await cli(['show', issued.tokenId]);
    assert.match(human.stdout, /status\s+revoked/);
    assert.ok(!human.stdout.includes(issued.token) && !JSON.stringify(shown).includes(issued.token));
  });

  it('should import a signing secret from stdin, never from the command line', async () => {
    const secret = `whsec_${Buffer.alloc(32, 9).toString('base64')}`;
    const run = await cli(['receiver', 'add', 'crm', '--url', receiver.url, '--secret-stdin', '--json'], `${secret}\n`);
    const added = json(run);
    assert.equal(added.id, 'crm');
    assert.equal(added.secret, undefined, 'an imported secret is not echoed');
    const bad = await cli(['receiver', 'add', 'crm2', '--url', receiver.url, '--secret-stdin'], 'hunter2\n');
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /secret: expected a Standard Webhooks secret/);
    assert.ok(!bad.stderr.includes('hunter2'));
  });

  it('should exit non-zero with a one-line, field-level message on bad input, changing nothing', async () => {
    const cases: [string[], number, RegExp][] = [
      [['issue', '--subject', 'usr_1', '--ttl', '5x'], 2, /ttl: expected a duration such as .*"5x"/],
      [['issue', '--subject', 'jane@example.com', '--ttl', '1h'], 2, /subject: .*not an email/],
      [['issue', '--ttl', '1h'], 1, /required option '--subject <id>' not specified/],
      [['show', 'tok_123'], 2, /token id.*expected a token id/],
      [['show', newTokenId()], 3, /token "tok_[0-9a-f]{32}" not found/],
      [['revoke', newTokenId(), '--reason', 'x'], 3, /not found/],
      [['revoke', newTokenId(), '--reason', '  '], 2, /reason: a reason is required/],
      [['list', '--status', 'zombie'], 2, /status: /],
      [['receiver', 'add', 'Bad Id', '--url', 'http://127.0.0.1:1/'], 2, /id: expected a lowercase id/],
      [['receiver', 'add', 'ok', '--url', 'ftp://x'], 2, /url: expected an http\(s\) URL/],
      [['receiver', 'add', 'ok', '--url', 'https://u:p@127.0.0.1/'], 2, /url: credentials in the URL are not accepted/],
      [['receiver', 'remove', 'ghost'], 3, /receiver "ghost" not found/],
    ];
    for (const [args, code, message] of cases) {
      const run = await cli(args);
      assert.equal(run.code, code, `${args.join(' ')}: ${run.stderr}`);
      assert.match(run.stderr, message, args.join(' '));
      assert.equal(run.stderr.trim().split('\n').length, 1, `one line: ${run.stderr}`);
      assert.ok(!/\n\s+at /.test(run.stderr), 'no stack trace');
    }
    const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM token WHERE subject <> 'usr_8f3a21'`);
    assert.equal(rows[0].n, 0);
  });

  it('should revoke in the store while Temporal is unreachable, and say the workflow was not told', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_down', ttl: '1h' });
    const env = { ...ctx.childEnv(), TEMPORAL_ADDRESS: '127.0.0.1:1' };
    const child = spawn(
      process.execPath,
      [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'revoke', tokenId, '--reason', 'leaked', '--json'],
      { env },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise((resolve) => child.on('close', resolve));
    assert.equal(code, 0, stderr);
    const outcome = JSON.parse(stdout);
    assert.equal(outcome.status, 'revoked');
    assert.equal(outcome.workflowSignalled, false);
    assert.match(stderr, /warning: revoked in the store, but its workflow could not be signalled/);
    assert.equal((await ctx.warden.show(tokenId)).valid, false);
  });

  it('should name the missing setting when the store is not configured', async () => {
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'list'], {
      env: { PATH: process.env.PATH, TOKENWARDEN_DATA_DIR: '/nonexistent' },
    });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise((resolve) => child.on('close', resolve));
    assert.equal(code, 1);
    assert.match(stderr, /DATABASE_URL is not set/);
  });
});
