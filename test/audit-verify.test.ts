/**
 * Audit verification against real PostgreSQL: every chain recomputed from its stored text, signed
 * checkpoints of the chains' heads, the reconciler writing them, and `tokenwarden audit verify`.
 *
 * The audit tables refuse UPDATE and DELETE by trigger, so every tampering here is done the way an
 * attacker with database superuser rights would: `SET LOCAL session_replication_role = replica`,
 * which disables the triggers (and foreign keys) for that transaction.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { ActivityFailure, ApplicationFailure, WorkflowFailedError } from '@temporalio/client';
import pg from 'pg';
import { createPool, migrate, quoteIdent, type Queryable, type StorePool } from '../common/db.js';
import { WORKFLOW_TYPE } from '../common/names.js';
import type { ReconcileInput, ReconcileReport } from '../common/messages.js';
import * as store from '../common/store/index.js';
import { TokenWardenStore } from '../client/store.js';
import { ConfigError } from '../common/errors.js';
import { runCli } from './support/cli.js';
import { maybeRecordHistory } from './support/history.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';
import { recordStoreMade, recordStoreSecrets } from './support/run-record.js';

let ctx: TestContext;
const seed = randomBytes(32);
const key = store.auditSigningKey(seed);
/** Stores made by a test, dropped at the end. */
const made: TestStore[] = [];

before(async () => {
  ctx = await TestContext.create('auditverify');
});
after(async () => {
  for (const s of made) await s.drop();
  await ctx?.close();
});

/** A store of its own (its own schema), so a test's tampering is the only one its verification sees. */
class TestStore {
  private constructor(
    readonly schema: string,
    readonly pool: StorePool,
    /** Raw SQL in this store's schema. */
    readonly sql: pg.Pool,
  ) {}

  static async create(): Promise<TestStore> {
    const schema = `test_auditv_${randomBytes(4).toString('hex')}`;
    await migrate(ctx.settings.databaseUrl, schema);
    recordStoreMade(schema);
    const pool = createPool(ctx.settings.databaseUrl, schema, 3);
    const sql = new pg.Pool({
      connectionString: ctx.settings.databaseUrl,
      max: 2,
      options: `-c search_path=${quoteIdent(schema)}`,
    });
    const created = new TestStore(schema, pool, sql);
    made.push(created);
    return created;
  }

  /** A token with a chain of `events` events: issued, then notes (and its kill when `kill`). */
  async token(events = 4, kill = false): Promise<string> {
    const t = await insertTokenRow(this.pool, { subject: 'usr_audit' });
    for (let i = 2; i <= events - (kill ? 1 : 0); i++) {
      await store.recordAudit(this.pool, t.id, `note-${i}`, 'token.note', { n: i, note: `event ${i}` });
    }
    if (kill) {
      await store.killToken(this.pool, {
        tokenId: t.id,
        reason: 'left',
        actor: 'admin:alice',
        initiatingEntity: 'admin',
      });
    }
    return t.id;
  }

  /** Runs `statements` as a database superuser would, with every trigger off. */
  async tamper(statements: (c: pg.PoolClient) => Promise<unknown>): Promise<void> {
    const c = await this.sql.connect();
    try {
      await c.query('BEGIN');
      await c.query('SET LOCAL session_replication_role = replica');
      await statements(c);
      await c.query('COMMIT');
    } catch (err) {
      await c.query('ROLLBACK');
      throw err;
    } finally {
      c.release();
    }
  }

  verify(options: Omit<store.AuditVerifyOptions, 'key'> & { key?: store.AuditKey | null } = {}) {
    const { key: given, ...rest } = options;
    return store.verifyAuditTrail(this.pool, { ...rest, key: given === null ? undefined : (given ?? key) });
  }

  checkpoint(minIntervalMs = 0) {
    return store.writeAuditCheckpoint(this.pool, key, { minIntervalMs });
  }

  async drop(): Promise<void> {
    await this.pool.end();
    if (await recordStoreSecrets(this.sql, this.schema, { master: [ctx.settings.masterKey!], payload: [] })) {
      await this.sql.query(`DROP SCHEMA ${quoteIdent(this.schema)} CASCADE`);
    }
    await this.sql.end();
  }
}

/** The text an append would have written, computed by the store's own canonical JSON. */
async function canonicalText(c: pg.PoolClient, body: Record<string, unknown>): Promise<string> {
  const { rows } = await c.query('SELECT canonical_json($1::jsonb) AS text', [JSON.stringify(body)]);
  return rows[0].text as string;
}

const brokenOf = (report: store.AuditVerifyReport) =>
  report.broken.map(({ tokenId, seq, problem }) => ({ tokenId, seq, problem }));

describe('audit verify: the chains', () => {
  it('should find an untouched trail intact, reading at most one batch of rows per query', async () => {
    const s = await TestStore.create();
    const tokens = [await s.token(3), await s.token(5, true), await s.token(1)];
    const written = await s.checkpoint();
    assert.equal(written.written, true);
    assert.equal(written.seq, 1);

    let largest = 0;
    const counting = {
      tables: s.pool.tables,
      query: async (text: string, params?: unknown[]) => {
        const result = await s.pool.query(text, params);
        largest = Math.max(largest, result.rows.length);
        return result;
      },
    } as unknown as Queryable;
    const report = await store.verifyAuditTrail(counting, { key, batchSize: 2 });
    assert.deepEqual(report.broken, []);
    assert.deepEqual(report.checkpointProblems, []);
    assert.deepEqual(report.warnings, []);
    assert.equal(report.ok, true);
    assert.equal(report.chains, 3);
    assert.equal(report.events, 3 + 5 + 1);
    assert.equal(report.checkpoint?.seq, 1);
    assert.equal(report.checkpoint?.chains, 3);
    assert.equal(report.checkpoint?.events, 9);
    // Streamed: pages of two rows, across token boundaries, never the table at once.
    assert.equal(largest, 2);
    assert.deepEqual(await s.verify(), report, 'the same report as one large batch');

    // An auditor holding only the public key checks the same signatures.
    const auditor = store.auditCheckingKey(store.rawPublicKey(key.publicKey));
    assert.equal(auditor.keyId, key.keyId);
    assert.equal((await s.verify({ key: auditor })).ok, true);
    assert.equal((await s.verify({ tokenId: tokens[1]! })).chains, 1);
  });

  it('should name an edited row: its text changed, or rewritten with a fresh hash', async () => {
    const s = await TestStore.create();
    const [plain, rehashed, other] = [await s.token(4), await s.token(4), await s.token(4)];
    await s.tamper(async (c) => {
      // The text changed, its stored hash left as it was.
      await c.query(
        `UPDATE audit_event SET canonical = replace(canonical, '"event 2"', '"event two"') WHERE token_id = $1 AND seq = 2`,
        [plain],
      );
      // The text changed and hashed again: only the next event's link gives it away.
      await c.query(
        `UPDATE audit_event SET canonical = replace(canonical, '"event 3"', '"event three"') WHERE token_id = $1 AND seq = 3`,
        [rehashed],
      );
      await c.query(
        `UPDATE audit_event SET hash = sha256(convert_to(canonical, 'UTF8')) WHERE token_id = $1 AND seq = 3`,
        [rehashed],
      );
    });
    const report = await s.verify();
    assert.deepEqual(
      brokenOf(report),
      [
        { tokenId: plain, seq: 2, problem: 'edited' },
        { tokenId: rehashed, seq: 3, problem: 'edited' },
      ].sort((a, b) => (a.tokenId < b.tokenId ? -1 : 1)),
    );
    assert.equal(report.ok, false);
    assert.equal(report.chains, 3);
    assert.equal((await s.verify({ tokenId: other })).ok, true, 'an untouched chain alone is intact');
  });

  it('should name a deleted row, also when the rows after it were renumbered to close the gap', async () => {
    const s = await TestStore.create();
    const [gap, closed] = [await s.token(5), await s.token(5)];
    await s.tamper(async (c) => {
      await c.query('DELETE FROM audit_event WHERE token_id = $1 AND seq = 3', [gap]);
      await c.query('DELETE FROM audit_event WHERE token_id = $1 AND seq = 2', [closed]);
      // In two steps, the key being unique.
      await c.query('UPDATE audit_event SET seq = seq + 1000 WHERE token_id = $1 AND seq > 2', [closed]);
      await c.query('UPDATE audit_event SET seq = seq - 1001 WHERE token_id = $1 AND seq > 1000', [closed]);
    });
    const report = await s.verify();
    assert.deepEqual(
      brokenOf(report),
      [
        { tokenId: gap, seq: 3, problem: 'deleted' },
        { tokenId: closed, seq: 2, problem: 'deleted' },
      ].sort((a, b) => (a.tokenId < b.tokenId ? -1 : 1)),
    );
  });

  it('should name an inserted row, even one hashed and linked as an append would have', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(4);
    await s.tamper(async (c) => {
      // Room at seq 2: the later rows move up (in two steps, the key being unique).
      await c.query('UPDATE audit_event SET seq = seq + 1000 WHERE token_id = $1 AND seq >= 2', [tokenId]);
      await c.query('UPDATE audit_event SET seq = seq - 999 WHERE token_id = $1 AND seq > 1000', [tokenId]);
      const { rows } = await c.query(
        `SELECT hash, canonical::jsonb ->> 'at' AS at FROM audit_event WHERE token_id = $1 AND seq = 1`,
        [tokenId],
      );
      const prev = rows[0].hash as Buffer;
      const text = await canonicalText(c, {
        tokenId,
        seq: 2,
        kind: 'token.suspended',
        at: rows[0].at,
        prevHash: prev.toString('hex'),
        data: { reason: 'backdated' },
      });
      await c.query(
        `INSERT INTO audit_event (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
         VALUES ($1, 2, 'forged', 'token.suspended', $2, $3, sha256(convert_to($2, 'UTF8')))`,
        [tokenId, text, prev],
      );
    });
    const report = await s.verify();
    assert.deepEqual(brokenOf(report), [{ tokenId, seq: 2, problem: 'inserted' }]);
    assert.match(report.broken[0]!.detail, /inserted/);
  });

  it('should name a token whose whole chain is gone even without a checkpoint', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(3);
    await s.tamper((c) => c.query('DELETE FROM audit_event WHERE token_id = $1', [tokenId]));
    const report = await s.verify({ key: null });
    assert.deepEqual(brokenOf(report), [{ tokenId, seq: 1, problem: 'deleted' }]);
    assert.match(report.warnings.join('\n'), /no audit key configured/);
  });
});

describe('audit verify: a trail broken wholesale', () => {
  it('should count every broken chain once and name only the first ones', async () => {
    const s = await TestStore.create();
    const tokens = [await s.token(2), await s.token(2), await s.token(2)].sort();
    await s.checkpoint();
    // Every chain gone, token rows kept: each is missing against its head and has no event at all.
    await s.tamper((c) => c.query('DELETE FROM audit_event'));
    const all = await s.verify();
    assert.deepEqual(
      brokenOf(all),
      tokens.map((tokenId) => ({ tokenId, seq: 1, problem: 'deleted' })),
    );
    assert.equal(all.brokenChains, 3);
    const capped = await s.verify({ namedBroken: 1 });
    assert.deepEqual(brokenOf(capped), [{ tokenId: tokens[0], seq: 1, problem: 'deleted' }]);
    assert.equal(capped.brokenChains, 3);
    assert.equal(capped.ok, false);
    const keyless = await s.verify({ key: null, namedBroken: 2 });
    assert.equal(keyless.broken.length, 2);
    assert.equal(keyless.brokenChains, 3, 'counted beyond the named ones');
  });
});

describe('audit verify: signed checkpoints', () => {
  it('should catch chains deleted or rewritten whole, and a deleted last event, against the checkpoint', async () => {
    const s = await TestStore.create();
    const [gone, rewritten, shortened, intact] = [
      await s.token(3),
      await s.token(4, true),
      await s.token(4),
      await s.token(2),
    ];
    assert.equal((await s.checkpoint()).written, true);
    // Untouched chains grow after the checkpoint: still intact.
    await store.recordAudit(s.pool, intact, 'later', 'token.note', { n: 3 });

    await s.tamper(async (c) => {
      // The token and every trace of it: no row is left to say it existed.
      for (const table of ['audit_event', 'delivery', 'credential', 'token']) {
        await c.query(`DELETE FROM ${table} WHERE ${table === 'token' ? 'id' : 'token_id'} = $1`, [gone]);
      }
      // Every event of the chain written again, consistently: each hash and link recomputed.
      const { rows } = await c.query('SELECT seq, canonical FROM audit_event WHERE token_id = $1 ORDER BY seq', [
        rewritten,
      ]);
      let prev: string | null = null;
      for (const row of rows) {
        const body = JSON.parse(row.canonical as string) as Record<string, unknown>;
        if (row.seq === 4) (body.data as Record<string, unknown>).reason = 'routine cleanup';
        body.prevHash = prev;
        const text = await canonicalText(c, body);
        const { rows: hashed } = await c.query(
          `UPDATE audit_event SET canonical = $3, prev_hash = decode($4, 'hex'), hash = sha256(convert_to($3, 'UTF8'))
            WHERE token_id = $1 AND seq = $2 RETURNING encode(hash, 'hex') AS hash`,
          [rewritten, row.seq, text, prev],
        );
        prev = hashed[0].hash as string;
      }
      await c.query('DELETE FROM audit_event WHERE token_id = $1 AND seq = 4', [shortened]);
    });

    // Each chain alone is consistent: without the checkpoint, only the rewritten kill shows, because
    // the token row (left alone) still holds the reason its chain no longer does.
    assert.deepEqual(brokenOf(await s.verify({ key: null })), [
      { tokenId: rewritten, seq: 4, problem: 'row-mismatch' },
    ]);
    const report = await s.verify();
    assert.deepEqual(
      brokenOf(report),
      [
        { tokenId: gone, seq: 1, problem: 'deleted' },
        { tokenId: rewritten, seq: 4, problem: 'checkpoint-mismatch' },
        { tokenId: shortened, seq: 4, problem: 'deleted' },
      ].sort((a, b) => (a.tokenId < b.tokenId ? -1 : 1)),
    );
    assert.deepEqual(report.checkpointProblems, []);
    assert.equal(report.ok, false);
    assert.match(report.broken.find((b) => b.tokenId === gone)!.detail, /whole chain is gone/);
    // One token asked for: its own break, found through the checkpoint's head alone.
    assert.deepEqual(brokenOf(await s.verify({ tokenId: gone })), [{ tokenId: gone, seq: 1, problem: 'deleted' }]);

    // No new checkpoint vouches for the tampered trail.
    await assert.rejects(s.checkpoint(), (err: unknown) => {
      assert.ok(err instanceof store.AuditTamperedError, String(err));
      assert.deepEqual(err.broken.map((b) => b.tokenId).sort(), [gone, rewritten, shortened].sort());
      return true;
    });
  });

  it('should catch a forged checkpoint, altered heads, a deleted checkpoint and another key', async () => {
    const scenario = async () => {
      const s = await TestStore.create();
      const tokenId = await s.token(2);
      await s.checkpoint();
      await store.recordAudit(s.pool, tokenId, 'n3', 'token.note', { n: 3 });
      await s.checkpoint();
      await store.recordAudit(s.pool, tokenId, 'n4', 'token.note', { n: 4 });
      await s.checkpoint();
      const clean = await s.verify();
      assert.equal(clean.ok, true, JSON.stringify(clean));
      assert.equal(clean.checkpointsChecked, 3);
      return { s, tokenId };
    };
    const problems = (r: store.AuditVerifyReport) =>
      r.checkpointProblems.map(({ checkpoint, problem }) => ({ checkpoint, problem }));

    // The statement says something else than what was signed (here: fewer events).
    const forged = await scenario();
    await forged.s.tamper((c) =>
      c.query(`UPDATE audit_checkpoint SET statement = replace(statement, '"events":4', '"events":3') WHERE seq = 3`),
    );
    assert.deepEqual(problems(await forged.s.verify()), [{ checkpoint: 3, problem: 'signature' }]);
    await store.recordAudit(forged.s.pool, forged.tokenId, 'n5', 'token.note', { n: 5 });
    await assert.rejects(forged.s.checkpoint(), (err: unknown) => {
      assert.ok(err instanceof store.AuditTamperedError, String(err));
      assert.match(err.message, /checkpoint #3 .*signature/);
      return true;
    });

    // Heads that no longer are the ones signed (made to fit a shortened chain).
    const heads = await scenario();
    await heads.s.tamper(async (c) => {
      await c.query('DELETE FROM audit_event WHERE token_id = $1 AND seq = 4', [heads.tokenId]);
      await c.query(
        `UPDATE audit_checkpoint_head h SET seq = 3, hash = a.hash FROM audit_event a
          WHERE h.checkpoint_seq = 3 AND a.token_id = h.token_id AND a.seq = 3`,
      );
    });
    const headsReport = await heads.s.verify();
    assert.deepEqual(problems(headsReport), [{ checkpoint: 3, problem: 'heads' }]);
    assert.equal(headsReport.ok, false);

    // A checkpoint between two others deleted.
    const deleted = await scenario();
    await deleted.s.tamper(async (c) => {
      await c.query('DELETE FROM audit_checkpoint_head WHERE checkpoint_seq = 2');
      await c.query('DELETE FROM audit_checkpoint WHERE seq = 2');
    });
    assert.deepEqual(problems(await deleted.s.verify()), [{ checkpoint: 3, problem: 'sequence' }]);

    // Checked with another key: none of its checkpoints is accepted.
    const other = await scenario();
    const stranger = store.auditSigningKey(randomBytes(32));
    assert.deepEqual(
      problems(await other.s.verify({ key: stranger })).map((p) => p.problem),
      ['unknown-key', 'unknown-key', 'unknown-key'],
    );
  });

  it('should roll the signing key: the writer links only to a checkpoint of a known key, verify accepts previous keys', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(2);
    await s.checkpoint();
    await store.recordAudit(s.pool, tokenId, 'n3', 'token.note', { n: 3 });
    const rolled = store.auditSigningKey(randomBytes(32));
    const previous = store.auditCheckingKey(store.rawPublicKey(key.publicKey));

    // Without the old public key the new key cannot tell checkpoint #1 from a forgery: it refuses.
    await assert.rejects(store.writeAuditCheckpoint(s.pool, rolled, { minIntervalMs: 0 }), (err: unknown) => {
      assert.ok(err instanceof store.AuditTamperedError, String(err));
      assert.match(err.message, new RegExp(`checkpoint #1 .*${key.keyId}.*TOKENWARDEN_AUDIT_PREVIOUS_PUBLIC_KEYS`));
      return true;
    });
    const written = await store.writeAuditCheckpoint(s.pool, rolled, { minIntervalMs: 0, previousKeys: [previous] });
    assert.equal(written.seq, 2);

    const without = await s.verify({ key: rolled });
    assert.deepEqual(
      without.checkpointProblems.map(({ checkpoint, problem }) => ({ checkpoint, problem })),
      [{ checkpoint: 1, problem: 'unknown-key' }],
    );
    const withPrevious = await s.verify({ key: rolled, previousKeys: [previous] });
    assert.equal(withPrevious.ok, true, JSON.stringify(withPrevious));
    assert.equal(withPrevious.checkpointsChecked, 2);
  });

  it('should fail when every checkpoint was deleted over events old enough to have been signed', async () => {
    const s = await TestStore.create();
    await s.token(3);
    assert.equal((await s.checkpoint()).written, true);
    await s.tamper(async (c) => {
      await c.query('DELETE FROM audit_checkpoint_head');
      await c.query('DELETE FROM audit_checkpoint');
    });
    // Not yet due: a store the reconciler has not reached is no fault.
    const young = await s.verify({ staleAfterMs: 60 * 60_000 });
    assert.equal(young.ok, true, JSON.stringify(young));
    // Due (every event counts as old enough): no checkpoint at all is a fault.
    const due = await s.verify({ staleAfterMs: 0 });
    assert.equal(due.ok, false);
    assert.deepEqual(
      due.checkpointProblems.map(({ checkpoint, problem }) => ({ checkpoint, problem })),
      [{ checkpoint: 0, problem: 'checkpoint-missing' }],
    );
    // Without a key nothing can be said of checkpoints (the CLI's summary says so).
    assert.deepEqual((await s.verify({ staleAfterMs: 0, key: null })).checkpointProblems, []);
  });

  it('should flag a rollback of the latest checkpoint: uncovered events, and a missing expected checkpoint', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(3);
    const first = await s.checkpoint();
    await store.recordAudit(s.pool, tokenId, 'n4', 'token.note', { n: 4 });
    const second = await s.checkpoint();
    assert.equal(second.written && second.seq, 2);
    const anchor = { seq: 2, digest: second.digest ?? '' };
    const clean = await s.verify({ staleAfterMs: 0, strict: true, expectCheckpoint: anchor });
    assert.equal(clean.ok, true, JSON.stringify(clean));
    assert.deepEqual(clean.warnings, []);

    // Checkpoint #2 and its heads deleted: #1 still verifies, but seq 4 is old and unsigned.
    await s.tamper(async (c) => {
      await c.query('DELETE FROM audit_checkpoint_head WHERE checkpoint_seq = 2');
      await c.query('DELETE FROM audit_checkpoint WHERE seq = 2');
    });
    const lenient = await s.verify({ staleAfterMs: 0 });
    assert.equal(lenient.ok, true, JSON.stringify(lenient));
    assert.equal(lenient.checkpoint?.seq, 1);
    assert.match(lenient.warnings.join('\n'), /checkpoint-stale: 1 event\(s\) since .* not covered by checkpoint #1/);
    const strict = await s.verify({ staleAfterMs: 0, strict: true });
    assert.deepEqual(
      strict.checkpointProblems.map(({ checkpoint, problem }) => ({ checkpoint, problem })),
      [{ checkpoint: 1, problem: 'checkpoint-stale' }],
    );
    const anchored = await s.verify({ expectCheckpoint: anchor });
    assert.deepEqual(
      anchored.checkpointProblems.map(({ checkpoint, problem }) => ({ checkpoint, problem })),
      [{ checkpoint: 2, problem: 'anchor' }],
    );
    assert.equal(anchored.ok, false);
    const firstAnchor = { seq: 1, digest: first.digest ?? '' };
    assert.deepEqual((await s.verify({ expectCheckpoint: firstAnchor })).checkpointProblems, []);
    assert.deepEqual(
      (await s.verify({ expectCheckpoint: { seq: 1, digest: '0'.repeat(64) } })).checkpointProblems.map(
        (p) => p.problem,
      ),
      ['anchor'],
    );
  });

  it('should warn, not cry tampering, when two checkpoints written during a verify prune the heads it reads', async () => {
    const s = await TestStore.create();
    const tokens = [await s.token(2), await s.token(2), await s.token(2)];
    await s.checkpoint();
    let written = false;
    const racing = {
      tables: s.pool.tables,
      query: async (text: string, params?: unknown[]) => {
        const result = await s.pool.query(text, params);
        // After the verifier's first page of heads: two checkpoints land, the second prunes #1's heads.
        if (!written && /FROM \S*audit_checkpoint_head\S*\s+WHERE checkpoint_seq = \$1 AND token_id >/.test(text)) {
          written = true;
          for (const tokenId of tokens.slice(0, 2)) {
            await store.recordAudit(s.pool, tokenId, 'later', 'token.note', { n: 3 });
            assert.equal((await s.checkpoint()).written, true);
          }
        }
        return result;
      },
    } as unknown as Queryable;
    const report = await store.verifyAuditTrail(racing, { key, batchSize: 1, staleAfterMs: 0, strict: true });
    assert.ok(written, 'the checkpoints were written during the walk');
    assert.deepEqual(report.checkpointProblems, []);
    assert.deepEqual(report.broken, []);
    assert.match(report.warnings.join('\n'), /checkpoint #1 was superseded during verification .*re-run/);
    assert.equal(report.ok, true);
  });

  it('should find an unchanged store unchanged without writing a head row', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(2);
    await s.checkpoint();
    const statements: string[] = [];
    const recording = createPool(ctx.settings.databaseUrl, s.schema, 1);
    recording.on('connect', (client) => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown;
      (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        const text = args[0] as string | { text: string };
        statements.push(typeof text === 'string' ? text : text.text);
        return query(...args);
      };
    });
    try {
      const quiet = await store.writeAuditCheckpoint(recording, key, { minIntervalMs: 0, batchSize: 1 });
      assert.deepEqual(quiet, { written: false, skipped: 'unchanged', seq: 1 });
      assert.deepEqual(
        statements.filter((text) => /INSERT INTO \S*audit_checkpoint_head/.test(text)),
        [],
        'no head row inserted (and rolled back) when nothing changed',
      );
      await store.recordAudit(s.pool, tokenId, 'n3', 'token.note', { n: 3 });
      assert.equal((await store.writeAuditCheckpoint(recording, key, { minIntervalMs: 0, batchSize: 1 })).seq, 2);
      assert.equal((await s.verify()).ok, true);
    } finally {
      await recording.end();
    }
  });

  it('should write at most one checkpoint per interval, none when no chain changed, and keep two heads', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(2);
    const first = await s.checkpoint();
    assert.equal(first.written, true);
    assert.deepEqual(
      { ...first, digest: undefined },
      { written: true, seq: 1, chains: 1, events: 2, digest: undefined },
    );
    assert.deepEqual(await s.checkpoint(60_000), { written: false, skipped: 'recent', seq: 1 });
    assert.deepEqual(await s.checkpoint(0), { written: false, skipped: 'unchanged', seq: 1 });
    for (const n of [3, 4]) {
      await store.recordAudit(s.pool, tokenId, `n${n}`, 'token.note', { n });
      const next = await s.checkpoint(0);
      assert.equal(next.written, true);
      assert.equal(next.seq, n - 1);
      assert.equal(next.events, n);
    }
    const { rows } = await s.sql.query(
      'SELECT DISTINCT checkpoint_seq FROM audit_checkpoint_head ORDER BY checkpoint_seq',
    );
    assert.deepEqual(
      rows.map((r) => r.checkpoint_seq),
      [2, 3],
      'the heads of the latest two checkpoints only',
    );
    // The checkpoint rows themselves are append-only, as the events are.
    await assert.rejects(s.sql.query('DELETE FROM audit_checkpoint WHERE seq = 1'), /append-only/);
    await assert.rejects(s.sql.query(`UPDATE audit_checkpoint SET key_id = 'x' WHERE seq = 1`), /append-only/);
  });
});

describe('audit checkpoints by the reconciler, and the CLI', () => {
  const start = (input: Omit<ReconcileInput, 'version'> = {}) =>
    ctx.client.workflow.start(WORKFLOW_TYPE.reconcile, {
      workflowId: `reconcile-${randomBytes(4).toString('hex')}`,
      taskQueue: ctx.settings.temporal.taskQueue,
      // A grace of ten years: no row is old enough to heal, the pass is only its checkpoint.
      args: [{ version: 1, graceMs: 10 * 365 * 86_400_000, ...input } satisfies ReconcileInput],
    });
  const pass = async (input: Omit<ReconcileInput, 'version'> = {}) =>
    (await start(input)).result() as Promise<ReconcileReport>;

  it('should have each pass sign the heads, and fail a pass over a tampered trail', async () => {
    const worker = await ctx.startWorker({ ...ctx.settings, auditKey: seed, auditCheckpointIntervalMs: 0 });
    try {
      const tokenId = (await insertTokenRow(ctx.pool, { subject: 'usr_audit' })).id;
      // This pass also adopts the token (its workflow never started): a history with a page, for replay.
      const firstPass = await start({ graceMs: 0 });
      const first = (await firstPass.result()) as ReconcileReport;
      await maybeRecordHistory(firstPass, 'reconcile-pass');
      assert.deepEqual(first.started, [tokenId]);
      assert.equal(first.auditCheckpoint?.written, true, JSON.stringify(first.auditCheckpoint));
      assert.match(first.auditCheckpoint?.digest ?? '', /^[0-9a-f]{64}$/);
      const report = await store.verifyAuditTrail(ctx.pool, { key });
      assert.equal(report.ok, true, JSON.stringify(report));
      assert.equal(report.checkpoint?.seq, first.auditCheckpoint?.seq);

      assert.equal((await pass()).auditCheckpoint?.skipped, 'unchanged');

      // As a database superuser would: the append-only trigger off for this transaction.
      const c = await ctx.sql.connect();
      try {
        await c.query('BEGIN');
        await c.query('SET LOCAL session_replication_role = replica');
        await c.query('DELETE FROM audit_event WHERE token_id = $1', [tokenId]);
        await c.query('COMMIT');
      } finally {
        c.release();
      }
      const failure = await pass().then(
        () => assert.fail('the pass should fail'),
        (err: unknown) => err,
      );
      assert.ok(failure instanceof WorkflowFailedError, String(failure));
      // The activity's failure, possibly inside an ActivityFailure.
      let cause: Error | undefined = failure.cause;
      while (cause instanceof ActivityFailure) cause = cause.cause;
      assert.ok(cause instanceof ApplicationFailure && cause.type === 'AuditChainTampered', String(cause));
      assert.equal(cause.nonRetryable, true);
      assert.match(cause.message, new RegExp(tokenId));
      // TokenWarden has the store's method (here without a key: the token left without any event).
      const seen = await ctx.warden.verifyAudit();
      assert.deepEqual(brokenOf(seen), [{ tokenId, seq: 1, problem: 'deleted' }]);
    } finally {
      await worker.stop();
    }
  });

  it('should exit 1 naming the token and seq, and 0 on an intact trail', async () => {
    const s = await TestStore.create();
    const tokenId = await s.token(3);
    await s.checkpoint();
    const env = {
      ...ctx.childEnv(),
      TOKENWARDEN_DB_SCHEMA: s.schema,
      TOKENWARDEN_AUDIT_PUBLIC_KEY: store.rawPublicKey(key.publicKey).toString('base64'),
    };
    const intact = await runCli(['audit', 'verify'], env);
    assert.equal(intact.code, 0, intact.stderr + intact.stdout);
    assert.match(intact.stdout, /audit trail intact/);
    assert.match(intact.stdout, new RegExp(`checkpoint key ${key.keyId} from env \\(TOKENWARDEN_AUDIT_PUBLIC_KEY\\)`));

    // Without a key only the chains are checked, and the summary says so.
    const keyless: Record<string, string> = { ...env };
    delete keyless.TOKENWARDEN_AUDIT_PUBLIC_KEY;
    const unchecked = await runCli(['audit', 'verify'], keyless);
    assert.equal(unchecked.code, 0, unchecked.stderr + unchecked.stdout);
    assert.match(unchecked.stdout, /chains intact; checkpoints NOT checked/);
    assert.doesNotMatch(unchecked.stdout, /audit trail intact/);

    // A pinned public key is never overridden by a signing key found on the host.
    const other = randomBytes(32).toString('base64');
    const conflicting = await runCli(['audit', 'verify'], { ...env, TOKENWARDEN_AUDIT_KEY: other });
    assert.equal(conflicting.code, 1, conflicting.stderr + conflicting.stdout);
    assert.match(conflicting.stderr, /TOKENWARDEN_AUDIT_PUBLIC_KEY .* signing key from TOKENWARDEN_AUDIT_KEY/);
    assert.equal(conflicting.stdout, '');
    assert.doesNotMatch(conflicting.stderr, new RegExp(other.replace(/[+/]/g, '.')));
    const pinnedStore = await TokenWardenStore.connect({
      ...ctx.settings,
      databaseSchema: s.schema,
      auditKey: randomBytes(32),
      auditPublicKey: store.rawPublicKey(key.publicKey),
    });
    try {
      await assert.rejects(pinnedStore.verifyAudit(), ConfigError);
    } finally {
      await pinnedStore.close();
    }

    await s.tamper((c) =>
      c.query(
        `UPDATE audit_event SET canonical = replace(canonical, '"event 2"', '"event 9"') WHERE token_id = $1 AND seq = 2`,
        [tokenId],
      ),
    );
    const broken = await runCli(['audit', 'verify'], env);
    assert.equal(broken.code, 1, broken.stderr);
    assert.match(broken.stdout, new RegExp(`BROKEN token ${tokenId} seq 2: edited`));

    const json = await runCli(['audit', 'verify', '--token', tokenId, '--json'], env);
    assert.equal(json.code, 1, json.stderr);
    const parsed = JSON.parse(json.stdout) as store.AuditVerifyReport;
    assert.deepEqual(brokenOf(parsed), [{ tokenId, seq: 2, problem: 'edited' }]);

    // The options the user typed are named, not the library's fields.
    const bad = await runCli(['audit', 'verify', '--token', 'nope'], env);
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /--token: /);
    const badAnchor = await runCli(['audit', 'verify', '--expect-checkpoint', '1:abc'], env);
    assert.equal(badAnchor.code, 2, badAnchor.stderr);
    assert.match(badAnchor.stderr, /--expect-checkpoint: expected <seq>:<digest>/);

    // The library's method is the CLI's.
    const library = await TokenWardenStore.connect({ ...ctx.settings, databaseSchema: s.schema, auditKey: seed });
    try {
      assert.deepEqual(brokenOf(await library.verifyAudit()), [{ tokenId, seq: 2, problem: 'edited' }]);
    } finally {
      await library.close();
    }
  });
});
