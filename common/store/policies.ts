/**
 * Named policies (table `policy`, migrations/0014) and the tokens under them: write and read a
 * policy, the live tokens a `policy apply` evaluates and tells, and the version each token's workflow
 * was told of (migrations/0016), which makes an apply resumable.
 */
import { z } from 'zod';
import type { Queryable } from '../db.js';
import { quoteIdent } from '../identifiers.js';
import { NotFoundError } from '../errors.js';
import type { PolicySnapshot } from '../messages.js';
import { SUSPICIOUS_ACTIONS, type SuspiciousAction } from '../names.js';
import { parseRow } from './rows.js';

/** A policy as written by `policy set` (durations in ms; null: no such limit). */
export interface PolicyInput {
  name: string;
  maxLifetimeMs: number | null;
  idleTimeoutMs: number | null;
  rotateEveryMs: number | null;
  graceMs: number;
  /** Largest first. */
  warnBeforeMs: number[];
  /** Null: any scope. */
  allowedScopes: string[] | null;
  onSuspicious: SuspiciousAction;
  ownerReceiverId: string | null;
  ownerDir: string | null;
}

export interface PolicyRecord extends PolicyInput {
  /** 1 when created; every `policy set` adds one. */
  version: number;
  createdAt: string;
  updatedAt: string;
}

const policyTable = (db: Queryable) => `${quoteIdent(db.tables.schema)}.policy`;

// bigint comes back from pg as text: the durations are read as float8 (exact far beyond any lifetime).
const POLICY_COLUMN_CASTS = {
  name: '',
  max_lifetime_ms: '::float8',
  idle_timeout_ms: '::float8',
  rotate_every_ms: '::float8',
  grace_ms: '::float8',
  warn_before_ms: '::float8[]',
  allowed_scopes: '',
  on_suspicious: '',
  owner_receiver_id: '',
  owner_dir: '',
  version: '',
  created_at: '',
  updated_at: '',
};
const POLICY_COLUMNS = Object.entries(POLICY_COLUMN_CASTS)
  .map(([column, cast]) => (cast ? `${column}${cast} AS ${column}` : column))
  .join(', ');

/** The columns of a value of the store's policy row type (`expr`), each named `<prefix><column>`. */
export const policyColumnsOf = (expr: string, prefix: string): string =>
  Object.entries(POLICY_COLUMN_CASTS)
    .map(([column, cast]) => `(${expr}).${column}${cast} AS ${prefix}${column}`)
    .join(', ');

/** The policy read by policyColumnsOf, or undefined when the value was null (no policy). */
export function policyFromColumns(row: Record<string, unknown>, prefix: string): PolicyRecord | undefined {
  if (row[`${prefix}name`] === null || row[`${prefix}name`] === undefined) return undefined;
  return toPolicy(Object.fromEntries(Object.keys(POLICY_COLUMN_CASTS).map((c) => [c, row[`${prefix}${c}`]])));
}

const nullableMs = z.number().nullable();
const policyRow = z
  .object({
    name: z.string(),
    max_lifetime_ms: nullableMs,
    idle_timeout_ms: nullableMs,
    rotate_every_ms: nullableMs,
    grace_ms: z.number(),
    warn_before_ms: z.array(z.number()),
    allowed_scopes: z.array(z.string()).nullable(),
    on_suspicious: z.enum(SUSPICIOUS_ACTIONS),
    owner_receiver_id: z.string().nullable(),
    owner_dir: z.string().nullable(),
    version: z.number().int(),
    created_at: z.date().transform((d) => d.toISOString()),
    updated_at: z.date().transform((d) => d.toISOString()),
  })
  .transform((r): PolicyRecord => ({
    name: r.name,
    maxLifetimeMs: r.max_lifetime_ms,
    idleTimeoutMs: r.idle_timeout_ms,
    rotateEveryMs: r.rotate_every_ms,
    graceMs: r.grace_ms,
    warnBeforeMs: r.warn_before_ms,
    allowedScopes: r.allowed_scopes,
    onSuspicious: r.on_suspicious,
    ownerReceiverId: r.owner_receiver_id,
    ownerDir: r.owner_dir,
    version: r.version,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  }));

const toPolicy = (row: unknown) => parseRow(policyRow, 'policy', row);

/** What the workflow is given of a policy: no destination details (a folder, a receiver id) in history. */
export const policySnapshot = (p: PolicyRecord): PolicySnapshot => ({
  name: p.name,
  version: p.version,
  maxLifetimeMs: p.maxLifetimeMs,
  idleTimeoutMs: p.idleTimeoutMs,
  rotateEveryMs: p.rotateEveryMs,
  graceMs: p.graceMs,
  warnBeforeMs: p.warnBeforeMs,
  allowedScopes: p.allowedScopes,
  onSuspicious: p.onSuspicious,
  hasOwnerDestination: p.ownerReceiverId !== null || p.ownerDir !== null,
});

/**
 * Creates the policy, or replaces every field of it and adds one to its version. Tokens under it are
 * unchanged until `policy apply` tells their workflows.
 */
export async function upsertPolicy(db: Queryable, p: PolicyInput): Promise<PolicyRecord> {
  const { rows } = await db.query(
    `INSERT INTO ${policyTable(db)} AS p (name, max_lifetime_ms, idle_timeout_ms, rotate_every_ms, grace_ms,
       warn_before_ms, allowed_scopes, on_suspicious, owner_receiver_id, owner_dir)
     VALUES ($1, $2, $3, $4, $5, $6::bigint[], $7::text[], $8, $9, $10)
     ON CONFLICT (name) DO UPDATE SET
       max_lifetime_ms = EXCLUDED.max_lifetime_ms, idle_timeout_ms = EXCLUDED.idle_timeout_ms,
       rotate_every_ms = EXCLUDED.rotate_every_ms, grace_ms = EXCLUDED.grace_ms,
       warn_before_ms = EXCLUDED.warn_before_ms, allowed_scopes = EXCLUDED.allowed_scopes,
       on_suspicious = EXCLUDED.on_suspicious, owner_receiver_id = EXCLUDED.owner_receiver_id,
       owner_dir = EXCLUDED.owner_dir, version = p.version + 1, updated_at = now()
     RETURNING ${POLICY_COLUMNS}`,
    [
      p.name,
      p.maxLifetimeMs,
      p.idleTimeoutMs,
      p.rotateEveryMs,
      p.graceMs,
      p.warnBeforeMs,
      p.allowedScopes,
      p.onSuspicious,
      p.ownerReceiverId,
      p.ownerDir,
    ],
  );
  return toPolicy(rows[0]);
}

export async function getPolicy(db: Queryable, name: string): Promise<PolicyRecord | undefined> {
  const { rows } = await db.query(`SELECT ${POLICY_COLUMNS} FROM ${policyTable(db)} WHERE name = $1`, [name]);
  return rows[0] ? toPolicy(rows[0]) : undefined;
}

export async function requirePolicy(db: Queryable, name: string): Promise<PolicyRecord> {
  const policy = await getPolicy(db, name);
  if (!policy) throw new NotFoundError('policy', name);
  return policy;
}

/** A live token of a policy, with what evaluatePolicy needs. */
export interface PolicyToken {
  id: string;
  subject: string;
  issuedAt: string;
  expiresAt: string;
  scopes: string[];
  lastUsedAt: string | null;
  /** The policy version its workflow was last told of (null: never, e.g. a token put under it by hand). */
  policyVersion: number | null;
}

const iso = z.date().transform((d) => d.toISOString());
const policyTokenRow = z
  .object({
    id: z.string(),
    subject: z.string(),
    issued_at: iso,
    expires_at: iso,
    scopes: z.array(z.string()),
    last_used_at: iso.nullable(),
    policy_version: z.number().int().nullable(),
  })
  .transform((r): PolicyToken => ({
    id: r.id,
    subject: r.subject,
    issuedAt: r.issued_at,
    expiresAt: r.expires_at,
    scopes: r.scopes,
    lastUsedAt: r.last_used_at,
    policyVersion: r.policy_version,
  }));

/**
 * A page of the live tokens (active, not past expiry) of a policy, by id after `afterId`; with
 * `untoldOf`, only those whose workflow was not yet told of that version. `dbNow` is the database
 * clock of the read: a dry run evaluates against it, as the workflow does against its own time.
 */
export async function policyTokensPage(
  db: Queryable,
  policy: string,
  opts: { afterId: string | null; limit: number; untoldOf?: number },
): Promise<{ tokens: PolicyToken[]; dbNow: string }> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT id, subject, issued_at, expires_at, scopes, last_used_at, policy_version, now() AS db_now
       FROM ${t.token}
      WHERE policy = $1 AND status = 'active' AND expires_at > now()
        AND ($2::text IS NULL OR id > $2)
        AND ($4::integer IS NULL OR policy_version IS NULL OR policy_version < $4)
      ORDER BY id LIMIT $3`,
    [policy, opts.afterId, opts.limit, opts.untoldOf ?? null],
  );
  const dbNow = rows[0]
    ? (rows[0] as { db_now: Date }).db_now.toISOString()
    : ((await db.query(`SELECT now() AS db_now`)).rows[0] as { db_now: Date }).db_now.toISOString();
  return { tokens: rows.map((r) => parseRow(policyTokenRow, 'token', r)), dbNow };
}

/** How many live tokens of the policy have not been told of `version`. */
export async function countUntoldPolicyTokens(db: Queryable, policy: string, version: number): Promise<number> {
  const t = db.tables;
  const { rows } = await db.query(
    `SELECT count(*)::integer AS n FROM ${t.token}
      WHERE policy = $1 AND status = 'active' AND expires_at > now()
        AND (policy_version IS NULL OR policy_version < $2)`,
    [policy, version],
  );
  return (rows[0] as { n: number }).n;
}

/** Records that these tokens' workflows were told of `version` (never lowers a version). */
export async function markPolicyTold(
  db: Queryable,
  tokenIds: readonly string[],
  policy: string,
  version: number,
): Promise<void> {
  if (tokenIds.length === 0) return;
  const t = db.tables;
  // Rows locked in id order, as every statement that locks several tokens does (no deadlock with a
  // kill or a bulk revoke); a plain UPDATE would lock them in the order its plan reads them.
  await db.query(
    `WITH due AS (
       SELECT id FROM ${t.token}
        WHERE id = ANY ($1::text[]) AND policy = $2 AND (policy_version IS NULL OR policy_version < $3)
        ORDER BY id FOR UPDATE
     )
     UPDATE ${t.token} AS t SET policy_version = $3 FROM due
      WHERE t.id = due.id AND (t.policy_version IS NULL OR t.policy_version < $3)`,
    [tokenIds, policy, version],
  );
}

/** The policy a token is under (null: none), and the version its workflow knows. */
export async function tokenPolicy(
  db: Queryable,
  tokenId: string,
): Promise<{ policy: string | null; policyVersion: number | null; dbNow: string } | undefined> {
  const t = db.tables;
  const { rows } = await db.query(`SELECT policy, policy_version, now() AS db_now FROM ${t.token} WHERE id = $1`, [
    tokenId,
  ]);
  const r = rows[0] as { policy: string | null; policy_version: number | null; db_now: Date } | undefined;
  return r && { policy: r.policy, policyVersion: r.policy_version, dbNow: r.db_now.toISOString() };
}

/** The snapshot a workflow (re)started for `token` is given: its policy's now, or none without one. */
export async function workflowPolicyOf(
  db: Queryable,
  token: { policy: string | null },
): Promise<PolicySnapshot | undefined> {
  const policy = token.policy ? await getPolicy(db, token.policy) : undefined;
  return policy ? policySnapshot(policy) : undefined;
}
