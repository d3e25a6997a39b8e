/**
 * The append-only, per-token hash chain of audit events: canonical JSON (RFC 8785) of each event,
 * hashed with SHA-256. The store's `append_audit` function writes every link (migrations/0002), so
 * the kill appends in its own statement exactly as every other writer does; Node only verifies.
 */
import { createHash } from 'node:crypto';
import type { Queryable, StorePool } from '../db.js';
import { routine, type AuditRecord } from './rows.js';

/**
 * Appends one event to the token's hash chain: one statement, in the caller's transaction when `db`
 * is a checked-out client. It takes the token row's lock so concurrent writers cannot fork the
 * chain; a repeated idempotency key is a no-op, so a retried activity does not log twice. `data` is
 * JSON with integer numbers only (the store's canonical JSON refuses fractions).
 */
export async function appendAudit(
  db: Queryable,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  await db.query(`SELECT ${routine(db.tables, 'append_audit')}($1, $2, $3, $4::jsonb)`, [
    tokenId,
    idempotencyKey,
    kind,
    JSON.stringify(data),
  ]);
}

export async function recordAudit(
  pool: StorePool,
  tokenId: string,
  idempotencyKey: string,
  kind: string,
  data: Record<string, unknown>,
): Promise<void> {
  await appendAudit(pool, tokenId, idempotencyKey, kind, data);
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
