/**
 * `node dist/bench/expiry-sweep.js [--tokens 1000] [--sizes 50,100,200,500,1000] [--sweepers 1]
 * [--receivers 1] [--rounds 3]`: how fast the store records a wave of expiries dead in batches (the expiry sweep,
 * worker/expiry-sweeper.ts), for each batch size, against one kill per token 8 at a time (what the
 * workflows' activities do, Temporal left out). Needs DATABASE_URL (e.g. the dev stack's, from
 * `tokenwarden env`: PostgreSQL as a user runs it, fsync on); works in a fresh schema it drops after.
 * Each wave: `--tokens` bare rows (as the issuer writes them), whose expiries are then moved into the
 * last 2 seconds at once; the timer starts after that. The series take turns, `--rounds` times, so a
 * burst of other load on the machine hits them alike; each series reports its median round. Prints a
 * line per round and a final JSON line.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { createPool, migrate, quoteIdent, type StorePool } from '../common/db.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { summarize } from './stats.js';

const say = (msg: string) => process.stderr.write(`[bench:expiry-sweep] ${msg}\n`);
const INSERT_CONCURRENCY = 8;
/** How many kills a busy worker runs at once in the one-kill-per-token series. */
const SINGLE_KILL_CONCURRENCY = 8;

function options() {
  const { values } = parseArgs({
    options: {
      tokens: { type: 'string', default: '1000' },
      sizes: { type: 'string', default: '50,100,200,500,1000' },
      sweepers: { type: 'string', default: '1' },
      receivers: { type: 'string', default: '1' },
      rounds: { type: 'string', default: '3' },
    },
  });
  const int = (text: string, name: string) => {
    if (!/^\d+$/.test(text) || Number(text) < 1) throw new Error(`${name} must be an integer ≥ 1, got ${text}`);
    return Number(text);
  };
  return {
    tokens: int(values.tokens, '--tokens'),
    sizes: values.sizes.split(',').map((s) => int(s.trim(), '--sizes')),
    sweepers: int(values.sweepers, '--sweepers'),
    receivers: int(values.receivers, '--receivers'),
    rounds: int(values.rounds, '--rounds'),
  };
}

async function inParallel<T>(items: T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/** Writes the wave's rows, then moves every expiry into the last 2 seconds in one statement. */
async function expiredWave(pool: StorePool, tokens: number, receivers: string[]): Promise<string[]> {
  const ids = Array.from({ length: tokens }, () => newTokenId());
  await inParallel(ids, INSERT_CONCURRENCY, async (tokenId) => {
    await store.insertToken(pool, {
      tokenId,
      credentialId: newCredentialId(),
      subject: 'usr_bench',
      name: null,
      scopes: [],
      receivers,
      ttlMs: 3_600_000,
      secretHash: randomBytes(32),
    });
  });
  const t = pool.tables;
  await pool.query(
    `UPDATE ${t.token} SET issued_at = now() - interval '1 hour',
            expires_at = now() - (random() * 2000) * interval '1 millisecond'
      WHERE id = ANY($1)`,
    [ids],
  );
  // Every series starts from tables in the same state.
  await pool.query(`VACUUM ANALYZE ${t.token}`);
  await pool.query(`VACUUM ANALYZE ${t.credential}`);
  return ids;
}

/** Checks the wave was recorded exactly once per token: status, outbox rows and audit events. */
async function checkWave(pool: StorePool, ids: string[], receivers: number): Promise<void> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `SELECT (SELECT count(*)::int FROM ${t.token} WHERE id = ANY($1) AND status = 'expired' AND revoked_at = expires_at) AS dead,
            (SELECT count(*)::int FROM ${t.delivery} WHERE token_id = ANY($1)) AS outbox,
            (SELECT count(*)::int FROM ${t.audit_event} WHERE token_id = ANY($1) AND kind = 'token.expired') AS audit`,
    [ids],
  );
  const { dead, outbox, audit } = rows[0] as { dead: number; outbox: number; audit: number };
  if (dead !== ids.length || outbox !== ids.length * receivers || audit !== ids.length) {
    throw new Error(`wave not recorded exactly once: ${JSON.stringify({ dead, outbox, audit, tokens: ids.length })}`);
  }
}

async function main(): Promise<void> {
  const opts = options();
  const databaseUrl = process.env.DATABASE_URL;
  if (!databaseUrl) throw new Error('DATABASE_URL is not set (e.g. eval "$(node bin/tokenwarden.js env)")');
  const schema = `bench_sweep_${randomBytes(4).toString('hex')}`;
  await migrate(databaseUrl, schema);
  const pool = createPool(databaseUrl, schema, opts.sweepers + INSERT_CONCURRENCY);
  const admin = new pg.Client({ connectionString: databaseUrl });
  await admin.connect();
  const loadBefore = os.loadavg()[0]!;
  const started = Date.now();
  try {
    const settings = (
      await admin.query(
        `SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'server_version')`,
      )
    ).rows as { name: string; setting: string }[];
    const receivers = Array.from({ length: opts.receivers }, (_, i) => `bench-${i}`);
    for (const id of receivers)
      await store.insertReceiver(pool, {
        id,
        url: 'http://127.0.0.1:1/',
        secretCiphertext: Buffer.from('x'),
        secretKeyId: 'k',
      });

    interface Round {
      totalMs: number;
      /** One latency per kill (one kill per token) or per batch statement. */
      statements: number[];
    }
    const singleKills = async (ids: string[]): Promise<Round> => {
      const statements: number[] = [];
      const t0 = performance.now();
      await inParallel(ids, SINGLE_KILL_CONCURRENCY, async (tokenId) => {
        const k0 = performance.now();
        await store.killToken(pool, {
          tokenId,
          reason: 'expired',
          actor: 'system',
          initiatingEntity: 'system',
          onlyIfExpired: true,
        });
        statements.push(performance.now() - k0);
      });
      return { totalMs: performance.now() - t0, statements };
    };
    const batches = (size: number) => async (): Promise<Round> => {
      const statements: number[] = [];
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: opts.sweepers }, async () => {
          for (;;) {
            const b0 = performance.now();
            const { killed, failed } = await store.killExpiredTokens(pool, { limit: size });
            statements.push(performance.now() - b0);
            if (failed.length > 0) throw new Error(`kills failed: ${JSON.stringify(failed[0])}`);
            if (killed.length < size) break;
          }
        }),
      );
      return { totalMs: performance.now() - t0, statements };
    };
    const plans: { name: string; batchSize: number | null; run: (ids: string[]) => Promise<Round> }[] = [
      { name: `one kill per token, ${SINGLE_KILL_CONCURRENCY} at a time`, batchSize: null, run: singleKills },
      ...opts.sizes.map((size) => ({
        name: `batches of ${size}, ${opts.sweepers} sweeper(s)`,
        batchSize: size,
        run: batches(size),
      })),
    ];
    const rounds = new Map<string, Round[]>(plans.map((p) => [p.name, []]));
    for (let round = 1; round <= opts.rounds; round++) {
      for (const plan of plans) {
        const ids = await expiredWave(pool, opts.tokens, receivers);
        const result = await plan.run(ids);
        await checkWave(pool, ids, opts.receivers);
        rounds.get(plan.name)!.push(result);
        say(
          `round ${round}: ${plan.name}: ${Math.round(result.totalMs)} ms, ` +
            `${Math.round(ids.length / (result.totalMs / 1000))} tokens/s, slowest statement ${Math.round(Math.max(...result.statements))} ms`,
        );
      }
    }
    const series = plans.map((plan) => {
      const runs = [...rounds.get(plan.name)!].sort((a, b) => a.totalMs - b.totalMs);
      const median = runs[Math.floor((runs.length - 1) / 2)]!;
      return {
        series: plan.name,
        batchSize: plan.batchSize,
        medianTotalMs: Math.round(median.totalMs),
        tokensPerS: Math.round(opts.tokens / (median.totalMs / 1000)),
        roundsTotalMs: rounds.get(plan.name)!.map((r) => Math.round(r.totalMs)),
        statementMs: summarize(rounds.get(plan.name)!.flatMap((r) => r.statements)),
      };
    });
    const result = {
      bench: 'expiry-sweep',
      date: new Date().toISOString(),
      tokens: opts.tokens,
      receiversPerToken: opts.receivers,
      sweepers: opts.sweepers,
      rounds: opts.rounds,
      series,
      postgres: Object.fromEntries(settings.map((s) => [s.name, s.setting])),
      node: process.version,
      cpus: os.cpus().length,
      loadAverage1m: { before: loadBefore, after: os.loadavg()[0]! },
      tookS: Math.round((Date.now() - started) / 1000),
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await pool.end();
    await admin.query(`DROP SCHEMA ${quoteIdent(schema)} CASCADE`).catch(() => {});
    await admin.end();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
