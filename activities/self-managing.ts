/**
 * Activities of a token that manages itself: rotation (manual and automatic), end of grace, idle
 * checks, owner warnings, suspension, scheduled revoke, expiry changes and policy application.
 * Thin: store calls and the owner's destination. No raw secret is ever returned or logged: the
 * automatic rotation generates the secret here and hands it to the owner only.
 */
import { ApplicationFailure, CancelledFailure, Context } from '@temporalio/activity';
import { createHash } from 'node:crypto';
import type { StorePool } from '../common/db.js';
import type { ChangeExpiryRequest, PolicySnapshot } from '../common/messages.js';
import { evaluatePolicy, type PolicyVerdict } from '../common/policy.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import { newCredentialId } from '../common/ids.js';
import { NotFoundError } from '../common/errors.js';
import { quoteIdent } from '../common/identifiers.js';
import * as store from '../common/store/index.js';
import { NO_OWNER_DESTINATION, sendToOwner, type OwnerDeps, type OwnerDestination } from './owner.js';

/** The grace of a rotation when neither the request nor the policy sets one (TOKENWARDEN_DEFAULT_GRACE). */
export const DEFAULT_GRACE_MS = 600_000;

/** Failure types the workflow's proxies do not retry (kept in step with workflows/lifecycle-state.ts). */
const INVALID_LIFECYCLE_REQUEST = 'InvalidLifecycleRequest';
const TOKEN_NOT_ACTIVE = 'TokenNotActive';

export interface SelfManagingDeps extends OwnerDeps {
  defaultGraceMs: number;
  /** TOKENWARDEN_MAX_TTL: no extension goes past issue + this. */
  maxTtlMs: number;
}

/** A policy row with its owner destination (the workflow sees the snapshot only). */
interface StoredPolicy {
  snapshot: PolicySnapshot;
  destination: OwnerDestination | undefined;
}

const toNumber = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));

/** The policy named `name`, read straight from the `policy` table; undefined when there is none. */
export async function readPolicy(pool: StorePool, name: string): Promise<StoredPolicy | undefined> {
  const { rows } = await pool.query(`SELECT * FROM ${quoteIdent(pool.tables.schema)}.policy WHERE name = $1`, [name]);
  const r = rows[0];
  if (!r) return undefined;
  const destination: OwnerDestination | undefined = r.owner_receiver_id
    ? { kind: 'receiver', receiverId: r.owner_receiver_id as string }
    : r.owner_dir
      ? { kind: 'dir', dir: r.owner_dir as string }
      : undefined;
  return {
    snapshot: {
      name: r.name as string,
      version: Number(r.version),
      maxLifetimeMs: toNumber(r.max_lifetime_ms),
      idleTimeoutMs: toNumber(r.idle_timeout_ms),
      rotateEveryMs: toNumber(r.rotate_every_ms),
      graceMs: Number(r.grace_ms),
      warnBeforeMs: ((r.warn_before_ms as string[] | null) ?? []).map(Number).sort((a, b) => b - a),
      allowedScopes: (r.allowed_scopes as string[] | null) ?? null,
      onSuspicious: r.on_suspicious as PolicySnapshot['onSuspicious'],
      hasOwnerDestination: destination !== undefined,
    },
    destination,
  };
}

/** The token's facts a policy is evaluated against, with the database clock. */
async function readTokenForPolicy(pool: StorePool, tokenId: string) {
  const { rows } = await pool.query(
    `SELECT policy, status, issued_at, expires_at, scopes, last_used_at, now() AS db_now FROM ${pool.tables.token} WHERE id = $1`,
    [tokenId],
  );
  const r = rows[0];
  if (!r) throw ApplicationFailure.nonRetryable(`token ${tokenId} does not exist`, 'NotFoundError');
  const iso = (v: unknown) => (v === null || v === undefined ? null : new Date(v as string).toISOString());
  return {
    policy: (r.policy as string | null) ?? null,
    status: r.status as string,
    issuedAt: iso(r.issued_at)!,
    expiresAt: iso(r.expires_at)!,
    scopes: (r.scopes as string[] | null) ?? [],
    lastUsedAt: iso(r.last_used_at),
    nowMs: new Date(r.db_now as string).getTime(),
  };
}

/** The token's policy with its owner destination; a refusal when the policy names none. */
async function ownerDestinationOf(pool: StorePool, tokenId: string): Promise<OwnerDestination | undefined> {
  const token = await readTokenForPolicy(pool, tokenId);
  if (!token.policy) return undefined;
  return (await readPolicy(pool, token.policy))?.destination;
}

/** The running activity's context; undefined when called outside an activity (a direct call). */
function activityContext(): Context | undefined {
  try {
    return Context.current();
  } catch {
    return undefined;
  }
}

/** Store refusals (bad input, a token not active) become non-retryable failures naming the field. */
async function refusals<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof NotFoundError) throw ApplicationFailure.nonRetryable(err.message, err.name);
    const e = err as { name?: string; message?: string; code?: string };
    if (e.name === 'InvalidInputError') {
      throw ApplicationFailure.nonRetryable(e.message ?? 'invalid request', INVALID_LIFECYCLE_REQUEST);
    }
    if (e.name === 'TokenNotActiveError') {
      throw ApplicationFailure.nonRetryable(e.message ?? 'token not active', TOKEN_NOT_ACTIVE);
    }
    // A number or an instant out of PostgreSQL's range (an absurd ttl): retrying cannot help.
    if (e.code === '22003' || e.code === '22008') {
      throw ApplicationFailure.nonRetryable(
        `ttl: out of range for the store (${e.message ?? e.code})`,
        INVALID_LIFECYCLE_REQUEST,
      );
    }
    throw err;
  }
}

/** A rotation as the workflow records it: ids and instants only. */
export interface RotationOutcome {
  credentialId: string;
  previousCredentialId: string | null;
  previousValidUntil: string | null;
  /** Credentials revoked by this step (a previous one superseded) that have receivers to tell. */
  revoked: { credentialId: string; eventId: string }[];
  /** False when the store had made this rotation before (a retry): the facts are that rotation's. */
  changed?: boolean;
}

const outcomeOf = (r: store.RotationResult): RotationOutcome => ({
  credentialId: r.credentialId,
  previousCredentialId: r.previousCredentialId,
  previousValidUntil: r.previousValidUntil,
  revoked:
    r.supersededCredentialId && r.supersededEventId
      ? [{ credentialId: r.supersededCredentialId, eventId: r.supersededEventId }]
      : [],
  changed: r.changed,
});

export function createSelfManagingActivities(pool: StorePool, deps: SelfManagingDeps) {
  /** Grace: the request's, else the policy's, else the worker's default. */
  async function graceFor(tokenId: string, requested: number | undefined): Promise<number> {
    if (requested !== undefined) return requested;
    const token = await readTokenForPolicy(pool, tokenId);
    const policy = token.policy ? await readPolicy(pool, token.policy) : undefined;
    return policy?.snapshot.graceMs ?? deps.defaultGraceMs;
  }

  /** Whether `credentialId` is still the pending credential of its rotation (a later attempt discards it). */
  async function stillPending(tokenId: string, credentialId: string): Promise<boolean> {
    return (await store.listCredentials(pool, tokenId)).some((c) => c.id === credentialId && c.state === 'pending');
  }

  /** The automatic rotation after its crash-retry check: a new pending secret, delivered, then promoted. */
  async function rotateAndDeliver(
    input: { tokenId: string; rotationId: string; graceMs?: number; why: string },
    ctx: Context | undefined,
  ): Promise<RotationOutcome> {
    const destination = await ownerDestinationOf(pool, input.tokenId);
    if (!destination) {
      throw ApplicationFailure.nonRetryable(
        `token ${input.tokenId}: its policy names no owner destination for the new secret`,
        NO_OWNER_DESTINATION,
      );
    }
    const graceMs = await graceFor(input.tokenId, input.graceMs);
    const secret = generateTokenString();
    const credentialId = newCredentialId();
    await refusals(() =>
      store.insertPendingCredential(pool, {
        tokenId: input.tokenId,
        credentialId,
        rotationId: input.rotationId,
        secretHash: hashToken(secret),
      }),
    );
    const body = JSON.stringify({
      type: 'token.rotated',
      token_id: input.tokenId,
      credential_id: credentialId,
      rotation_id: input.rotationId,
      reason: input.why,
      token: secret,
    });
    const superseded = async () => {
      if (!(await stillPending(input.tokenId, credentialId))) {
        throw ApplicationFailure.retryable(
          `rotation ${input.rotationId}: credential ${credentialId} was discarded by a later attempt`,
          'RotationSuperseded',
        );
      }
    };
    // The workflow's cancellation stops the attempt only before the send: once the owner may hold the
    // secret, it is promoted (the workflow records the completion), never left pending and dead.
    if (ctx?.cancellationSignal.aborted) {
      // Never sent: dropped now, as a later rotation (a new rotation id) would not find it.
      await store.discardPendingCredential(pool, input.tokenId, input.rotationId);
      throw new CancelledFailure(`rotation ${input.rotationId}: cancelled`);
    }
    await superseded();
    await sendToOwner(deps, destination, { tokenId: input.tokenId, messageId: credentialId, body });
    await superseded();
    const promoted = await refusals(() =>
      store.promoteCredential(pool, {
        tokenId: input.tokenId,
        credentialId,
        graceMs,
        actor: 'system:rotation',
        reason: input.why,
      }),
    );
    return outcomeOf(promoted);
  }

  /** One attempt of automatic rotation `input.rotationId`, after its crash-retry check. */
  async function rotateOnce(
    input: { tokenId: string; rotationId: string; graceMs?: number; why: string },
    ctx: Context | undefined,
  ): Promise<RotationOutcome> {
    // A pending credential of an earlier attempt is dropped (its secret is lost); a promoted one
    // means this rotation completed before its result was recorded.
    const earlier = await store.discardPendingCredential(pool, input.tokenId, input.rotationId);
    if (earlier && earlier.state !== 'pending') {
      // The promotion's recorded facts (the superseded credential's event too) answer as the first
      // attempt did; the grace is not used again.
      const promoted = await refusals(() =>
        store.promoteCredential(pool, {
          tokenId: input.tokenId,
          credentialId: earlier.id,
          graceMs: 0,
          actor: 'system:rotation',
          reason: input.why,
        }),
      );
      return outcomeOf(promoted);
    }
    return rotateAndDeliver(input, ctx);
  }

  return {
    /** Manual rotation: the caller made the secret; its hash becomes current. Idempotent by credentialId. */
    async rotateCredential(input: {
      tokenId: string;
      credentialId: string;
      secretHash: string;
      graceMs?: number;
      actor: string;
      reason: string;
    }): Promise<RotationOutcome> {
      const graceMs = await graceFor(input.tokenId, input.graceMs);
      const rotated = await refusals(() =>
        store.rotateCredential(pool, {
          tokenId: input.tokenId,
          credentialId: input.credentialId,
          secretHash: Buffer.from(input.secretHash, 'hex'),
          graceMs,
          actor: input.actor,
          reason: input.reason,
        }),
      );
      return outcomeOf(rotated);
    },

    /**
     * Automatic rotation `rotationId`: a pending credential of an earlier attempt is discarded (its
     * secret is lost), a new secret is generated, its hash stored as pending, the secret delivered
     * to the owner, then the credential promoted. Safe to retry after a crash anywhere.
     */
    async rotateAutomatically(input: {
      tokenId: string;
      rotationId: string;
      graceMs?: number;
      why: string;
    }): Promise<RotationOutcome> {
      // Heartbeats bring the workflow's cancellation (or this attempt's timeout) here; they start
      // before the first store call, which may wait on the token's lock.
      const ctx = activityContext();
      ctx?.heartbeat();
      const beat = ctx ? setInterval(() => ctx.heartbeat(), 1_000) : undefined;
      try {
        return await rotateOnce(input, ctx);
      } finally {
        clearInterval(beat);
      }
    },

    async endGrace(input: {
      tokenId: string;
      credentialId: string;
    }): Promise<{ revoked: RotationOutcome['revoked']; notYetEndedMs?: number }> {
      const ended = await refusals(() => store.endGrace(pool, input));
      // The database clock is behind the workflow's: the grace is not over there yet.
      if (ended.notYetEndedMs !== undefined) return { revoked: [], notYetEndedMs: ended.notYetEndedMs };
      // Receivers without an outbox row (the token's kill revoked it first) have nothing to hear.
      return {
        revoked: ended.receivers.length > 0 ? [{ credentialId: input.credentialId, eventId: ended.eventId }] : [],
      };
    },

    /** The token's last activity: its last recorded use, else its issue. */
    async readLastUse(input: { tokenId: string }): Promise<{ lastActivityAt: string }> {
      const use = await store.readLastUse(pool, pool.tables.schema, input.tokenId);
      if (!use) throw ApplicationFailure.nonRetryable(`token ${input.tokenId} does not exist`, 'NotFoundError');
      return { lastActivityAt: use.lastUsedAt ?? use.issuedAt };
    },

    /** A warning before expiry or idle revocation, sent once per key (across retries and runs). */
    async sendWarning(input: {
      tokenId: string;
      subject: string;
      key: string;
      reason: 'expiry' | 'inactivity';
      deadline: string;
      beforeMs: number;
    }): Promise<{ sent: boolean }> {
      if (await store.isNoticeSent(pool, input.tokenId, input.key)) return { sent: false };
      const destination = await ownerDestinationOf(pool, input.tokenId);
      // The webhook-id derives from the key: a send retried after a crash is one notice for the owner.
      const messageId = `ntc_${createHash('sha256').update(`${input.tokenId}:${input.key}`).digest('hex').slice(0, 32)}`;
      if (destination) {
        const body = JSON.stringify({
          type: 'token.expiring',
          token_id: input.tokenId,
          sub_id: { format: 'opaque', id: input.subject },
          deadline: input.deadline,
          reason: input.reason,
        });
        await sendToOwner(deps, destination, { tokenId: input.tokenId, messageId, body });
      }
      await store.recordNotice(pool, {
        tokenId: input.tokenId,
        key: input.key,
        kind: 'token.expiring',
        data: {
          reason: input.reason,
          deadline: input.deadline,
          beforeMs: input.beforeMs,
          messageId,
          delivered: destination !== undefined,
        },
      });
      return { sent: true };
    },

    async setSuspended(input: {
      tokenId: string;
      suspended: boolean;
      reason: string;
      actor: string;
      /** The Update's id: a retried activity is the same change, audited once. */
      requestId?: string | undefined;
    }): Promise<{ suspended: boolean; suspendedAt: string | null }> {
      const { requestId, ...change } = input;
      const { token } = await refusals(() =>
        store.setSuspended(pool, { ...change, ...(requestId !== undefined ? { requestId } : {}) }),
      );
      return { suspended: token.suspendedAt !== null, suspendedAt: token.suspendedAt };
    },

    /** Stores (or clears, `at: null`) the scheduled revoke `show` displays, with an audit event. */
    async setScheduledRevoke(input: {
      tokenId: string;
      at: string | null;
      reason: string;
      actor: string;
      /** The Update's id: each schedule and each cancel is its own audit event, once across retries. */
      requestId?: string | undefined;
    }): Promise<void> {
      await refusals(() =>
        store.setScheduledRevoke(pool, {
          tokenId: input.tokenId,
          at: input.at,
          reason: input.at ? input.reason : null,
        }),
      );
      await store.recordAudit(
        pool,
        input.tokenId,
        input.requestId !== undefined
          ? `scheduled-revoke:${input.requestId}`
          : `scheduled-revoke:${input.at ?? 'cancelled'}:${createHash('sha256').update(input.reason).digest('hex').slice(0, 16)}`,
        input.at ? 'revoke.scheduled' : 'revoke.schedule-cancelled',
        { at: input.at, reason: input.reason, actor: input.actor },
      );
    },

    /** The store first (database clock, the limits checked there); a retry with the same requestId is the same change. */
    async changeExpiry(
      input: ChangeExpiryRequest & { tokenId: string; actor: string; requestId: string },
    ): Promise<{ expiresAt: string; previousExpiresAt: string }> {
      const changed = await refusals(() => store.changeExpiry(pool, { ...input, maxLifetimeMs: deps.maxTtlMs }));
      return { expiresAt: changed.token.expiresAt, previousExpiresAt: changed.previousExpiresAt };
    },

    /**
     * Re-reads the token's policy and applies its verdict in the store (a shortened expiry); the
     * workflow adopts the result and revokes when the verdict says so.
     */
    async applyPolicy(input: {
      tokenId: string;
    }): Promise<{ policy: PolicySnapshot | null; verdict: PolicyVerdict; expiresAt: string }> {
      const token = await readTokenForPolicy(pool, input.tokenId);
      const policy = token.policy ? await readPolicy(pool, token.policy) : undefined;
      if (!policy) return { policy: null, verdict: { kind: 'ok' }, expiresAt: token.expiresAt };
      const verdict = evaluatePolicy(token, policy.snapshot, token.nowMs);
      let { expiresAt } = token;
      if (verdict.kind === 'shorten') {
        // To the limit itself, read by the store under the token's lock: a ttl counted from nowMs
        // would land past the limit once the store's clock has moved on, and be refused.
        const shortened = await store.shortenToPolicyLimit(pool, {
          tokenId: input.tokenId,
          actor: `system:policy:${policy.snapshot.name}`,
          reason: verdict.why,
        });
        expiresAt = shortened.token.expiresAt;
      }
      return { policy: policy.snapshot, verdict, expiresAt };
    },
  };
}
