/**
 * `node dist/bench/issue-rate.js [--tokens N] [--concurrency 1,8] [--rounds R]` against a running
 * stack (`eval "$(tokenwarden env)"` first): the issue rate next to the Temporal floor beneath it,
 * measured in the same run on the same server, rounds interleaved so drift hits every series alike.
 *   store     the store part of issue alone (insertToken)
 *   raw start workflow.start with the id, queue and input only
 *   full start the start issue sends: plus search attributes, static summary and details
 *   issue     TokenWarden.issue, end to end
 * Everything runs in a fresh schema, on a task queue no worker polls (the issue path alone, not a
 * worker's load); the schema is dropped at the end. Prints a table, then one JSON line.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { TokenWarden } from '../client/index.js';
import { loadSettings, type Settings } from '../common/config.js';
import { createPool, migrate, quoteIdent } from '../common/db.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { WORKFLOW_TYPE, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { connectTemporal, startTokenWorkflow, tokenWorkflowInput } from '../common/temporal.js';
import { summarize, type LatencySummary } from './stats.js';
import { timeStatements } from './statement-timer.js';

const say = (msg: string) => process.stderr.write(`[bench:issue] ${msg}\n`);
const SERIES = ['store', 'rawStart', 'fullStart', 'issue'] as const;
type Series = (typeof SERIES)[number];

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      tokens: { type: 'string', default: '300' },
      concurrency: { type: 'string', default: '1,8' },
      rounds: { type: 'string', default: '3' },
    },
  });
  const tokens = Number(values.tokens);
  const rounds = Number(values.rounds);
  const levels = values.concurrency.split(',').map(Number);

  const base = loadSettings();
  const schema = `bench_issue_${randomBytes(4).toString('hex')}`;
  await migrate(base.databaseUrl, schema);
  const settings: Settings = {
    ...base,
    databaseSchema: schema,
    temporal: { ...base.temporal, taskQueue: `bench-issue-${randomBytes(4).toString('hex')}` },
  };
  const warden = await TokenWarden.connect(settings);
  const client = await connectTemporal(settings);
  const pool = createPool(settings.databaseUrl, schema);
  await store.insertReceiver(pool, {
    id: 'bench',
    url: 'http://127.0.0.1:1/',
    secretCiphertext: Buffer.from('x'),
    secretKeyId: 'k',
  });
  const newToken = (): store.NewToken => ({
    tokenId: newTokenId(),
    credentialId: newCredentialId(),
    subject: 'usr_bench',
    name: null,
    scopes: ['read'],
    receivers: ['bench'],
    ttlMs: 3_600_000,
    secretHash: randomBytes(32),
  });
  // A record shaped like the one issue starts with; only the id changes per start.
  const template = await store.insertToken(pool, newToken());
  const taskQueue = settings.temporal.taskQueue;

  const ops: Record<Series, () => Promise<unknown>> = {
    store: () => store.insertToken(pool, newToken()),
    rawStart: () => {
      const token = { ...template, id: newTokenId() };
      return client.workflow.start(WORKFLOW_TYPE.tokenLifecycle, {
        workflowId: tokenWorkflowId(token.id),
        taskQueue,
        args: [tokenWorkflowInput(token, settings.timing)],
      });
    },
    fullStart: () => startTokenWorkflow(client, { ...template, id: newTokenId() }, taskQueue, settings.timing),
    issue: () => warden.issue({ subject: 'usr_bench_issue', receivers: ['bench'], scopes: ['read'], ttl: '1h' }),
  };

  async function run(op: () => Promise<unknown>, concurrency: number): Promise<{ rate: number; latencies: number[] }> {
    const latencies: number[] = [];
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (next++ < tokens) {
          const s = performance.now();
          await op();
          latencies.push(performance.now() - s);
        }
      }),
    );
    return { rate: tokens / ((performance.now() - t0) / 1000), latencies };
  }

  // Warm-up: connections opened, the server's caches filled.
  for (const series of SERIES) for (let i = 0; i < 20; i++) await ops[series]();

  const rates: Record<string, number[]> = {};
  const latencies: Record<string, number[]> = {};
  for (let round = 1; round <= rounds; round++) {
    for (const c of levels) {
      for (const series of SERIES) {
        const key = `${series}@${c}`;
        const result = await run(ops[series], c);
        (rates[key] ??= []).push(result.rate);
        (latencies[key] ??= []).push(...result.latencies);
        say(`round ${round} ${key}: ${result.rate.toFixed(1)}/s`);
      }
    }
  }

  // The store part's round trips, as its caller sees them.
  const statements: string[] = [];
  await store.insertToken(
    timeStatements(pool, (s) => statements.push(s)),
    newToken(),
  );

  await warden.close(); // writes any started marks still pending
  const { rows } = await pool.query(
    `SELECT count(*)::int AS n FROM ${pool.tables.token} WHERE subject = 'usr_bench_issue' AND workflow_started_at IS NULL`,
  );
  const unmarked = rows[0].n as number;
  await pool.query(`DROP SCHEMA ${quoteIdent(schema)} CASCADE`);
  await pool.end();
  await client.connection.close();

  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const result: Record<string, { ratePerS: number; rates: number[]; latency: LatencySummary }> = {};
  for (const key of Object.keys(rates)) {
    result[key] = {
      ratePerS: Math.round(median(rates[key]!) * 10) / 10,
      rates: rates[key]!.map((r) => Math.round(r * 10) / 10),
      latency: summarize(latencies[key]!),
    };
  }
  const table = levels.map((c) => {
    const r = (s: Series) => result[`${s}@${c}`]!;
    return {
      concurrency: c,
      storePerS: r('store').ratePerS,
      rawStartPerS: r('rawStart').ratePerS,
      fullStartPerS: r('fullStart').ratePerS,
      issuePerS: r('issue').ratePerS,
      issueVsRawStart: Math.round((r('issue').ratePerS / r('rawStart').ratePerS) * 100) / 100,
      attributeCostOfStart: Math.round((1 - r('fullStart').ratePerS / r('rawStart').ratePerS) * 1000) / 1000,
      issueP50Ms: r('issue').latency.p50Ms,
      rawStartP50Ms: r('rawStart').latency.p50Ms,
      fullStartP50Ms: r('fullStart').latency.p50Ms,
      storeP50Ms: r('store').latency.p50Ms,
    };
  });
  console.table(table);
  console.log(
    JSON.stringify({
      bench: 'issue-rate',
      tokens,
      rounds,
      loadAverage: os.loadavg().map((l) => Math.round(l * 100) / 100),
      storeStatements: statements,
      issuedRowsUnmarkedAfterClose: unmarked,
      table,
      series: result,
    }),
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
