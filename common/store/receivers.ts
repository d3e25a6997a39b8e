/** Receivers (downstream services) and their encrypted signing secrets. */
import type { Queryable, StorePool } from '../db.js';
import { InvalidInputError, NotFoundError } from '../errors.js';
import { toReceiver, type ReceiverRecord } from './rows.js';

export async function insertReceiver(
  pool: StorePool,
  receiver: { id: string; url: string; probeUrl?: string; secretCiphertext: Buffer; secretKeyId: string },
): Promise<ReceiverRecord> {
  const t = pool.tables;
  const { rows } = await pool.query(
    `INSERT INTO ${t.receiver} (id, url, probe_url, secret_ciphertext, secret_key_id) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (id) DO NOTHING RETURNING *`,
    [receiver.id, receiver.url, receiver.probeUrl ?? null, receiver.secretCiphertext, receiver.secretKeyId],
  );
  if (!rows[0]) {
    throw new InvalidInputError(`invalid receiver: id: receiver ${JSON.stringify(receiver.id)} already exists`, [
      { path: 'id', message: 'already exists' },
    ]);
  }
  return toReceiver(rows[0]);
}

export async function listReceivers(db: Queryable): Promise<ReceiverRecord[]> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT * FROM ${t.receiver} WHERE removed_at IS NULL ORDER BY id`);
  return rows.map(toReceiver);
}

/** Removal keeps the row (deliveries reference it) and stops new tokens from naming it. */
export async function removeReceiver(db: Queryable, id: string): Promise<ReceiverRecord> {
  const t = db.tables;
  const { rows } = await db.query(
    `UPDATE ${t.receiver} SET enabled = false, removed_at = coalesce(removed_at, now()) WHERE id = $1 RETURNING *`,
    [id],
  );
  if (!rows[0]) throw new NotFoundError('receiver', id);
  return toReceiver(rows[0]);
}

export async function loadReceiverSecret(
  db: Queryable,
  id: string,
): Promise<{ receiver: ReceiverRecord; ciphertext: Buffer; keyId: string } | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT * FROM ${t.receiver} WHERE id = $1`, [id]);
  const row = rows[0];
  if (!row) return undefined;
  return { receiver: toReceiver(row), ciphertext: row.secret_ciphertext as Buffer, keyId: row.secret_key_id as string };
}

export interface StoredSecret {
  receiverId: string;
  ciphertext: Buffer;
  keyId: string;
}

/** Every receiver's secret (removed ones too) not encrypted under the key `keyId` names. */
export async function listSecretsNotUnderKey(db: Queryable, keyId: string): Promise<StoredSecret[]> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT id, secret_ciphertext, secret_key_id FROM ${t.receiver} WHERE secret_key_id <> $1 ORDER BY id`,
    [keyId],
  );
  return rows.map((r) => ({
    receiverId: r.id as string,
    ciphertext: r.secret_ciphertext as Buffer,
    keyId: r.secret_key_id as string,
  }));
}

/**
 * Replaces a receiver's encrypted secret if it is still the one read (compare and set): one
 * statement, so a worker reading the row sees either pair, and both decrypt during a key roll.
 */
export async function replaceSecret(
  db: Queryable,
  from: StoredSecret,
  to: { ciphertext: Buffer; keyId: string },
): Promise<boolean> {
  const t = db.tables;
  const { rowCount } = await db.query(
    `UPDATE ${t.receiver} SET secret_ciphertext = $4, secret_key_id = $5
      WHERE id = $1 AND secret_key_id = $2 AND secret_ciphertext = $3`,
    [from.receiverId, from.keyId, from.ciphertext, to.ciphertext, to.keyId],
  );
  return rowCount === 1;
}
