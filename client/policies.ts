/**
 * Named policies: `set` (validated, each field named), `show`, and `apply`. A dry run evaluates every
 * live token of the policy with common/policy.ts evaluatePolicy, the function the workflow applies,
 * against the database clock, and lists what would be shortened or revoked and why. An apply tells
 * each live token's workflow (Signal policyChanged, paced by client/tell.ts); each token records the
 * policy version its workflow was told of, so an interrupted apply resumes with the tokens not told.
 */
import { randomUUID } from 'node:crypto';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { z } from 'zod';
import { checkout, type StoreClient, type StorePool } from '../common/db.js';
import { formatDuration } from '../common/durations.js';
import { InvalidInputError, PolicyApplyInProgressError } from '../common/errors.js';
import { policyChangedSignal, type PolicyChangedSignal } from '../common/messages.js';
import { SUSPICIOUS_ACTIONS, tokenWorkflowId } from '../common/names.js';
import { evaluatePolicy } from '../common/policy.js';
import {
  countUntoldPolicyTokens,
  markPolicyTold,
  policySnapshot,
  policyTokensPage,
  requirePolicy,
  upsertPolicy,
  type PolicyRecord,
  type PolicyToken,
} from '../common/store/policies.js';
import { loadReceiverSecret } from '../common/store/receivers.js';
import { ownerDirProblem } from '../common/owner-dir.js';
import { parseInput, parsePolicyName, receiverIdSchema, ttlSchema, UNPRINTABLE } from '../common/validation.js';
import { graceSchema } from './self-managing.js';
import { GIVE_UP_AFTER, NOT_RUNNING, tellPaced, type TellProgress } from './tell.js';

export type { PolicyRecord } from '../common/store/policies.js';

export const scopeSchema = z.string().regex(/^[\x21-\x7e]{1,100}$/, 'expected a scope without spaces');

const ownerDirSchema = z
  .string()
  .min(2)
  .max(1000, 'at most 1000 characters')
  .refine((d) => d.startsWith('/'), 'expected an absolute path')
  .refine((d) => !UNPRINTABLE.test(d), 'must not contain control characters');

/** A policy's grace when none is given (the `policy` table's default too). */
export const DEFAULT_POLICY_GRACE_MS = 600_000;

/** The fields of a policy (the name comes from elsewhere: the command's argument, the URL). */
export const policyFieldsSchema = (maxTtlMs: number) =>
  z
    .strictObject({
      maxTtl: ttlSchema(maxTtlMs).optional(),
      idleTimeout: ttlSchema(maxTtlMs).optional(),
      rotateEvery: ttlSchema(maxTtlMs).optional(),
      grace: graceSchema.optional(),
      /** Warnings before expiry or idle revocation, e.g. ['30d', '7d', '1d']. */
      warn: z.array(ttlSchema(maxTtlMs)).max(10, 'at most 10 warnings').optional(),
      /** Absent: any scope. */
      scopes: z.array(scopeSchema).min(1, 'expected at least one scope (omit it to allow any)').max(100).optional(),
      onSuspicious: z.enum(SUSPICIOUS_ACTIONS).default('revoke'),
      /** A receiver that gets the owner's notices (warnings, automatically rotated secrets), signed. */
      ownerReceiver: receiverIdSchema.optional(),
      /** For the dev stack: a folder (0700) where notices are written as 0600 files. */
      ownerDir: ownerDirSchema.optional(),
    })
    .superRefine((p, ctx) => {
      const issue = (path: string, message: string) => ctx.addIssue({ code: 'custom', path: [path], message });
      const hasOwner = p.ownerReceiver !== undefined || p.ownerDir !== undefined;
      if (p.ownerReceiver !== undefined && p.ownerDir !== undefined) {
        issue('ownerDir', 'give an owner receiver or an owner folder, not both');
      }
      // Each of these sends something to the token's owner: without a destination it could not.
      if (p.rotateEvery !== undefined && !hasOwner) {
        issue('rotateEvery', 'automatic rotation sends the new secret to the owner: set ownerReceiver or ownerDir');
      }
      if (p.warn !== undefined && p.warn.length > 0 && !hasOwner) {
        issue('warn', 'warnings go to the owner: set ownerReceiver or ownerDir');
      }
      if (p.onSuspicious === 'rotate' && !hasOwner) {
        issue('onSuspicious', 'rotate sends the new secret to the owner: set ownerReceiver or ownerDir');
      }
      // The grace stored, given or not: a rotation inside the previous one's grace revokes a
      // credential clients may still use, and their next use kills the token as reuse.
      if (p.rotateEvery !== undefined && (p.grace ?? DEFAULT_POLICY_GRACE_MS) >= p.rotateEvery) {
        issue(
          'grace',
          p.grace !== undefined
            ? 'must be shorter than the rotation period (rotateEvery)'
            : `the default grace (${formatDuration(DEFAULT_POLICY_GRACE_MS)}) is not shorter than the rotation period (rotateEvery): give a shorter grace`,
        );
      }
      if (p.maxTtl !== undefined && p.warn?.some((w) => w >= p.maxTtl!)) {
        issue('warn', 'each warning must come before the max lifetime (maxTtl)');
      }
    });
export type PolicyFields = z.input<ReturnType<typeof policyFieldsSchema>>;

export const POLICY_APPLY_DEFAULTS = { rate: 200, concurrency: 16, batchSize: 500 } as const;

const applySchema = z.strictObject({
  dryRun: z.boolean().default(false),
  /** Workflows told per second at most (Temporal's rate limits are per namespace). */
  rate: z.number().positive().max(10_000).default(POLICY_APPLY_DEFAULTS.rate),
  concurrency: z.number().int().min(1).max(256).default(POLICY_APPLY_DEFAULTS.concurrency),
  /** Tokens read per page (memory stays flat whatever the policy's size). */
  batchSize: z.number().int().min(1).max(1000).default(POLICY_APPLY_DEFAULTS.batchSize),
});

export type ApplyPolicyOptions = z.input<typeof applySchema> & {
  /** Stops telling workflows; run apply again to tell the rest. */
  signal?: AbortSignal;
  onProgress?: (progress: TellProgress) => void;
};

/** One token a dry run would change. */
export type PolicyFinding =
  | { tokenId: string; subject: string; action: 'shorten'; expiresAt: string; newExpiresAt: string; why: string }
  | { tokenId: string; subject: string; action: 'revoke'; reason: 'policy' | 'inactive'; why: string };

export interface PolicyDryRunReport {
  policy: string;
  version: number;
  dryRun: true;
  /** The database clock the tokens were evaluated at. */
  asOf: string;
  /** Live tokens of the policy evaluated. */
  evaluated: number;
  /** Tokens the policy leaves as they are. */
  unchanged: number;
  shorten: Extract<PolicyFinding, { action: 'shorten' }>[];
  revoke: Extract<PolicyFinding, { action: 'revoke' }>[];
}

export interface PolicyApplyReport {
  policy: string;
  version: number;
  dryRun: false;
  /** On every token's policyChanged signal (audited by its workflow). */
  operationId: string;
  /** Live tokens not yet told of this version when the apply began. */
  total: number;
  signalled: number;
  /** Tokens not told (abort, failures, no running workflow): run apply again. */
  notSignalled: string[];
  aborted: boolean;
  /** Live tokens of the policy still not told of this version (a rerun tells exactly these). */
  remaining: number;
  warnings: string[];
}

export interface PolicyDeps {
  pool: StorePool;
  temporal: Client;
  maxTtlMs: number;
  /** TOKENWARDEN_OWNER_DIR_ROOT: every ownerDir lies inside it; unset, ownerDir is refused. */
  ownerDirRoot?: string;
}

/** Writes the whole policy (fields not given take their defaults) and adds one to its version. */
export async function setPolicy(deps: PolicyDeps, name: string, fields: PolicyFields): Promise<PolicyRecord> {
  const policyName = parsePolicyName(name);
  const p = parseInput(policyFieldsSchema(deps.maxTtlMs), fields, `policy ${policyName}`);
  const refuse = (path: string, message: string) =>
    new InvalidInputError(`invalid policy ${policyName}: ${path}: ${message}`, [{ path, message }]);
  const dirProblem = p.ownerDir === undefined ? undefined : ownerDirProblem(deps.ownerDirRoot, p.ownerDir);
  if (dirProblem !== undefined) throw refuse('ownerDir', dirProblem);
  // The row of a removed receiver stays (its deliveries refer to it): the key alone does not refuse it.
  if (p.ownerReceiver !== undefined && (await loadReceiverSecret(deps.pool, p.ownerReceiver))?.receiver.removedAt) {
    throw refuse('ownerReceiver', `receiver ${p.ownerReceiver} was removed`);
  }
  try {
    return await upsertPolicy(deps.pool, {
      name: policyName,
      maxLifetimeMs: p.maxTtl ?? null,
      idleTimeoutMs: p.idleTimeout ?? null,
      rotateEveryMs: p.rotateEvery ?? null,
      graceMs: p.grace ?? DEFAULT_POLICY_GRACE_MS,
      warnBeforeMs: [...new Set(p.warn ?? [])].sort((a, b) => b - a),
      allowedScopes: p.scopes ? [...new Set(p.scopes)] : null,
      onSuspicious: p.onSuspicious,
      ownerReceiverId: p.ownerReceiver ?? null,
      ownerDir: p.ownerDir ?? null,
    });
  } catch (err) {
    const e = err as { code?: string; constraint?: string };
    if (e.code === '23503' && e.constraint === 'policy_owner_receiver_id_fkey') {
      const message = `no receiver ${p.ownerReceiver}`;
      throw new InvalidInputError(`invalid policy ${policyName}: ownerReceiver: ${message}`, [
        { path: 'ownerReceiver', message },
      ]);
    }
    throw err;
  }
}

export async function showPolicy(deps: Pick<PolicyDeps, 'pool'>, name: string): Promise<PolicyRecord> {
  return requirePolicy(deps.pool, parsePolicyName(name));
}

const finding = (token: PolicyToken, policy: PolicyRecord, nowMs: number): PolicyFinding | undefined => {
  const verdict = evaluatePolicy(token, policySnapshot(policy), nowMs);
  if (verdict.kind === 'shorten') {
    return {
      tokenId: token.id,
      subject: token.subject,
      action: 'shorten',
      expiresAt: token.expiresAt,
      newExpiresAt: verdict.expiresAt,
      why: verdict.why,
    };
  }
  if (verdict.kind === 'revoke') {
    return { tokenId: token.id, subject: token.subject, action: 'revoke', reason: verdict.reason, why: verdict.why };
  }
  return undefined;
};

/**
 * Dry run: what the policy does to each live token of it now. Apply: tells every live token's
 * workflow not yet told of the policy's current version, paced; each workflow re-reads the policy,
 * recomputes its deadlines and applies the same verdict (shorten, or revoke with reason `policy`
 * or `inactive`). Running it again after an abort or a failure tells only the rest. One apply of
 * a policy runs at a time, across processes: another throws PolicyApplyInProgressError.
 */
export async function applyPolicy(
  deps: PolicyDeps,
  name: string,
  options: ApplyPolicyOptions = {},
): Promise<PolicyDryRunReport | PolicyApplyReport> {
  const { signal, onProgress, ...fields } = options;
  const policyName = parsePolicyName(name);
  const req = parseInput(applySchema, fields, 'policy apply options');
  const policy = await requirePolicy(deps.pool, policyName);
  if (req.dryRun) {
    const report: PolicyDryRunReport = {
      policy: policy.name,
      version: policy.version,
      dryRun: true,
      asOf: '',
      evaluated: 0,
      unchanged: 0,
      shorten: [],
      revoke: [],
    };
    let after: string | null = null;
    for (;;) {
      const page = await policyTokensPage(deps.pool, policy.name, { afterId: after, limit: req.batchSize });
      // One clock for the whole list: the first page's.
      report.asOf ||= page.dbNow;
      for (const token of page.tokens) {
        report.evaluated++;
        const found = finding(token, policy, Date.parse(report.asOf));
        if (found === undefined) report.unchanged++;
        else if (found.action === 'shorten') report.shorten.push(found);
        else report.revoke.push(found);
      }
      if (page.tokens.length < req.batchSize) break;
      after = page.tokens.at(-1)!.id;
    }
    return report;
  }

  const lock = await checkout(deps.pool);
  try {
    await lock.query('BEGIN');
    if (!(await tryPolicyApplyLock(lock, policy.name))) throw new PolicyApplyInProgressError(policy.name);
    return await tellPolicyTokens(deps, policy, req, signal, onProgress);
  } finally {
    // Ends the transaction, and with it the lock; a broken connection is discarded, not reused.
    await lock.query('ROLLBACK').then(
      () => lock.release(),
      (err: Error) => lock.release(err),
    );
  }
}

/**
 * Takes the lock of `policy`'s apply for the transaction open on `client`, or answers false when
 * another session holds it. Transaction-level, so it stays on one server connection behind a
 * transaction-mode pooler (PgBouncer) and goes with the transaction, whatever ends it.
 */
export async function tryPolicyApplyLock(client: StoreClient, policy: string): Promise<boolean> {
  const { rows } = await client.query<{ locked: boolean }>(
    `SELECT pg_try_advisory_xact_lock(hashtext('tokenwarden.policy-apply:' || $1), hashtext($2)) AS locked`,
    [client.tables.schema, policy],
  );
  return rows[0]!.locked;
}

async function tellPolicyTokens(
  deps: PolicyDeps,
  policy: PolicyRecord,
  req: z.output<typeof applySchema>,
  signal: AbortSignal | undefined,
  onProgress: ApplyPolicyOptions['onProgress'],
): Promise<PolicyApplyReport> {
  const operationId = randomUUID();
  const payload: PolicyChangedSignal = { policy: policy.name, operationId };
  const tell = async (token: PolicyToken) => {
    try {
      await deps.temporal.connection.withDeadline(Date.now() + 5_000, () =>
        deps.temporal.workflow.getHandle(tokenWorkflowId(token.id)).signal(policyChangedSignal, payload),
      );
    } catch (err) {
      // An answer, not an outage: such tokens must not stop the apply before the healthy ones.
      if (err instanceof WorkflowNotFoundError) return NOT_RUNNING;
      throw err;
    }
    return undefined;
  };
  const total = await countUntoldPolicyTokens(deps.pool, policy.name, policy.version);
  const report: PolicyApplyReport = {
    policy: policy.name,
    version: policy.version,
    dryRun: false,
    operationId,
    total,
    signalled: 0,
    notSignalled: [],
    aborted: false,
    remaining: total,
    warnings: [],
  };
  const failures = { failed: 0, firstFailures: [] as string[], gaveUp: false };
  const notRunning: string[] = [];
  let after: string | null = null;
  for (;;) {
    if (signal?.aborted) {
      report.aborted = true;
      break;
    }
    const { tokens } = await policyTokensPage(deps.pool, policy.name, {
      afterId: after,
      limit: req.batchSize,
      untoldOf: policy.version,
    });
    if (tokens.length === 0) break;
    after = tokens.at(-1)!.id;
    const before = { done: report.signalled, failed: failures.failed };
    const told = await tellPaced(tokens, tell, req, {
      ...(signal ? { signal } : {}),
      onProgress: (p) =>
        onProgress?.({
          done: before.done + p.done,
          failed: before.failed + p.failed,
          total: Math.max(total, before.done + before.failed + p.total),
        }),
    });
    const untold = new Set(told.notSignalled);
    // The checkpoint: these workflows know this version; a rerun skips them.
    await markPolicyTold(
      deps.pool,
      tokens.filter((t) => !untold.has(t.id)).map((t) => t.id),
      policy.name,
      policy.version,
    );
    report.signalled += told.signalled;
    report.notSignalled.push(...told.notSignalled);
    notRunning.push(...told.notRunning);
    failures.failed += told.failed;
    failures.firstFailures.push(...told.firstFailures.slice(0, 3 - failures.firstFailures.length));
    failures.gaveUp = told.gaveUp;
    report.aborted ||= told.aborted;
    if (told.aborted || told.gaveUp || tokens.length < req.batchSize) break;
  }
  report.remaining = await countUntoldPolicyTokens(deps.pool, policy.name, policy.version);
  const rerun = `run \`tokenwarden policy apply ${policy.name}\` again`;
  if (failures.failed > 0) {
    report.warnings.push(
      `${failures.failed} workflow(s) could not be told (${failures.firstFailures.join('; ')}${failures.failed > 3 ? '; …' : ''})` +
        (failures.gaveUp ? `; stopped after ${GIVE_UP_AFTER} failures in a row` : '') +
        `; ${rerun} to tell them`,
    );
  }
  if (notRunning.length > 0) {
    report.warnings.push(
      `${notRunning.length} live token(s) have no running workflow, so they were not told ` +
        `(${notRunning.slice(0, 3).join(', ')}${notRunning.length > 3 ? ', …' : ''}): ` +
        'check them with `tokenwarden show`, and revoke or reissue them',
    );
  }
  if (report.aborted) report.warnings.push(`aborted: ${report.remaining} token(s) not told yet; ${rerun} to resume`);
  return report;
}
