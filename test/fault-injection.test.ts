/**
 * Fault injection, automated: worker processes SIGKILLed during a burst of revocations, a receiver
 * refusing connections, revokes racing expiry, PostgreSQL killed with -9 mid-burst, Temporal
 * restarted mid-sleep. Nothing may be lost, no effect repeated, no raw secret left anywhere.
 *
 * Sizes are small by default (CI). The size of the manual fault-injection run:
 *   TOKENWARDEN_FAULT_TOKENS=200 TOKENWARDEN_FAULT_RECEIVERS=5 TOKENWARDEN_FAULT_WORKER_KILLS=5 \
 *   TOKENWARDEN_FAULT_RECEIVER_DOWN=60s npm test -- fault
 * Every run prints its seed; TOKENWARDEN_FAULT_SEED=<seed> replays its kill points and victims.
 */
import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import type { IssuedToken, RevokeOutcome } from '../client/index.js';
import { tokenWorkflowId } from '../common/names.js';
import { runCli, type CliRun } from './support/cli.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { envDuration, envInt, inLanes, seededRandom, workflowResults } from './support/fault.js';
import {
  acceptedEvents,
  auditProblems,
  halfKillProblems,
  propagationProblems,
  readFacts,
  receiverProblems,
  repeats,
} from './support/invariants.js';
import { OwnPostgres, OwnTemporal } from './support/own-services.js';
import { TestReceiver } from './support/receiver.js';
import { SecretScan } from './support/secret-scan.js';
import { waitUntil } from './support/wait.js';
import { WorkerFleet } from './support/worker-process.js';

const config = {
  tokens: envInt('TOKENWARDEN_FAULT_TOKENS', 60),
  receivers: envInt('TOKENWARDEN_FAULT_RECEIVERS', 3),
  workerKills: envInt('TOKENWARDEN_FAULT_WORKER_KILLS', 3),
  receiverDownMs: envDuration('TOKENWARDEN_FAULT_RECEIVER_DOWN', '5s'),
  racers: envInt('TOKENWARDEN_FAULT_RACERS', 50),
  seed: envInt('TOKENWARDEN_FAULT_SEED', randomInt(2 ** 31)),
};
/** Retries every ≤ 1 s; no escalation to `stuck` during a scenario (it is not what these test). */
const TIMING = { escalateAfterMs: 600_000, retryInitialMs: 200, retryMaxMs: 1_000 };
/** How soon after a receiver's return every event must be there (the issue's 4 s at a 1 s retry cap). */
const RETURN_BOUND_MS = TIMING.retryMaxMs + 3_000;
const SETTLE_MS = 120_000;

const random = seededRandom(config.seed);
const scan = new SecretScan();
const fleets: WorkerFleet[] = [];
/** Token workflows on the run's shared Temporal server, searched by the last test. */
const sharedWorkflowIds = new Set<string>();
/** Error output of library calls and CLI runs, searched by the last test. */
const errorOutput: string[] = [];
const cleanups: Array<() => Promise<void>> = [];
let shared: TestContext;
let sharedFleet: WorkerFleet;

before(async () => {
  shared = await TestContext.create('fault', TIMING);
  scan.addMasterKey('the shared context', shared.settings.masterKey!);
  sharedFleet = startFleet(shared, atTheEnd);
  await sharedFleet.add(2);
});
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch((err: Error) => console.error(err));
  await sharedFleet?.killAll();
  await shared?.close();
});

type Defer = (cleanup: () => Promise<void>) => void;
const atTheEnd: Defer = (cleanup) => cleanups.push(cleanup);

/** Cleanups that run in reverse order once the test `t` has finished, passed or not. */
function afterThisTest(t: { after(fn: () => Promise<void>): void }): Defer {
  const stack: Array<() => Promise<void>> = [];
  t.after(async () => {
    for (const cleanup of stack.reverse()) await cleanup().catch((err: Error) => console.error(err));
  });
  return (cleanup) => stack.push(cleanup);
}

function startFleet(ctx: TestContext, defer: Defer): WorkerFleet {
  const fleet = new WorkerFleet(ctx.childEnv(), ctx.client);
  fleets.push(fleet);
  defer(() => fleet.killAll());
  return fleet;
}

interface Endpoint {
  id: string;
  receiver: TestReceiver;
}

/** Real receivers registered with the context; their signing secrets go to the scan. */
async function addReceivers(ctx: TestContext, prefix: string, count: number, defer = atTheEnd): Promise<Endpoint[]> {
  const endpoints: Endpoint[] = [];
  for (let i = 1; i <= count; i++) {
    const receiver = await TestReceiver.start();
    defer(() => receiver.close());
    const id = `${prefix}-${i}`;
    receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
    scan.addSigningSecret(id, receiver.secret);
    endpoints.push({ id, receiver });
  }
  return endpoints;
}

async function issueTokens(
  ctx: TestContext,
  subject: string,
  count: number,
  receivers: Endpoint[],
  ttl: string,
): Promise<IssuedToken[]> {
  return inLanes(Array.from({ length: count }), 4, async () => {
    const issued = await ctx.warden.issue({ subject, receivers: receivers.map((r) => r.id), ttl });
    scan.addToken(issued.tokenId, issued.token);
    return issued;
  });
}

const everyProblem = async (ctx: TestContext, tokenIds: string[], receivers: Endpoint[]) => [
  ...(await readFacts(ctx.pool, tokenIds)).flatMap(propagationProblems),
  ...receivers.flatMap((r) => receiverProblems(r.id, r.receiver, tokenIds)),
];

const seconds = (since: number) => `${((Date.now() - since) / 1000).toFixed(1)} s`;

describe('fault injection', () => {
  it('should lose nothing and repeat no effect when worker processes are SIGKILLed during a burst of revocations', async (t) => {
    const started = Date.now();
    t.diagnostic(
      `seed ${config.seed}; ${config.tokens} tokens × ${config.receivers} receivers, ${config.workerKills} kills`,
    );
    const receivers = await addReceivers(shared, 'burst', config.receivers);
    const tokenIds = (await issueTokens(shared, 'usr_burst', config.tokens, receivers, '1h')).map((x) => x.tokenId);
    for (const id of tokenIds) sharedWorkflowIds.add(tokenWorkflowId(id));

    // Kill points are counts of events accepted so far, so that every kill lands mid-propagation.
    const expected = tokenIds.length * receivers.length;
    const accepted = () => receivers.reduce((n, r) => n + acceptedEvents(r.receiver), 0);
    const killPoints = Array.from({ length: config.workerKills }, () =>
      Math.ceil(expected * (0.05 + 0.85 * random())),
    ).sort((a, b) => a - b);
    const revoking = inLanes(tokenIds, 4, (tokenId) => shared.warden.revoke({ tokenId, reason: 'burst drill' }));
    const kills: string[] = [];
    for (const point of killPoints) {
      await waitUntil(() => accepted() >= point, `${point} of ${expected} events accepted`, SETTLE_MS);
      const running = sharedFleet.running();
      const victim = running[Math.floor(random() * running.length)]!;
      await victim.kill();
      kills.push(`${victim.name} at ${accepted()}/${expected}`);
      // The other process keeps working while the replacement starts.
      await sharedFleet.add(1);
    }

    const outcomes = await revoking;
    assert.deepEqual(
      outcomes.filter((o) => !o.changed || o.status !== 'revoked' || !o.workflowSignalled),
      [],
      'every revoke killed its token and told its workflow',
    );
    await workflowResults(shared.client, tokenIds, SETTLE_MS);
    assert.deepEqual(await everyProblem(shared, tokenIds, receivers), []);
    assert.deepEqual(sharedFleet.crashed(), [], 'no worker process ended on its own');
    t.diagnostic(
      `${expected} events delivered in ${seconds(started)}; kills: ${kills.join(', ')}; ` +
        `${receivers.reduce((n, r) => n + repeats(r.receiver), 0)} repeated request(s) of an event`,
    );
  });

  it('should deliver every event within seconds of a receiver coming back after refusing connections', async (t) => {
    const started = Date.now();
    const receivers = await addReceivers(shared, 'outage', 2);
    const [steady, flaky] = receivers as [Endpoint, Endpoint];
    const tokenIds = (await issueTokens(shared, 'usr_outage', 10, receivers, '1h')).map((x) => x.tokenId);
    for (const id of tokenIds) sharedWorkflowIds.add(tokenWorkflowId(id));

    await flaky.receiver.goDown();
    const downSince = Date.now();
    await inLanes(tokenIds, 4, (tokenId) => shared.warden.revoke({ tokenId, reason: 'outage drill' }));
    await waitUntil(
      () => tokenIds.every((id) => steady.receiver.requestsFor(id).length > 0),
      'every event at the receiver that is up',
      SETTLE_MS,
    );
    await waitUntil(
      async () => {
        const { rows } = await shared.sql.query(
          'SELECT count(*)::int AS n FROM delivery WHERE token_id = ANY($1) AND receiver_id = $2 AND attempts >= 2',
          [tokenIds, flaky.id],
        );
        return rows[0].n === tokenIds.length;
      },
      'every delivery to the receiver that is down to have been tried twice',
      SETTLE_MS,
    );
    // The outage lasts receiverDownMs in all: the length of the fault, not a wait for an outcome.
    await sleep(Math.max(0, downSince + config.receiverDownMs - Date.now()));
    assert.equal(flaky.receiver.requests.length, 0);
    await flaky.receiver.comeBack();
    const back = Date.now();
    await waitUntil(
      () => tokenIds.every((id) => flaky.receiver.requestsFor(id).length > 0),
      'every event at the receiver that came back',
      SETTLE_MS,
      20,
    );
    const lagMs = Date.now() - back;
    assert.ok(lagMs <= RETURN_BOUND_MS, `every event arrived ${lagMs} ms after the receiver came back`);

    await workflowResults(shared.client, tokenIds, SETTLE_MS);
    assert.deepEqual(await everyProblem(shared, tokenIds, receivers), []);
    t.diagnostic(
      `receiver down ${config.receiverDownMs / 1000} s; all ${tokenIds.length} events there ${lagMs} ms after its return; ${seconds(started)}`,
    );
  });

  it('should kill once and send one event per receiver when concurrent revokes race the expiry', async (t) => {
    const receivers = await addReceivers(shared, 'race', config.receivers);
    const tokens = await issueTokens(shared, 'usr_race', 3, receivers, '3s');
    for (const x of tokens) sharedWorkflowIds.add(tokenWorkflowId(x.tokenId));

    // The racers' calls start spread over 100 ms, a window placed at random around the expiry instant.
    const settled = await Promise.all(
      tokens.map(async (token) => {
        const windowStart = Date.parse(token.expiresAt) - 100 * random();
        return Promise.allSettled(
          Array.from({ length: config.racers }, async (_, i) => {
            await sleep(Math.max(0, windowStart + (i * 100) / config.racers - Date.now()));
            return shared.warden.revoke({ tokenId: token.tokenId, reason: `racer ${i}` });
          }),
        );
      }),
    );
    const tokenIds = tokens.map((x) => x.tokenId);
    const results = await workflowResults(shared.client, tokenIds, SETTLE_MS);
    const facts = await readFacts(shared.pool, tokenIds);
    const winners: string[] = [];
    tokenIds.forEach((tokenId, k) => {
      const failed = settled[k]!.filter((s) => s.status === 'rejected');
      assert.deepEqual(failed, [], `no revoke of ${tokenId} failed`);
      const outcomes = settled[k]!.map((s) => (s as PromiseFulfilledResult<RevokeOutcome>).value);
      const factsOf = (o: RevokeOutcome) => [o.status, o.revokedAt, o.revokedBy, o.reason];
      assert.equal(new Set(outcomes.map((o) => JSON.stringify(factsOf(o)))).size, 1, 'every caller sees one death');
      const changed = outcomes.filter((o) => o.changed).length;
      assert.ok(changed <= 1, `${changed} callers report that they killed ${tokenId}`);
      if (outcomes[0]!.status === 'revoked') assert.equal(changed, 1, 'a revocation is some caller’s');
      assert.equal(results[k]!.status, facts[k]!.status);
      winners.push(`${facts[k]!.status}${changed ? ` (${outcomes.find((o) => o.changed)!.reason})` : ''}`);
    });
    assert.deepEqual(await everyProblem(shared, tokenIds, receivers), []);
    t.diagnostic(`${config.racers} racers per token; outcome per token: ${winners.join(', ')}`);
  });

  it('should leave no half-kill and report every failed call as failed when PostgreSQL is killed -9 mid-burst', async (t) => {
    const started = Date.now();
    const defer = afterThisTest(t);
    const postgres = await OwnPostgres.start();
    defer(() => postgres.stop());
    const ctx = await TestContext.create('fault_pg', TIMING, { databaseUrl: postgres.databaseUrl });
    defer(() => ctx.close());
    scan.addMasterKey('the PostgreSQL-crash context', ctx.settings.masterKey!);
    const fleet = startFleet(ctx, defer);
    await fleet.add(2);
    const receivers = await addReceivers(ctx, 'pg', config.receivers, defer);
    const tokenIds = (await issueTokens(ctx, 'usr_pg', 36, receivers, '1h')).map((x) => x.tokenId);
    for (const id of tokenIds) sharedWorkflowIds.add(tokenWorkflowId(id));
    const [beforeCrash, whileDown, afterRestart, viaCli] = [
      tokenIds.slice(0, 12),
      tokenIds.slice(12, 20),
      tokenIds.slice(20, 32),
      tokenIds.slice(32),
    ] as [string[], string[], string[], string[]];

    interface Call {
      tokenId: string;
      outcome?: RevokeOutcome;
      error?: string;
    }
    const calls: Call[] = [];
    const revoke = async (tokenId: string): Promise<Call> => {
      const call: Call = { tokenId };
      try {
        call.outcome = await ctx.warden.revoke({ tokenId, reason: 'database crash drill' });
      } catch (err) {
        call.error = err instanceof Error ? err.message : String(err);
        errorOutput.push(call.error);
      }
      calls.push(call);
      return call;
    };

    // The crash lands while half of the first calls are still in flight.
    const first = inLanes(beforeCrash, 4, revoke);
    await waitUntil(() => calls.length >= beforeCrash.length / 2, 'half of the first revocations', SETTLE_MS, 1);
    await postgres.crash();
    await first;
    const duringOutage = await inLanes(whileDown, 4, revoke);
    const cliRuns: CliRun[] = await inLanes(viaCli, 2, (tokenId) =>
      runCli(['revoke', tokenId, '--reason', 'database crash drill', '--json'], ctx.childEnv()),
    );
    await postgres.restart();
    await inLanes(afterRestart, 4, revoke);

    assert.deepEqual(
      duringOutage.filter((c) => c.outcome),
      [],
      'a revocation while the database is down is reported as failed',
    );
    for (const run of cliRuns) {
      errorOutput.push(run.stdout, run.stderr);
      assert.notEqual(run.code, 0, `the CLI reports the failure: ${run.stdout}`);
      assert.equal(run.stdout, '', 'no outcome printed for a failed revocation');
      assert.match(run.stderr, /^tokenwarden: .+\n$/, 'one line of error output');
    }
    assert.deepEqual(
      calls.filter((c) => afterRestart.includes(c.tokenId) && !c.outcome),
      [],
      'revocations succeed once the database is back',
    );
    // A success is a durable kill: the store holds that very kill, not a later one by the workflow.
    const facts = await readFacts(ctx.pool, tokenIds);
    const { rows } = await ctx.sql.query('SELECT id, revoked_at FROM token WHERE id = ANY($1)', [tokenIds]);
    const revokedAt = new Map(rows.map((r) => [r.id as string, (r.revoked_at as Date | null)?.toISOString()]));
    const lost = calls.filter((c) => c.outcome && revokedAt.get(c.tokenId) !== c.outcome.revokedAt);
    assert.deepEqual(lost, [], 'every reported revocation survived the crash as reported');
    assert.deepEqual([...facts.flatMap(halfKillProblems), ...facts.flatMap(auditProblems)], []);

    // Every call sent its signal, so every token dies and propagates, failed calls included.
    await workflowResults(ctx.client, tokenIds, SETTLE_MS);
    assert.deepEqual(await everyProblem(ctx, tokenIds, receivers), []);
    assert.deepEqual(fleet.crashed(), [], 'no worker process ended on its own');
    await scan.searchTables(ctx.sql, 'the PostgreSQL-crash schema');
    const failed = calls.filter((c) => c.error).length + cliRuns.length;
    t.diagnostic(
      `${calls.filter((c) => c.outcome).length} revocations reported done, ${failed} reported failed ` +
        `(${cliRuns.length} by the CLI), ${calls.filter((c) => beforeCrash.includes(c.tokenId) && c.error).length} cut by the crash; ${seconds(started)}`,
    );
  });

  it('should fire every expiry timer when the Temporal server restarts while the tokens sleep', async (t) => {
    const started = Date.now();
    const defer = afterThisTest(t);
    const temporal = await OwnTemporal.start();
    defer(() => temporal.stop());
    const ctx = await TestContext.create('fault_temporal', TIMING, {
      temporalAddress: temporal.address,
      namespace: temporal.namespace,
    });
    defer(() => ctx.close());
    scan.addMasterKey('the Temporal-restart context', ctx.settings.masterKey!);
    const fleet = startFleet(ctx, defer);
    await fleet.add(1);
    const receivers = await addReceivers(ctx, 'restart', 2, defer);
    // Staggered expiries: some fall due while the server is down, the rest after it is back.
    const tokens = await inLanes(Array.from({ length: 10 }), 4, async (_, i) => {
      const issued = await ctx.warden.issue({
        subject: 'usr_restart',
        receivers: receivers.map((r) => r.id),
        ttl: `${6_000 + i * 400}ms`,
      });
      scan.addToken(issued.tokenId, issued.token);
      return issued;
    });
    const tokenIds = tokens.map((x) => x.tokenId);
    await waitUntil(
      async () => {
        for (const id of tokenIds) {
          const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(id)));
          if (!history.events?.some((e) => e.timerStartedEventAttributes)) return false;
        }
        return true;
      },
      'every token workflow asleep on its expiry timer',
      SETTLE_MS,
      200,
    );

    await temporal.shutDown();
    const halfway = Math.max(...tokens.slice(0, tokens.length / 2).map((x) => Date.parse(x.expiresAt)));
    // Down until half of the timers are overdue: the length of the fault, not a wait for an outcome.
    await sleep(Math.max(0, halfway + 500 - Date.now()));
    await temporal.restart();

    const results = await workflowResults(ctx.client, tokenIds, SETTLE_MS);
    assert.deepEqual(
      results.filter((r) => r.status !== 'expired'),
      [],
      'every token expired by its own timer (no reconciler runs here)',
    );
    assert.deepEqual(await everyProblem(ctx, tokenIds, receivers), []);
    assert.deepEqual(fleet.crashed(), [], 'the worker process survived the restart');
    await scan.searchHistories(ctx.client, tokenIds.map(tokenWorkflowId));
    await scan.searchTables(ctx.sql, 'the Temporal-restart schema');
    t.diagnostic(`${tokenIds.length} timers fired across the restart; ${seconds(started)}`);
  });

  it('should leave no raw token or signing secret in any history, log, error output or table', async (t) => {
    await scan.searchHistories(shared.client, sharedWorkflowIds);
    await scan.searchTables(shared.sql, 'the shared schema');
    for (const fleet of fleets) {
      for (const worker of fleet.processes) scan.searchOutput(worker.name, worker.output.join('\n'));
    }
    scan.searchOutput('library errors and CLI output', errorOutput.join('\n'));
    assert.deepEqual(scan.hits(), []);
    t.diagnostic(scan.summary());
  });
});
