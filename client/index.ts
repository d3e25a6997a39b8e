/**
 * The library apps import: issue, revoke, show, list, receivers. Reads and kills in the store
 * directly (the store answers "is it valid?"), and tells each token's workflow through Temporal.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import {
  WorkflowNotFoundError,
  WorkflowUpdateFailedError,
  WorkflowUpdateRPCTimeoutOrCancelledError,
  type Client,
  type UpdateDefinition,
} from '@temporalio/client';
import type { StorePool } from '../common/db.js';
import { z } from 'zod';
import { loadSettings, type Settings } from '../common/config.js';
import { NotPropagatingError } from '../common/errors.js';
import { sendWithAbortRetries, updateRefusal } from './errors.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import { INITIATING_ENTITIES, type InitiatingEntity, type TokenStatus } from '../common/names.js';
import { generateTokenString, hashToken } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { StartedMarks } from './started-marks.js';
import { policySnapshot } from '../common/store/policies.js';
import {
  applyPolicy,
  setPolicy,
  showPolicy,
  type ApplyPolicyOptions,
  type PolicyApplyReport,
  type PolicyDeps,
  type PolicyDryRunReport,
  type PolicyFields,
  type PolicyRecord,
} from './policies.js';
import * as selfManaging from './self-managing.js';
import { tokenHistory, type HistoryEntry } from './history.js';
import type {
  ChangeExpiryInput,
  RotateInput,
  RotateOutcome,
  ScheduleRevokeInput,
  SelfManagingDeps,
  SelfManagingOperatorInput,
  SuspiciousInput,
  SuspiciousOutcome,
} from './self-managing.js';
import type { BulkDeps, BulkOptions, BulkReport } from './bulk/pipeline.js';
import type { IssueManyOptions, IssueManyReport } from './bulk/issue-many.js';
import {
  actorSchema,
  correlationIdSchema,
  nameSchema,
  parseInput,
  policyNameSchema,
  reasonSchema,
  receiverIdSchema,
  subjectLookupSchema,
  subjectSchema,
  tokenIdSchema,
  ttlSchema,
} from '../common/validation.js';
import {
  forceCompleteUpdate,
  retryPropagationUpdate,
  type OperatorRequest,
  type RevokeRequest,
} from '../common/messages.js';
import {
  TEMPORAL_CALL_DEADLINE_MS,
  connectTemporal,
  signalRevoke,
  signalRevokeRunning,
  startTokenWorkflow,
} from '../common/temporal.js';
import { tokenWorkflowId } from '../common/names.js';
import { summarise, TokenWardenStore, type ConnectOptions } from './store.js';
import { causes, tellPaced, tellWarnings, type TellProgress } from './tell.js';
import {
  countMatching,
  revokeMany,
  type MatchCount,
  type RevokeFilter,
  type RevokeManyOptions,
  type RevokeManyReport,
} from './revoke-many.js';

export {
  REVOKE_MANY_DEFAULTS,
  type BulkRevokeFilter,
  type MatchCount,
  type RevokeFilter,
  type RevokeManyOptions,
  type RevokeManyProgress,
  type RevokeManyReport,
} from './revoke-many.js';

export { loadSettings, loadStoreSettings, type Settings, type StoreSettings } from '../common/config.js';
export {
  TokenWardenStore,
  type ConnectOptions,
  type ListFilter,
  type ReceiverRequest,
  type RekeyOutcome,
  type TokenSummary,
  type TokenView,
} from './store.js';
export {
  InvalidInputError,
  NotFoundError,
  ConfigError,
  TokenStateConflictError,
  TokenNotActiveError,
  NotPropagatingError,
} from '../common/errors.js';
export type { TokenRecord, DeliveryRecord, ReceiverRecord } from '../common/store/index.js';
import type { TokenRecord } from '../common/store/index.js';
export type { DeliveryReport } from '../common/store/deliveries.js';
// Bulk import and bulk issue (client/bulk).
export type { BulkError, BulkOptions, BulkProgress, BulkReport } from './bulk/pipeline.js';
export type { IssueManyOptions, IssueManyReport, IssuedEntry } from './bulk/issue-many.js';
export type { ImportRecordInput, IssueRecordInput } from './bulk/records.js';
export { readRecords, SourceLine, type RecordFormat } from './bulk/reader.js';
// Self-managing tokens: policies, rotation, suspension, scheduled revoke, expiry changes.
export {
  POLICY_APPLY_DEFAULTS,
  type ApplyPolicyOptions,
  type PolicyApplyReport,
  type PolicyDryRunReport,
  type PolicyFields,
  type PolicyFinding,
  type PolicyRecord,
} from './policies.js';
export type {
  ChangeExpiryInput,
  RotateInput,
  RotateOutcome,
  ScheduleRevokeInput,
  SelfManagingOperatorInput,
  SuspiciousInput,
  SuspiciousOutcome,
} from './self-managing.js';
// Audit verification (TokenWardenStore#verifyAudit, inherited by TokenWarden).
export type {
  AuditBreak,
  AuditCheckpointSummary,
  AuditVerifyInput,
  AuditVerifyReport,
  BrokenAuditLink,
  CheckpointProblem,
} from './store.js';
// A token's life from its workflow's history (client/history.ts).
export { HISTORY_ENTRY_KINDS, formatTimeline, type HistoryEntry, type HistoryEntryKind } from './history.js';
/** Offline check of a token string's shape and checksum (for secret scanners); no store access. */
export { isWellFormedToken } from '../common/secrets.js';

export const issueSchema = (maxTtlMs: number) =>
  z.object({
    subject: subjectSchema,
    receivers: z.array(receiverIdSchema).default([]),
    ttl: ttlSchema(maxTtlMs),
    name: nameSchema.optional(),
    scopes: z.array(z.string().regex(/^[\x21-\x7e]{1,100}$/, 'expected a scope without spaces')).default([]),
    /** A named policy: a ttl above its max lifetime or a scope it does not allow is refused, nothing written. */
    policy: policyNameSchema.optional(),
  });
export type IssueRequest = z.input<ReturnType<typeof issueSchema>>;

const revokeSchema = z.object({
  tokenId: tokenIdSchema,
  reason: reasonSchema,
  actor: actorSchema.default('admin'),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
  correlationId: correlationIdSchema.optional(),
});
export type RevokeInput = z.input<typeof revokeSchema>;

const operatorSchema = z.object({
  tokenId: tokenIdSchema,
  reason: reasonSchema,
  actor: actorSchema.default('operator'),
  /** Makes the call idempotent: the same request id is applied once (default: a new one per call). */
  requestId: z.uuid().optional(),
});
export type OperatorInput = Omit<z.input<typeof operatorSchema>, 'tokenId'>;

export const OFFBOARD_DEFAULTS = { rate: 200, concurrency: 16 } as const;

const offboardSchema = z.object({
  subject: subjectLookupSchema,
  reason: reasonSchema,
  actor: actorSchema.default('admin'),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
  /** Workflows told per second at most (Temporal's rate limits are per namespace). */
  rate: z.number().positive().max(10_000).default(OFFBOARD_DEFAULTS.rate),
  /** Workflows told at once at most. */
  concurrency: z.number().int().min(1).max(256).default(OFFBOARD_DEFAULTS.concurrency),
});
export type OffboardInput = z.input<typeof offboardSchema> & {
  /** Called after each token's workflow was told (or could not be). */
  onProgress?: (progress: OffboardProgress) => void;
  /** Stops telling workflows; the kill has committed. Run offboard again to resume. */
  signal?: AbortSignal;
};

export type OffboardProgress = TellProgress;

export interface OffboardReport {
  subject: string;
  /** The correlation id (`txn`) of every event and audit record of this offboarding. */
  operationId: string;
  /** Tokens this call killed in the store (in one transaction): status revoked, or expired. */
  revoked: string[];
  /** Tokens of the subject dead before this call. */
  alreadyDead: string[];
  /** Workflows told to propagate: this call's kills and earlier ones never taken over (a resume). */
  signalled: number;
  /** Workflows not told (aborted, or the signal failed): the reconciler tells them, or run it again. */
  notSignalled: string[];
  /** Deliveries of these tokens not yet confirmed when the call returned, per receiver. */
  receiversPending: Record<string, number>;
  aborted: boolean;
  warnings: string[];
  /** How long the store's one transaction took (the tokens were dead after it), then telling the workflows. */
  durationsMs: { kill: number; tell: number };
}

export interface IssuedToken {
  tokenId: string;
  /** The raw token: returned here once, stored nowhere (only its SHA-256). */
  token: string;
  expiresAt: string;
}

export interface RevokeOutcome {
  tokenId: string;
  status: TokenStatus;
  /** False when the token was already dead: these are the first kill's facts. */
  changed: boolean;
  revokedAt: string;
  revokedBy: string;
  reason: string;
  /** Whether the token's workflow accepted the signal; when false the reconciler will tell it. */
  workflowSignalled: boolean;
  warning?: string;
}

export interface RetryOutcome {
  tokenId: string;
  /** Receivers whose delivery is retried now (its backoff reset). */
  retrying: string[];
}

export interface ForceOutcome {
  tokenId: string;
  /** Receivers whose delivery was marked `forced`: propagation completes without their confirmation. */
  forced: string[];
}

/** How long retry and force wait for the token's workflow to apply them (a worker runs the handler). */
export const OPERATOR_DEADLINE_MS = 15_000;

const bulkPaceSchema = z.object({
  concurrency: z.number().int().min(1).max(256).optional(),
  batchSize: z.number().int().min(1).max(1000).optional(),
});

/** A bulk call's pace checked (a bad value names its field); the callbacks and signal pass as given. */
function bulkOptions<O extends BulkOptions>(options: O): O {
  parseInput(bulkPaceSchema, { concurrency: options.concurrency, batchSize: options.batchSize }, 'bulk options');
  return options;
}

const notPropagating = (tokenId: string, detail: string) =>
  new NotPropagatingError(tokenId, `token ${tokenId} is not propagating a revocation (${detail})`);

/** The field prefixes of the operator Updates' refusals (`request:` is an undecodable payload). */
const OPERATOR_FIELDS = { reason: 'reason', actor: 'actor', request: 'request' } as const;

/** The store's reads and receivers (TokenWardenStore), and what tells tokens' workflows through Temporal. */
export class TokenWarden extends TokenWardenStore {
  readonly #startedMarks: StartedMarks;
  /** Built once: a zod object schema generates its parser on its first parse (~0.5 ms of CPU each time). */
  readonly #issueSchema: ReturnType<typeof issueSchema>;

  private constructor(
    override readonly settings: Settings,
    pool: StorePool,
    private readonly temporal: Client,
    onError: (err: Error) => void,
  ) {
    super(settings, pool);
    this.#startedMarks = new StartedMarks(pool, onError);
    this.#issueSchema = issueSchema(settings.maxTtlMs);
  }

  /** Connects to the store and Temporal with the given settings (default: from the environment). */
  static override async connect(
    settings: Settings = loadSettings(),
    options: ConnectOptions = {},
  ): Promise<TokenWarden> {
    const onError = options.onError ?? (() => {});
    const pool = TokenWardenStore.createPool(settings, { onError });
    try {
      const client = await connectTemporal(settings);
      return new TokenWarden(settings, pool, client, onError);
    } catch (err) {
      await pool.end();
      throw err;
    }
  }

  /** Resolves when the Temporal server answers within `timeoutMs` (health checks); throws otherwise. */
  async checkTemporal(timeoutMs = 2_000): Promise<void> {
    const connection = this.temporal.connection;
    await connection.withDeadline(Date.now() + timeoutMs, () => connection.workflowService.getSystemInfo({}));
  }

  /** Records the workflow starts still pending, then closes the connections. */
  override async close(): Promise<void> {
    await this.#startedMarks.close();
    await this.temporal.connection.close();
    await super.close();
  }

  /**
   * Issues a token: the secret is generated here, only its hash is stored, the workflow is started
   * with ids only, and the raw token is returned once both succeeded. When the start fails (Temporal
   * unreachable past the call deadline, the start refused), the row is killed before the error is
   * thrown: nobody holds the raw token, so nothing valid may stay behind. A crash in between leaves
   * an active row with a bounded life, which the reconciler adopts. That the workflow started is
   * recorded in the background, batched with other issues (a lost mark costs a harmless restart).
   */
  async issue(request: IssueRequest): Promise<IssuedToken> {
    const req = parseInput(this.#issueSchema, request, 'token request');
    const token = generateTokenString();
    const record = await store.insertToken(this.pool, {
      tokenId: newTokenId(),
      credentialId: newCredentialId(),
      subject: req.subject,
      name: req.name ?? null,
      scopes: req.scopes,
      receivers: [...new Set(req.receivers)].sort(),
      ttlMs: req.ttl,
      secretHash: hashToken(token),
      policy: req.policy ?? null,
    });
    try {
      // The policy the issue read under its lock, whose version the row records (a `policy set`
      // since then is told by an apply).
      const policy = record.issuedUnder ? policySnapshot(record.issuedUnder) : undefined;
      await this.temporal.connection.withDeadline(Date.now() + TEMPORAL_CALL_DEADLINE_MS, () =>
        startTokenWorkflow(this.temporal, record, this.settings.temporal.taskQueue, this.settings.timing, policy),
      );
    } catch (err) {
      throw await this.abandonIssue(record.id, err);
    }
    this.#startedMarks.add(record.id);
    return { tokenId: record.id, token, expiresAt: record.expiresAt };
  }

  /** Kills the row of an issue that failed after it was written, and says what happened. */
  private async abandonIssue(tokenId: string, failure: unknown): Promise<Error> {
    const why = `issue failed: the token's workflow could not be started (${causes(failure)})`;
    try {
      await store.killToken(this.pool, {
        tokenId,
        reason: 'issue failed: its workflow could not be started',
        actor: 'system',
        initiatingEntity: 'system',
      });
    } catch (killFailure) {
      return new Error(
        `${why}, and revoking ${tokenId} in the store failed too (${causes(killFailure)}): nobody received the token, but it stays valid until it expires or is revoked`,
        { cause: failure },
      );
    }
    return new Error(`${why}; ${tokenId} was revoked in the store, no valid token is left behind`, {
      cause: failure,
    });
  }

  /**
   * Brings existing tokens under management: each record (an ImportRecordInput, or a SourceLine of
   * readRecords) is validated alone, stored by its secret's hash in batches, and its workflow
   * started, `concurrency` at once. Idempotent and resumable: a rerun after a crash or an abort
   * skips what was done and finishes the rest; nothing is started twice. Never throws for a bad
   * record: the report counts it (and onError hears of it).
   */
  async startMany(records: AsyncIterable<unknown> | Iterable<unknown>, options: BulkOptions = {}): Promise<BulkReport> {
    const { startMany } = await import('./bulk/start-many.js');
    return startMany(this.bulkDeps(), records, bulkOptions(options));
  }

  /**
   * Issues a token for each record (subject, receivers, ttl, name, scopes); the raw tokens are
   * written to `options.out` (created with mode 0600) and nowhere else, each batch before it is
   * issued. A rerun with the same out file issues only the records it does not hold yet.
   */
  async issueMany(
    records: AsyncIterable<unknown> | Iterable<unknown>,
    options: IssueManyOptions,
  ): Promise<IssueManyReport> {
    const { issueMany } = await import('./bulk/issue-many.js');
    return issueMany(this.bulkDeps(), records, { ...options, ...bulkOptions(options) });
  }

  private bulkDeps(): BulkDeps {
    return {
      pool: this.pool,
      temporal: this.temporal,
      settings: this.settings,
      markStarted: (tokenId) => this.#startedMarks.add(tokenId),
      flushStarted: () => this.#startedMarks.flush(),
    };
  }

  /**
   * Kills the token in the store (dead for every verifier when this returns), then signals its
   * workflow to propagate. Idempotent: a second call returns the first revocation's facts.
   */
  async revoke(input: RevokeInput): Promise<RevokeOutcome> {
    const req = parseInput(revokeSchema, input, 'revoke request');
    const request: RevokeRequest = {
      reason: req.reason,
      actor: req.actor,
      initiatingEntity: req.initiatingEntity as InitiatingEntity,
      requestId: randomUUID(),
      ...(req.correlationId ? { correlationId: req.correlationId } : {}),
    };
    // The kill and the signal go out together, so the call costs the slower of the two, not their
    // sum. Both carry the same request: whichever kill commits first (ours, or the workflow's own)
    // records it, and the request id tells us which revocation is ours. One deadline covers both
    // Temporal calls below: revoke answers within it, whatever Temporal does.
    const deadline = Date.now() + TEMPORAL_CALL_DEADLINE_MS;
    const [killed, signalled] = await Promise.allSettled([
      store.killToken(this.pool, { tokenId: req.tokenId, ...request }),
      this.temporal.connection.withDeadline(deadline, () => signalRevokeRunning(this.temporal, req.tokenId, request)),
    ]);
    if (killed.status === 'rejected') throw killed.reason;
    const t = killed.value.token;
    const changed = killed.value.changed || t.revokeRequestId === request.requestId;
    const outcome: RevokeOutcome = {
      tokenId: t.id,
      status: t.status,
      changed,
      revokedAt: t.revokedAt!,
      revokedBy: t.revokedBy!,
      reason: t.revokeReason!,
      workflowSignalled: signalled.status === 'fulfilled',
    };
    if (!changed || signalled.status === 'fulfilled') return outcome;
    try {
      if (!(signalled.reason instanceof WorkflowNotFoundError)) throw signalled.reason;
      // No running workflow (never started, or already closed): start one that adopts the kill.
      const policy = await store.workflowPolicyOf(this.pool, t);
      await this.temporal.connection.withDeadline(deadline, () =>
        signalRevoke(this.temporal, t, request, this.settings.temporal.taskQueue, this.settings.timing, policy),
      );
      outcome.workflowSignalled = true;
    } catch (err) {
      outcome.warning = `revoked in the store, but its workflow could not be signalled (${causes(err)}); the reconciler will start propagation`;
    }
    return outcome;
  }

  /**
   * Offboards a subject: every active token of theirs is killed in the store in one transaction
   * (nothing of theirs verifies when this returns, whatever their number), then each token's
   * workflow is told to propagate, rate-limited. Idempotent and resumable: a second run kills
   * nothing and tells only the workflows of the subject's dead tokens that never took over
   * propagation (an aborted or crashed first run); the reconciler tells those too, later.
   */
  async offboard(input: OffboardInput): Promise<OffboardReport> {
    const { onProgress, signal: abort, ...fields } = input;
    const req = parseInput(offboardSchema, fields, 'offboard request');
    const operationId = randomUUID();
    const started = performance.now();
    const killed = await store.killSubjectTokens(this.pool, req.subject, {
      reason: req.reason,
      actor: req.actor,
      initiatingEntity: req.initiatingEntity as InitiatingEntity,
      operationId,
    });
    const killedAt = performance.now();
    const killedIds = new Set(killed.map((t) => t.id));
    const dead = await store.deadTokensOf(this.pool, req.subject);
    // This call's kills, then any earlier kill whose workflow never took over propagation.
    const untold = [...killed, ...dead.filter((t) => !killedIds.has(t.id) && t.propagationStartedAt === null)];
    const request: RevokeRequest = {
      reason: req.reason,
      actor: req.actor,
      initiatingEntity: req.initiatingEntity as InitiatingEntity,
      requestId: operationId,
      correlationId: operationId,
    };
    const tellStarted = performance.now();
    const told = await tellPaced(untold, (token) => this.tellWorkflow(token, request), req, {
      ...(onProgress ? { onProgress } : {}),
      ...(abort ? { signal: abort } : {}),
    });
    const tellMs = performance.now() - tellStarted;
    const receiversPending = await store.unconfirmedByReceiver(
      this.pool,
      untold.map((t) => t.id),
    );
    return {
      subject: req.subject,
      operationId,
      revoked: killed.map((t) => t.id),
      alreadyDead: dead.filter((t) => !killedIds.has(t.id)).map((t) => t.id),
      signalled: told.signalled,
      notSignalled: told.notSignalled,
      receiversPending,
      aborted: told.aborted,
      warnings: tellWarnings(told, 'run offboard again'),
      durationsMs: { kill: Math.round(killedAt - started), tell: Math.round(tellMs) },
    };
  }

  /**
   * Revokes every token matching `filter` (AND of its criteria; at least one): all dead in the
   * store first, in chunks, one operation id on every event and audit record, then each workflow
   * told, paced. Resumable with `{ resume: operationId }` (see client/revoke-many.ts).
   */
  async revokeMany(filter: RevokeFilter | null, options: RevokeManyOptions): Promise<RevokeManyReport> {
    return revokeMany(
      { pool: this.pool, tellWorkflow: (token, request) => this.tellWorkflow(token, request) },
      filter,
      options,
    );
  }

  /** How many tokens a filter matches now (active, and dead already): the figure to confirm. */
  async countMatching(filter: RevokeFilter): Promise<MatchCount> {
    return countMatching(this.pool, filter);
  }

  /** One token's workflow told of its kill; where none runs, one is started that adopts it. */
  private async tellWorkflow(token: TokenRecord, request: RevokeRequest): Promise<void> {
    const deadline = Date.now() + TEMPORAL_CALL_DEADLINE_MS;
    try {
      await this.temporal.connection.withDeadline(deadline, () =>
        signalRevokeRunning(this.temporal, token.id, request),
      );
    } catch (err) {
      if (!(err instanceof WorkflowNotFoundError)) throw err;
      const policy = await store.workflowPolicyOf(this.pool, token);
      await this.temporal.connection.withDeadline(deadline, () =>
        signalRevoke(this.temporal, token, request, this.settings.temporal.taskQueue, this.settings.timing, policy),
      );
    }
  }

  /**
   * Tells the workflow of a token killed in the store alone (reuse detected by a verifier), with the
   * kill's facts, as the reconciler's untold set would later. Nothing to tell for a live token.
   */
  async tellKilled(tokenId: string): Promise<void> {
    const token = await store.requireToken(this.pool, tokenId);
    if (token.status === 'active') return;
    await this.tellWorkflow(token, {
      reason: token.revokeReason ?? 'unspecified',
      actor: token.revokedBy ?? 'system',
      initiatingEntity: token.initiatingEntity ?? 'system',
    });
  }

  /**
   * Retries every unconfirmed delivery of a revoked token now, resetting its backoff (after a
   * receiver's 4xx was fixed, or to hurry a stuck propagation). Audited by the workflow.
   */
  async retryPropagation(tokenId: string, input: OperatorInput): Promise<RetryOutcome> {
    const { retrying } = await this.operatorUpdate('retry', retryPropagationUpdate, { tokenId, ...input });
    return { tokenId, retrying };
  }

  /** Marks every unconfirmed delivery `forced` and completes propagation (an operator's decision, audited). */
  async forceComplete(tokenId: string, input: OperatorInput): Promise<ForceOutcome> {
    const { forced } = await this.operatorUpdate('force', forceCompleteUpdate, { tokenId, ...input });
    return { tokenId, forced };
  }

  private async operatorUpdate<Result>(
    kind: 'retry' | 'force',
    update: UpdateDefinition<Result, [OperatorRequest]>,
    input: z.input<typeof operatorSchema>,
  ): Promise<Result> {
    const req = parseInput(operatorSchema, input, `${kind} request`);
    const token = await store.requireToken(this.pool, req.tokenId);
    if (token.propagation !== 'pending' && token.propagation !== 'stuck') {
      throw notPropagating(req.tokenId, `status ${summarise(token).status}, propagation ${token.propagation}`);
    }
    const request: OperatorRequest = { reason: req.reason, actor: req.actor };
    const handle = this.temporal.workflow.getHandle(tokenWorkflowId(req.tokenId));
    const options = { args: [request] as [OperatorRequest], updateId: req.requestId ?? randomUUID() };
    try {
      const deadline = Date.now() + OPERATOR_DEADLINE_MS;
      return await this.temporal.connection.withDeadline(deadline, () =>
        sendWithAbortRetries(() => handle.executeUpdate(update, options), deadline),
      );
    } catch (err) {
      if (err instanceof WorkflowUpdateFailedError) {
        const refusal = updateRefusal(err, { tokenId: req.tokenId, kind, fields: OPERATOR_FIELDS });
        if (refusal) throw refusal;
      }
      const what =
        err instanceof WorkflowNotFoundError
          ? 'its workflow is not running; the reconciler restarts an unfinished propagation, then try again'
          : err instanceof WorkflowUpdateRPCTimeoutOrCancelledError
            ? `its workflow did not apply the ${kind} within ${OPERATOR_DEADLINE_MS / 1000} s (is a worker running?); check with show`
            : err instanceof WorkflowUpdateFailedError
              ? `its workflow failed the ${kind} (${causes(err)}); check with show`
              : `the ${kind} could not be sent to its workflow (${causes(err)})`;
      throw new Error(`token ${req.tokenId}: ${what}`, { cause: err });
    }
  }

  // ------------------------------------------------ history of a token (client/history.ts)

  /**
   * The token's whole life, oldest first, from its workflow's history (every run of its workflow
   * id, payloads decoded through this client's data converter), then its delivery rows as the
   * store holds them now. Runs Temporal no longer holds are stood in for by the store's audit
   * events, in entries that say so (`history.unavailable`, `history.partial`).
   */
  async history(tokenId: string): Promise<HistoryEntry[]> {
    const id = parseInput(tokenIdSchema, tokenId, 'token id');
    const token = await store.requireToken(this.pool, id);
    return tokenHistory({ client: this.temporal, pool: this.pool }, token);
  }

  // ------------------------------------------------ self-managing tokens (client/self-managing.ts, client/policies.ts)

  private get selfManagingDeps(): SelfManagingDeps & PolicyDeps {
    return {
      pool: this.pool,
      temporal: this.temporal,
      maxTtlMs: this.settings.maxTtlMs,
      ...(this.settings.ownerDirRoot !== undefined ? { ownerDirRoot: this.settings.ownerDirRoot } : {}),
    };
  }

  /**
   * Rotates the token: a new secret generated here, its SHA-256 sent to the token's workflow, which
   * makes it the current credential; the old one stays valid for the grace (`grace`, else the
   * policy's, else the worker's default), then is revoked at every receiver. The raw token is
   * returned once.
   */
  async rotate(tokenId: string, input: RotateInput = {}): Promise<RotateOutcome> {
    return selfManaging.rotate(this.selfManagingDeps, tokenId, input);
  }

  /** Reports suspicious activity; the token's policy rotates (grace 0) or revokes. Evidence is audited. */
  async reportSuspicious(tokenId: string, input: SuspiciousInput): Promise<SuspiciousOutcome> {
    return selfManaging.reportSuspicious(this.selfManagingDeps, tokenId, input);
  }

  /** Suspends: the token fails verification until resumed, but is not dead (expiry and revoke still run). */
  async suspend(tokenId: string, input: SelfManagingOperatorInput) {
    return selfManaging.setSuspended(this.selfManagingDeps, tokenId, true, input);
  }

  async resume(tokenId: string, input: SelfManagingOperatorInput) {
    return selfManaging.setSuspended(this.selfManagingDeps, tokenId, false, input);
  }

  /** Revokes the token at `at` (its workflow carries it out then); replaces an earlier schedule. */
  async scheduleRevoke(tokenId: string, input: ScheduleRevokeInput) {
    return selfManaging.scheduleRevoke(this.selfManagingDeps, tokenId, input);
  }

  async cancelScheduledRevoke(tokenId: string, input: SelfManagingOperatorInput) {
    return selfManaging.cancelScheduledRevoke(this.selfManagingDeps, tokenId, input);
  }

  /** Moves the expiry later, to now + ttl (database clock), within the policy's max lifetime. */
  async extend(tokenId: string, input: ChangeExpiryInput) {
    return selfManaging.changeExpiry(this.selfManagingDeps, tokenId, 'extend', input);
  }

  /** Moves the expiry earlier, to now + ttl (database clock). */
  async shorten(tokenId: string, input: ChangeExpiryInput) {
    return selfManaging.changeExpiry(this.selfManagingDeps, tokenId, 'shorten', input);
  }

  /** Writes a named policy (every field; those not given take their defaults). Apply it to tell its tokens. */
  async setPolicy(name: string, fields: PolicyFields = {}): Promise<PolicyRecord> {
    return setPolicy(this.selfManagingDeps, name, fields);
  }

  async showPolicy(name: string): Promise<PolicyRecord> {
    return showPolicy(this.selfManagingDeps, name);
  }

  /**
   * `dryRun`: what the policy does to each live token of it now (shorten, revoke, and why). Else
   * every live token's workflow not yet told of the policy's version is signalled, paced; resumable.
   */
  async applyPolicy(name: string, options: ApplyPolicyOptions & { dryRun: true }): Promise<PolicyDryRunReport>;
  async applyPolicy(name: string, options?: ApplyPolicyOptions & { dryRun?: false }): Promise<PolicyApplyReport>;
  async applyPolicy(name: string, options?: ApplyPolicyOptions): Promise<PolicyDryRunReport | PolicyApplyReport>;
  async applyPolicy(name: string, options: ApplyPolicyOptions = {}): Promise<PolicyDryRunReport | PolicyApplyReport> {
    return applyPolicy(this.selfManagingDeps, name, options);
  }
}
