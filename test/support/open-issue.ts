/**
 * A token issued in a transaction left open (its own connection): the window in which a bulk kill
 * must not miss it. `commit` ends the transaction.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';

export interface OpenIssue {
  tokenId: string;
  commit(): Promise<void>;
}

/** `via`: the one-token issue (issue_token), or a bulk import's batch (import_tokens). */
export async function issueInOpenTransaction(
  sql: pg.Pool,
  subject: string,
  name: string | null,
  via: 'issue' | 'import' = 'issue',
): Promise<OpenIssue> {
  const client = await sql.connect();
  const tokenId = `tok_${randomBytes(16).toString('hex')}`;
  const credentialId = `cred_${randomBytes(8).toString('hex')}`;
  try {
    await client.query('BEGIN');
    if (via === 'issue') {
      await client.query(`SELECT issue_token($1, $2, $3, $4, '{}', '{}', 3600000, $5)`, [
        tokenId,
        credentialId,
        subject,
        name,
        randomBytes(32),
      ]);
    } else {
      const { rows } = await client.query(
        `SELECT outcome FROM import_tokens($1, $2, '{true}', $3, $4, $5, '{"[]"}', '{"[]"}', '{NULL}', '{3600000}', true)`,
        [[tokenId], [credentialId], [randomBytes(32)], [subject], [name]],
      );
      if (rows[0]?.outcome !== 'inserted') throw new Error(`import_tokens answered ${String(rows[0]?.outcome)}`);
    }
  } catch (err) {
    client.release(true);
    throw err;
  }
  return {
    tokenId,
    async commit() {
      try {
        await client.query('COMMIT');
      } finally {
        client.release();
      }
    },
  };
}

/** Whether a session waits on this store's issuance barrier now (all issues, or one subject's). */
export async function waitingOnIssuanceBarrier(sql: pg.Pool, perSubject: boolean): Promise<boolean> {
  const { rows } = await sql.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_locks
      WHERE locktype = 'advisory' AND NOT granted AND objsubid = 2
        AND classid::bigint = (issuance_lock_class($1)::bigint & 4294967295)`,
    [perSubject],
  );
  return rows[0]!.n > 0;
}
