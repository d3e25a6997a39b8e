/**
 * One apply of a policy at a time, across processes (a transaction-level advisory lock): a second
 * apply over HTTP answers 409, through the library and the CLI it is a clear error; an HTTP client
 * that disconnects stops its apply (the rest is told by the next). The paced loop adds one abort
 * listener, whatever its concurrency.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { tellPaced } from '../client/tell.js';
import { tryPolicyApplyLock } from '../client/policies.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { checkout } from '../common/db.js';
import { PolicyApplyInProgressError } from '../common/errors.js';
import { call, startApiHarness, type ApiHarness } from './support/api.js';
import { runCli } from './support/cli.js';
import { TestContext } from './support/context.js';
import { insertPolicy, startToken, type StartedToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;

before(async () => {
  ctx = await TestContext.create('applylock');
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

/** A policy with `n` live tokens whose workflows run (no worker needed: a signal is accepted by the server). */
async function policyWithTokens(name: string, n: number): Promise<StartedToken[]> {
  const policy = await insertPolicy(ctx, { name });
  const tokens: StartedToken[] = [];
  for (let i = 0; i < n; i++) tokens.push(await startToken(ctx, { ttlMs: 3_600_000, policy }));
  return tokens;
}

/** Whether the workflow has received a Signal (no worker runs: the apply's policyChanged waits in history). */
const signalled = async (token: StartedToken) =>
  ((await token.handle.fetchHistory()).events ?? []).some((e) => e.workflowExecutionSignaledEventAttributes);

/**
 * Whether an apply of `name` holds its lock now, read from pg_locks: trying the lock, even for an
 * instant, would make an apply starting at that instant answer 409.
 */
async function applyRunning(name: string): Promise<boolean> {
  const { rows } = await ctx.sql.query(
    `SELECT EXISTS (
       SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = hashtext('tokenwarden.policy-apply:' || $1)::oid AND objid = hashtext($2)::oid
     ) AS running`,
    [ctx.settings.databaseSchema, name],
  );
  return rows[0].running as boolean;
}

const untold = async (name: string) =>
  Number(
    (
      await ctx.sql.query(
        `SELECT count(*) AS n FROM token t JOIN policy p ON p.name = t.policy
          WHERE t.policy = $1 AND (t.policy_version IS NULL OR t.policy_version < p.version)`,
        [name],
      )
    ).rows[0].n,
  );

/** A slow apply over HTTP (one workflow a second: 20 s for 20 tokens), cancellable by aborting the request. */
function slowApply(name: string, tokens: StartedToken[]) {
  const stop = new AbortController();
  let ended: string | undefined;
  const answer = fetch(`${api.url}/v1/policies/${name}/apply`, {
    method: 'POST',
    headers: { authorization: `Bearer ${api.keys.admin}`, 'content-type': 'application/json' },
    body: JSON.stringify({ rate: 1 }),
    signal: stop.signal,
  })
    .then(async (res) => {
      ended = `HTTP ${res.status} ${await res.text()}`;
      return res;
    })
    .catch((err: unknown) => {
      ended ??= String(err);
      return err;
    });
  /** Until the apply holds its lock and has told at least one token (an apply that ended first says how). */
  const running = () =>
    waitUntil(
      async () => {
        if (ended !== undefined) throw new Error(`the apply ended before it was seen running: ${ended}`);
        // Told in id order: the first token issued is told first.
        return (await applyRunning(name)) && (await signalled(tokens[0]!));
      },
      `the apply of ${name} holding its lock, some tokens told`,
      30_000,
    );
  return { stop, answer, running };
}

describe('policy apply, one at a time', () => {
  it('should refuse a second apply of the same policy while one runs: 409, the library and the CLI', async () => {
    // The probe sees the lock the apply takes, and nothing once it is gone.
    const holder = await checkout(ctx.pool);
    try {
      await holder.query('BEGIN');
      assert.equal(await tryPolicyApplyLock(holder, 'locked'), true);
      assert.equal(await applyRunning('locked'), true, 'pg_locks shows the lock');
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
    }
    assert.equal(await applyRunning('locked'), false);

    const first = slowApply('locked', await policyWithTokens('locked', 20));
    await first.running();

    const second = await call(api.url, 'POST', '/v1/policies/locked/apply', { key: api.keys.admin, json: {} });
    assert.equal(second.status, 409, second.text);
    assert.equal(second.body.type, 'urn:tokenwarden:problem:policy-apply-in-progress');
    assert.match(second.body.detail, /another apply of this policy is running/);
    await assert.rejects(ctx.warden.applyPolicy('locked'), PolicyApplyInProgressError);
    const cli = await runCli(['policy', 'apply', 'locked', '--json'], ctx.childEnv());
    assert.equal(cli.code, 1, cli.stderr);
    assert.match(cli.stderr, /policy locked: another apply of this policy is running/);
    assert.equal(cli.stdout, '');
    // A dry run changes nothing: it is not held up.
    const dry = await call(api.url, 'POST', '/v1/policies/locked/apply', {
      key: api.keys.admin,
      json: { dryRun: true },
    });
    assert.equal(dry.status, 200, dry.text);

    first.stop.abort();
    await waitUntil(async () => !(await applyRunning('locked')), 'the first apply stopped', 10_000);
    // The lock went with it: the next apply tells the rest.
    const rest = await ctx.warden.applyPolicy('locked', { rate: 1_000 });
    assert.equal(rest.remaining, 0);
    assert.ok(rest.signalled > 0 && rest.signalled < 20, `the rest was told (${rest.signalled})`);
  });

  it('should stop an HTTP apply when its client disconnects', async () => {
    const { stop, answer, running } = slowApply('dropped', await policyWithTokens('dropped', 20));
    await running();
    const started = Date.now();
    stop.abort();
    // At one a second the whole apply takes 20 s: stopping is much sooner.
    await waitUntil(async () => !(await applyRunning('dropped')), 'the apply stopped after the disconnect', 5_000);
    assert.ok(Date.now() - started < 5_000);
    assert.ok((await answer) instanceof Error, 'the client saw its own abort');
    const left = await untold('dropped');
    assert.ok(left > 0 && left < 20, `told some, not all (${left} left)`);
  });

  it('should add one abort listener to the signal, whatever the concurrency', async () => {
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on('warning', onWarning);
    try {
      const tokens = Array.from({ length: 40 }, (_, i) => ({ id: `tok_${i}` }));
      const stop = new AbortController();
      const outcome = await tellPaced(tokens, async () => {}, { rate: 400, concurrency: 16 }, { signal: stop.signal });
      assert.equal(outcome.signalled, 40);
      // Warnings are emitted on the next tick.
      await new Promise((resolve) => setImmediate(resolve));
    } finally {
      process.off('warning', onWarning);
    }
    assert.deepEqual(
      warnings.filter((w) => w.name === 'MaxListenersExceededWarning').map((w) => w.message),
      [],
    );
  });
});
