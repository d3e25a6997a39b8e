/**
 * `node dist/bench/issue-rate.js [--tokens N] [--concurrency 1,8] [--slot S] [--baseline-dist DIR]`
 * against a running stack (`eval "$(tokenwarden env)"` first): the issue rate next to the Temporal
 * floor beneath it, in one process against one server. Each series runs S operations at a time, in
 * turn with the others, until it has run N: load from elsewhere on the machine hits every series alike.
 *   store      the store part of issue alone (insertToken)
 *   rawStart   workflow.start with the id, queue and input only
 *   fullStart  the start issue sends: plus search attributes, static summary and details
 *   issue      TokenWarden.issue, end to end
 * `--baseline-dist` adds baselineStore and baselineIssue: the same two from another build's dist/
 * folder (e.g. the previous commit's, built elsewhere), in a schema migrated by that build.
 * Everything runs in fresh schemas (dropped at the end), on a task queue no worker polls: the issue
 * path alone, not a worker's load. Prints a table, then one JSON line.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { TokenWarden } from '../client/index.js';
import { loadSettings, type Settings } from '../common/config.js';
import * as db from '../common/db.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { WORKFLOW_TYPE, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import { connectTemporal, startTokenWorkflow, tokenWorkflowInput } from '../common/temporal.js';
import { summarize, type LatencySummary } from './stats.js';
import { timeStatements } from './statement-timer.js';

const say = (msg: string) => process.stderr.write(`[bench:issue] ${msg}\n`);

/** What the bench uses of a build: this one, or the baseline's dist/ folder. */
interface Build {
  TokenWarden: typeof TokenWarden;
  db: typeof db;
  store: typeof store;
}

interface Target {
  build: Build;
  schema: string;
  warden: TokenWarden;
  pool: db.StorePool;
}

async function openTarget(build: Build, base: Settings, label: string): Promise<Target> {
  const schema = `bench_issue_${label}_${randomBytes(4).toString('hex')}`;
  await build.db.migrate(base.databaseUrl, schema);
  const warden = await build.TokenWarden.connect({ ...base, databaseSchema: schema });
  const pool = build.db.createPool(base.databaseUrl, schema);
  await build.store.insertReceiver(pool, {
    id: 'bench',
    url: 'http://127.0.0.1:1/',
    secretCiphertext: Buffer.from('x'),
    secretKeyId: 'k',
  });
  return { build, schema, warden, pool };
}

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

const ISSUED_SUBJECT = 'usr_bench_issue';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      tokens: { type: 'string', default: '300' },
      concurrency: { type: 'string', default: '1,8' },
      slot: { type: 'string', default: '50' },
      'baseline-dist': { type: 'string' },
    },
  });
  const tokens = Number(values.tokens);
  const slot = Number(values.slot);
  const levels = values.concurrency.split(',').map(Number);

  // One task queue no worker polls, for every build: the workflows started here never run.
  const env = loadSettings();
  const base: Settings = {
    ...env,
    temporal: { ...env.temporal, taskQueue: `bench-issue-${randomBytes(4).toString('hex')}` },
  };
  const current = await openTarget({ TokenWarden, db, store }, base, 'current');
  const targets = [current];
  let baseline: Target | undefined;
  if (values['baseline-dist']) {
    const dir = path.resolve(values['baseline-dist']);
    const load = async <T>(file: string) => (await import(pathToFileURL(path.join(dir, file)).href)) as T;
    const build: Build = {
      TokenWarden: (await load<{ TokenWarden: typeof TokenWarden }>('client/index.js')).TokenWarden,
      db: await load<typeof db>('common/db.js'),
      store: await load<typeof store>('common/store/index.js'),
    };
    baseline = await openTarget(build, base, 'baseline');
    targets.push(baseline);
  }
  const client = await connectTemporal(base);
  const taskQueue = base.temporal.taskQueue;
  // A record shaped like the one issue starts with; only the id changes per start.
  const template = await store.insertToken(current.pool, newToken());

  const issueVia = (t: Target) => () =>
    t.warden.issue({ subject: ISSUED_SUBJECT, receivers: ['bench'], scopes: ['read'], ttl: '1h' });
  const ops: Record<string, () => Promise<unknown>> = {
    store: () => store.insertToken(current.pool, newToken()),
    rawStart: () => {
      const token = { ...template, id: newTokenId() };
      return client.workflow.start(WORKFLOW_TYPE.tokenLifecycle, {
        workflowId: tokenWorkflowId(token.id),
        taskQueue,
        args: [tokenWorkflowInput(token, base.timing)],
      });
    },
    fullStart: () => startTokenWorkflow(client, { ...template, id: newTokenId() }, taskQueue, base.timing),
    issue: issueVia(current),
    ...(baseline
      ? {
          baselineStore: () => baseline.build.store.insertToken(baseline.pool, newToken()),
          baselineIssue: issueVia(baseline),
        }
      : {}),
  };
  const names = Object.keys(ops);

  // Warm-up: connections opened, the server's caches filled.
  for (const name of names) for (let i = 0; i < 20; i++) await ops[name]!();

  const spent: Record<string, number> = {};
  const latencies: Record<string, number[]> = {};
  for (const c of levels) {
    for (let done = 0; done < tokens; done += slot) {
      const count = Math.min(slot, tokens - done);
      for (const name of names) {
        const key = `${name}@${c}`;
        const samples = (latencies[key] ??= []);
        let next = 0;
        const t0 = performance.now();
        await Promise.all(
          Array.from({ length: Math.min(c, count) }, async () => {
            while (next++ < count) {
              const s = performance.now();
              await ops[name]!();
              samples.push(performance.now() - s);
            }
          }),
        );
        spent[key] = (spent[key] ?? 0) + (performance.now() - t0);
      }
    }
    say(`concurrency ${c} done`);
  }

  // The store part's round trips, as its caller sees them.
  const statementsOf = async (t: Target) => {
    const sent: string[] = [];
    await t.build.store.insertToken(
      timeStatements(t.pool, (s) => sent.push(s)),
      newToken(),
    );
    return sent;
  };
  const storeStatements = await statementsOf(current);
  const baselineStatements = baseline ? await statementsOf(baseline) : undefined;

  // After close (which writes the marks still pending), every issued token is marked started.
  const unmarked: Record<string, number> = {};
  for (const t of targets) {
    await t.warden.close();
    const { rows } = await t.pool.query(
      `SELECT count(*)::int AS n FROM ${t.pool.tables.token} WHERE subject = $1 AND workflow_started_at IS NULL`,
      [ISSUED_SUBJECT],
    );
    unmarked[t === current ? 'current' : 'baseline'] = rows[0].n as number;
    await t.pool.query(`DROP SCHEMA ${db.quoteIdent(t.schema)} CASCADE`);
    await t.pool.end();
  }
  await client.connection.close();

  const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;
  const series: Record<string, { ratePerS: number; latency: LatencySummary }> = {};
  for (const key of Object.keys(spent)) {
    series[key] = { ratePerS: round(tokens / (spent[key]! / 1000)), latency: summarize(latencies[key]!) };
  }
  const table = levels.map((c) => {
    const rate = (name: string) => series[`${name}@${c}`]?.ratePerS ?? NaN;
    const p50 = (name: string) => series[`${name}@${c}`]?.latency.p50Ms ?? NaN;
    return {
      concurrency: c,
      rawStartPerS: rate('rawStart'),
      fullStartPerS: rate('fullStart'),
      // What the search attributes and the static summary/details cost a start, in throughput.
      attributeCost: round(1 - rate('fullStart') / rate('rawStart'), 3),
      storePerS: rate('store'),
      issuePerS: rate('issue'),
      issueVsRawStart: round(rate('issue') / rate('rawStart'), 2),
      issueP50Ms: p50('issue'),
      ...(baseline
        ? {
            baselineStorePerS: rate('baselineStore'),
            baselineIssuePerS: rate('baselineIssue'),
            baselineIssueVsRawStart: round(rate('baselineIssue') / rate('rawStart'), 2),
            baselineIssueP50Ms: p50('baselineIssue'),
          }
        : {}),
    };
  });
  console.table(table);
  console.log(
    JSON.stringify({
      bench: 'issue-rate',
      tokens,
      slot,
      loadAverage: os.loadavg().map((l) => round(l, 2)),
      storeStatements,
      ...(baselineStatements ? { baselineStatements } : {}),
      issuedUnmarkedAfterClose: unmarked,
      table,
      series,
    }),
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
