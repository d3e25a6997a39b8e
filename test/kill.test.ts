/**
 * The kill as one statement (the store's kill_token function) and the audit chain written in SQL:
 * canonical JSON identical to Node's, no session state, and an expired token's time of death.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import canonicalize from 'canonicalize';
import { createPool } from '../common/db.js';
import { revocationEventId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import { insertTokenRow } from './support/tokens.js';
import { TestContext } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';
import { listenForKills } from './support/kill-listener.js';

let ctx: TestContext;
const receivers: TestReceiver[] = [];
before(async () => {
  ctx = await TestContext.create('kill');
  for (const id of ['billing', 'crm']) {
    await store.insertReceiver(ctx.pool, {
      id,
      url: `http://127.0.0.1:1/${id}`,
      secretCiphertext: Buffer.from('x'),
      secretKeyId: 'k',
    });
  }
});
after(async () => {
  for (const r of receivers) await r.close();
  await ctx?.close();
});

const newToken = (overrides: Partial<store.NewToken> = {}) =>
  insertTokenRow(ctx.pool, { subject: 'usr_kill', receivers: ['billing', 'crm'], ...overrides });

/** Moves a token's lifetime into the past, as if every worker had been down since it expired. */
async function expiredAgo(tokenId: string, hours: number): Promise<void> {
  await ctx.sql.query(
    `UPDATE token SET issued_at = now() - ($2 + 1) * interval '1 hour', expires_at = now() - $2 * interval '1 hour'
      WHERE id = $1`,
    [tokenId, hours],
  );
}

async function storedBodies(tokenId: string): Promise<string[]> {
  const { rows } = await ctx.sql.query('SELECT body FROM delivery WHERE token_id = $1 ORDER BY receiver_id', [tokenId]);
  return rows.map((r) => r.body as string);
}

const auditData = async (tokenId: string, kind: string) => {
  const event = (await store.readAudit(ctx.pool, tokenId)).find((e) => e.kind === kind);
  assert.ok(event, `an audit event ${kind}`);
  return (JSON.parse(event.canonical) as { data: Record<string, unknown> }).data;
};

// Every character class where JSON encoders differ: escapes JSON.stringify writes in short form,
// the rest of C0 (as \u00xx, lowercase), DEL and U+2028/9 (raw), astral characters (raw, not escaped).
const C0 = Array.from({ length: 0x1f }, (_, i) => String.fromCharCode(i + 1)).join('');
const HOSTILE_STRINGS = [
  '',
  C0,
  '"quoted" \\ back\\slash \\u0041 /slash/ </script>',
  '\u007f DEL \u0080 \u009f \u00a0 \u00ad',
  'line\u2028separator\u2029paragraph',
  '😀 🏳️‍🌈 𝄞 emoji and astral',
  '日本語の理由 中文 한국어',
  '\ufeff BOM \ufffd replacement \ue000 private use',
  "it's '); DROP TABLE token; -- E'\\'",
];

describe('canonical JSON in SQL', () => {
  const inSql = async (value: unknown) =>
    (await ctx.sql.query('SELECT canonical_json($1::jsonb) AS text', [JSON.stringify(value)])).rows[0].text as string;

  it('should write exactly what Node canonicalize writes, on hostile strings, keys and nesting', async () => {
    const values: unknown[] = [
      ...HOSTILE_STRINGS,
      HOSTILE_STRINGS,
      Object.fromEntries(HOSTILE_STRINGS.map((s, i) => [s, i])),
      { b: 1, a: [true, false, null, { z: [], y: {} }], A: -0, _: 9007199254740991, aa: -9007199254740991, a1: 1e2 },
      { é: 1, e: 2, 中: 3, '~': 4, ' ': 5, '': 6, Z: { nested: { deeper: [C0, ['x']] } } },
      { tokenId: 'tok_1', seq: 12, at: new Date(Date.UTC(2030, 0, 2, 3, 4, 5, 6)), prevHash: null, data: {} },
      [],
      {},
      0,
      null,
      true,
    ];
    for (const value of values) assert.equal(await inSql(value), canonicalize(value), JSON.stringify(value));
  });

  it('should refuse what it cannot write as Node does, instead of writing it differently', async () => {
    await assert.rejects(inSql({ n: 1.5 }), /safe integers only/);
    await assert.rejects(inSql({ n: 2 ** 53 }), /safe integers only/);
    // PostgreSQL text cannot hold U+0000 (the library refuses it in every field before the store).
    await assert.rejects(inSql({ s: 'nul \u0000' }), /unsupported Unicode escape sequence/);
  });

  it('should write instants as Date#toISOString does for the values node-postgres reads', async () => {
    for (const text of ['2030-02-28T23:59:59.999999Z', '2024-02-29T00:00:00Z', '1999-12-31T23:59:59.000500+05:30']) {
      const { rows } = await ctx.sql.query('SELECT $1::timestamptz AS at, iso_time($1::timestamptz) AS iso', [text]);
      assert.equal(rows[0].iso, (rows[0].at as Date).toISOString(), text);
    }
  });
});

describe('audit chain', () => {
  /** How the chain's links were written in Node before the store wrote them (kept to prove continuity). */
  function nodeLink(tokenId: string, seq: number, prevHash: string | null, kind: string, data: object) {
    const canonical = canonicalize({ tokenId, seq, kind, at: new Date().toISOString(), prevHash, data })!;
    return { canonical, hash: createHash('sha256').update(canonical, 'utf8').digest() };
  }

  it('should verify a chain written partly by Node and continued by the store, hostile text included', async () => {
    const t = await newToken({ receivers: [] });
    const [issued] = await store.readAudit(ctx.pool, t.id);
    const legacy = nodeLink(t.id, 2, issued!.hash, 'test.node', { texts: HOSTILE_STRINGS, n: 7 });
    await ctx.sql.query(
      `INSERT INTO audit_event (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
       VALUES ($1, 2, 'node', 'test.node', $2, $3, $4)`,
      [t.id, legacy.canonical, Buffer.from(issued!.hash, 'hex'), legacy.hash],
    );
    await store.recordAudit(ctx.pool, t.id, 'sql', 'test.sql', { texts: HOSTILE_STRINGS, n: 8 });
    await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: HOSTILE_STRINGS.join(' | '),
      actor: HOSTILE_STRINGS[2]!,
      initiatingEntity: 'admin',
    });
    const events = await store.readAudit(ctx.pool, t.id);
    assert.deepEqual(
      events.map((e) => e.kind),
      ['token.issued', 'test.node', 'test.sql', 'token.revoked'],
    );
    assert.equal(store.findBrokenAuditLink(events), null);
    for (const e of events) assert.equal(canonicalize(JSON.parse(e.canonical)), e.canonical, `link ${e.seq}`);
    assert.deepEqual((JSON.parse(events[2]!.canonical) as { data: unknown }).data, {
      texts: HOSTILE_STRINGS,
      n: 8,
    });
  });

  it('should keep one chain when kills and other writers race on the same token', async () => {
    for (let round = 0; round < 5; round++) {
      const t = await newToken();
      await Promise.all([
        ...[1, 2, 3].map((n) => store.recordAudit(ctx.pool, t.id, `note-${n}`, 'test.note', { n })),
        store.killToken(ctx.pool, { tokenId: t.id, reason: 'r', actor: 'a', initiatingEntity: 'admin' }),
        store.killToken(ctx.pool, { tokenId: t.id, reason: 'r', actor: 'b', initiatingEntity: 'admin' }),
      ]);
      const events = await store.readAudit(ctx.pool, t.id);
      assert.equal(events.length, 5);
      assert.equal(store.findBrokenAuditLink(events), null);
    }
  });
});

describe('the kill', () => {
  it('should store one event body with all its fields, canonical, the same for every receiver and repeat', async () => {
    const t = await newToken();
    await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'left the company',
      actor: 'admin:alice',
      initiatingEntity: 'admin',
      correlationId: 'offboarding-42',
    });
    const [billing, crm] = await storedBodies(t.id);
    assert.equal(billing, crm);
    assert.equal(canonicalize(JSON.parse(billing!)), billing);
    const row = await store.requireToken(ctx.pool, t.id);
    const { rows: creds } = await ctx.sql.query('SELECT id FROM credential WHERE token_id = $1', [t.id]);
    assert.deepEqual(JSON.parse(billing!), {
      id: revocationEventId(t.id),
      type: 'token.revoked',
      change_type: 'revoke',
      credential_type: 'api-token',
      token_id: t.id,
      credential_ids: creds.map((c) => c.id),
      sub_id: { format: 'opaque', id: 'usr_kill' },
      reason: 'left the company',
      initiating_entity: 'admin',
      actor: 'admin:alice',
      event_timestamp: Math.floor(Date.parse(row.revokedAt!) / 1000),
      occurred_at: row.revokedAt,
      txn: 'offboarding-42',
    });
    await store.killToken(ctx.pool, { tokenId: t.id, reason: 'again', actor: 'admin:bob', initiatingEntity: 'admin' });
    assert.deepEqual(await storedBodies(t.id), [billing, crm]);
  });

  it('should kill in one statement on a connection that keeps no state (DISCARD ALL between kills)', async () => {
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    let statements = 0;
    pool.on('connect', (client) => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown;
      client.query = ((...args: unknown[]) => (statements++, query(...args))) as typeof client.query;
    });
    const statementsPerKill: number[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        const t = await newToken();
        statements = 0;
        const killed = await store.killToken(pool, {
          tokenId: t.id,
          reason: 'r',
          actor: 'a',
          initiatingEntity: 'admin',
        });
        statementsPerKill.push(statements);
        assert.equal(killed.changed, true);
        await pool.query('DISCARD ALL');
        await store.recordAudit(pool, t.id, 'after-discard', 'test.note', {});
      }
    } finally {
      await pool.end();
    }
    assert.deepEqual(statementsPerKill, [1, 1, 1], 'one statement (one round trip) per kill');
  });

  it('should resolve its tables in its own schema, never a session temporary table', async () => {
    const { rows } = await ctx.sql.query(
      `SELECT p.proname, p.proconfig FROM pg_proc p
        WHERE p.pronamespace = $1::regnamespace
          AND p.proname IN ('kill_token', 'kill_expired_tokens', 'revocation_event_id', 'append_audit')`,
      [ctx.settings.databaseSchema],
    );
    assert.equal(rows.length, 4);
    for (const r of rows as { proname: string; proconfig: string[] }[]) {
      assert.deepEqual(r.proconfig, [`search_path=${ctx.settings.databaseSchema}, pg_temp`], r.proname);
    }
  });

  it('should notify `<schema>:<tokenId>` when it kills, and not when the token was already dead', async () => {
    const listener = await listenForKills(ctx.settings.databaseUrl);
    const { payloads } = listener;
    try {
      const t = await newToken();
      const kill = () =>
        store.killToken(ctx.pool, { tokenId: t.id, reason: 'r', actor: 'a', initiatingEntity: 'admin' });
      await kill();
      await kill();
      const marker = await newToken();
      await store.killToken(ctx.pool, { tokenId: marker.id, reason: 'r', actor: 'a', initiatingEntity: 'admin' });
      await waitUntil(() => payloads.includes(`${ctx.settings.databaseSchema}:${marker.id}`), 'the marker NOTIFY');
      assert.deepEqual(payloads, [
        `${ctx.settings.databaseSchema}:${t.id}`,
        `${ctx.settings.databaseSchema}:${marker.id}`,
      ]);
    } finally {
      await listener.end();
    }
  });

  it('should record that the workflow took over when its kill finds the token already dead', async () => {
    const t = await newToken();
    const first = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'r',
      actor: 'a',
      initiatingEntity: 'admin',
    });
    assert.equal(first.token.propagationStartedAt, null);
    const byWorkflow = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'r',
      actor: 'a',
      initiatingEntity: 'admin',
      byWorkflow: true,
    });
    assert.equal(byWorkflow.changed, false);
    assert.ok(byWorkflow.token.propagationStartedAt);
    assert.equal(byWorkflow.token.revokedAt, first.token.revokedAt);
    assert.equal((await store.readAudit(ctx.pool, t.id)).length, 2);
  });
});

describe('time of death of an expired token', () => {
  it('should be its expiry, by the system, in the row, the event body and the audit, whoever kills it late', async () => {
    const t = await newToken();
    await expiredAgo(t.id, 3);
    const killed = await store.killToken(ctx.pool, {
      tokenId: t.id,
      reason: 'expired',
      actor: 'reconciler',
      initiatingEntity: 'system',
      onlyIfExpired: true,
    });
    const expiresAt = killed.token.expiresAt;
    assert.ok(Date.now() - Date.parse(expiresAt) > 2 * 3_600_000);
    assert.equal(killed.changed, true);
    assert.equal(killed.token.status, 'expired');
    assert.equal(killed.token.revokedAt, expiresAt);
    assert.equal(killed.token.revokedBy, 'system');
    assert.equal(killed.token.revokeReason, 'expired');
    assert.equal(killed.token.initiatingEntity, 'system');

    const body = JSON.parse((await storedBodies(t.id))[0]!);
    assert.equal(body.type, 'token.expired');
    assert.equal(body.occurred_at, expiresAt);
    assert.equal(body.event_timestamp, Math.floor(Date.parse(expiresAt) / 1000));
    assert.equal(body.actor, 'system');
    assert.equal(body.initiating_entity, 'system');

    const data = await auditData(t.id, 'token.expired');
    assert.equal(data.occurredAt, expiresAt);
    assert.equal(data.actor, 'system');

    const { rows } = await ctx.sql.query('SELECT revoked_at FROM credential WHERE token_id = $1', [t.id]);
    assert.equal((rows[0].revoked_at as Date).toISOString(), expiresAt);
    const shown = await ctx.warden.show(t.id);
    assert.equal(shown.revokedAt, expiresAt);
    assert.equal(shown.revokedBy, 'system');
  });

  it('should say system, not the revoker, when a revoke is processed just past expiry', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_kill', ttl: '300ms', receivers: ['billing'] });
    await waitUntil(async () => !(await store.requireToken(ctx.pool, tokenId)).valid, 'the token to expire');
    const outcome = await ctx.warden.revoke({
      tokenId,
      reason: 'offboarding',
      actor: 'cli:alice',
      initiatingEntity: 'admin',
    });
    const row = await store.requireToken(ctx.pool, tokenId);
    assert.equal(row.status, 'expired');
    assert.equal(row.revokedAt, row.expiresAt);
    assert.equal(row.revokedBy, 'system');
    assert.equal(row.revokeReason, 'expired');
    assert.equal(row.initiatingEntity, 'system');
    assert.equal(outcome.revokedBy, 'system');
    const body = JSON.parse((await storedBodies(tokenId))[0]!);
    assert.equal(body.type, 'token.expired');
    assert.equal(body.actor, 'system');
    assert.equal(body.initiating_entity, 'system');
    assert.equal(body.reason, 'expired');
    assert.equal(body.occurred_at, row.expiresAt);
  });

  it('should reach receivers with the expiry as its time after a worker outage', async () => {
    const receiver = await TestReceiver.start();
    receivers.push(receiver);
    const added = await ctx.warden.addReceiver({ id: 'late', url: receiver.url });
    receiver.secret = added.secret;
    // No worker runs yet: the token expires unattended.
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_outage', ttl: '300ms', receivers: ['late'] });
    await waitUntil(async () => !(await store.requireToken(ctx.pool, tokenId)).valid, 'the token to expire');
    await expiredAgo(tokenId, 2);
    const worker = await ctx.startWorker();
    try {
      await waitUntil(() => receiver.requests.length > 0, 'the expiry event', 30_000);
    } finally {
      await worker.stop();
    }
    const expiresAt = (await store.requireToken(ctx.pool, tokenId)).expiresAt;
    const event = JSON.parse(receiver.requests[0]!.body);
    assert.equal(receiver.requests[0]!.verified, true);
    assert.equal(event.type, 'token.expired');
    assert.equal(event.occurred_at, expiresAt);
    assert.equal(event.actor, 'system');
  });
});
