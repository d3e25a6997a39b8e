/**
 * Tokens with a policy for the self-managing tests: a policy row, a token row that names it (its raw
 * secret known to the test), and its workflow started with the policy snapshot, as issuance does.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { WorkflowHandle } from '@temporalio/client';
import { readPolicy } from '../../activities/self-managing.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import type { PolicySnapshot } from '../../common/messages.js';
import { tokenWorkflowId } from '../../common/names.js';
import { generateTokenString, hashToken } from '../../common/secrets.js';
import * as store from '../../common/store/index.js';
import { credentialLookupSql, type CredentialLookupRow } from '../../common/store/verification.js';
import { startTokenWorkflow } from '../../common/temporal.js';
import type { TestContext } from './context.js';

export interface PolicyRow {
  name: string;
  maxLifetimeMs?: number | null;
  idleTimeoutMs?: number | null;
  rotateEveryMs?: number | null;
  graceMs?: number;
  warnBeforeMs?: number[];
  allowedScopes?: string[] | null;
  onSuspicious?: 'rotate' | 'revoke';
  ownerReceiverId?: string | null;
  ownerDir?: string | null;
}

/** A fresh 0700 folder for an owner's files. */
export const ownerFolder = (): string => mkdtempSync(path.join(os.tmpdir(), 'tw-owner-'));

export async function insertPolicy(ctx: TestContext, p: PolicyRow): Promise<PolicySnapshot> {
  await ctx.sql.query(
    `INSERT INTO policy (name, max_lifetime_ms, idle_timeout_ms, rotate_every_ms, grace_ms, warn_before_ms,
                         allowed_scopes, on_suspicious, owner_receiver_id, owner_dir)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
    [
      p.name,
      p.maxLifetimeMs ?? null,
      p.idleTimeoutMs ?? null,
      p.rotateEveryMs ?? null,
      p.graceMs ?? 600_000,
      p.warnBeforeMs ?? [],
      p.allowedScopes ?? null,
      p.onSuspicious ?? 'revoke',
      p.ownerReceiverId ?? null,
      p.ownerDir ?? null,
    ],
  );
  return (await readPolicy(ctx.pool, p.name))!.snapshot;
}

export interface StartedToken {
  tokenId: string;
  /** The raw token string (the test plays the caller that holds it). */
  token: string;
  credentialId: string;
  handle: WorkflowHandle;
}

/** A token row (optionally under `policy`) and its workflow, started as issuance starts it. */
export async function startToken(
  ctx: TestContext,
  opts: { ttlMs: number; receivers?: string[]; policy?: PolicySnapshot; subject?: string; scopes?: string[] },
): Promise<StartedToken> {
  const token = generateTokenString();
  const tokenId = newTokenId();
  const credentialId = newCredentialId();
  let row = await store.insertToken(ctx.pool, {
    tokenId,
    credentialId,
    subject: opts.subject ?? 'usr_self_managing',
    name: null,
    scopes: opts.scopes ?? [],
    receivers: opts.receivers ?? [],
    ttlMs: opts.ttlMs,
    secretHash: hashToken(token),
  });
  if (opts.policy) {
    await ctx.sql.query('UPDATE token SET policy = $2 WHERE id = $1', [tokenId, opts.policy.name]);
    row = await store.requireToken(ctx.pool, tokenId);
  }
  await startTokenWorkflow(ctx.client, row, ctx.settings.temporal.taskQueue, ctx.settings.timing, opts.policy);
  return { tokenId, token, credentialId, handle: ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)) };
}

/** A new secret as a rotating caller makes it: the string stays with the caller, the hash goes to the workflow. */
export function newSecret(): { token: string; credentialId: string; secretHash: string } {
  const token = generateTokenString();
  return { token, credentialId: newCredentialId(), secretHash: createHash('sha256').update(token).digest('hex') };
}

/**
 * Whether the store holds `token` valid, through the verifier's own lookup (the store's one validity
 * path) but without the verifier's reuse kill: a test may ask about an old secret without killing the token.
 */
export async function isValid(ctx: TestContext, token: string): Promise<boolean> {
  const { rows } = await ctx.sql.query<CredentialLookupRow>(credentialLookupSql(ctx.settings.databaseSchema), [
    hashToken(token),
  ]);
  return rows.some((r) => r.valid);
}
