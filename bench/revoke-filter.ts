/**
 * `node dist/bench/revoke-filter.js [--rows 300000] [--rounds 5]`: the store's side of a revocation
 * by filter on many rows: counting what still matches (bulk_revoke_remaining) and finding one kill
 * chunk (bulk_revoke_due), against the first version's statements (filter values from the joined
 * row; a chunk that walks from the first id). Needs DATABASE_URL; works in a fresh schema it drops
 * after. Rows are inserted directly (generate_series), 1 in 1000 of the filtered subject/receiver.
 * Prints the median ms per statement and filter, and a final JSON line.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { createPool, migrate, quoteIdent } from '../common/db.js';

const say = (msg: string) => process.stderr.write(`[bench:revoke-filter] ${msg}\n`);

const { values } = parseArgs({
  options: { rows: { type: 'string', default: '300000' }, rounds: { type: 'string', default: '5' } },
});
const rowCount = Number(values.rows);
const rounds = Number(values.rounds);
const url = process.env.DATABASE_URL;
if (!url) throw new Error('DATABASE_URL is required');

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const schema = `bench_revoke_filter_${randomBytes(4).toString('hex')}`;
await migrate(url, schema);
const pool = createPool(url, schema, 2);
const q = quoteIdent(schema);
try {
  // The rows in steps, on a connection of its own: the store's pool bounds one statement at 12 s.
  const loader = new pg.Client({ connectionString: url });
  await loader.connect();
  for (let from = 1; from <= rowCount; from += 50_000) {
    await loader.query(
      `INSERT INTO ${q}.token (id, subject, name, receivers, issued_at, expires_at)
       SELECT 'tok_' || md5(g::text), 'usr_' || (g % 1000), 'svc-' || (g % 997) || '-x', ARRAY['r' || (g % 1000)],
              now() - interval '1 day' + g * interval '1 ms', now() + interval '30 days'
         FROM generate_series($1::int, $2::int) g`,
      [from, Math.min(rowCount, from + 49_999)],
    );
  }
  await loader.end();
  await pool.query(`ANALYZE ${q}.token`);
  say(`${rowCount} rows in ${schema}`);
  // The first version's remaining count: filter values from the joined operation row.
  await pool.query(`CREATE FUNCTION ${q}.old_remaining(operation_id uuid) RETURNS bigint
    LANGUAGE sql STABLE SET search_path = ${q}, pg_temp AS $$
      SELECT count(*) FROM token t, bulk_revoke o
       WHERE o.id = operation_id AND t.status = 'active'
         AND bulk_revoke_matches(t, o.cutoff, o.subject, o.receiver, o.issued_before, o.name_prefix) $$`);
  const filters: Record<string, [string | null, string | null, string | null, string | null]> = {
    subject: ['usr_7', null, null, null],
    receiver: [null, 'r7', null, null],
    'name-prefix': [null, null, null, 'svc-7-'],
  };
  const results: Record<string, Record<string, number>> = {};
  for (const [label, [subject, receiver, issuedBefore, namePrefix]] of Object.entries(filters)) {
    const id = randomUUID();
    await pool.query(
      `INSERT INTO ${q}.bulk_revoke (id, subject, receiver, issued_before, name_prefix, reason, actor, initiating_entity, cutoff)
       VALUES ($1, $2, $3, $4, $5, 'bench', 'bench', 'admin', now())`,
      [id, subject, receiver, issuedBefore, namePrefix],
    );
    const time = async (sql: string, params: unknown[]) => {
      const ms: number[] = [];
      for (let i = 0; i < rounds; i++) {
        const t0 = performance.now();
        await pool.query(sql, params);
        ms.push(performance.now() - t0);
      }
      return Math.round(median(ms) * 10) / 10;
    };
    const last = (await pool.query(`SELECT max(id) AS m FROM ${q}.token`)).rows[0].m as string;
    results[label] = {
      remainingBefore: await time(`SELECT ${q}.old_remaining($1)`, [id]),
      remainingAfter: await time(`SELECT ${q}.bulk_revoke_remaining($1)`, [id]),
      // The last chunk of a filter (nothing after the last id): the first version walked from the start.
      lastChunkFromStart: await time(`SELECT ${q}.bulk_revoke_due($1, NULL, 500)`, [id]),
      lastChunkKeyset: await time(`SELECT ${q}.bulk_revoke_due($1, $2, 500)`, [id, last]),
    };
    say(`${label}: ${JSON.stringify(results[label])}`);
  }
  process.stdout.write(`${JSON.stringify({ rows: rowCount, rounds, medianMs: results })}\n`);
} finally {
  await pool.query(`DROP SCHEMA ${q} CASCADE`);
  await pool.end();
}
