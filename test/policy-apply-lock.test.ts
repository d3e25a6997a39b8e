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
import { insertPolicy, startToken } from './support/self-managing.js';
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
async function policyWithTokens(name: string, n: number): Promise<void> {
  const policy = await insertPolicy(ctx, { name });
  for (let i = 0; i < n; i++) await startToken(ctx, { ttlMs: 3_600_000, policy });
}

/** Whether an apply of `name` holds its lock now (asked in a transaction rolled back at once). */
async function applyRunning(name: string): Promise<boolean> {
  const client = await checkout(ctx.pool);
  try {
    await client.query('BEGIN');
    return !(await tryPolicyApplyLock(client, name));
  } finally {
    await client.query('ROLLBACK');
    client.release();
  }
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

/** A slow apply over HTTP (2 workflows a second), cancellable by aborting the request. */
function slowApply(name: string) {
  const stop = new AbortController();
  const answer = fetch(`${api.url}/v1/policies/${name}/apply`, {
    method: 'POST',
    headers: { authorization: `Bearer ${api.keys.admin}`, 'content-type': 'application/json' },
    body: JSON.stringify({ rate: 2 }),
    signal: stop.signal,
  }).catch((err: unknown) => err);
  return { stop, answer };
}

describe('policy apply, one at a time', () => {
  it('should refuse a second apply of the same policy while one runs: 409, the library and the CLI', async () => {
    await policyWithTokens('locked', 20);
    const first = slowApply('locked');
    await waitUntil(() => applyRunning('locked'), 'the first apply holds the lock');

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
    await policyWithTokens('dropped', 20);
    const { stop, answer } = slowApply('dropped');
    await waitUntil(() => applyRunning('dropped'), 'the apply holds the lock');
    const started = Date.now();
    stop.abort();
    // At 2 a second the whole apply takes 10 s: stopping is much sooner.
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
