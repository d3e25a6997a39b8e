/**
 * `npm run bench:audit [-- --deaths N --receivers R --rounds K --explain]`: the audit trail's read paths on an
 * embedded PostgreSQL (or DATABASE_URL), against floors measured in the same run on the same rows.
 *  (a) export: `exportDeaths` (the server-side cursor, the records assembled from the hash chain)
 *      written as JSON lines, against a bare SELECT over the same rows: the dead tokens, their
 *      evidence events and their delivery rows, each row once, unsorted, through the same kind of
 *      cursor and fetch size, nothing assembled. Deaths/s and audit events/s, ratio, and the exporter's heap high-water mark.
 *  (b) verify and (c) the payload codec's cost: see the marked places below.
 * N deaths (default 20,000), each with R receivers (default 3) settled as the store settles them
 * (a retried acknowledgement, an acknowledgement, a probe's verification), so each token's chain holds
 * the kill, its deliveries and its completion. Human lines on stderr, a final JSON line on stdout.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { checkout, createPool, migrate, quoteIdent, type StorePool } from '../common/db.js';
import { DEATH_EXPORT_FETCH_SIZE, deathsQuery, EVIDENCE_KINDS, exportDeaths } from '../common/store/audit-export.js';
import { killTokens } from '../common/store/kill.js';
import { startEmbeddedPostgres } from '../dev/postgres.js';
import { freePort } from '../dev/processes.js';
import { mib } from './proc.js';
import { ratio } from './stats.js';

const say = (msg: string) => process.stderr.write(`[bench:audit] ${msg}\n`);

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      deaths: { type: 'string', default: '20000' },
      receivers: { type: 'string', default: '3' },
      rounds: { type: 'string', default: '3' },
      explain: { type: 'boolean', default: false },
    },
  });
  const deaths = Number(values.deaths);
  const receivers = Number(values.receivers);
  const rounds = Number(values.rounds);
  if (!Number.isInteger(deaths) || deaths < 1) throw new Error('--deaths: expected a positive integer');
  if (!Number.isInteger(receivers) || receivers < 1 || receivers > 3) throw new Error('--receivers: 1 to 3');
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds: expected a positive integer');
  return { deaths, receivers, rounds, explain: values.explain };
}

/** Deaths as the store writes them, set-based (the store's own functions), in chunks of one transaction each. */
async function seed(pool: StorePool, deaths: number, receiverCount: number): Promise<void> {
  const s = quoteIdent(pool.tables.schema);
  const receivers = ['retried', 'plain', 'probed'].slice(0, receiverCount);
  await pool.query(
    `INSERT INTO ${pool.tables.receiver} (id, url, secret_ciphertext, secret_key_id)
     SELECT r, 'https://' || r || '.example.com/events', '\\x00'::bytea, 'bench' FROM unnest($1::text[]) r`,
    [receivers],
  );
  const tag = randomBytes(4).toString('hex');
  const chunk = 1_000;
  for (let from = 0; from < deaths; from += chunk) {
    const to = Math.min(deaths, from + chunk) - 1;
    const { rows } = await pool.query(
      `SELECT (${s}.issue_token('tok_' || md5($1 || g), 'cred_' || md5($1 || 'c' || g), 'usr_' || (g % 500), NULL,
                                '{}', $4::text[], 86400000, sha256(convert_to($1 || g, 'UTF8')))).id
         FROM generate_series($2::int, $3::int) g`,
      [tag, from, to, receivers],
    );
    const ids = rows.map((r) => r.id as string);
    await killTokens(pool, ids, {
      reason: 'offboarded',
      actor: 'bench',
      initiatingEntity: 'admin',
      operationId: `bench-${tag}-${from}`,
    });
    const settle = async (receiverId: string, outcome: string, code: number | null, error: string | null) =>
      pool.query(
        `SELECT ${s}.record_delivery_attempt(d.event_id, d.receiver_id, $3, $4, $5)
           FROM ${pool.tables.delivery} d WHERE d.token_id = ANY ($1::text[]) AND d.receiver_id = $2`,
        [ids, receiverId, outcome, code, error],
      );
    if (receivers.includes('retried')) {
      await settle('retried', 'retryable', 503, 'HTTP 503');
      await settle('retried', 'delivered', 204, null);
    }
    if (receivers.includes('plain')) await settle('plain', 'delivered', 200, null);
    if (receivers.includes('probed')) {
      await settle('probed', 'acknowledged', 204, null);
      await settle('probed', 'verified', 200, null);
    }
    await pool.query(
      `WITH done AS (
         UPDATE ${pool.tables.token} SET propagation = 'complete', propagation_completed_at = now()
          WHERE id = ANY ($1::text[]) RETURNING id)
       SELECT ${s}.append_audit(id, 'complete:bench', 'propagation.complete', '{"forced":false}'::jsonb) FROM done`,
      [ids],
    );
    if ((to + 1) % 10_000 === 0 || to + 1 === deaths) say(`  ${to + 1} deaths written`);
  }
  await pool.query(`ANALYZE ${pool.tables.token}; ANALYZE ${pool.tables.audit_event}; ANALYZE ${pool.tables.delivery}`);
}

interface Pass {
  seconds: number;
  records: number;
  heapHighMiB: number;
}

/** The export as `tokenwarden audit export` writes it, minus stdout: each record as a JSON line. */
async function exportPass(pool: StorePool): Promise<Pass> {
  const heapBefore = process.memoryUsage().heapUsed;
  let heapHigh = 0;
  let records = 0;
  let bytes = 0;
  const started = performance.now();
  for await (const record of exportDeaths(pool, {})) {
    bytes += JSON.stringify(record).length + 1;
    if (++records % 1_000 === 0) heapHigh = Math.max(heapHigh, process.memoryUsage().heapUsed - heapBefore);
  }
  const seconds = (performance.now() - started) / 1000;
  if (bytes === 0 && records > 0) throw new Error('nothing written');
  return { seconds, records, heapHighMiB: mib(Math.max(0, heapHigh)) };
}

/** Statements read through cursors in one read-only transaction, FETCH by FETCH, rows discarded. */
async function cursorPass(
  pool: StorePool,
  statements: { sql: string; params: unknown[] }[],
): Promise<Pass & { rows: number }> {
  const client = await checkout(pool);
  let rows = 0;
  const started = performance.now();
  try {
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    for (const [i, { sql, params }] of statements.entries()) {
      await client.query(`DECLARE pass_${i} NO SCROLL CURSOR FOR ${sql}`, params);
      for (;;) {
        const batch = await client.query(`FETCH FORWARD ${DEATH_EXPORT_FETCH_SIZE} FROM pass_${i}`);
        rows += batch.rows.length;
        if (batch.rows.length < DEATH_EXPORT_FETCH_SIZE) break;
      }
    }
    await client.query('COMMIT');
  } finally {
    client.release();
  }
  return { seconds: (performance.now() - started) / 1000, records: 0, rows, heapHighMiB: 0 };
}

/** The floor: each row once, unsorted: the dead tokens, their evidence events, their deliveries. */
const barePass = (pool: StorePool) => {
  const t = pool.tables;
  return cursorPass(pool, [
    { sql: `SELECT t.* FROM ${t.token} t WHERE t.status <> 'active'`, params: [] },
    {
      sql: `SELECT a.token_id, a.seq, a.kind, a.canonical FROM ${t.audit_event} a JOIN ${t.token} t ON t.id = a.token_id
             WHERE t.status <> 'active' AND a.kind = ANY ($1::text[])`,
      params: [EVIDENCE_KINDS],
    },
    {
      sql: `SELECT d.* FROM ${t.delivery} d JOIN ${t.token} t ON t.id = d.token_id WHERE t.status <> 'active'`,
      params: [],
    },
  ]);
};

/** Where the export's time goes: its own statement fetched alone, nothing assembled in Node. */
const queryPass = (pool: StorePool) =>
  cursorPass(pool, [{ sql: deathsQuery(pool), params: [null, null, null, EVIDENCE_KINDS] }]);

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const tmpDir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bench-audit-'));
  // mkdtemp makes it 0700; as root, Postgres runs as the postgres user and must traverse it.
  await chmod(tmpDir, 0o711);
  const postgres = process.env.DATABASE_URL
    ? undefined
    : await startEmbeddedPostgres({ dataDir: path.join(tmpDir, 'postgres'), port: await freePort(), log: say });
  const databaseUrl = process.env.DATABASE_URL ?? postgres!.databaseUrl;
  const schema = `bench_audit_${randomBytes(4).toString('hex')}`;
  const pool = createPool(databaseUrl, schema, 4);
  try {
    await migrate(databaseUrl, schema);
    say(
      `seeding ${opts.deaths} deaths with ${opts.receivers} receiver(s) each (embedded PostgreSQL: ${!postgres ? 'no, DATABASE_URL' : 'yes'})`,
    );
    const seeding = performance.now();
    await seed(pool, opts.deaths, opts.receivers);
    say(`  seeded in ${((performance.now() - seeding) / 1000).toFixed(1)} s`);
    const { rows: counted } = await pool.query(
      `SELECT count(*)::int AS n FROM ${pool.tables.audit_event} a JOIN ${pool.tables.token} t ON t.id = a.token_id
        WHERE t.status <> 'active' AND a.kind = ANY ($1::text[])`,
      [EVIDENCE_KINDS],
    );
    const evidenceEvents = counted[0]!.n as number;

    if (opts.explain) {
      const { rows: plan } = await pool.query(`EXPLAIN ${deathsQuery(pool)}`, [null, null, null, EVIDENCE_KINDS]);
      say(`the export's plan:\n${plan.map((r) => `  ${r['QUERY PLAN'] as string}`).join('\n')}`);
    }

    // Interleaved rounds, so a checkpoint or autovacuum weighs on both alike; medians reported.
    const exports: Pass[] = [];
    const bares: (Pass & { rows: number })[] = [];
    const queries: Pass[] = [];
    for (let round = 1; round <= opts.rounds; round++) {
      const bare = await barePass(pool);
      const query = await queryPass(pool);
      const exported = await exportPass(pool);
      if (exported.records !== opts.deaths) throw new Error(`exported ${exported.records} of ${opts.deaths} deaths`);
      bares.push(bare);
      queries.push(query);
      exports.push(exported);
      say(
        `  round ${round}: export ${exported.seconds.toFixed(2)} s (heap +${exported.heapHighMiB} MiB at most), its statement alone ${query.seconds.toFixed(2)} s, bare SELECT ${bare.seconds.toFixed(2)} s (${bare.rows} rows)`,
      );
    }
    const exportSeconds = median(exports.map((p) => p.seconds));
    const bareSeconds = median(bares.map((p) => p.seconds));
    const exportFigures = {
      deaths: opts.deaths,
      receiversPerDeath: opts.receivers,
      evidenceEvents,
      fetchSize: DEATH_EXPORT_FETCH_SIZE,
      exportSeconds: Math.round(exportSeconds * 1000) / 1000,
      exportDeathsPerSecond: Math.round(opts.deaths / exportSeconds),
      exportEventsPerSecond: Math.round(evidenceEvents / exportSeconds),
      exportStatementSeconds: Math.round(median(queries.map((p) => p.seconds)) * 1000) / 1000,
      bareSelectSeconds: Math.round(bareSeconds * 1000) / 1000,
      bareSelectRows: bares[0]!.rows,
      bareSelectEventsPerSecond: Math.round(evidenceEvents / bareSeconds),
      ratio: ratio(exportSeconds, bareSeconds),
      exportHeapHighMiB: Math.max(...exports.map((p) => p.heapHighMiB)),
    };
    say(
      `export: ${exportFigures.exportDeathsPerSecond} deaths/s, ${exportFigures.exportEventsPerSecond} audit events/s; ` +
        `bare SELECT: ${exportFigures.bareSelectEventsPerSecond} events/s; export ×${exportFigures.ratio} of the floor`,
    );

    // ---------------------------------------------------------------- (b) audit verify: TO BE ADDED
    // Coordinator: the verify rate over the same rows (events/s, against a bare SELECT of the same
    // audit_event rows) goes here, as `verify` in the JSON line below.
    const verify = null;

    // ---------------------------------------------------------------- (c) payload codec: TO BE ADDED
    // Coordinator: the codec's cost on revoke latency (with vs without, same run; goal ≤ 1.1×) goes
    // here, as `codec` in the JSON line below (it needs a Temporal dev server and a worker).
    const codec = null;

    process.stdout.write(`${JSON.stringify({ bench: 'audit', export: exportFigures, verify, codec })}\n`);
  } finally {
    await pool.query(`DROP SCHEMA ${quoteIdent(schema)} CASCADE`).catch(() => {});
    await pool.end();
    await postgres?.stop();
    await rm(tmpDir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  say(err instanceof Error ? (err.stack ?? err.message) : String(err));
  process.exitCode = 1;
});
