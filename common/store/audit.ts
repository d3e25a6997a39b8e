/**
 * The append-only, per-token hash chain of audit events (canonical JSON, RFC 8785, and SHA-256).
 */
import canonicalize from 'canonicalize';
import { createHash } from 'node:crypto';
import type { Queryable, StoreClient, StorePool } from '../db.js';
import { inTransaction, type AuditRecord } from './rows.js';

/**
 * Appends one event to the token's hash chain, in the caller's transaction. Takes the token row's
 * lock so concurrent writers cannot fork the chain; a repeated idempotency key is a no-op, so a
 * retried activity does not log twice.
 */
export async function appendAudit(
  client: StoreClient,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  const t = client.tables;
  await client.query(`SELECT 1 FROM ${t.token} WHERE id = $1 FOR UPDATE`, [tokenId]);
  const { rows } = await client.query(
    `SELECT now() AS now,
            (SELECT 1 FROM ${t.audit_event} WHERE token_id = $1 AND idempotency_key = $2) AS seen,
            last.seq, last.hash
       FROM (SELECT 1) one
       LEFT JOIN LATERAL (SELECT seq, hash FROM ${t.audit_event} WHERE token_id = $1 ORDER BY seq DESC LIMIT 1) last ON true`,
    [tokenId, idempotencyKey],
  );
  const head = rows[0] as { now: Date; seen: number | null; seq: number | null; hash: Buffer | null };
  if (head.seen) return;
  const event = sealAuditEvent(tokenId, head, kind, data);
  await client.query(
    `INSERT INTO ${t.audit_event} (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
     VALUES ($1, $2, $3, $4, $5, $6, $7)`,
    [tokenId, event.seq, idempotencyKey, kind, event.canonical, head.hash, event.hash],
  );
}

/** The next link of a token's chain: canonical JSON (RFC 8785) of the event, and its SHA-256. */
export function sealAuditEvent(
  tokenId: string,
  head: { now: Date; seq: number | null; hash: Buffer | null },
  kind: string,
  data: Record<string, unknown>,
): { seq: number; canonical: string; hash: Buffer } {
  const seq = (head.seq ?? 0) + 1;
  const prevHash = head.hash ? head.hash.toString('hex') : null;
  const canonical = canonicalize({ tokenId, seq, kind, at: head.now.toISOString(), prevHash, data });
  if (canonical === undefined) throw new Error('audit event is not serialisable');
  return { seq, canonical, hash: createHash('sha256').update(canonical, 'utf8').digest() };
}

export async function recordAudit(
  pool: StorePool,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  await inTransaction(pool, (client) => appendAudit(client, tokenId, idempotencyKey, kind, data));
}

export async function readAudit(db: Queryable, tokenId: string): Promise<AuditRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT seq, kind, canonical, hash, prev_hash FROM ${t.audit_event} WHERE token_id = $1 ORDER BY seq`,
    [tokenId],
  );
  return rows.map((r) => ({
    seq: r.seq as number,
    kind: r.kind as string,
    canonical: r.canonical as string,
    hash: (r.hash as Buffer).toString('hex'),
    prevHash: r.prev_hash ? (r.prev_hash as Buffer).toString('hex') : null,
  }));
}

/** Recomputes the chain; returns the seq of the first broken link, or null when intact. */
export function findBrokenAuditLink(events: AuditRecord[]): number | null {
  let prev: string | null = null;
  for (const event of events) {
    const hash = createHash('sha256').update(event.canonical, 'utf8').digest('hex');
    const body = JSON.parse(event.canonical) as { prevHash: string | null; seq: number };
    if (hash !== event.hash || event.prevHash !== prev || body.prevHash !== prev || body.seq !== event.seq) {
      return event.seq;
    }
    prev = hash;
  }
  return null;
}
