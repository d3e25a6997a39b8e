/** Revocation by filter: every match dead in the store first, one operation id throughout, resumable. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { InvalidInputError, TokenWarden, type RevokeManyReport } from '../client/index.js';
import { PACKAGE_ROOT } from '../common/config.js';
import { freePort } from '../dev/processes.js';
import * as store from '../common/store/index.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { issueInOpenTransaction, waitingOnIssuanceBarrier } from './support/open-issue.js';
import { waitUntil } from './support/wait.js';
import { runOutput } from './support/run-record.js';

let ctx: TestContext;
let worker: RunningWorker;
const receivers: Record<string, TestReceiver> = {};

before(async () => {
  ctx = await TestContext.create('revoke_many');
  for (const id of ['billing', 'search']) {
    receivers[id] = await TestReceiver.start();
    await ctx.warden.addReceiver({ id, url: receivers[id]!.url });
  }
  worker = await ctx.startWorker();
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

  it('should refuse an issued-before at or after now, a prefix with edge whitespace, and more matches than max', async () => {
    const deployer = await issue('usr_edges', ['billing'], 'deployer-prod');
    const operations = await operationCount();
    const cases: [Record<string, unknown>, Record<string, unknown>, string, RegExp][] = [
      [{ issuedBefore: '2999-01-01' }, { reason: 'x' }, 'issuedBefore', /filters nothing/],
      [{ namePrefix: 'deploy ' }, { reason: 'x' }, 'namePrefix', /whitespace/],
      [{ namePrefix: ' deploy' }, { reason: 'x' }, 'namePrefix', /whitespace/],
      [{ subject: 'usr_edges' }, { reason: 'x', max: 0 }, 'max', /1 active token\(s\) match, more than/],
      [{ subject: 'usr_edges' }, { reason: 'x', batchSize: 1001 }, 'batchSize', /./],
    ];
    for (const [filter, options, field, message] of cases) {
      const err = await ctx.warden.revokeMany(filter as never, options as never).catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, `${field}: ${String(err)}`);
      assert.ok(
        err.fields.some((f) => f.path === field && message.test(f.message)),
        `${field} named in ${JSON.stringify(err.fields)}`,
      );
    }
    assert.equal(await operationCount(), operations, 'no operation recorded');
    assert.equal((await rows([deployer])).get(deployer)!.valid, true, 'deployer-prod untouched');
    const within = await ctx.warden.revokeMany({ subject: 'usr_edges' }, { reason: 'x', max: 1 });
    assert.equal(within.killed, 1, 'max = the match count revokes');
  });

  it('should kill a matching token issued in a transaction that commits while the operation begins, never complete with it active', async () => {
    const open = await issueInOpenTransaction(ctx.sql, 'usr_window', 'win-1');
    const other = await issue('usr_window', ['billing'], 'win-2');
    let settled = false;
    const running = ctx.warden
      .revokeMany({ subject: 'usr_window' }, { reason: 'window' })
      .finally(() => (settled = true));
    // The operation waits for the open issue (the barrier) or, without one, runs to its end.
    await waitUntil(
      async () => settled || (await waitingOnIssuanceBarrier(ctx.sql, false)),
      'the revoke waiting on the issuance barrier, or done',
    );
    await open.commit();
    const report = await running;
    const after = await rows([open.tokenId, other]);
    assert.equal(after.get(other)!.valid, false);
    assert.equal(after.get(open.tokenId)!.valid, false, 'the token of the open transaction is dead');
    assert.equal(after.get(open.tokenId)!.revoke_request_id, report.operationId);
    assert.deepEqual({ killed: report.killed, state: report.state }, { killed: 2, state: 'complete' });
  });

  it('should kill a matching token of an import batch whose transaction commits while the operation begins', async () => {
    const open = await issueInOpenTransaction(ctx.sql, 'usr_window_import', 'win-i', 'import');
    let settled = false;
    const running = ctx.warden
      .revokeMany({ subject: 'usr_window_import' }, { reason: 'window' })
      .finally(() => (settled = true));
    await waitUntil(
      async () => settled || (await waitingOnIssuanceBarrier(ctx.sql, false)),
      'the revoke waiting on the issuance barrier, or done',
    );
    await open.commit();
    const report = await running;
    const after = await rows([open.tokenId]);
    assert.equal(after.get(open.tokenId)!.valid, false, 'the imported token of the open transaction is dead');
    assert.deepEqual({ killed: report.killed, state: report.state }, { killed: 1, state: 'complete' });
  });

  it('should clamp asOf to the operation clock: an asOf in the future cuts off no later than now', async () => {
    const before = await issue('usr_asof', ['billing'], 'asof-1');
    const future = new Date(Date.now() + 3_600_000).toISOString();
    let op: { cutoff: string } | undefined;
    const report = await ctx.warden.revokeMany(
      { subject: 'usr_asof' },
      { reason: 'asof', asOf: future, onOperation: (o) => (op = o) },
    );
    assert.ok(Date.parse(op!.cutoff) < Date.parse(future), 'the cutoff is the clock, not the future asOf');
    assert.equal(report.killed, 1);
    assert.equal((await rows([before])).get(before)!.valid, false);
  });

  it('should report a token whose kill keeps failing, kill the others, and stay incomplete', async () => {
    const ids = [
      await issue('usr_poison', ['billing'], 'p-1'),
      await issue('usr_poison', ['billing'], 'p-2'),
      await issue('usr_poison', ['billing'], 'p-3'),
    ];
    const poisoned = ids[1]!;
    // A real store error on one row: its kill raises (as a corrupt row or a failing trigger would).
    await ctx.sql.query(`CREATE FUNCTION refuse_kill() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'refusing to kill %', NEW.id; END $$`);
    await ctx.sql.query(
      `CREATE TRIGGER refuse_kill BEFORE UPDATE ON token FOR EACH ROW
         WHEN (NEW.id = '${poisoned}' AND NEW.status <> 'active') EXECUTE FUNCTION refuse_kill()`,
    );
    let report: RevokeManyReport;
    try {
      report = await ctx.warden.revokeMany({ subject: 'usr_poison' }, { reason: 'poison' });
    } finally {
      await ctx.sql.query('DROP TRIGGER refuse_kill ON token; DROP FUNCTION refuse_kill()');
    }
    const after = await rows(ids);
    assert.equal(after.get(ids[0]!)!.valid, false);
    assert.equal(after.get(ids[2]!)!.valid, false);
    assert.equal(after.get(poisoned)!.valid, true);
    assert.deepEqual(
      report.failed.map((f) => f.tokenId),
      [poisoned],
    );
    assert.match(report.failed[0]!.error, /refusing to kill/);
    assert.equal(report.state, 'incomplete');
    const resumed = await ctx.warden.revokeMany(null, { resume: report.operationId });
    assert.deepEqual({ killed: resumed.killed, state: resumed.state }, { killed: 1, state: 'complete' });
  });

  it('should refuse a resume that changes the filter, reason, actor, asOf or max, naming the field', async () => {
    await issue('usr_same', ['billing']);
    const op = await store.createBulkRevoke(ctx.pool, {
      id: randomUUID(),
      filter: { subject: 'usr_same' },
      reason: 'kept',
      actor: 'admin',
      initiatingEntity: 'admin',
    });
    const cases: [Record<string, unknown> | null, Record<string, unknown>, string][] = [
      [{ subject: 'usr_other' }, {}, 'filter'],
      [null, { reason: 'changed' }, 'reason'],
      [null, { actor: 'someone' }, 'actor'],
      [null, { asOf: new Date().toISOString() }, 'asOf'],
      [null, { max: 10 }, 'max'],
    ];
    for (const [filter, options, field] of cases) {
      const err = await ctx.warden
        .revokeMany(filter as never, { resume: op.id, ...options } as never)
        .catch((e: unknown) => e);
      assert.ok(err instanceof InvalidInputError, `${field}: ${String(err)}`);
      assert.ok(
        err.fields.some((f) => f.path === field),
        `${field} named in ${JSON.stringify(err.fields)}`,
      );
    }
    const same = await ctx.warden.revokeMany({ subject: 'usr_same' }, { resume: op.id, reason: 'kept' });
    assert.deepEqual([same.killed, same.state], [1, 'complete']);
  });

  it('should kill every match and give up telling when Temporal is unreachable, then resume', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 12; i++) ids.push(await issue('usr_outage', ['billing']));
    const address = `127.0.0.1:${await freePort()}`;
    const down = await TokenWarden.connect({
      ...ctx.settings,
      temporal: { ...ctx.settings.temporal, connectionOptions: { address } },
    });
    let report: RevokeManyReport;
    try {
      report = await down.revokeMany({ subject: 'usr_outage' }, { reason: 'outage', concurrency: 2 });
    } finally {
      await down.close();
    }
    assert.ok(
      [...(await rows(ids)).values()].every((r) => !r.valid),
      'all dead in the store',
    );
    assert.deepEqual([report.killed, report.signalled, report.state], [12, 0, 'incomplete']);
    assert.deepEqual([...report.notSignalled].sort(), [...ids].sort());
    assert.match(report.warnings.join('\n'), /stopped after 8 failures in a row, \d+ not tried/);
    const resumed = await ctx.warden.revokeMany(null, { resume: report.operationId });
    assert.deepEqual([resumed.killed, resumed.signalled, resumed.state], [0, 12, 'complete']);
    await propagated(ids);
  });

  it('should revoke by receiver alone and by name prefix alone', async () => {
    await ctx.warden.addReceiver({ id: 'solo', url: receivers.billing!.url });
    const onSolo = await issue('usr_solo', ['solo'], 'x-1');
    const offSolo = await issue('usr_solo', ['search'], 'x-2');
    const byReceiver = await ctx.warden.revokeMany({ receiver: 'solo' }, { reason: 'receiver gone' });
    assert.equal(byReceiver.killed, 1);
    const r1 = await rows([onSolo, offSolo]);
    assert.deepEqual([r1.get(onSolo)!.valid, r1.get(offSolo)!.valid], [false, true]);

    const pfx = `pfx${randomUUID().slice(0, 8)}-`;
    const a = await issue('usr_p1', ['search'], `${pfx}a`);
    const b = await issue('usr_p2', ['search'], `${pfx}b`);
    const near = await issue('usr_p2', ['search'], pfx.slice(0, -1));
    const byPrefix = await ctx.warden.revokeMany({ namePrefix: pfx }, { reason: 'prefix', batchSize: 1 });
    assert.equal(byPrefix.killed, 2);
    const r2 = await rows([a, b, near]);
    assert.deepEqual([r2.get(a)!.valid, r2.get(b)!.valid, r2.get(near)!.valid], [false, false, true]);
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
  // Its error output is the command's log (on a pseudo-terminal both streams arrive as stdout).
  const log = runOutput('cli');
  child.stdout.on('data', (c: Buffer) => {
    out.stdout += c.toString();
    if (opts.tty) log(c);
  });
  child.stderr.on('data', (c: Buffer) => {
    out.stderr += c.toString();
    log(c);
  });
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
    for (let i = 0; i < 16; i++) ids.push(await issue('usr_sigint', ['billing']));
    // No worker: signals are accepted and nothing takes over, so the CLI's own progress line is
    // the sign of telling, and 16 tokens at 2/s leave it seconds before it could finish.
    await worker.stop();
    const run = startCli(['revoke', '--where', 'subject=usr_sigint', '--reason', 'rotate', '--yes', '--rate', '2']);
    await waitUntil(() => /workflows told [1-9]\d*\/16/.test(run.out.stderr), 'a first workflow told');
    run.child.kill('SIGINT');
    const { code } = await run.exited;
    worker = await ctx.startWorker();
    assert.equal(code, 130, run.out.stderr);
    const operationId = /operation ([0-9a-f-]{36})/.exec(run.out.stdout)?.[1];
    assert.ok(operationId, run.out.stdout);
    assert.match(run.out.stderr, /tokenwarden: 16 active token\(s\) match subject=usr_sigint/);
    assert.match(run.out.stderr, /tokenwarden: killed in the store 16\/16/);
    assert.doesNotMatch(run.out.stderr, /stopping after the kill phase/, 'interrupted while telling');
    assert.match(run.out.stderr, new RegExp(`interrupted; .*Resume with: tokenwarden revoke --resume ${operationId}`));
    assert.match(run.out.stdout, /16 token\(s\) revoked now .*\n\d+ workflow\(s\) told to propagate, \d+ not told/);
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

  it('should refuse bulk-only options with a single token id, and list unfinished operations with --operations', async () => {
    const tokenId = await issue('usr_ops', ['billing']);
    const env = ctx.childEnv();
    for (const extra of [['--rate', '5'], ['--yes'], ['--max', '3']]) {
      const run = await runCli(['revoke', tokenId, '--reason', 'lost', ...extra], env);
      assert.equal(run.code, 2, `${extra[0]}: ${run.stderr}`);
      assert.match(run.stderr, new RegExp(`${extra[0]}: only with --where or --resume`));
    }
    assert.equal((await rows([tokenId])).get(tokenId)!.valid, true, 'nothing revoked');
    const op = await store.createBulkRevoke(ctx.pool, {
      id: randomUUID(),
      filter: { subject: 'usr_ops' },
      reason: 'lost terminal',
      actor: 'admin',
      initiatingEntity: 'admin',
    });
    const listed = await runCli(['revoke', '--operations', '--json'], env);
    assert.equal(listed.code, 0, listed.stderr);
    const ops = JSON.parse(listed.stdout) as { id: string; state: string; filter: object }[];
    const mine = ops.find((o) => o.id === op.id);
    assert.deepEqual(mine && [mine.state, mine.filter], ['killing', { subject: 'usr_ops' }]);
    assert.ok(ops.every((o) => o.state !== 'complete'));
    const resumed = await runCli(['revoke', '--resume', op.id, '--json'], env);
    assert.equal(resumed.code, 0, resumed.stderr);
    const after = JSON.parse((await runCli(['revoke', '--operations', '--json'], env)).stdout) as { id: string }[];
    assert.ok(!after.some((o) => o.id === op.id), 'a complete operation is not listed');
  });

  it('should resume with --resume after the process was SIGKILLed mid-tell, every workflow told once', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 16; i++) ids.push(await issue('usr_sigkill', ['search'], `svc-${i}`));
    // No worker while the CLI tells (see the SIGINT test): its progress lines show telling began.
    await worker.stop();
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
    const log = runOutput('cli');
    child.stderr.on('data', (c: Buffer) => {
      stderr += c.toString();
      log(c);
    });
    const exited = new Promise<NodeJS.Signals | null>((resolve) =>
      child.on('exit', (_code, signal) => resolve(signal)),
    );
    try {
      const operationId = await waitUntil(
        () => /resume with: tokenwarden revoke --resume ([0-9a-f-]{36})/.exec(stderr)?.[1],
        'the operation id on stderr',
      );
      // Some workflow told, not all (16 at 2/s): then the process dies.
      await waitUntil(() => /workflows told [1-9]\d*\/16/.test(stderr), 'a first workflow told');
      child.kill('SIGKILL');
      assert.equal(await exited, 'SIGKILL');
      worker = await ctx.startWorker();
      const midway = await rows(ids);
      assert.ok(
        ids.every((id) => !midway.get(id)!.valid),
        'every match was dead before telling began',
      );
      const untold = ids.filter((id) => !midway.get(id)!.taken_over);

      const resumed = await runCli(['revoke', '--resume', operationId, '--json'], ctx.childEnv());
      assert.equal(resumed.code, 0, resumed.stderr);
      const report = JSON.parse(resumed.stdout) as RevokeManyReport;
      assert.equal(report.operationId, operationId);
      assert.equal(report.resumed, true);
      assert.equal(report.killed, 0);
      assert.equal(report.killedTotal, 16);
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
      if (worker.worker.getState() !== 'RUNNING') worker = await ctx.startWorker();
    }
  });
});
