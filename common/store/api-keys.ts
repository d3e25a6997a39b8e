/**
 * API keys of the HTTP API. A key is `twk_<id hex>_<secret hex>`: the id finds the row, the
 * secret's SHA-256 is compared in constant time. The raw key is returned once, at creation.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { v7 as uuidv7 } from 'uuid';
import { z } from 'zod';
import type { Queryable } from '../db.js';
import { NotFoundError } from '../errors.js';
import { nameSchema, parseInput } from '../validation.js';
import { parseRow } from './rows.js';

export const API_KEY_SCOPES = ['admin', 'codec', 'introspect', 'revoke'] as const;
export type ApiKeyScope = (typeof API_KEY_SCOPES)[number];

export interface ApiKeyRecord {
  id: string;
  name: string;
  scopes: ApiKeyScope[];
  createdAt: string;
  revokedAt: string | null;
}

/** `twk_` + the id's 32 hex digits + `_` + 256 random bits in hex. */
const API_KEY_RE = /^twk_([0-9a-f]{32})_([0-9a-f]{64})$/;

const apiKeyRow = z
  .object({
    id: z.string(),
    name: z.string(),
    scopes: z.array(z.enum(API_KEY_SCOPES)),
    created_at: z.date(),
    revoked_at: z.date().nullable(),
  })
  .transform((r): ApiKeyRecord => ({
    id: r.id,
    name: r.name,
    scopes: r.scopes,
    createdAt: r.created_at.toISOString(),
    revokedAt: r.revoked_at?.toISOString() ?? null,
  }));

const toApiKey = (row: unknown) => parseRow(apiKeyRow, 'api_key', row);
const secretHash = (secret: string) => createHash('sha256').update(secret, 'utf8').digest();

export const apiKeyIdSchema = z
  .string()
  .regex(/^key_[0-9a-f]{32}$/, 'expected an API key id like key_0193…(32 hex digits)');

const apiKeyRequestSchema = z.object({
  name: nameSchema,
  scopes: z
    .array(z.enum(API_KEY_SCOPES, { error: `expected ${API_KEY_SCOPES.join(', ')}` }))
    .min(1, `at least one scope: ${API_KEY_SCOPES.join(', ')}`),
});

/** Creates a key; the raw key is in the result only. */
export async function createApiKey(
  db: Queryable,
  request: { name: string; scopes: readonly string[] },
): Promise<ApiKeyRecord & { key: string }> {
  const input = parseInput(apiKeyRequestSchema, request, 'API key');
  const hex = uuidv7().replaceAll('-', '');
  const secret = randomBytes(32).toString('hex');
  const { rows } = await db.query(
    `INSERT INTO ${db.tables.api_key} (id, name, scopes, key_hash) VALUES ($1, $2, $3, $4)
     RETURNING id, name, scopes, created_at, revoked_at`,
    [`key_${hex}`, input.name, [...new Set(input.scopes)].sort(), secretHash(secret)],
  );
  return { ...toApiKey(rows[0]), key: `twk_${hex}_${secret}` };
}

export async function listApiKeys(db: Queryable): Promise<ApiKeyRecord[]> {
  const { rows } = await db.query(
    `SELECT id, name, scopes, created_at, revoked_at FROM ${db.tables.api_key} ORDER BY id`,
  );
  return rows.map(toApiKey);
}

/** Idempotent: a revoked key keeps its first revocation time. */
export async function revokeApiKey(db: Queryable, keyId: string): Promise<ApiKeyRecord> {
  const id = parseInput(apiKeyIdSchema, keyId, 'API key id');
  const { rows } = await db.query(
    `UPDATE ${db.tables.api_key} SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
     RETURNING id, name, scopes, created_at, revoked_at`,
    [id],
  );
  if (!rows[0]) throw new NotFoundError('api key', id);
  return toApiKey(rows[0]);
}

/**
 * The active key a presented string is, or undefined (malformed, unknown, wrong secret, revoked:
 * the caller cannot tell which). Malformed strings are refused without a query.
 */
export async function authenticateApiKey(db: Queryable, presented: string): Promise<ApiKeyRecord | undefined> {
  const match = API_KEY_RE.exec(presented);
  if (!match) return undefined;
  const { rows } = await db.query(
    `SELECT id, name, scopes, created_at, revoked_at, key_hash FROM ${db.tables.api_key} WHERE id = $1`,
    [`key_${match[1]}`],
  );
  const row = rows[0] as { key_hash: Buffer; revoked_at: Date | null } | undefined;
  if (!row || !timingSafeEqual(row.key_hash, secretHash(match[2]!)) || row.revoked_at) return undefined;
  return toApiKey(row);
}
