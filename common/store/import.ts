/** Bulk writes of tokens whose secret hashes are known: imports, and bulk issue's journaled tokens. */
import type { Queryable } from '../db.js';
import { routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

export interface ImportedToken {
  tokenId: string;
  credentialId: string;
  /** False when the record named no id (a fresh one was chosen): a stored hash then counts as this token. */
  idGiven: boolean;
  secretHash: Buffer;
  subject: string;
  name: string | null;
  scopes: string[];
  receivers: string[];
  /** Exactly one of the two: an absolute expiry, or a lifetime from the database clock's now. */
  expiresAt: string | null;
  ttlMs: number | null;
}

export type ImportOutcome =
  | { outcome: 'inserted'; token: TokenRecord }
  /** Stored before (a rerun): `token` is the stored row, which wins over the record. */
  | { outcome: 'existing'; token: TokenRecord }
  /** Nothing written: `field` is the record's field at fault (`secret` for the token or its hash). */
  | { outcome: 'conflict'; field: string; message: string };

/**
 * Writes a batch in one statement (the store's `import_tokens`, migrations/0013): per record, in
 * order, inserted, existing (a rerun), or a conflict with its reason; one record never aborts the
 * batch. `imported` marks the audit events of tokens brought under management.
 */
export async function importTokens(
  db: Queryable,
  batch: readonly ImportedToken[],
  imported: boolean,
): Promise<ImportOutcome[]> {
  if (batch.length === 0) return [];
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT r_ord, r_outcome, r_field, r_message, ${tokenColumns(db.tables)}
       FROM (SELECT r.ord AS r_ord, r.outcome AS r_outcome, r.field AS r_field, r.message AS r_message, (r.facts).*
               FROM ${routine(t, 'import_tokens')}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) AS r) AS imported
      ORDER BY r_ord`,
    [
      batch.map((r) => r.tokenId),
      batch.map((r) => r.credentialId),
      batch.map((r) => r.idGiven),
      batch.map((r) => `\\x${r.secretHash.toString('hex')}`),
      batch.map((r) => r.subject),
      batch.map((r) => r.name),
      batch.map((r) => JSON.stringify(r.scopes)),
      batch.map((r) => JSON.stringify(r.receivers)),
      batch.map((r) => r.expiresAt),
      batch.map((r) => r.ttlMs),
      imported,
    ],
  );
  if (rows.length !== batch.length) {
    throw new Error(`the store answered ${rows.length} outcome(s) for a batch of ${batch.length}`);
  }
  return rows.map((row: { r_outcome: string; r_field: string | null; r_message: string | null }) =>
    row.r_outcome === 'conflict'
      ? { outcome: 'conflict', field: row.r_field ?? '(record)', message: row.r_message ?? 'refused by the store' }
      : { outcome: row.r_outcome as 'inserted' | 'existing', token: toToken(row) },
  );
}
