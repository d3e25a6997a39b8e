/** The `tokenwarden` command as a user runs it: a child process, exit codes, stdout and stderr. */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import proto from '@temporalio/proto';
import { after, before, describe, it } from 'node:test';
import { masterKeyFile, PACKAGE_ROOT, payloadKeysFile } from '../common/config.js';
import { newTokenId } from '../common/ids.js';
import { tokenWorkflowId } from '../common/names.js';
import { isWellFormedToken } from '../common/secrets.js';
import { freePort } from '../dev/processes.js';
import { runCli, type CliRun } from './support/cli.js';
import { recordingModulesTo, temporalSdkFiles } from './support/loaded-modules.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { SecretScan } from './support/secret-scan.js';
import { waitUntil } from './support/wait.js';
import { WorkerProcess } from './support/worker-process.js';
import { recordKeys, recordStoreMade, recordStoreSecrets, runOutput } from './support/run-record.js';

let ctx: TestContext;
let worker: WorkerProcess;
let receiver: TestReceiver;
/** Every run of this file's commands, searched for secrets by the last test. */
const runs: Run[] = [];
/** The runs that print a raw token or a signing secret by design: their stdout is not searched. */
const shownOnce = new Set<Run>();
const scan = new SecretScan();
const tokenIds: string[] = [];

before(async () => {
  ctx = await TestContext.create('cli');
  worker = await WorkerProcess.start(ctx.childEnv(), ctx.client);
  receiver = await TestReceiver.start();
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

type Run = CliRun;

/** A `tokenwarden` run with this file's store, queue and timing (plus `extraEnv`). */
async function cli(args: string[], stdin?: string, extraEnv: Record<string, string> = {}): Promise<Run> {
  return recorded(await runCli(args, { ...ctx.childEnv(), ...extraEnv }, stdin));
}

function recorded(run: Run): Run {
  runs.push(run);
  return run;
}

/** Marks the one output that shows a secret (a new token, a generated signing secret). */
function showsSecretOnce(run: Run): Run {
  shownOnce.add(run);
  return run;
}

const json = (run: Run) => {
  assert.equal(run.code, 0, run.stderr);
  return JSON.parse(run.stdout);
};

describe('tokenwarden CLI', () => {
  it('should walk through receiver add, issue, revoke, show and list', async () => {
    const added = json(showsSecretOnce(await cli(['receiver', 'add', 'billing', '--url', receiver.url, '--json'])));
    scan.addSigningSecret('billing', added.secret);
    assert.equal(added.id, 'billing');
    assert.match(added.secret, /^whsec_/);
    receiver.secret = added.secret;

    const refused = await cli(['issue', '--subject', 'usr_8f3a21', '--receiver', 'nope', '--ttl', '30s']);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /receivers: unknown or removed receiver nope/);

    const issued = json(
      showsSecretOnce(
        await cli(['issue', '--subject', 'usr_8f3a21', '--receiver', 'billing', '--ttl', '30s', '--json']),
      ),
    );
    scan.addToken(issued.tokenId, issued.token);
    tokenIds.push(issued.tokenId);
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
    const secret = `whsec_${randomBytes(32).toString('base64')}`;
    scan.addSigningSecret('crm', secret);
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
      [['issue', '--ttl', '1h'], 2, /required option '--subject <id>' not specified/],
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
    const { tokenId, token } = await ctx.warden.issue({ subject: 'usr_down', ttl: '1h' });
    scan.addToken(tokenId, token);
    tokenIds.push(tokenId);
    const revoked = await cli(['revoke', tokenId, '--reason', 'leaked', '--json'], undefined, {
      TEMPORAL_ADDRESS: '127.0.0.1:1',
    });
    assert.equal(revoked.code, 0, revoked.stderr);
    const outcome = JSON.parse(revoked.stdout);
    assert.equal(outcome.status, 'revoked');
    assert.equal(outcome.workflowSignalled, false);
    assert.match(revoked.stderr, /warning: revoked in the store, but its workflow could not be signalled/);
    assert.equal((await ctx.warden.show(tokenId)).valid, false);
  });

  it('should name the missing setting when the store is not configured', async () => {
    const listed = await run(['list'], { PATH: process.env.PATH ?? '', TOKENWARDEN_DATA_DIR: '/nonexistent' });
    assert.equal(listed.code, 1);
    assert.match(listed.stderr, /DATABASE_URL is not set/);
  });
});

const oneLine = (run: Run) => {
  assert.equal(run.stderr.trim().split('\n').length, 1, `one line: ${run.stderr}`);
  assert.ok(!/\n\s+at /.test(run.stderr), 'no stack trace');
};

/** Whether text holds anything a terminal would act on, besides the line breaks between lines. */
const obeyable = (text: string) => /[\p{Cc}\u202e]/u.test(text.replaceAll('\n', ''));

async function tokensOf(subject: string): Promise<number> {
  const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM token WHERE subject = $1`, [subject]);
  return rows[0].n;
}

describe('tokenwarden CLI: lifetimes are bounded', () => {
  it('should refuse a ttl beyond TOKENWARDEN_MAX_TTL with the field named, writing nothing', async () => {
    for (const ttl of ['99999999d', '3000000d', '300000d', '366d']) {
      const run = await cli(['issue', '--subject', 'usr_ttl', '--ttl', ttl]);
      assert.equal(run.code, 2, `${ttl}: ${run.stderr}`);
      assert.match(run.stderr, /ttl: at most 365d \(TOKENWARDEN_MAX_TTL\)/, ttl);
      oneLine(run);
    }
    const lower = await cli(['issue', '--subject', 'usr_ttl', '--ttl', '2h'], undefined, { TOKENWARDEN_MAX_TTL: '1h' });
    assert.equal(lower.code, 2, lower.stderr);
    assert.match(lower.stderr, /ttl: at most 1h \(TOKENWARDEN_MAX_TTL\)/);
    const unbounded = await cli(['list'], undefined, { TOKENWARDEN_MAX_TTL: '3651d' });
    assert.equal(unbounded.code, 1, unbounded.stderr);
    assert.match(unbounded.stderr, /TOKENWARDEN_MAX_TTL: TOKENWARDEN_MAX_TTL must be at most 3650d/);
    assert.equal(await tokensOf('usr_ttl'), 0);
  });
});

describe('tokenwarden CLI: commands that need only the store load no Temporal SDK', () => {
  let dir: string;
  before(async () => (dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-modules-'))));
  after(async () => await rm(dir, { recursive: true, force: true }));

  /** Runs the command and returns it with the Temporal SDK, gRPC and protobufjs files it loaded. */
  async function loading(args: string[]): Promise<{ run: Run; sdk: string[] }> {
    const file = path.join(dir, `${runs.length}.json`);
    const run = await cli(args, undefined, recordingModulesTo(file));
    return { run, sdk: await temporalSdkFiles(file) };
  }

  it('should list, show and manage receivers without loading the Temporal client', async () => {
    // The recorder sees the client where it is needed: issue starts a workflow.
    const issue = await loading(['issue', '--subject', 'usr_modules', '--ttl', '1h', '--json']);
    const { tokenId, token } = json(showsSecretOnce(issue.run)) as { tokenId: string; token: string };
    scan.addToken(tokenId, token);
    tokenIds.push(tokenId);
    assert.ok(
      issue.sdk.some((f) => f.includes(`${path.sep}@temporalio${path.sep}client${path.sep}`)),
      'issue loads @temporalio/client',
    );

    const added = await loading(['receiver', 'add', 'modules-rcv', '--url', receiver.url, '--json']);
    scan.addSigningSecret('modules-rcv', (json(showsSecretOnce(added.run)) as { secret: string }).secret);
    assert.deepEqual(added.sdk, [], 'receiver add');
    for (const args of [
      ['list', '--json'],
      ['show', tokenId, '--json'],
      ['receiver', 'list', '--json'],
      ['receiver', 'rekey', '--json'],
      ['receiver', 'remove', 'modules-rcv', '--json'],
      ['audit', 'verify', '--json'],
      ['migrate'],
      ['--version'],
    ]) {
      const { run, sdk } = await loading(args);
      assert.equal(run.code, 0, `${args.join(' ')}: ${run.stderr}`);
      assert.deepEqual(sdk, [], args.join(' '));
    }
    const env = await loading(['env', '--data-dir', '/nonexistent']);
    assert.equal(env.run.code, 1, env.run.stderr);
    assert.deepEqual(env.sdk, [], 'env');
  });
});

describe('tokenwarden CLI: input that must not pass, output that must not steer a terminal', () => {
  it('should refuse control characters in --name, --reason and --actor', async () => {
    const cases: [string[], RegExp][] = [
      [
        ['issue', '--subject', 'usr_ctl', '--ttl', '1h', '--name', 'key\u001b]0;pwned\u0007'],
        /name: must not contain control characters \(found U\+001B\)/,
      ],
      [['issue', '--subject', 'usr_ctl', '--ttl', '1h', '--name', 'line\rover'], /name: .*\(found U\+000D\)/],
      [['issue', '--subject', 'usr_ctl', '--ttl', '1h', '--name', '\u009b31mred'], /name: .*\(found U\+009B\)/],
      [['issue', '--subject', 'usr_ctl', '--ttl', '1h', '--name', ''], /name: expected a non-empty name/],
      [['revoke', newTokenId(), '--reason', 'left\nstatus active'], /reason: .*\(found U\+000A\)/],
      [['revoke', newTokenId(), '--reason', 'left', '--actor', 'hr\u007f'], /actor: .*\(found U\+007F\)/],
    ];
    for (const [args, message] of cases) {
      const run = await cli(args);
      assert.equal(run.code, 2, `${JSON.stringify(args)}: ${run.stderr}`);
      assert.match(run.stderr, message, JSON.stringify(args));
      oneLine(run);
      assert.ok(!obeyable(run.stderr), 'nothing raw reaches the terminal');
    }
    assert.equal(await tokensOf('usr_ctl'), 0);
  });

  it('should escape what a terminal would obey in rows written before validation', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_legacy', ttl: '1h' });
    const evil = 'laptop\u001b[2J\u0007\u009b\u202e\nstatus       active (valid)';
    await ctx.sql.query(`UPDATE token SET name = $2 WHERE id = $1`, [tokenId, evil]);
    const human = await cli(['show', tokenId]);
    assert.equal(human.code, 0, human.stderr);
    assert.ok(!obeyable(human.stdout), JSON.stringify(human.stdout));
    assert.match(
      human.stdout,
      /subject {6}usr_legacy \(laptop\\x1b\[2J\\x07\\x9b\\u202e\\x0astatus {7}active \(valid\)\)/,
    );
    assert.equal(human.stdout.split('\n').filter((l) => l.startsWith('status')).length, 1, 'no forged line');
    const machine = await cli(['show', tokenId, '--json']);
    assert.ok(!obeyable(machine.stdout) && machine.stdout.split('\n').length === 2, JSON.stringify(machine.stdout));
    assert.equal(json(machine).name, evil, 'JSON output still parses to the stored value');
  });

  it('should refuse an empty --subject instead of listing everything', async () => {
    const run = await cli(['list', '--subject', '']);
    assert.equal(run.code, 2, run.stderr);
    assert.match(run.stderr, /subject: expected an opaque id/);
    const status = await cli(['list', '--status', '']);
    assert.equal(status.code, 2, status.stderr);
    assert.match(status.stderr, /status: /);
  });

  it('should exit 2 on usage errors, as on any invalid input', async () => {
    const cases: [string[], RegExp][] = [
      [['bogus'], /unknown command 'bogus'/],
      [['issue', '--subject', 'usr_1', '--ttl', '1h', '--bogus'], /unknown option '--bogus'/],
      [['revoke', newTokenId()], /required option '--reason <text>' not specified/],
      [['show'], /missing required argument 'tokenId'/],
      [['list', '--limit'], /option '--limit <n>' argument missing/],
      [['retry', newTokenId()], /required option '--reason <text>' not specified/],
    ];
    for (const [args, message] of cases) {
      const run = await cli(args);
      assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
      assert.match(run.stderr, message, args.join(' '));
      oneLine(run);
    }
    const help = await cli(['--help']);
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /Usage: tokenwarden/);
  });

  it('should print its version', async () => {
    const pkg = JSON.parse(await readFile(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string };
    for (const flag of ['--version', '-V']) {
      const run = await cli([flag]);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, `${pkg.version}\n`);
    }
  });
});

describe('tokenwarden CLI: issue while Temporal is unreachable', () => {
  it('should fail within the deadline, say so, and leave nothing valid behind', async () => {
    const started = Date.now();
    const run = await cli(['issue', '--subject', 'usr_nobody_told', '--ttl', '1h', '--json'], undefined, {
      TEMPORAL_ADDRESS: `127.0.0.1:${await freePort()}`,
    });
    const elapsed = Date.now() - started;
    assert.equal(run.code, 1, run.stderr);
    assert.equal(run.stdout, '', 'no token is printed');
    assert.match(run.stderr, /issue failed: the token's workflow could not be started .* was revoked in the store/);
    oneLine(run);
    assert.ok(elapsed < 8_000, `the process ended within the deadline plus its start-up (${elapsed} ms)`);
    const { rows } = await ctx.sql.query(
      `SELECT status, (status = 'active' AND expires_at > now()) AS valid FROM token WHERE subject = 'usr_nobody_told'`,
    );
    assert.deepEqual(rows, [{ status: 'revoked', valid: false }]);
  });
});

describe('tokenwarden CLI: retry and force', () => {
  let flaky: TestReceiver;
  before(async () => {
    flaky = await TestReceiver.start();
    flaky.secret = json(showsSecretOnce(await cli(['receiver', 'add', 'flaky', '--url', flaky.url, '--json']))).secret;
    scan.addSigningSecret('flaky', flaky.secret!);
  });
  after(async () => {
    await flaky?.close();
  });

  /** A revoked token whose one delivery was refused with 400 (it waits for an operator). */
  async function refusedRevocation(subject: string): Promise<string> {
    flaky.behaviour = () => ({ status: 400 });
    const { tokenId, token } = json(
      showsSecretOnce(await cli(['issue', '--subject', subject, '--receiver', 'flaky', '--ttl', '1h', '--json'])),
    );
    scan.addToken(tokenId, token);
    tokenIds.push(tokenId);
    json(await cli(['revoke', tokenId, '--reason', 'rotated', '--json']));
    await waitUntil(async () => {
      const t = await ctx.warden.show(tokenId);
      return t.deliveries[0]?.status === 'failed';
    }, 'the 400 to be recorded as a failed delivery');
    return tokenId;
  }

  it('should retry a refused delivery now, once the receiver accepts', async () => {
    const { tokenId: active } = await ctx.warden.issue({ subject: 'usr_retry', ttl: '1h' });
    const early = await cli(['retry', active, '--reason', 'too early']);
    assert.equal(early.code, 4, early.stderr);
    assert.match(early.stderr, /is not propagating a revocation \(status active, propagation none\)/);
    oneLine(early);

    const tokenId = await refusedRevocation('usr_retry');
    const attemptsBefore = flaky.requests.length;
    flaky.behaviour = () => ({ status: 204 });
    const retried = json(await cli(['retry', tokenId, '--reason', 'receiver fixed', '--json']));
    assert.deepEqual(retried, { tokenId, retrying: ['flaky'] });
    await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).result();
    const shown = await ctx.warden.show(tokenId);
    assert.equal(shown.propagation, 'complete');
    assert.equal(shown.deliveries[0]?.status, 'delivered');
    assert.ok(flaky.requests.slice(attemptsBefore).some((r) => r.answered === 204 && r.verified));

    const late = await cli(['retry', tokenId, '--reason', 'again']);
    assert.equal(late.code, 4, late.stderr);
    assert.match(late.stderr, /is not propagating a revocation \(status revoked, propagation complete\)/);
  });

  it('should force a refused delivery complete, audited with the reason', async () => {
    const tokenId = await refusedRevocation('usr_force');
    const forced = json(await cli(['force', tokenId, '--reason', 'receiver retired', '--actor', 'ops:bob', '--json']));
    assert.deepEqual(forced, { tokenId, forced: ['flaky'] });
    const result = await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).result();
    assert.equal(result.forced, true);
    const human = await cli(['show', tokenId]);
    assert.match(human.stdout, /propagation {2}complete/);
    assert.match(human.stdout, /receiver {5}flaky: forced/);
    const { rows } = await ctx.sql.query(
      `SELECT canonical FROM audit_event WHERE token_id = $1 AND canonical LIKE '%receiver retired%'`,
      [tokenId],
    );
    assert.equal(rows.length, 1, 'the force is audited once, with its reason');
    assert.match(rows[0].canonical, /ops:bob/);
  });
});

describe('tokenwarden CLI: a dev stack without its worker, and its settings as environment lines', () => {
  const children: ChildProcess[] = [];
  let dataDir: string;
  let stackSchema: string;
  after(async () => {
    // The worker before the stack: it is the stack's Temporal that the worker polls.
    for (const child of children.reverse()) await stop(child);
    if (stackSchema) {
      // The stack's own keys, made in its data folder: searched for in the run's logs and its store.
      const keys = async (file: string) =>
        (await readFile(file, 'utf8').catch(() => ''))
          .split(/[\s,]+/)
          .filter(Boolean)
          .map((k) => Buffer.from(k, 'base64'));
      const master = await keys(masterKeyFile(dataDir));
      const payload = await keys(payloadKeysFile(dataDir));
      recordKeys(payload, master);
      // A store the stack made (its credential table is there): searched, and dropped only then.
      const made = await ctx.sql.query(
        `SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'credential'`,
        [stackSchema],
      );
      if (!made.rowCount || (await recordStoreSecrets(ctx.sql, stackSchema, { master, payload }))) {
        await ctx.sql.query(`DROP SCHEMA IF EXISTS ${stackSchema} CASCADE`);
      }
    }
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  });

  it('should run separate worker processes with what `tokenwarden env` prints', async () => {
    dataDir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-stack-'));
    stackSchema = `test_stack_${randomBytes(4).toString('hex')}`;
    recordStoreMade(stackSchema);
    const taskQueue = `tq-${stackSchema}`;
    const base = {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '',
      TEMPORAL_CLI: process.env.TEMPORAL_CLI ?? '',
    };
    const stack = background(['start', '--no-worker', '--data-dir', dataDir], {
      ...base,
      DATABASE_URL: ctx.settings.databaseUrl,
      TOKENWARDEN_DB_SCHEMA: stackSchema,
      TOKENWARDEN_TASK_QUEUE: taskQueue,
      TOKENWARDEN_TEMPORAL_PORT: String(await freePort()),
      TOKENWARDEN_UI_PORT: String(await freePort()),
      TOKENWARDEN_API_PORT: String(await freePort()),
    });
    children.push(stack.child);
    await waitUntil(
      // Printed once everything the stack runs has started (its worker too, when it has one).
      () => existsSync(path.join(dataDir, 'stack.json')) && stack.output().includes('tokenwarden is running'),
      `the stack to start (${stack.output()})`,
      90_000,
    );
    // The stack's HTTP API: in the stack file and the banner, and answering.
    const stackApi = (JSON.parse(await readFile(path.join(dataDir, 'stack.json'), 'utf8')) as { api: string }).api;
    assert.match(stackApi, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.ok(stack.output().includes(`HTTP API on ${stackApi}`), 'printed in the banner');
    assert.equal((await fetch(`${stackApi}/healthz`)).status, 200);

    const printed = await run(['env', '--data-dir', dataDir], base);
    assert.equal(printed.code, 0, printed.stderr);
    const lines = printed.stdout.trimEnd().split('\n');
    const env: Record<string, string> = {};
    for (const line of lines) {
      const m = /^export ([A-Z_]+)='([^']*)'$/.exec(line);
      assert.ok(m, `a shell line: ${line}`);
      env[m[1]!] = m[2]!;
    }
    const masterKeyFile = path.join(dataDir, 'master.key');
    assert.deepEqual(Object.keys(env).sort(), [
      'DATABASE_URL',
      'TEMPORAL_ADDRESS',
      'TEMPORAL_NAMESPACE',
      'TOKENWARDEN_AUDIT_KEY_FILE',
      'TOKENWARDEN_DB_SCHEMA',
      'TOKENWARDEN_MASTER_KEY_FILE',
      'TOKENWARDEN_OWNER_DIR_ROOT',
      'TOKENWARDEN_PAYLOAD_KEYS_FILE',
      'TOKENWARDEN_RECEIVER_ALLOW',
      'TOKENWARDEN_TASK_QUEUE',
    ]);
    assert.equal(env.TOKENWARDEN_RECEIVER_ALLOW, 'loopback', 'the stack allows loopback receivers');
    assert.equal(env.TOKENWARDEN_OWNER_DIR_ROOT, path.join(dataDir, 'owner'), "owner folders in the stack's data");
    assert.equal(env.DATABASE_URL, ctx.settings.databaseUrl);
    assert.equal(env.TOKENWARDEN_DB_SCHEMA, stackSchema);
    assert.equal(env.TOKENWARDEN_TASK_QUEUE, taskQueue);
    assert.equal(env.TEMPORAL_NAMESPACE, 'tokenwarden');
    assert.equal(env.TOKENWARDEN_MASTER_KEY_FILE, masterKeyFile);
    const key = (await readFile(masterKeyFile, 'utf8')).trim();
    assert.ok(!printed.stdout.includes(key), 'the master key itself is not printed');
    // The stack's payload key: made once, owner-only, named by path, never printed.
    const payloadKeysFile = path.join(dataDir, 'payload.keys');
    assert.equal(env.TOKENWARDEN_PAYLOAD_KEYS_FILE, payloadKeysFile);
    assert.equal((await stat(payloadKeysFile)).mode & 0o777, 0o600);
    const payloadKey = (await readFile(payloadKeysFile, 'utf8')).trim();
    assert.equal(Buffer.from(payloadKey, 'base64').length, 32);
    assert.ok(!printed.stdout.includes(payloadKey), 'the payload key itself is not printed');
    // The stack made its audit key (the checkpoints' signer) in its data folder, and names only the file.
    assert.equal(env.TOKENWARDEN_AUDIT_KEY_FILE, path.join(dataDir, 'audit.key'));
    const auditKey = (await readFile(env.TOKENWARDEN_AUDIT_KEY_FILE!, 'utf8')).trim();
    assert.equal(Buffer.from(auditKey, 'base64').length, 32);
    assert.ok(!printed.stdout.includes(auditKey), 'the audit key itself is not printed');

    const temporal = new Client({
      connection: await Connection.connect({ address: env.TEMPORAL_ADDRESS! }),
      namespace: 'tokenwarden',
    });
    try {
      const pollers = async () =>
        (
          await temporal.workflowService.describeTaskQueue({
            namespace: 'tokenwarden',
            taskQueue: { name: taskQueue },
            taskQueueType: proto.temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
          })
        ).pollers ?? [];
      assert.deepEqual(await pollers(), [], 'no worker runs in the stack');

      // Only the printed lines: no stack discovery through the data folder.
      const only = { ...base, ...env, TOKENWARDEN_DATA_DIR: '/nonexistent' };
      const worker = background(['worker'], only);
      children.push(worker.child);
      await waitUntil(async () => (await pollers()).length > 0, `the worker to poll (${worker.output()})`, 90_000);

      // A loopback receiver, as in the walkthrough: the separate worker must be allowed to reach it.
      const added = showsSecretOnce(await run(['receiver', 'add', 'stack-rcv', '--url', receiver.url, '--json'], only));
      assert.equal(added.code, 0, added.stderr);
      scan.addSigningSecret('stack-rcv', (JSON.parse(added.stdout) as { secret: string }).secret);
      const issued = showsSecretOnce(
        await run(['issue', '--subject', 'usr_stack', '--receiver', 'stack-rcv', '--ttl', '1s', '--json'], only),
      );
      assert.equal(issued.code, 0, issued.stderr);
      const { tokenId, token } = JSON.parse(issued.stdout) as { tokenId: string; token: string };
      scan.addToken(tokenId, token);
      await waitUntil(
        async () => {
          const shown = await run(['show', tokenId, '--json'], only);
          const t = JSON.parse(shown.stdout) as { recordedStatus: string; propagation: string };
          return t.recordedStatus === 'expired' && t.propagation === 'complete';
        },
        `the separate worker to expire ${tokenId} (${worker.output()})`,
        60_000,
      );
      assert.ok(
        receiver.acked().some((r) => (JSON.parse(r.body) as { token_id: string }).token_id === tokenId),
        'the loopback receiver got the event from the separate worker',
      );
      // What the stack's Temporal stores is ciphertext (search attributes aside, which hold ids), and
      // the stack's codec endpoint, which its Web UI calls without a key from loopback, reads it.
      const history = await temporal.workflow.getHandle(tokenWorkflowId(tokenId)).fetchHistory();
      const started = history.events![0]!.workflowExecutionStartedEventAttributes!;
      const [input] = started.input!.payloads!;
      assert.equal(Buffer.from(input!.metadata!.encoding!).toString(), 'binary/encrypted');
      assert.ok(!Buffer.from(input!.data!).toString('latin1').includes('usr_stack'));
      const decoded = await fetch(`${stackApi}/codec/decode`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-namespace': 'tokenwarden' },
        body: JSON.stringify({
          payloads: [
            {
              metadata: Object.fromEntries(
                Object.entries(input!.metadata!).map(([k, v]) => [k, Buffer.from(v!).toString('base64')]),
              ),
              data: Buffer.from(input!.data!).toString('base64'),
            },
          ],
        }),
      });
      assert.equal(decoded.status, 200);
      const [plain] = ((await decoded.json()) as { payloads: Array<{ data: string }> }).payloads;
      assert.match(Buffer.from(plain!.data, 'base64').toString(), /"subject":"usr_stack"/);
      const identities = (await pollers()).map((p) => p.identity ?? '');
      assert.ok(
        identities.length > 0 && identities.every((id) => id.startsWith(`${worker.child.pid}@`)),
        `only the worker process polls: ${identities.join(', ')} (worker pid ${worker.child.pid})`,
      );
    } finally {
      await temporal.connection.close();
    }
  });

  it('should say so when no stack is running', async () => {
    const printed = await run(['env', '--data-dir', '/nonexistent'], { PATH: process.env.PATH ?? '' });
    assert.equal(printed.code, 1);
    assert.match(printed.stderr, /no dev stack is running from \/nonexistent/);
  });
});

/** A `tokenwarden` run with exactly `env` (no test defaults). */
async function run(args: string[], env: Record<string, string>): Promise<Run> {
  return recorded(await runCli(args, env));
}

/** A long-running `tokenwarden` process; its output is kept for failure messages. */
function background(args: string[], env: Record<string, string>): { child: ChildProcess; output(): string } {
  const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args], { env });
  let output = '';
  // A long-running command (stack, worker): all its output is its log.
  const log = runOutput(args[0] ?? 'cli');
  const keep = (c: Buffer) => {
    output += c.toString();
    log(c);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  return { child, output: () => output };
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGINT');
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

describe('tokenwarden CLI: secrets', () => {
  // Last: every run above has happened.
  it('should print no raw token or signing secret but in the one output that shows it', async (t) => {
    scan.addMasterKey('this file', ctx.settings.masterKey!);
    for (const run of runs) {
      const command = `tokenwarden ${run.args.join(' ')}`;
      if (!shownOnce.has(run)) scan.searchOutput(`the output of ${command}`, run.stdout);
      scan.searchOutput(`the error output of ${command}`, run.stderr);
    }
    scan.searchOutput('the worker process', worker.output.join('\n'));
    await scan.searchHistories(ctx.client, tokenIds.map(tokenWorkflowId));
    await scan.searchTables(ctx.sql, 'the store');
    assert.deepEqual(scan.hits(), []);
    t.diagnostic(scan.summary());
  });
});
