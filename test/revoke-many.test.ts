/** Revocation by filter: every match dead in the store first, one operation id throughout, resumable. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { InvalidInputError, type RevokeManyReport } from '../client/index.js';
import { PACKAGE_ROOT } from '../common/config.js';
import * as store from '../common/store/index.js';
import { runCli } from './support/cli.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
const receivers: Record<string, TestReceiver> = {};

before(async () => {
  ctx = await TestContext.create('revoke_many');
  for (const id of ['billing', 'search']) {
    receivers[id] = await TestReceiver.start();
    await ctx.warden.addReceiver({ id, url: receivers[id]!.url });
  }
  await ctx.startWorker();
});
after(async () => {
  await ctx?.close();
  for (const r of Object.values(receivers)) await r.close();
});

const issue = async (subject: string, receiverIds: string[], name?: string) =>
  (await ctx.warden.issue({ subject, ttl: '1h', receivers: receiverIds, ...(name ? { name } : {}) })).tokenId;

interface Row {
  id: string;
  status: string;
  valid: boolean;
  revoke_request_id: string | null;
  taken_over: boolean;
}

async function rows(ids: string[]): Promise<Map<string, Row>> {
  const { rows: found } = await ctx.sql.query<Row>(
    `SELECT id, status, (status = 'active' AND expires_at > now()) AS valid, revoke_request_id,
            propagation_started_at IS NOT NULL AS taken_over
       FROM token WHERE id = ANY($1)`,
    [ids],
  );
  return new Map(found.map((r) => [r.id, r]));
}

const dbNow = async () => ((await ctx.sql.query<{ now: Date }>('SELECT now()')).rows[0]!.now as Date).toISOString();

async function propagated(ids: string[]): Promise<void> {
  await waitUntil(
    async () => {
      const { rows: r } = await ctx.sql.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM token WHERE id = ANY($1) AND propagation = 'complete'`,
        [ids],
      );
      return r[0]!.n === ids.length;
    },
    `propagation complete for ${ids.length} token(s)`,
    30_000,
  );
}

/** Each receiver got exactly one event per token it is listed on (none for the others), carrying `txn`. */
function assertToldOnce(tokens: Record<string, string[]>, txn: string): void {
  for (const [tokenId, listed] of Object.entries(tokens)) {
    for (const [rid, receiver] of Object.entries(receivers)) {
      const got = receiver.requestsFor(tokenId);
      assert.equal(got.length, listed.includes(rid) ? 1 : 0, `${rid} about ${tokenId}`);
      for (const r of got)
        assert.equal((JSON.parse(r.body) as { txn: string }).txn, txn, 'the event carries the operation id');
    }
  }
}

async function operationCount(): Promise<number> {
  const { rows: r } = await ctx.sql.query<{ n: number }>('SELECT count(*)::int AS n FROM bulk_revoke');
  return r[0]!.n;
}

describe('revokeMany', () => {
  it('should kill exactly the active tokens matching every criterion, tell each receiver once per token, and tie every kill to the operation id', async () => {
    const early = {
      ci1: await issue('usr_team', ['billing'], 'ci-1'),
      ci2: await issue('usr_team', ['billing', 'search'], 'ci-2'),
      otherReceiver: await issue('usr_team', ['search'], 'ci-3'),
      otherName: await issue('usr_team', ['billing'], 'prod-1'),
      noName: await issue('usr_team', ['billing']),
      otherSubject: await issue('usr_other', ['billing'], 'ci-1'),
      deadBefore: await issue('usr_team', ['billing'], 'ci-old'),
    };
    const earlier = await ctx.warden.revoke({ tokenId: early.deadBefore, reason: 'rotated' });
    assert.equal(earlier.changed, true);
    await propagated([early.deadBefore]);
    const cut = await dbNow();
    const late = await issue('usr_team', ['billing'], 'ci-late');
    const filter = { subject: 'usr_team', receiver: 'billing', namePrefix: 'ci-', issuedBefore: cut };

    assert.deepEqual(
      { ...(await ctx.warden.countMatching(filter)), asOf: 'x' },
      { active: 2, dead: 1, asOf: 'x' },
      'the preview counts what the revoke will kill',
    );
    const progress: string[] = [];
    const report = await ctx.warden.revokeMany(filter, {
      reason: 'CI integration retired',
      actor: 'secops',
      onProgress: (p) => progress.push(p.phase),
    });

    const matching = [early.ci1, early.ci2];
    const untouched = [early.otherReceiver, early.otherName, early.noName, early.otherSubject, late];
    const after = await rows([...matching, ...untouched, early.deadBefore]);
    for (const id of matching) {
      assert.equal(after.get(id)!.valid, false, `${id} dead in the store when revokeMany returns`);
      assert.equal(after.get(id)!.revoke_request_id, report.operationId);
    }
    for (const id of untouched) assert.equal(after.get(id)!.status, 'active', `${id} untouched`);
    assert.notEqual(
      after.get(early.deadBefore)!.revoke_request_id,
      report.operationId,
      'an earlier kill keeps its facts',
    );
    assert.deepEqual(
      {
        killed: report.killed,
        killedTotal: report.killedTotal,
        alreadyDead: report.alreadyDead,
        matched: report.matched,
        signalled: report.signalled,
        notSignalled: report.notSignalled,
        aborted: report.aborted,
        state: report.state,
        resumed: report.resumed,
      },
      {
        killed: 2,
        killedTotal: 2,
        alreadyDead: 1,
        matched: 3,
        signalled: 2,
        notSignalled: [],
        aborted: false,
        state: 'complete',
        resumed: false,
      },
    );
    assert.ok(progress.includes('kill') && progress.includes('tell'), `progress of both phases: ${progress.join()}`);

    await propagated(matching);
    assertToldOnce({ [early.ci1]: ['billing'], [early.ci2]: ['billing', 'search'] }, report.operationId);
    for (const id of untouched) assertToldOnce({ [id]: [] }, report.operationId);

    // Every audit record carrying the operation id is one of its kills, and every kill carries it.
    const { rows: audits } = await ctx.sql.query<{ token_id: string; key: string; correlation: string | null }>(
      `SELECT token_id, idempotency_key AS key, canonical::jsonb -> 'data' ->> 'correlationId' AS correlation
         FROM audit_event WHERE canonical::jsonb -> 'data' ->> 'correlationId' = $1 OR token_id = ANY($2)`,
      [report.operationId, matching],
    );
    const kills = audits.filter((a) => a.key === 'killed');
    assert.deepEqual(kills.map((a) => a.token_id).sort(), [...matching].sort());
    for (const a of kills) assert.equal(a.correlation, report.operationId);
    for (const a of audits) if (a.correlation !== null) assert.equal(a.correlation, report.operationId);

    const { rows: op } = await ctx.sql.query(
      'SELECT state, killed, told, reason, actor, subject, name_prefix FROM bulk_revoke WHERE id = $1',
      [report.operationId],
    );
    assert.deepEqual(op[0], {
      state: 'complete',
      killed: 2,
      told: 2,
      reason: 'CI integration retired',
      actor: 'secops',
      subject: 'usr_team',
      name_prefix: 'ci-',
    });

    // A resume of a finished operation kills nothing, tells nothing, sends nothing again.
    const again = await ctx.warden.revokeMany(null, { resume: report.operationId });
    assert.equal(again.killed, 0);
    assert.equal(again.signalled, 0);
    assert.equal(again.state, 'complete');
    assertToldOnce({ [early.ci1]: ['billing'], [early.ci2]: ['billing', 'search'] }, report.operationId);
  });

  it('should stop telling on abort with every match dead, and a resume tells the rest once and never kills a token issued since', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push(await issue('usr_aborted', ['billing']));
    const stop = new AbortController();
    const first = await ctx.warden.revokeMany(
      { subject: 'usr_aborted' },
      {
        reason: 'leaked batch',
        concurrency: 1,
        // Several kill transactions and pages of telling.
        batchSize: 2,
        signal: stop.signal,
        onProgress: (p) => {
          if (p.phase === 'tell' && p.done >= 1) stop.abort();
        },
      },
    );
    assert.equal(first.aborted, true);
    assert.equal(first.killed, 5);
    assert.equal(first.signalled, 1);
    assert.equal(first.notSignalled.length, 4);
    assert.equal(first.state, 'incomplete');
    assert.match(first.warnings.join('\n'), new RegExp(`tokenwarden revoke --resume ${first.operationId}`));
    const dead = await rows(ids);
    assert.ok(
      ids.every((id) => !dead.get(id)!.valid),
      'every match dead although most workflows were not told',
    );
    const told = ids.find((id) => !first.notSignalled.includes(id))!;
    await waitUntil(async () => (await rows([told])).get(told)!.taken_over, 'the told workflow took over');
    assert.ok(
      first.notSignalled.every((id) => !dead.get(id)!.taken_over),
      'the untold ones were not told',
    );

    const issuedSince = await issue('usr_aborted', ['billing']);
    const resumed = await ctx.warden.revokeMany(null, { resume: first.operationId, batchSize: 2 });
    assert.equal(resumed.resumed, true);
    assert.equal(resumed.killed, 0, 'a token issued after the operation began never matches');
    assert.equal(resumed.killedTotal, 5);
    assert.equal(resumed.signalled, 4);
    assert.equal(resumed.state, 'complete');
    assert.equal((await rows([issuedSince])).get(issuedSince)!.valid, true);

    await propagated(ids);
    assertToldOnce(Object.fromEntries(ids.map((id) => [id, ['billing']])), first.operationId);
    assertToldOnce({ [issuedSince]: [] }, first.operationId);
  });

  it('should kill on resume what an operation recorded but never killed (a crash before its kill phase)', async () => {
    const before = [await issue('usr_crashed', ['search']), await issue('usr_crashed', [])];
    const op = await store.createBulkRevoke(ctx.pool, {
      id: randomUUID(),
      filter: { subject: 'usr_crashed' },
      reason: 'crashed run',
      actor: 'admin',
      initiatingEntity: 'admin',
    });
    const since = await issue('usr_crashed', ['search']);
    const report = await ctx.warden.revokeMany(null, { resume: op.id });
    assert.equal(report.killed, 2);
    assert.equal(report.signalled, 2);
    const after = await rows([...before, since]);
    for (const id of before) assert.equal(after.get(id)!.revoke_request_id, op.id);
    assert.equal(after.get(since)!.valid, true);
    await propagated(before);
    assertToldOnce({ [before[0]!]: ['search'], [since]: [] }, op.id);
  });

  it('should refuse a bad filter or option naming the field, and change nothing', async () => {
    const kept = await issue('usr_kept', ['billing'], 'ci-kept');
    const operations = await operationCount();
    const cases: [Record<string, unknown> | null, Record<string, unknown>, string][] = [
      [{}, { reason: 'x' }, '(input)'],
      [null, { reason: 'x' }, '(input)'],
      [{ subject: 'someone@example.com' }, { reason: 'x' }, 'subject'],
      [{ receiver: 'Billing!' }, { reason: 'x' }, 'receiver'],
      [{ issuedBefore: 'yesterday' }, { reason: 'x' }, 'issuedBefore'],
      [{ namePrefix: '' }, { reason: 'x' }, 'namePrefix'],
      [{ colour: 'red' }, { reason: 'x' }, '(input)'],
      [{ subject: 'usr_kept' }, {}, 'reason'],
      [{ subject: 'usr_kept' }, { reason: 'x', rate: 0 }, 'rate'],
      [{ subject: 'usr_kept' }, { reason: 'x', concurrency: 0 }, 'concurrency'],
      [null, { resume: 'not-a-uuid' }, 'resume'],
    ];
    for (const [filter, options, field] of cases) {
      const err = await ctx.warden.revokeMany(filter as never, options as never).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, `${field}: ${String(err)}`);
      assert.ok(
        err.fields.some((f) => f.path === field),
        `${field} named in ${JSON.stringify(err.fields)}`,
      );
    }
    const empty = await ctx.warden.revokeMany({}, { reason: 'x' }).catch((e: Error) => e.message);
    assert.match(String(empty), /at least one criterion is required/);
    assert.equal(await operationCount(), operations, 'no operation recorded');
    assert.equal((await rows([kept])).get(kept)!.valid, true);
  });
});

/** The CLI as a child process whose output is read while it runs; `tty` runs it on a pseudo-terminal. */
function startCli(args: string[], opts: { tty?: boolean } = {}) {
  const argv = [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args];
  const quote = (a: string) => `'${a.replaceAll("'", "'\\''")}'`;
  const child = opts.tty
    ? spawn('script', ['-qfec', [process.execPath, ...argv].map(quote).join(' '), '/dev/null'], {
        env: ctx.childEnv(),
        stdio: ['pipe', 'pipe', 'pipe'],
      })
    : spawn(process.execPath, argv, { env: ctx.childEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  const out = { stdout: '', stderr: '' };
  child.stdout.on('data', (c: Buffer) => (out.stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out.stderr += c.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  return { child, out, exited };
}

describe('tokenwarden revoke --where', () => {
  it('should refuse without a terminal and without --yes, or with a bad --where, changing nothing', async () => {
    const kept = await issue('usr_cli_kept', ['billing'], 'ci-1');
    const operations = await operationCount();
    const env = ctx.childEnv();
    const refused = await runCli(['revoke', '--where', 'subject=usr_cli_kept', '--reason', 'x'], env);
    assert.equal(refused.code, 2, refused.stderr);
    assert.match(
      refused.stderr,
      /refusing to revoke without confirmation: 1 active token\(s\) match subject=usr_cli_kept; .*pass --yes/,
    );
    const bad: [string[], RegExp][] = [
      [
        ['--where', 'subject=usr_cli_kept,issued-before=yesterday'],
        /invalid --where: issued-before: expected an ISO 8601/,
      ],
      [['--where', 'colour=red'], /invalid --where: colour: unknown criterion/],
      [['--where', 'subject='], /invalid --where: subject:/],
      [['--where', 'subject=usr_cli_kept,subject=usr_other'], /subject: given twice/],
      [['--where', 'subject=usr_cli_kept', '--rate', 'fast'], /invalid --rate/],
    ];
    for (const [args, expected] of bad) {
      const run = await runCli(['revoke', ...args, '--reason', 'x', '--yes'], env);
      assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
      assert.match(run.stderr, expected);
    }
    const noReason = await runCli(['revoke', '--where', 'subject=usr_cli_kept', '--yes'], env);
    assert.equal(noReason.code, 2);
    assert.match(noReason.stderr, /required option '--reason <text>' not specified/);
    const unknown = await runCli(['revoke', '--resume', randomUUID()], env);
    assert.equal(unknown.code, 3, unknown.stderr);
    assert.match(unknown.stderr, /revoke operation .* not found/);
    assert.equal(await operationCount(), operations, 'no operation recorded');
    assert.equal((await rows([kept])).get(kept)!.valid, true);
    assert.equal(receivers.billing!.requestsFor(kept).length, 0);
  });

  it('should ask on a terminal: no changes nothing, yes revokes', async () => {
    const ids = [await issue('usr_tty', ['billing']), await issue('usr_tty', ['billing'])];
    const args = ['revoke', '--where', 'subject=usr_tty', '--reason', 'asked'];
    const declined = startCli(args, { tty: true });
    await waitUntil(() => declined.out.stdout.includes('[y/N]'), 'the question');
    assert.match(
      declined.out.stdout,
      /2 active token\(s\) match subject=usr_tty\. Revoke them all \(reason: asked\)\?/,
    );
    declined.child.stdin.write('n\n');
    assert.equal((await declined.exited).code, 1);
    assert.match(declined.out.stdout, /nothing was revoked/);
    assert.ok(
      [...(await rows(ids)).values()].every((r) => r.valid),
      'declined: nothing revoked',
    );

    const accepted = startCli(args, { tty: true });
    await waitUntil(() => accepted.out.stdout.includes('[y/N]'), 'the question');
    accepted.child.stdin.write('y\n');
    assert.equal((await accepted.exited).code, 0, accepted.out.stdout);
    assert.match(accepted.out.stdout, /2 token\(s\) revoked now/);
    assert.ok(
      [...(await rows(ids)).values()].every((r) => !r.valid),
      'confirmed: all revoked',
    );
    await propagated(ids);
  });

  it('should report progress as plain lines without a terminal, and stop telling on SIGINT with the resume command', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await issue('usr_sigint', ['billing']));
    const run = startCli(['revoke', '--where', 'subject=usr_sigint', '--reason', 'rotate', '--yes', '--rate', '2']);
    await waitUntil(async () => [...(await rows(ids)).values()].some((r) => r.taken_over), 'a first workflow told');
    run.child.kill('SIGINT');
    const { code } = await run.exited;
    assert.equal(code, 1, run.out.stderr);
    const operationId = /operation ([0-9a-f-]{36})/.exec(run.out.stdout)?.[1];
    assert.ok(operationId, run.out.stdout);
    assert.match(run.out.stderr, /tokenwarden: 6 active token\(s\) match subject=usr_sigint/);
    assert.match(run.out.stderr, /tokenwarden: killed in the store 6\/6/);
    assert.match(run.out.stderr, /tokenwarden: workflows told \d\/6/);
    assert.match(run.out.stderr, new RegExp(`interrupted; .*Resume with: tokenwarden revoke --resume ${operationId}`));
    assert.match(run.out.stdout, /6 token\(s\) revoked now .*\n\d workflow\(s\) told to propagate, [1-5] not told/);
    assert.ok(
      [...(await rows(ids)).values()].every((r) => !r.valid),
      'every match dead',
    );

    const resumed = await runCli(['revoke', '--resume', operationId, '--json'], ctx.childEnv());
    assert.equal(resumed.code, 0, resumed.stderr);
    await propagated(ids);
    assertToldOnce(Object.fromEntries(ids.map((id) => [id, ['billing']])), operationId);
  });

  it('should still revoke a single token by id', async () => {
    const tokenId = await issue('usr_single', ['billing']);
    const env = ctx.childEnv();
    const run = await runCli(['revoke', tokenId, '--reason', 'lost', '--json'], env);
    assert.equal(run.code, 0, run.stderr);
    const outcome = JSON.parse(run.stdout) as { tokenId: string; status: string; changed: boolean };
    assert.deepEqual([outcome.tokenId, outcome.status, outcome.changed], [tokenId, 'revoked', true]);
    await propagated([tokenId]);
    assert.equal(receivers.billing!.requestsFor(tokenId).length, 1);
    const missing = await runCli(['revoke', tokenId], env);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /required option '--reason <text>' not specified/);
  });

  it('should resume with --resume after the process was SIGKILLed mid-tell, every workflow told once', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 8; i++) ids.push(await issue('usr_sigkill', ['search'], `svc-${i}`));
    const args = [
      'revoke',
      '--where',
      'subject=usr_sigkill,name-prefix=svc-',
      '--reason',
      'breach',
      '--yes',
      '--rate',
      '2',
      '--json',
    ];
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args], {
      env: ctx.childEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<NodeJS.Signals | null>((resolve) =>
      child.on('exit', (_code, signal) => resolve(signal)),
    );
    try {
      const operationId = await waitUntil(
        () => /resume with: tokenwarden revoke --resume ([0-9a-f-]{36})/.exec(stderr)?.[1],
        'the operation id on stderr',
      );
      // Some workflow told (and taken over), not all: then the process dies.
      await waitUntil(async () => [...(await rows(ids)).values()].some((r) => r.taken_over), 'a first workflow told');
      child.kill('SIGKILL');
      assert.equal(await exited, 'SIGKILL');
      const midway = await rows(ids);
      assert.ok(
        ids.every((id) => !midway.get(id)!.valid),
        'every match was dead before telling began',
      );
      const untold = ids.filter((id) => !midway.get(id)!.taken_over);
      assert.ok(untold.length > 0 && untold.length < ids.length, `killed mid-tell (${untold.length} untold)`);

      const resumed = await runCli(['revoke', '--resume', operationId, '--json'], ctx.childEnv());
      assert.equal(resumed.code, 0, resumed.stderr);
      const report = JSON.parse(resumed.stdout) as RevokeManyReport;
      assert.equal(report.operationId, operationId);
      assert.equal(report.resumed, true);
      assert.equal(report.killed, 0);
      assert.equal(report.killedTotal, 8);
      // The untold ones, less any told just before the kill that took over since.
      assert.ok(
        report.signalled > 0 && report.signalled <= untold.length,
        `told ${report.signalled} of ${untold.length}`,
      );
      assert.deepEqual(report.notSignalled, []);
      await propagated(ids);
      assertToldOnce(Object.fromEntries(ids.map((id) => [id, ['search']])), operationId);
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });
});
