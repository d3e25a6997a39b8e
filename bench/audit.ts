/**
 * `npm run bench:audit [-- --deaths N --receivers R --rounds K --explain]`: the audit trail's read paths on an
 * embedded PostgreSQL (or DATABASE_URL), against floors measured in the same run on the same rows.
 *  (a) export: `exportDeaths` (the server-side cursor, the records assembled from the hash chain)
 *      written as JSON lines, against a bare SELECT over the same rows: the dead tokens, their
 *      evidence events and their delivery rows, each row once, unsorted, through the same kind of
 *      cursor and fetch size, nothing assembled. Deaths/s and audit events/s, ratio, and the exporter's heap high-water mark.
 *  (b) verify: `verifyAuditTrail` with the checkpoint key (as `tokenwarden audit verify` runs it) over
 *      the same tokens' chains, against its reads alone (the same keyset pages, nothing hashed) and a
 *      bare SELECT of the same audit_event rows. Events/s and ratio; the checkpoint's write time too.
 *  (c) the payload codec's cost on revoke latency, on the stack a user gets (`tokenwarden start`,
 *      fsync on) with two `tokenwarden worker` processes: one with the stack's payload key, one with
 *      none (its own task queue), and a library client of each; revocations alternate between them.
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
import type { Client } from '@temporalio/client';
import proto from '@temporalio/proto';
import { TokenWarden } from '../client/index.js';
import { loadSettings, type Settings } from '../common/config.js';
import { tokenWorkflowId } from '../common/names.js';
import {
  AUDIT_VERIFY_BATCH,
  auditSigningKey,
  verifyAuditTrail,
  writeAuditCheckpoint,
  type AuditKey,
} from '../common/store/audit-verify.js';
import { ENCRYPTED_ENCODING } from '../common/payload-codec.js';
import { connectTemporal } from '../common/temporal.js';
import { checkout, createPool, migrate, quoteIdent, type StorePool } from '../common/db.js';
import { DEATH_EXPORT_FETCH_SIZE, deathsQuery, EVIDENCE_KINDS, exportDeaths } from '../common/store/audit-export.js';
import { killTokens } from '../common/store/kill.js';
import { startEmbeddedPostgres } from '../dev/postgres.js';
import { freePort, ManagedChild } from '../dev/processes.js';
import { mib } from './proc.js';
import { ArrivalReceiver } from './receiver.js';
import { CLI_PATH, startUserStack, waitForWorkers } from './scale-stack.js';
import { ms, percentile, ratio, summarize, type LatencySummary } from './stats.js';
import { waitUntilIdle } from './workflows.js';

const say = (msg: string) => process.stderr.write(`[bench:audit] ${msg}\n`);

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      deaths: { type: 'string', default: '20000' },
      receivers: { type: 'string', default: '3' },
      rounds: { type: 'string', default: '3' },
      explain: { type: 'boolean', default: false },
      revokes: { type: 'string', default: '100' },
      warmup: { type: 'string', default: '10' },
    },
  });
  const deaths = Number(values.deaths);
  const receivers = Number(values.receivers);
  const rounds = Number(values.rounds);
  if (!Number.isInteger(deaths) || deaths < 1) throw new Error('--deaths: expected a positive integer');
  if (!Number.isInteger(receivers) || receivers < 1 || receivers > 3) throw new Error('--receivers: 1 to 3');
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds: expected a positive integer');
  const revokes = Number(values.revokes);
  const warmup = Number(values.warmup);
  if (!Number.isInteger(revokes) || revokes < 0)
    throw new Error('--revokes: expected an integer ≥ 0 (0 skips the codec series)');
  if (!Number.isInteger(warmup) || warmup < 0) throw new Error('--warmup: expected an integer ≥ 0');
  return { deaths, receivers, rounds, explain: values.explain, revokes, warmup };
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

/** (b) `tokenwarden audit verify`'s work: every chain recomputed, the checkpoint's signature and heads checked. */
async function verifyPass(pool: StorePool, key: AuditKey): Promise<Pass & { events: number; chains: number }> {
  const started = performance.now();
  const report = await verifyAuditTrail(pool, { key });
  const seconds = (performance.now() - started) / 1000;
  if (!report.ok || report.checkpointsChecked === 0) {
    throw new Error(
      `verify of an untouched trail did not pass: ${JSON.stringify({ ...report, broken: report.broken.slice(0, 3) })}`,
    );
  }
  return { seconds, records: 0, heapHighMiB: 0, events: report.events, chains: report.chains };
}

/** Verify's reads alone: the keyset pages it reads (token id, seq order, 1,000 rows each), nothing hashed. */
async function verifyReadsPass(pool: StorePool): Promise<Pass & { rows: number }> {
  let rows = 0;
  let after: [string, number] = ['', 0];
  const started = performance.now();
  for (;;) {
    const page = await pool.query(
      `SELECT token_id, seq, kind, canonical, hash, prev_hash FROM ${pool.tables.audit_event}
        WHERE (token_id, seq) > ($1, $2) ORDER BY token_id, seq LIMIT $3`,
      [after[0], after[1], AUDIT_VERIFY_BATCH],
    );
    rows += page.rows.length;
    if (page.rows.length < AUDIT_VERIFY_BATCH) break;
    const last = page.rows[page.rows.length - 1]!;
    after = [last.token_id as string, last.seq as number];
  }
  return { seconds: (performance.now() - started) / 1000, records: 0, rows, heapHighMiB: 0 };
}

/** The verify floor: every audit_event row verify reads, the same columns, each once, unsorted. */
const bareEventsPass = (pool: StorePool) =>
  cursorPass(pool, [
    { sql: `SELECT token_id, seq, kind, canonical, hash, prev_hash FROM ${pool.tables.audit_event}`, params: [] },
  ]);

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

interface CodecArm {
  name: 'encrypted' | 'plain';
  settings: Settings;
  warden: TokenWarden;
  client: Client;
  tokens: string[];
  revokeCall: number[];
  revokeToDelivered: number[];
}

const CODEC_WAIT_MS = 60_000;

/** The usual summary and the 95th percentile the codec's goal is stated for. */
const latency = (samples: number[]): LatencySummary & { p95Ms: number } => ({
  ...summarize(samples),
  p95Ms: ms(
    percentile(
      [...samples].sort((a, b) => a - b),
      95,
    ),
  ),
});
/** The codec's goal: a revocation with encrypted payloads within 1.1× of one without. */
const CODEC_GOAL_RATIO = 1.1;

/**
 * (c) Revocations with and without the payload codec on one stack: the stack's own worker setup
 * twice, as `tokenwarden worker` processes, one given the stack's payload key and one given none (on
 * its own task queue), each driven by a library client with the same settings. The arms alternate
 * which goes first; each revocation starts once the previous workflow completed (a quiet system).
 */
async function codecCost(revokes: number, warmup: number) {
  const halt = new AbortController();
  const stopping: (() => Promise<void>)[] = [];
  const loadBefore = os.loadavg();
  try {
    const stack = await startUserStack({ workers: 1, log: say, signal: halt.signal });
    stopping.push(stack.stop);
    const plainQueue = `${stack.settings.temporal.taskQueue}-plain`;
    // An empty data folder: no payload.keys to be found there either.
    const plainDir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bench-plain-'));
    stopping.push(() => rm(plainDir, { recursive: true, force: true }));
    const plainEnv: NodeJS.ProcessEnv = {
      ...stack.clientEnv,
      TOKENWARDEN_DATA_DIR: plainDir,
      TOKENWARDEN_TASK_QUEUE: plainQueue,
    };
    delete plainEnv.TOKENWARDEN_PAYLOAD_KEYS_FILE;
    const plainWorker = new ManagedChild(
      'tokenwarden worker (no payload key)',
      process.execPath,
      [CLI_PATH, 'worker', '--no-schedule'],
      {
        env: plainEnv,
      },
    );
    stopping.push(() => plainWorker.stop('SIGINT', 30_000));

    const arm = async (name: CodecArm['name'], settings: Settings): Promise<CodecArm> => {
      const warden = await TokenWarden.connect(settings);
      stopping.push(() => warden.close());
      const client = await connectTemporal(settings);
      stopping.push(() => client.connection.close());
      return { name, settings, warden, client, tokens: [], revokeCall: [], revokeToDelivered: [] };
    };
    const encrypted = await arm('encrypted', stack.settings);
    const plain = await arm('plain', loadSettings(plainEnv));
    if (encrypted.settings.payloadKeys.length !== 1 || plain.settings.payloadKeys.length !== 0) {
      throw new Error('the arms must differ in their payload keys only');
    }
    await waitForWorkers(stack, encrypted.client, halt.signal);
    for (const deadline = Date.now() + CODEC_WAIT_MS; ;) {
      const { pollers } = await plain.client.workflowService.describeTaskQueue({
        namespace: plain.settings.temporal.namespace,
        taskQueue: { name: plainQueue, kind: proto.temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL },
        taskQueueType: proto.temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
      });
      if (pollers?.some((p) => p.identity?.startsWith(`${plainWorker.pid}@`))) break;
      if (!plainWorker.running || Date.now() > deadline)
        throw new Error(`the plain worker does not poll:\n${plainWorker.output()}`);
      await new Promise((resolve) => setTimeout(resolve, 250));
    }

    const receiver = await ArrivalReceiver.start(say);
    stopping.push(() => receiver.close());
    const receiverId = `codec-${randomBytes(3).toString('hex')}`;
    await encrypted.warden.addReceiver({ id: receiverId, url: receiver.url });
    const total = warmup + revokes;
    say(`codec: issuing ${total} tokens per arm`);
    for (const a of [encrypted, plain]) {
      for (let i = 0; i < total; i++) {
        const issued = await a.warden.issue({ subject: `usr_codec_${a.name}`, ttl: '1h', receivers: [receiverId] });
        a.tokens.push(issued.tokenId);
      }
      for (const tokenId of a.tokens) await waitUntilIdle(a.client, tokenWorkflowId(tokenId), halt.signal);
    }
    // What makes the two arms differ, checked in what Temporal stored: the first token's workflow input.
    for (const a of [encrypted, plain]) {
      const { events } = await a.client.workflow.getHandle(tokenWorkflowId(a.tokens[0]!)).fetchHistory();
      const stored = events?.[0]?.workflowExecutionStartedEventAttributes?.input?.payloads?.[0]?.metadata?.encoding;
      const isEncrypted =
        stored !== undefined && stored !== null && Buffer.from(stored).toString() === ENCRYPTED_ENCODING;
      if (isEncrypted !== (a.name === 'encrypted'))
        throw new Error(`the ${a.name} arm's history input is ${isEncrypted ? '' : 'not '}encrypted`);
    }
    const within = async <T>(promise: Promise<T>, what: string): Promise<T> => {
      let timer: NodeJS.Timeout | undefined;
      try {
        return await Promise.race([
          promise,
          new Promise<never>((_, reject) => {
            timer = setTimeout(
              () => reject(new Error(`timed out after ${CODEC_WAIT_MS} ms waiting for ${what}`)),
              CODEC_WAIT_MS,
            );
          }),
        ]);
      } finally {
        clearTimeout(timer);
      }
    };
    const revokeOne = async (a: CodecArm, i: number) => {
      const tokenId = a.tokens[i]!;
      const t0 = performance.now();
      const outcome = await a.warden.revoke({ tokenId, reason: 'benchmark' });
      const t1 = performance.now();
      if (!outcome.changed || !outcome.workflowSignalled)
        throw new Error(`revoking ${tokenId} did not kill and signal it`);
      const arrival = await within(receiver.arrivalOf(tokenId, CODEC_WAIT_MS), `the event of ${tokenId}`);
      await within(
        a.client.workflow.getHandle(tokenWorkflowId(tokenId)).result(),
        `workflow of ${tokenId} to complete`,
      );
      if (i < warmup) return;
      a.revokeCall.push(t1 - t0);
      a.revokeToDelivered.push(arrival.at - t0);
    };
    say(`codec: ${warmup} warm-up and ${revokes} measured revocations per arm, alternating`);
    for (let i = 0; i < total; i++) {
      const order = i % 2 === 0 ? [encrypted, plain] : [plain, encrypted];
      for (const a of order) await revokeOne(a, i);
      if ((i + 1) % 20 === 0) say(`  ${i + 1} of ${total}`);
    }
    const figures = (a: CodecArm) => ({
      revokeCall: latency(a.revokeCall),
      revokeToDelivered: latency(a.revokeToDelivered),
    });
    const withCodec = figures(encrypted);
    const withoutCodec = figures(plain);
    const ratios = (pick: (f: ReturnType<typeof figures>) => ReturnType<typeof latency>) => ({
      p50: ratio(pick(withCodec).p50Ms, pick(withoutCodec).p50Ms),
      p95: ratio(pick(withCodec).p95Ms, pick(withoutCodec).p95Ms),
    });
    const revokeToDelivered = ratios((f) => f.revokeToDelivered);
    const result = {
      revocationsPerArm: revokes,
      warmupPerArm: warmup,
      stack:
        'tokenwarden start --no-worker (Temporal dev server on SQLite, embedded PostgreSQL, fsync on) and two `tokenwarden worker` processes',
      withCodec,
      withoutCodec,
      ratio: { revokeCall: ratios((f) => f.revokeCall), revokeToDelivered },
      goalRatio: CODEC_GOAL_RATIO,
      goalMet: revokeToDelivered.p50 <= CODEC_GOAL_RATIO && revokeToDelivered.p95 <= CODEC_GOAL_RATIO,
      loadAverage: { before: loadBefore.map((l) => ms(l)), after: os.loadavg().map((l) => ms(l)) },
    };
    say(
      `codec: revoke-to-delivered p50 ${ms(withCodec.revokeToDelivered.p50Ms)} vs ${ms(withoutCodec.revokeToDelivered.p50Ms)} ms (×${revokeToDelivered.p50}), ` +
        `p95 ${ms(withCodec.revokeToDelivered.p95Ms)} vs ${ms(withoutCodec.revokeToDelivered.p95Ms)} ms (×${revokeToDelivered.p95}); ` +
        `revoke call p50 ×${result.ratio.revokeCall.p50}, p95 ×${result.ratio.revokeCall.p95}`,
    );
    return result;
  } finally {
    for (const stop of stopping.reverse()) await stop().catch((err: Error) => say(`stopping failed: ${err.message}`));
  }
}

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

    // ---------------------------------------------------------------- (b) audit verify
    const key = auditSigningKey(randomBytes(32));
    const checkpointing = performance.now();
    const checkpoint = await writeAuditCheckpoint(pool, key, { minIntervalMs: 0 });
    const checkpointSeconds = (performance.now() - checkpointing) / 1000;
    if (!checkpoint.written) throw new Error(`no checkpoint written: ${JSON.stringify(checkpoint)}`);
    const verifies: (Pass & { events: number; chains: number })[] = [];
    const reads: (Pass & { rows: number })[] = [];
    const bareEvents: (Pass & { rows: number })[] = [];
    for (let round = 1; round <= opts.rounds; round++) {
      const bare = await bareEventsPass(pool);
      const read = await verifyReadsPass(pool);
      const verified = await verifyPass(pool, key);
      bareEvents.push(bare);
      reads.push(read);
      verifies.push(verified);
      say(
        `  round ${round}: verify ${verified.seconds.toFixed(2)} s (${verified.events} events, ${verified.chains} chains), its reads alone ${read.seconds.toFixed(2)} s, bare SELECT ${bare.seconds.toFixed(2)} s (${bare.rows} rows)`,
      );
    }
    const verifySeconds = median(verifies.map((p) => p.seconds));
    const bareEventsSeconds = median(bareEvents.map((p) => p.seconds));
    const verifiedEvents = verifies[0]!.events;
    const verify = {
      events: verifiedEvents,
      chains: verifies[0]!.chains,
      checkpointWriteSeconds: Math.round(checkpointSeconds * 1000) / 1000,
      verifySeconds: Math.round(verifySeconds * 1000) / 1000,
      verifyEventsPerSecond: Math.round(verifiedEvents / verifySeconds),
      readsAloneSeconds: Math.round(median(reads.map((p) => p.seconds)) * 1000) / 1000,
      bareSelectSeconds: Math.round(bareEventsSeconds * 1000) / 1000,
      bareSelectRows: bareEvents[0]!.rows,
      bareSelectEventsPerSecond: Math.round(verifiedEvents / bareEventsSeconds),
      ratio: ratio(verifySeconds, bareEventsSeconds),
    };
    say(
      `verify: ${verify.verifyEventsPerSecond} events/s (${verify.chains} chains); bare SELECT: ${verify.bareSelectEventsPerSecond} events/s; verify ×${verify.ratio} of the floor; checkpoint written in ${verify.checkpointWriteSeconds} s`,
    );

    // ---------------------------------------------------------------- (c) payload codec
    const codec = opts.revokes > 0 ? await codecCost(opts.revokes, opts.warmup) : null;

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
