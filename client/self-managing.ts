/**
 * What an operator asks of one live token's workflow: rotate, report suspicious activity, suspend,
 * resume, schedule or cancel a revocation, extend or shorten. Inputs are checked here (zod, the
 * field named); the workflow applies each through its store activity and answers, or refuses with
 * a non-retryable failure whose message starts with the field (`ttl: …`), said back as bad input.
 */
import { randomUUID } from 'node:crypto';
import {
  WorkflowNotFoundError,
  WorkflowUpdateFailedError,
  WorkflowUpdateRPCTimeoutOrCancelledError,
  type Client,
  type UpdateDefinition,
} from '@temporalio/client';
import { z } from 'zod';
import type { StorePool } from '../common/db.js';
import { formatDuration, parseDuration, DURATION_HINT } from '../common/durations.js';
import { InvalidInputError, TokenNotActiveError } from '../common/errors.js';
import { newCredentialId } from '../common/ids.js';
import {
  cancelScheduledRevokeUpdate,
  changeExpiryUpdate,
  reportSuspiciousSignal,
  resumeUpdate,
  rotateUpdate,
  scheduleRevokeUpdate,
  suspendUpdate,
  type ChangeExpiryRequest,
  type RotateRequest,
  type RotateResult,
  type OperatorRequest,
  type ScheduleRevokeRequest,
  type SuspendRequest,
  type SuspiciousReport,
} from '../common/messages.js';
import { tokenWorkflowId } from '../common/names.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import { requirePolicy, tokenPolicy } from '../common/store/policies.js';
import { requireToken } from '../common/store/tokens.js';
import { findSecret, MAX_JSON_DEPTH, nestsTooDeep } from '../common/secret-shapes.js';
import { actorSchema, parseInput, reasonSchema, secretKind, tokenIdSchema, ttlSchema } from '../common/validation.js';
import { sendWithAbortRetries, updateRefusal } from './errors.js';
import { causes } from './tell.js';

/** The token's workflow could not be reached or did not answer in time (the API answers 503). */
export class WorkflowUnavailableError extends Error {
  override readonly name = 'WorkflowUnavailableError';
}

/** How long a message waits for the token's workflow to apply it (a worker runs the handler). */
export const SELF_MANAGING_DEADLINE_MS = 15_000;

/** The longest grace a rotation may give the previous credential (as the workflow checks). */
export const MAX_GRACE_MS = 30 * 86_400_000;

/** A duration that may be zero (`0`, `0s`): a rotation's grace. */
export const graceSchema = z.unknown().transform((value, ctx) => {
  const ms =
    value === 0 || value === '0'
      ? 0
      : typeof value === 'number' && Number.isSafeInteger(value) && value > 0
        ? value
        : typeof value === 'string'
          ? /^0(ms|s|m|h|d|w)$/.test(value.trim())
            ? 0
            : parseDuration(value)
          : undefined;
  if (ms === undefined) {
    ctx.addIssue({ code: 'custom', message: `expected 0 or ${DURATION_HINT}` });
    return z.NEVER;
  }
  if (ms > MAX_GRACE_MS) {
    ctx.addIssue({ code: 'custom', message: `at most ${formatDuration(MAX_GRACE_MS)}` });
    return z.NEVER;
  }
  return ms;
});

const common = {
  tokenId: tokenIdSchema,
  actor: actorSchema.default('operator'),
};

const rotateSchema = z.strictObject({
  ...common,
  grace: graceSchema.optional(),
  reason: reasonSchema.optional(),
});
export type RotateInput = Omit<z.input<typeof rotateSchema>, 'tokenId'>;

/**
 * Evidence is kept in plaintext (workflow history, the append-only audit trail): any JSON, at most
 * 8 KiB, with no secret-shaped string anywhere in it (the natural evidence is the offending request,
 * Authorization header included).
 */
export const evidenceSchema = z.unknown().superRefine((value, ctx) => {
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch {
    text = undefined;
  }
  if (text === undefined) ctx.addIssue({ code: 'custom', message: 'expected JSON' });
  else if (Buffer.byteLength(text) > 8_192) ctx.addIssue({ code: 'custom', message: 'at most 8 KiB as JSON' });
  else if (nestsTooDeep(JSON.parse(text))) {
    ctx.addIssue({ code: 'custom', message: `nested at most ${MAX_JSON_DEPTH} levels deep` });
  } else {
    const secret = findSecret(JSON.parse(text), secretKind);
    if (secret !== undefined) {
      ctx.addIssue({
        code: 'custom',
        path: secret.path,
        message: `looks like a secret (${secret.kind}); evidence is stored in plaintext: leave the secret out`,
      });
    }
  }
});

const suspiciousSchema = z.strictObject({
  ...common,
  reason: reasonSchema,
  evidence: evidenceSchema.optional(),
});
export type SuspiciousInput = Omit<z.input<typeof suspiciousSchema>, 'tokenId'>;

const operatorSchema = z.strictObject({ ...common, reason: reasonSchema });
export type SelfManagingOperatorInput = Omit<z.input<typeof operatorSchema>, 'tokenId'>;

/** An instant in the future: ISO 8601 with Z or an offset. */
export const futureInstantSchema = z.iso
  .datetime({ offset: true, error: 'expected an ISO 8601 date-time with Z or an offset, e.g. 2026-12-31T18:00:00Z' })
  .transform((text) => new Date(text).toISOString())
  .refine((iso) => Date.parse(iso) > Date.now(), 'must be in the future');

const scheduleSchema = z.strictObject({ ...common, at: futureInstantSchema, reason: reasonSchema });
export type ScheduleRevokeInput = Omit<z.input<typeof scheduleSchema>, 'tokenId'>;

const expirySchema = (maxTtlMs: number) =>
  z.strictObject({ ...common, ttl: ttlSchema(maxTtlMs), reason: reasonSchema });
export type ChangeExpiryInput = Omit<z.input<ReturnType<typeof expirySchema>>, 'tokenId'>;

export interface RotateOutcome {
  tokenId: string;
  /** The new raw token: returned here once, stored nowhere (its SHA-256 went to the workflow). */
  token: string;
  credentialId: string;
  previousCredentialId: string | null;
  /** When the previous credential stops being valid; null when there was none. */
  previousValidUntil: string | null;
}

export interface SuspiciousOutcome {
  tokenId: string;
  reportId: string;
  /** The policy's answer the workflow gives (`revoke` without a policy, or when it names no owner destination). */
  action: 'rotate' | 'revoke';
}

export interface SelfManagingDeps {
  pool: StorePool;
  temporal: Client;
  maxTtlMs: number;
}

const refusal = (path: string, message: string) =>
  new InvalidInputError(`invalid request: ${path}: ${message}`, [{ path, message }]);

/** A token that is not live cannot be rotated, suspended or rescheduled: said before Temporal is asked. */
async function requireLive(deps: SelfManagingDeps, tokenId: string, what: string): Promise<void> {
  const token = await requireToken(deps.pool, tokenId);
  if (token.effectiveStatus !== 'active') {
    throw new TokenNotActiveError(tokenId, `token ${tokenId} is ${token.effectiveStatus}: it cannot be ${what}`);
  }
}

/** Fields of the messages a workflow's refusal may name, as the caller called them (graceMs was `grace`). */
const REQUEST_FIELDS: Record<string, string> = {
  ttl: 'ttl',
  at: 'at',
  reason: 'reason',
  actor: 'actor',
  mode: 'mode',
  graceMs: 'grace',
  grace: 'grace',
};

/** Sends an Update and waits for the workflow's answer; its refusals become bad input or a conflict (client/errors.ts). */
async function sendUpdate<Result, Arg>(
  deps: SelfManagingDeps,
  kind: string,
  tokenId: string,
  update: UpdateDefinition<Result, [Arg]>,
  arg: Arg,
  updateId: string,
): Promise<Result> {
  const handle = deps.temporal.workflow.getHandle(tokenWorkflowId(tokenId));
  try {
    const deadline = Date.now() + SELF_MANAGING_DEADLINE_MS;
    return await deps.temporal.connection.withDeadline(deadline, () =>
      sendWithAbortRetries(() => handle.executeUpdate(update, { args: [arg] as [Arg], updateId }), deadline),
    );
  } catch (err) {
    if (err instanceof WorkflowUpdateFailedError) {
      const refused = updateRefusal(err, { tokenId, kind, fields: { ...REQUEST_FIELDS, request: 'request' } });
      if (refused) throw refused;
    }
    const what =
      err instanceof WorkflowNotFoundError
        ? 'its workflow is not running (the reconciler starts the workflow of an active token; try again shortly)'
        : err instanceof WorkflowUpdateRPCTimeoutOrCancelledError
          ? `its workflow did not apply the ${kind} within ${SELF_MANAGING_DEADLINE_MS / 1000} s (is a worker running?); check with show`
          : err instanceof WorkflowUpdateFailedError
            ? `its workflow failed the ${kind} (${causes(err)}); check with show`
            : `the ${kind} could not be sent to its workflow (${causes(err)})`;
    throw new WorkflowUnavailableError(`token ${tokenId}: ${what}`, { cause: err });
  }
}

/**
 * Rotates: a new secret generated here, only its SHA-256 sent to the workflow, which stores it as
 * the current credential (the old one enters its grace). The Update id is the new credential id, so
 * the SDK's own retries of the Update are one rotation. The raw token is returned once.
 */
export async function rotate(deps: SelfManagingDeps, tokenId: string, input: RotateInput): Promise<RotateOutcome> {
  const req = parseInput(rotateSchema, { ...input, tokenId }, 'rotate request');
  await requireLive(deps, req.tokenId, 'rotated');
  const token = generateTokenString();
  const credentialId = newCredentialId();
  const request: RotateRequest = {
    credentialId,
    secretHash: hashToken(token).toString('hex'),
    ...(req.grace !== undefined ? { graceMs: req.grace } : {}),
    actor: req.actor,
    ...(req.reason !== undefined ? { reason: req.reason } : {}),
  };
  // A lost answer is retried once with the same Update id and credential (the workflow applies it
  // once): the secret is still in hand. Rotating anew instead would revoke the old secret at once.
  let result: RotateResult;
  try {
    result = await sendUpdate(deps, 'rotate', req.tokenId, rotateUpdate, request, credentialId).catch((err) => {
      if (!(err instanceof WorkflowUnavailableError && err.cause instanceof WorkflowUpdateRPCTimeoutOrCancelledError)) {
        throw err;
      }
      return sendUpdate(deps, 'rotate', req.tokenId, rotateUpdate, request, credentialId);
    });
  } catch (err) {
    if (!(err instanceof WorkflowUnavailableError)) throw err;
    throw new WorkflowUnavailableError(
      `${err.message}. The rotation to ${credentialId} may have been applied: if \`show\` lists it as current, its secret is lost and the old one ends with its grace; rotate again and move every client to the new secret (the old one is then revoked at once, and presenting it revokes the token)`,
      { cause: err.cause },
    );
  }
  return {
    tokenId: req.tokenId,
    token,
    credentialId: result.credentialId,
    previousCredentialId: result.previousCredentialId,
    previousValidUntil: result.previousValidUntil,
  };
}

/** Reports suspicious activity (a Signal: never refused by the workflow); the token's policy decides. */
export async function reportSuspicious(
  deps: SelfManagingDeps,
  tokenId: string,
  input: SuspiciousInput,
): Promise<SuspiciousOutcome> {
  const req = parseInput(suspiciousSchema, { ...input, tokenId }, 'suspicious activity report');
  await requireLive(deps, req.tokenId, 'reported');
  const reportId = randomUUID();
  const report: SuspiciousReport = {
    reason: req.reason,
    actor: req.actor,
    reportId,
    ...(req.evidence !== undefined ? { evidence: req.evidence } : {}),
  };
  const found = await tokenPolicy(deps.pool, req.tokenId);
  const policy = found?.policy ? await requirePolicy(deps.pool, found.policy).catch(() => undefined) : undefined;
  const rotates = policy?.onSuspicious === 'rotate' && (policy.ownerReceiverId !== null || policy.ownerDir !== null);
  try {
    await deps.temporal.connection.withDeadline(Date.now() + SELF_MANAGING_DEADLINE_MS, () =>
      deps.temporal.workflow.getHandle(tokenWorkflowId(req.tokenId)).signal(reportSuspiciousSignal, report),
    );
  } catch (err) {
    throw new WorkflowUnavailableError(
      `token ${req.tokenId}: the report could not be sent to its workflow (${causes(err)})`,
      {
        cause: err,
      },
    );
  }
  return { tokenId: req.tokenId, reportId, action: rotates ? 'rotate' : 'revoke' };
}

export async function setSuspended(
  deps: SelfManagingDeps,
  tokenId: string,
  suspended: boolean,
  input: SelfManagingOperatorInput,
) {
  const kind = suspended ? 'suspend' : 'resume';
  const req = parseInput(operatorSchema, { ...input, tokenId }, `${kind} request`);
  await requireLive(deps, req.tokenId, suspended ? 'suspended' : 'resumed');
  const request: SuspendRequest = { reason: req.reason, actor: req.actor };
  const result = await sendUpdate(
    deps,
    kind,
    req.tokenId,
    suspended ? suspendUpdate : resumeUpdate,
    request,
    randomUUID(),
  );
  return { tokenId: req.tokenId, ...result };
}

export async function scheduleRevoke(deps: SelfManagingDeps, tokenId: string, input: ScheduleRevokeInput) {
  const req = parseInput(scheduleSchema, { ...input, tokenId }, 'scheduled revoke');
  await requireLive(deps, req.tokenId, 'scheduled for revocation');
  const request: ScheduleRevokeRequest = { at: req.at, reason: req.reason, actor: req.actor };
  const result = await sendUpdate(deps, 'scheduled revoke', req.tokenId, scheduleRevokeUpdate, request, randomUUID());
  return { tokenId: req.tokenId, ...result };
}

export async function cancelScheduledRevoke(deps: SelfManagingDeps, tokenId: string, input: SelfManagingOperatorInput) {
  const req = parseInput(operatorSchema, { ...input, tokenId }, 'cancel of a scheduled revoke');
  await requireLive(deps, req.tokenId, 'rescheduled');
  const request: OperatorRequest = { reason: req.reason, actor: req.actor };
  const result = await sendUpdate(deps, 'cancel', req.tokenId, cancelScheduledRevokeUpdate, request, randomUUID());
  return { tokenId: req.tokenId, ...result };
}

/**
 * Moves the expiry to now + ttl (database clock). Checked here first against the global maximum
 * (TOKENWARDEN_MAX_TTL) and the token's policy (issued_at + max lifetime), so a refusal names `ttl`
 * without a round trip to the workflow; the store checks again when it writes.
 */
export async function changeExpiry(
  deps: SelfManagingDeps,
  tokenId: string,
  mode: 'extend' | 'shorten',
  input: ChangeExpiryInput,
) {
  const req = parseInput(expirySchema(deps.maxTtlMs), { ...input, tokenId }, `${mode} request`);
  const token = await requireToken(deps.pool, req.tokenId);
  if (token.effectiveStatus !== 'active') {
    throw new TokenNotActiveError(
      req.tokenId,
      `token ${req.tokenId} is ${token.effectiveStatus}: its expiry cannot move`,
    );
  }
  const found = await tokenPolicy(deps.pool, req.tokenId);
  const nowMs = Date.parse(found!.dbNow);
  const newExpiryMs = nowMs + req.ttl;
  const issuedMs = Date.parse(token.issuedAt);
  if (found?.policy) {
    const policy = await requirePolicy(deps.pool, found.policy);
    if (policy.maxLifetimeMs !== null && newExpiryMs > issuedMs + policy.maxLifetimeMs) {
      throw refusal(
        'ttl',
        `now + ttl passes ${new Date(issuedMs + policy.maxLifetimeMs).toISOString()}, the end of policy ${policy.name}'s max lifetime (${formatDuration(policy.maxLifetimeMs)} from issue)`,
      );
    }
  }
  // The global maximum counts from issue too: a token's whole life is bounded, not each extension.
  if (newExpiryMs > issuedMs + deps.maxTtlMs) {
    throw refusal(
      'ttl',
      `now + ttl passes ${new Date(issuedMs + deps.maxTtlMs).toISOString()}, the end of the maximum lifetime (TOKENWARDEN_MAX_TTL, ${formatDuration(deps.maxTtlMs)} from issue)`,
    );
  }
  const currentMs = Date.parse(token.expiresAt);
  if (mode === 'extend' && newExpiryMs < currentMs) {
    throw refusal('ttl', `extend moves the expiry later: now + ttl is before the current expiry ${token.expiresAt}`);
  }
  if (mode === 'shorten' && newExpiryMs > currentMs) {
    throw refusal('ttl', `shorten moves the expiry earlier: now + ttl is after the current expiry ${token.expiresAt}`);
  }
  const request: ChangeExpiryRequest = { ttlMs: req.ttl, mode, reason: req.reason, actor: req.actor };
  const result = await sendUpdate(deps, mode, req.tokenId, changeExpiryUpdate, request, randomUUID());
  return { tokenId: req.tokenId, ...result };
}
