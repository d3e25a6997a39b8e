/**
 * The evidence export on real components: the Temporal dev server, PostgreSQL, receivers on
 * loopback (one that fails first, one whose probe confirms, one that rejects until an operator
 * forces it), the CLI as a child process. Each record is checked against what the receivers saw
 * and against the store's own rows.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DEATH_CSV_COLUMNS } from '../client/audit-export.js';
import type { DeathRecord } from '../client/store.js';
import { createPool, type StorePool } from '../common/db.js';
import { InvalidInputError } from '../common/errors.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { generateSigningSecret } from '../common/secrets.js';
import { exportDeaths } from '../common/store/audit-export.js';
import * as store from '../common/store/index.js';
import { startReceiver, type ExampleReceiver } from '../examples/receiver/receiver.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { recordingModulesTo, temporalSdkFiles } from './support/loaded-modules.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker | undefined;
const closers: (() => Promise<void>)[] = [];
let counter = 0;

before(async () => {
  ctx = await TestContext.create('auditexport', { escalateAfterMs: 3_000, retryInitialMs: 200, retryMaxMs: 1_000 });
});
after(async () => {
  await worker?.stop();
  for (const close of closers) await close();
  await ctx?.close();
});

const newSubject = () => `usr_export_${++counter}_${randomBytes(3).toString('hex')}`;

async function testReceiver(answer: (n: number) => number): Promise<{ id: string; receiver: TestReceiver }> {
  const receiver = await TestReceiver.start();
  closers.push(() => receiver.close());
  const id = `rcv-${++counter}`;
  receiver.secret = (await ctx.warden.addReceiver({ id, url: receiver.url })).secret;
  receiver.behaviour = (n) => ({ status: answer(n) });
  return { id, receiver };
}

async function probingReceiver(): Promise<{ id: string; example: ExampleReceiver }> {
  const secret = generateSigningSecret();
  const example = await startReceiver({ secrets: [secret], log: () => {} });
  closers.push(() => example.close());
  const id = `prb-${++counter}`;
  await ctx.warden.addReceiver({ id, url: example.eventsUrl, probeUrl: example.probeUrl, secret });
  return { id, example };
}

/** A token written to the store only (no workflow): nothing but the export looks at it. */
async function storeOnlyToken(subject: string, receivers: string[], ttlMs: number): Promise<string> {
  const tokenId = newTokenId();
  await store.insertToken(ctx.pool, {
    tokenId,
    credentialId: newCredentialId(),
    subject,
    name: null,
    scopes: [],
    receivers,
    ttlMs,
    secretHash: randomBytes(32),
  });
  return tokenId;
}

const exported = async (filter: Parameters<typeof ctx.warden.exportDeaths>[0]): Promise<DeathRecord[]> => {
  const records: DeathRecord[] = [];
  for await (const record of ctx.warden.exportDeaths(filter)) records.push(record);
  return records;
};

const onlyRecord = async (subject: string): Promise<DeathRecord> => {
  const records = await exported({ subject });
  assert.equal(records.length, 1, `one death of ${subject}: ${JSON.stringify(records)}`);
  return records[0]!;
};

const propagationIs = (tokenId: string, state: string) =>
  waitUntil(
    async () => (await store.requireToken(ctx.pool, tokenId)).propagation === state,
    `propagation of ${tokenId} ${state}`,
  );

const ms = (iso: string | null) => Date.parse(iso!);

describe('audit export', () => {
  it('should show an expiry no process has recorded yet as dead in the store, its receiver untold', async () => {
    // No worker runs yet, so nothing records this expiry: it is dead by the database clock alone.
    const { id } = await testReceiver(() => 204);
    const subject = newSubject();
    const tokenId = await storeOnlyToken(subject, [id], 300);
    await waitUntil(
      async () =>
        (await ctx.sql.query('SELECT expires_at <= now() AS past FROM token WHERE id = $1', [tokenId])).rows[0]
          ?.past as boolean,
      'the expiry to pass on the database clock',
    );
    const record = await onlyRecord(subject);
    const token = await store.requireToken(ctx.pool, tokenId);
    assert.equal(token.status, 'active', 'the row itself is not yet recorded dead');
    assert.equal(record.status, 'expired');
    assert.equal(record.requestedAt, token.expiresAt);
    assert.equal(record.deadInStoreAt, token.expiresAt);
    assert.equal(record.recordedAt, null);
    assert.equal(record.eventId, null);
    assert.equal(record.deadEverywhereAt, null, 'a receiver not told: not dead everywhere');
    assert.deepEqual(
      record.receivers.map((r) => [r.receiverId, r.outcome, r.attempts, r.confirmedAt]),
      [[id, 'untold', 0, null]],
    );
    assert.deepEqual([record.reason, record.actor, record.initiatingEntity], ['expired', 'system', 'system']);
  });

  it("should include every receiver's acknowledgement of a revocation: attempts, verification, time to dead everywhere", async () => {
    worker = await ctx.startWorker();
    const failingFirst = await testReceiver((n) => (n === 1 ? 503 : 204));
    const plain = await testReceiver(() => 204);
    const probing = await probingReceiver();
    const subject = newSubject();
    const receivers = [failingFirst.id, plain.id, probing.id];
    const { tokenId } = await ctx.warden.issue({ subject, receivers, ttl: '1h' });
    probing.example.accept(tokenId);
    await ctx.warden.revoke({ tokenId, reason: 'left the company', actor: 'hr:alice' });
    await propagationIs(tokenId, 'complete');

    const record = await onlyRecord(subject);
    const token = await store.requireToken(ctx.pool, tokenId);
    const rows = new Map((await store.listDeliveries(ctx.pool, tokenId)).map((d) => [d.receiverId, d]));
    assert.deepEqual(
      [record.tokenId, record.status, record.reason, record.actor, record.initiatingEntity],
      [tokenId, 'revoked', 'left the company', 'hr:alice', 'admin'],
    );
    assert.equal(record.requestedAt, token.revokedAt, 'a revoke request kills in the store at once');
    assert.equal(record.deadInStoreAt, token.revokedAt);
    assert.equal(record.recordedAt, token.revokedAt);
    assert.equal(record.timeToDeadInStoreMs, 0);
    assert.equal(record.propagation, 'complete');
    assert.equal(record.propagationCompletedAt, token.propagationCompletedAt);
    assert.equal(record.stuckAt, null);
    assert.equal(record.eventId, rows.get(plain.id)!.eventId);

    // Every receiver, in the token's order, each as the store holds it and as the receiver saw it.
    assert.deepEqual(
      record.receivers.map((r) => r.receiverId),
      token.receivers,
    );
    assert.deepEqual([...token.receivers].sort(), [...receivers].sort());
    for (const r of record.receivers) {
      const row = rows.get(r.receiverId)!;
      assert.equal(r.acknowledgedAt, row.ackedAt, r.receiverId);
      assert.equal(r.attempts, row.attempts, r.receiverId);
      assert.equal(r.verifiedAt, row.verifiedAt, r.receiverId);
      assert.equal(r.probes, row.probes, r.receiverId);
      assert.ok(ms(r.acknowledgedAt) >= ms(record.deadInStoreAt), `${r.receiverId} acknowledged after the kill`);
      assert.equal(r.forced, null);
    }
    const of = (id: string) => record.receivers.find((r) => r.receiverId === id);
    const [first, second, third] = [of(failingFirst.id), of(plain.id), of(probing.id)];
    assert.equal(first!.outcome, 'acknowledged');
    assert.equal(first!.attempts, 2, 'a 503, then the acknowledgement');
    assert.deepEqual(
      failingFirst.receiver.requestsFor(tokenId).map((q) => q.answered),
      [503, 204],
    );
    assert.equal(first!.confirmedAt, first!.acknowledgedAt);
    assert.equal(second!.outcome, 'acknowledged');
    assert.equal(second!.attempts, plain.receiver.requestsFor(tokenId).length);
    assert.equal(third!.outcome, 'verified');
    assert.equal(third!.attempts, 1);
    assert.ok(third!.probes >= 1);
    assert.ok(ms(third!.verifiedAt) >= ms(third!.acknowledgedAt));
    assert.equal(third!.confirmedAt, third!.verifiedAt, 'a probed receiver counts once its probe confirms');
    assert.equal(probing.example.accepts(tokenId), false);

    const lastConfirmation = Math.max(...record.receivers.map((r) => ms(r.confirmedAt)));
    assert.equal(ms(record.deadEverywhereAt), lastConfirmation);
    assert.equal(record.timeToDeadEverywhereMs, lastConfirmation - ms(record.requestedAt));
  });

  it('should show a stuck receiver forced by an operator: who, why, when; never dead everywhere', async () => {
    const rejecting = await testReceiver(() => 400);
    const plain = await testReceiver(() => 204);
    const subject = newSubject();
    const { tokenId } = await ctx.warden.issue({ subject, receivers: [plain.id, rejecting.id], ttl: '1h' });
    await ctx.warden.revoke({ tokenId, reason: 'key leaked', actor: 'sec:bob' });
    await propagationIs(tokenId, 'stuck');
    await ctx.warden.forceComplete(tokenId, { reason: 'the receiver was retired', actor: 'ops:carol' });
    await propagationIs(tokenId, 'complete');

    const record = await onlyRecord(subject);
    const audit = await store.readAudit(ctx.pool, tokenId);
    const atOf = (kind: string) => (JSON.parse(audit.find((e) => e.kind === kind)!.canonical) as { at: string }).at;
    assert.equal(record.stuckAt, atOf('propagation.stuck'));
    assert.equal(record.propagation, 'complete');
    assert.equal(record.deadEverywhereAt, null, 'a forced receiver never confirmed');
    assert.equal(record.timeToDeadEverywhereMs, null);
    const [acked, forced] = [plain.id, rejecting.id].map((id) => record.receivers.find((r) => r.receiverId === id));
    assert.equal(acked!.outcome, 'acknowledged');
    assert.equal(forced!.outcome, 'forced');
    assert.equal(forced!.acknowledgedAt, null);
    assert.equal(forced!.confirmedAt, null);
    assert.equal(forced!.lastStatusCode, 400);
    assert.equal(forced!.attempts, rejecting.receiver.requestsFor(tokenId).length);
    assert.deepEqual(forced!.forced, {
      at: atOf('propagation.forced'),
      actor: 'ops:carol',
      reason: 'the receiver was retired',
    });
  });

  it("should take a scheduled revocation's instant as requested, and an expiry's as dead in the store", async () => {
    const subject = newSubject();
    const scheduled = await ctx.warden.issue({ subject, receivers: [], ttl: '1h' });
    const at = new Date(Date.now() + 1_500).toISOString();
    await ctx.warden.scheduleRevoke(scheduled.tokenId, { at, reason: 'contract ends', actor: 'hr:dan' });
    const expiring = await ctx.warden.issue({ subject, receivers: [], ttl: '1s' });
    await propagationIs(scheduled.tokenId, 'complete');
    await propagationIs(expiring.tokenId, 'complete');

    const records = new Map((await exported({ subject })).map((r) => [r.tokenId, r]));
    const revoked = records.get(scheduled.tokenId)!;
    assert.equal(revoked.status, 'revoked');
    assert.equal(revoked.requestedAt, at);
    assert.ok(revoked.timeToDeadInStoreMs >= 0, 'carried out at or after its instant');
    assert.equal(revoked.timeToDeadInStoreMs, ms(revoked.deadInStoreAt) - ms(at));
    assert.equal(revoked.deadEverywhereAt, revoked.deadInStoreAt, 'no receivers: the store is everywhere');
    const expired = records.get(expiring.tokenId)!;
    assert.equal(expired.status, 'expired');
    assert.equal(expired.requestedAt, expiring.expiresAt);
    assert.equal(expired.deadInStoreAt, expiring.expiresAt);
    assert.ok(ms(expired.recordedAt) >= ms(expired.deadInStoreAt), 'recorded at or after the expiry');
  });

  it("should take settled facts from the audit chain: an edited delivery row changes none, one settled without an event is 'unaudited'", async () => {
    const first = await testReceiver(() => 204);
    const second = await testReceiver(() => 204);
    const subject = newSubject();
    const tokenId = await storeOnlyToken(subject, [first.id, second.id], 3_600_000);
    await store.killToken(ctx.pool, { tokenId, reason: 'audit', actor: 'ops', initiatingEntity: 'admin' });
    const [delivery] = await store.listDeliveries(ctx.pool, tokenId);
    await store.recordDeliveryAttempt(ctx.pool, delivery!.eventId, first.id, {
      kind: 'retryable',
      statusCode: 502,
      error: 'HTTP 502',
    });
    await store.recordDeliveryAttempt(ctx.pool, delivery!.eventId, first.id, { kind: 'delivered', statusCode: 200 });
    const before = (await onlyRecord(subject)).receivers[0]!;
    assert.deepEqual([before.receiverId, before.outcome, before.attempts], [first.id, 'acknowledged', 2]);

    // Rows are not evidence: an hour taken off the acknowledgement, attempts rewritten, and the
    // second delivery marked delivered with no audit event.
    await ctx.sql.query(
      `UPDATE delivery SET acked_at = acked_at - interval '1 hour', attempts = 1 WHERE token_id = $1 AND receiver_id = $2`,
      [tokenId, first.id],
    );
    await ctx.sql.query(
      `UPDATE delivery SET status = 'delivered', acked_at = now(), attempts = 1 WHERE token_id = $1 AND receiver_id = $2`,
      [tokenId, second.id],
    );
    const after = await onlyRecord(subject);
    assert.deepEqual(after.receivers[0], before);
    assert.equal(after.receivers[1]!.outcome, 'unaudited');
    assert.equal(after.receivers[1]!.confirmedAt, null);
    assert.equal(after.deadEverywhereAt, null);
    const chain = await store.readAudit(ctx.pool, tokenId);
    assert.deepEqual(
      after.auditSeqs.map((seq) => chain.find((e) => e.seq === seq)!.kind),
      ['token.issued', 'token.revoked', 'delivery.delivered'],
    );
  });

  it('should take the receivers and subject from the chain: an edited token row changes no record, and verify names it', async () => {
    const first = await testReceiver(() => 204);
    const second = await testReceiver(() => 204);
    const subject = newSubject();
    const tokenId = await storeOnlyToken(subject, [first.id, second.id], 3_600_000);
    await store.killToken(ctx.pool, { tokenId, reason: 'audit', actor: 'ops', initiatingEntity: 'admin' });
    const [delivery] = await store.listDeliveries(ctx.pool, tokenId);
    await store.recordDeliveryAttempt(ctx.pool, delivery!.eventId, first.id, { kind: 'delivered', statusCode: 200 });
    const before: Partial<DeathRecord> = await onlyRecord(subject);
    delete before.asOf;
    assert.deepEqual(
      before.receivers!.map((r) => [r.receiverId, r.outcome]),
      [
        [first.id, 'acknowledged'],
        [second.id, 'pending'],
      ],
    );
    assert.equal(before.deadEverywhereAt, null);
    assert.equal((await ctx.warden.verifyAudit({ tokenId })).ok, true);

    // The unconfirmed receiver dropped from the row: the death would read as dead everywhere.
    await ctx.sql.query(`UPDATE token SET receivers = array_remove(receivers, $2) WHERE id = $1`, [tokenId, second.id]);
    const after: Partial<DeathRecord> = await onlyRecord(subject);
    delete after.asOf;
    assert.deepEqual(after, before);
    const report = await ctx.warden.verifyAudit({ tokenId });
    assert.deepEqual(
      report.broken.map(({ seq, problem }) => ({ seq, problem })),
      [{ seq: 1, problem: 'row-mismatch' }],
    );
    assert.match(report.broken[0]!.detail, /other receivers than its issue event/);
    const cli = await runCli(['audit', 'verify', '--token', tokenId], ctx.childEnv());
    assert.equal(cli.code, 1, cli.stderr + cli.stdout);
    assert.match(cli.stdout, new RegExp(`BROKEN token ${tokenId} seq \\d+: row-mismatch`));

    // Another subject on the row: the record keeps the issued one, verify names the edit.
    await ctx.sql.query(`UPDATE token SET subject = $2, receivers = $3 WHERE id = $1`, [
      tokenId,
      `${subject}_moved`,
      [first.id, second.id],
    ]);
    const [moved] = await exported({ subject: `${subject}_moved` });
    assert.equal(moved?.subject, subject);
    const renamed = await ctx.warden.verifyAudit({ tokenId });
    assert.deepEqual(
      renamed.broken.map(({ seq, problem }) => ({ seq, problem })),
      [{ seq: 1, problem: 'row-mismatch' }],
    );
    assert.match(renamed.broken[0]!.detail, /another subject/);

    // The kill's own facts: a revocation reason rewritten on the row.
    await ctx.sql.query(`UPDATE token SET subject = $2, revoke_reason = 'routine' WHERE id = $1`, [tokenId, subject]);
    const rewritten = await ctx.warden.verifyAudit({ tokenId });
    assert.deepEqual(
      rewritten.broken.map(({ seq, problem }) => ({ seq, problem })),
      [{ seq: 2, problem: 'row-mismatch' }],
    );
    assert.match(rewritten.broken[0]!.detail, /revoke_reason/);
  });

  it('should filter by death time (since inclusive, until exclusive) and subject; refuse a reversed range', async () => {
    const subject = newSubject();
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(await storeOnlyToken(subject, [], 3_600_000));
    const deaths: string[] = [];
    for (const tokenId of ids) {
      const { token } = await store.killToken(ctx.pool, {
        tokenId,
        reason: 'cleanup',
        actor: 'ops',
        initiatingEntity: 'admin',
      });
      deaths.push(token.revokedAt!);
    }
    const other = newSubject();
    await store.killToken(ctx.pool, {
      tokenId: await storeOnlyToken(other, [], 3_600_000),
      reason: 'cleanup',
      actor: 'ops',
      initiatingEntity: 'admin',
    });
    const idsOf = async (filter: Parameters<typeof exported>[0]) => (await exported(filter)).map((r) => r.tokenId);
    assert.deepEqual(await idsOf({ subject }), ids, 'oldest death first, the other subject left out');
    assert.deepEqual(await idsOf({ subject, since: deaths[1] }), ids.slice(1));
    assert.deepEqual(await idsOf({ subject, until: deaths[1] }), ids.slice(0, 1));
    assert.deepEqual(await idsOf({ subject, since: deaths[1], until: deaths[2] }), [ids[1]]);
    assert.deepEqual(await idsOf({ subject, since: '2000-01-01', until: '2000-01-02' }), []);
    assert.throws(
      () => ctx.warden.exportDeaths({ since: deaths[1], until: deaths[0] }),
      (err: unknown) => err instanceof InvalidInputError && err.fields.some((f) => f.path === 'until'),
    );
    assert.throws(
      () => ctx.warden.exportDeaths({ since: 'yesterday' }),
      (err: unknown) => err instanceof InvalidInputError && err.fields.some((f) => f.path === 'since'),
    );
  });

  it('should write RFC 4180 CSV from the CLI: quotes and commas kept, formulas defused, the same records as jsonl', async () => {
    const subject = newSubject();
    const tokenId = await storeOnlyToken(subject, [], 3_600_000);
    const reason = '\uff1dsaid "no", then left, badly';
    await store.killToken(ctx.pool, { tokenId, reason, actor: '=HYPERLINK("x")', initiatingEntity: 'admin' });

    const csv = await runCli(['audit', 'export', '--subject', subject, '--format', 'csv'], ctx.childEnv());
    assert.equal(csv.code, 0, csv.stderr);
    const table = parseCsv(csv.stdout);
    assert.deepEqual(table[0], [...DEATH_CSV_COLUMNS]);
    assert.equal(table.length, 2, csv.stdout);
    const row = Object.fromEntries(DEATH_CSV_COLUMNS.map((c, i) => [c, table[1]![i]]));
    assert.equal(row.reason, `'${reason}`, 'a leading fullwidth = runs as a formula in some locales');
    assert.equal(row.actor, `'=HYPERLINK("x")`, 'a leading = would run as a formula');
    assert.equal(row.tokenId, tokenId);
    assert.equal(row.receiversTotal, '0');
    assert.deepEqual(JSON.parse(row.receivers!), []);

    // A store-only command: it must not load the Temporal SDK.
    const modules = path.join(await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-export-')), 'modules.json');
    closers.push(() => rm(path.dirname(modules), { recursive: true, force: true }));
    const jsonl = await runCli(['audit', 'export', '--subject', subject], {
      ...ctx.childEnv(),
      ...recordingModulesTo(modules),
    });
    assert.equal(jsonl.code, 0, jsonl.stderr);
    assert.deepEqual(await temporalSdkFiles(modules), []);
    const lines = jsonl.stdout.trimEnd().split('\n');
    assert.equal(lines.length, 1);
    const fromCli = JSON.parse(lines[0]!) as DeathRecord;
    const fromLibrary = await onlyRecord(subject);
    assert.deepEqual({ ...fromCli, asOf: '' }, { ...fromLibrary, asOf: '' });
    assert.equal(row.auditSeqs, fromCli.auditSeqs.join(' '));
    const plain = DEATH_CSV_COLUMNS.filter(
      (c) => !['actor', 'reason', 'receivers', 'auditSeqs'].includes(c) && c in fromCli,
    );
    for (const column of plain) {
      const value = fromCli[column as keyof DeathRecord];
      if (column !== 'asOf') assert.equal(row[column], value === null ? '' : String(value), column);
    }

    const bad = await runCli(['audit', 'export', '--until', 'tomorrow'], ctx.childEnv());
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /--until: expected an ISO 8601 date/);
    assert.equal(bad.stdout, '');
  });

  it('should stream: each FETCH returns at most the fetch size, read only as the consumer takes records', async () => {
    const subject = newSubject();
    const count = 30;
    const fetchSize = 4;
    for (let i = 0; i < count; i++) {
      await store.killToken(ctx.pool, {
        tokenId: await storeOnlyToken(subject, [], 3_600_000),
        reason: 'bulk',
        actor: 'ops',
        initiatingEntity: 'admin',
      });
    }
    // The rows each FETCH brought back, seen on the connection the export checks out.
    const fetched: number[] = [];
    const spied = spyOnFetches(fetched);
    closers.push(() => spied.end());

    const records = exportDeaths(spied, { subject }, { fetchSize });
    // A failed assertion must still end the export: its connection would otherwise hold up the pool's end.
    closers.unshift(async () => void (await records.return()));
    const first = await records.next();
    assert.equal(first.done, false);
    assert.deepEqual(fetched, [fetchSize], 'one batch read for the first record, nothing ahead');
    let taken = 1;
    for await (const record of records) {
      assert.equal(record.subject, subject);
      taken++;
    }
    assert.equal(taken, count);
    assert.ok(
      fetched.every((n) => n <= fetchSize),
      `batches ${fetched.join(', ')}`,
    );
    assert.equal(fetched.length, Math.floor(count / fetchSize) + 1);
    assert.equal(
      fetched.reduce((a, b) => a + b, 0),
      count,
    );

    // Stopping early reads no further, and hands the connection back with its transaction ended.
    fetched.length = 0;
    let early = 0;
    for await (const record of exportDeaths(spied, { subject }, { fetchSize })) {
      assert.ok(record);
      if (++early === 5) break;
    }
    assert.deepEqual(fetched, [fetchSize, fetchSize]);
    assert.equal(spied.idleCount, spied.totalCount, 'the connection is back in the pool');
    const { rows } = await spied.query('SELECT now() = statement_timestamp() AS fresh');
    assert.equal(rows[0]?.fresh, true, 'no transaction left open on it');
  });
});

/** A pool of one connection on this file's schema whose FETCH results are counted. */
function spyOnFetches(fetched: number[]): StorePool {
  const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
  pool.on('connect', (client) => {
    const query = client.query.bind(client) as (...args: unknown[]) => Promise<{ rows: unknown[] }>;
    Object.assign(client, {
      query: async (...args: unknown[]) => {
        const result = await query(...args);
        if (typeof args[0] === 'string' && args[0].startsWith('FETCH')) fetched.push(result.rows.length);
        return result;
      },
    });
  });
  return pool;
}

/** RFC 4180: fields separated by commas, records by CRLF, quoted fields with "" for a quote. */
function parseCsv(text: string): string[][] {
  const records: string[][] = [];
  let record: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      record.push(field);
      field = '';
    } else if (c === '\r' && text[i + 1] === '\n') {
      record.push(field);
      records.push(record);
      record = [];
      field = '';
      i++;
    } else field += c;
  }
  assert.equal(field + record.join(''), '', 'the last record ends with CRLF');
  return records;
}
