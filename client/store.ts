/**
 * The library's store half (`tokenwarden/store`): reads and the receivers' registry, which need no
 * Temporal. TokenWarden extends it with what tells workflows; the CLI's store-only commands and
 * apps that only read use it alone, so they never load the Temporal SDK.
 */
import { z } from 'zod';
import { DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS, loadStoreSettings, type StoreSettings } from '../common/config.js';
import { createPool, type StorePool } from '../common/db.js';
import { ConfigError, InvalidInputError, NotFoundError } from '../common/errors.js';
import { PROPAGATION_STATES, TOKEN_STATUSES, type TokenStatus } from '../common/names.js';
import { checkReceiverUrl, resolveReceiver, type ReceiverAllowance } from '../common/addresses.js';
import { generateSigningSecret, MasterKeyring } from '../common/secrets.js';
// The store modules these calls need, not common/store/index.js, whose kill path loads uuid.
import { listDeliveryReports, type DeliveryReport } from '../common/store/deliveries.js';
import { listCredentials, type CredentialRecord } from '../common/store/credentials.js';
import {
  insertReceiver,
  listReceivers,
  listSecretsNotUnderKey,
  removeReceiver,
  replaceSecret,
} from '../common/store/receivers.js';
import type { ReceiverRecord, TokenRecord } from '../common/store/rows.js';
import { listTokens, requireToken } from '../common/store/tokens.js';
import {
  auditCheckingKey,
  auditVerifyKeyFrom,
  verifyAuditTrail,
  type AuditVerifyReport,
} from '../common/store/audit-verify.js';
import { exportDeaths, type DeathRecord } from '../common/store/audit-export.js';
import { deathFilterSchema, type DeathFilterInput } from './audit-export.js';
import { parseInput, receiverIdSchema, subjectLookupSchema, tokenIdSchema } from '../common/validation.js';

export { loadStoreSettings, type StoreSettings } from '../common/config.js';
export { InvalidInputError, NotFoundError, ConfigError } from '../common/errors.js';
export type { TokenRecord, DeliveryRecord, ReceiverRecord } from '../common/store/rows.js';
export type { DeliveryReport } from '../common/store/deliveries.js';
export type {
  AuditBreak,
  AuditCheckpointSummary,
  AuditVerifyReport,
  BrokenAuditLink,
  CheckpointProblem,
} from '../common/store/audit-verify.js';

const auditVerifySchema = z.object({
  tokenId: tokenIdSchema.optional(),
  /** Fail, not warn, when old events are not covered by the latest checkpoint. */
  strict: z.boolean().optional(),
  /** `<seq>:<digest>` of a checkpoint recorded elsewhere (a pass's `auditCheckpoint`, a previous verify). */
  expectCheckpoint: z
    .string()
    .regex(/^[1-9]\d*:[0-9a-f]{64}$/, 'expected <seq>:<digest> (the digest is 64 hex digits)')
    .transform((text) => ({ seq: Number(text.split(':')[0]), digest: text.split(':')[1]! }))
    .optional(),
});
export type AuditVerifyInput = z.input<typeof auditVerifySchema>;
export type { DeathRecord, ReceiverEvidence, ReceiverOutcome } from '../common/store/audit-export.js';
export type { DeathFilterInput } from './audit-export.js';

const listSchema = z.object({
  subject: subjectLookupSchema.optional(),
  status: z.enum(TOKEN_STATUSES).optional(),
  /** Has every receiver been told? `stuck`: a receiver unconfirmed past the escalation deadline. */
  propagation: z.enum(PROPAGATION_STATES).optional(),
  limit: z.number().int().min(1).max(10_000).default(100),
  /** Only tokens older than this one (keyset pagination: the last id of the previous page). */
  before: tokenIdSchema.optional(),
});
export type ListFilter = z.input<typeof listSchema>;

const fetchSizeSchema = z.number().int().min(1).max(100_000);

/** A receiver's URL, stored as the parser's normalised `href`: what is shown is what workers reach. */
const receiverUrlSchema = (allow: readonly ReceiverAllowance[]) =>
  z.string().transform((text, ctx) => {
    const checked = checkReceiverUrl(text, allow);
    if (checked.url) return checked.url.href;
    ctx.addIssue({ code: 'custom', message: checked.problem });
    return z.NEVER;
  });

/** Receiver input; the URL rules depend on the deployment's allowed address ranges. */
export const receiverSchema = (allow: readonly ReceiverAllowance[]) =>
  z.object({
    id: receiverIdSchema,
    url: receiverUrlSchema(allow),
    /**
     * Base URL of its verification probe: `GET <probeUrl>/<tokenId>` answers whether the receiver
     * still accepts the token; its deliveries are confirmed only when it says no. Same address rules.
     */
    probeUrl: receiverUrlSchema(allow).optional(),
    /** An existing signing secret to import (e.g. read from stdin); generated when absent. */
    secret: z
      .string()
      .regex(
        /^whsec_[A-Za-z0-9+/]{32,}={0,2}$/,
        'expected a Standard Webhooks secret: whsec_ followed by base64 of at least 24 bytes',
      )
      .optional(),
  });
export type ReceiverRequest = z.input<ReturnType<typeof receiverSchema>>;

export interface RekeyOutcome {
  /** Id of the current master key, under which every listed secret is now encrypted. */
  keyId: string;
  rekeyed: string[];
  /** Secrets left as they were, with the reason (e.g. no configured key can decrypt them). */
  failed: { receiverId: string; error: string }[];
}

/**
 * A token as callers see it: `status` is what a verifier sees now (an active row past its expiry is
 * `expired` before any worker records it); `recordedStatus` is the row's own column.
 */
export type TokenSummary = Omit<TokenRecord, 'status' | 'effectiveStatus'> & {
  status: TokenStatus;
  recordedStatus: TokenStatus;
};

export interface TokenView extends TokenSummary {
  /** Each receiver's delivery, with its acknowledgement (`delivered`) and probe confirmation (`verified`). */
  deliveries: DeliveryReport[];
  /** Its credentials (secret versions), oldest first: state, and a previous one's grace deadline (`validUntil`). */
  credentials: CredentialRecord[];
}

export interface ConnectOptions {
  /**
   * Called when an idle database connection fails (e.g. the server restarted): the pool discards it
   * and opens a new one on the next query; and, in TokenWarden, when recording issued tokens'
   * workflow starts in the background fails (the reconciler records them instead). The library
   * itself prints nothing.
   */
  onError?: (err: Error) => void;
}

export const summarise = ({ status, effectiveStatus, ...rest }: TokenRecord): TokenSummary => ({
  ...rest,
  status: effectiveStatus,
  recordedStatus: status,
});

const missingMasterKey = () =>
  new ConfigError(
    "TOKENWARDEN_MASTER_KEY is not set: it encrypts receivers' signing secrets at rest (32 bytes, base64)",
  );

export class TokenWardenStore {
  #keyring: MasterKeyring | undefined;

  protected constructor(
    readonly settings: StoreSettings,
    readonly pool: StorePool,
  ) {}

  /** Connects to the store with the given settings (default: from the environment). */
  static async connect(
    settings: StoreSettings = loadStoreSettings(),
    options: ConnectOptions = {},
  ): Promise<TokenWardenStore> {
    return new TokenWardenStore(settings, TokenWardenStore.createPool(settings, options));
  }

  protected static createPool(settings: StoreSettings, options: ConnectOptions): StorePool {
    return createPool(settings.databaseUrl, settings.databaseSchema, undefined, options.onError);
  }

  async close(): Promise<void> {
    await this.pool.end();
  }

  async show(tokenId: string): Promise<TokenView> {
    const id = parseInput(tokenIdSchema, tokenId, 'token id');
    const token = await requireToken(this.pool, id);
    const [deliveries, credentials] = await Promise.all([
      listDeliveryReports(this.pool, id),
      listCredentials(this.pool, id),
    ]);
    return { ...summarise(token), deliveries, credentials };
  }

  async list(filter: ListFilter = {}): Promise<TokenSummary[]> {
    const f = parseInput(listSchema, filter, 'list filter');
    const tokens = await listTokens(this.pool, {
      ...(f.subject ? { subject: f.subject } : {}),
      ...(f.status ? { status: f.status } : {}),
      ...(f.propagation ? { propagation: f.propagation } : {}),
      limit: f.limit,
      ...(f.before ? { beforeId: f.before } : {}),
    });
    return tokens.map(summarise);
  }

  private get keyring(): MasterKeyring {
    return (this.#keyring ??= new MasterKeyring(this.settings.masterKey, this.settings.previousMasterKeys));
  }

  /**
   * Registers a receiver; its signing secret is generated (or imported), encrypted at rest and
   * returned once. The hosts of its URL and probe URL must not resolve to a forbidden address; a
   * name that does not resolve yet is accepted, since every attempt checks the resolved address again.
   */
  async addReceiver(input: ReceiverRequest): Promise<ReceiverRecord & { secret: string }> {
    const allow = this.settings.receiverAllow;
    const req = parseInput(receiverSchema(allow), input, 'receiver');
    for (const [field, url] of [
      ['url', req.url],
      ['probeUrl', req.probeUrl],
    ] as const) {
      if (url === undefined) continue;
      const resolved = await resolveReceiver(new URL(url), allow, AbortSignal.timeout(5_000)).catch(() => undefined);
      if (resolved?.problem) {
        throw new InvalidInputError(`invalid receiver: ${field}: ${resolved.problem}`, [
          { path: field, message: resolved.problem },
        ]);
      }
    }
    const secret = req.secret ?? generateSigningSecret();
    const encrypted = this.keyring.encrypt(secret, req.id);
    if (!encrypted) throw missingMasterKey();
    const record = await insertReceiver(this.pool, {
      id: req.id,
      url: req.url,
      ...(req.probeUrl !== undefined ? { probeUrl: req.probeUrl } : {}),
      secretCiphertext: encrypted.ciphertext,
      secretKeyId: encrypted.keyId,
    });
    return { ...record, secret };
  }

  /**
   * Re-encrypts every receiver's signing secret under the current master key, each with its own
   * compare-and-set, so it is safe while workers deliver and idempotent. Run it after configuring
   * a new TOKENWARDEN_MASTER_KEY with the old one in TOKENWARDEN_PREVIOUS_MASTER_KEYS.
   */
  async rekeyReceivers(): Promise<RekeyOutcome> {
    const keyId = this.keyring.currentId;
    if (!keyId) throw missingMasterKey();
    const outcome: RekeyOutcome = { keyId, rekeyed: [], failed: [] };
    for (const stored of await listSecretsNotUnderKey(this.pool, keyId)) {
      const { receiverId } = stored;
      try {
        const secret = this.keyring.decrypt(stored.keyId, stored.ciphertext, receiverId);
        if (secret === undefined) {
          outcome.failed.push({
            receiverId,
            error: `no configured master key has id ${stored.keyId}: add the key it was encrypted with to TOKENWARDEN_PREVIOUS_MASTER_KEYS`,
          });
          continue;
        }
        const replaced = await replaceSecret(this.pool, stored, this.keyring.encrypt(secret, receiverId)!);
        if (replaced) outcome.rekeyed.push(receiverId);
        else outcome.failed.push({ receiverId, error: 'its secret changed while rekeying: run rekey again' });
      } catch (err) {
        // Decryption errors say only that authentication failed; they never quote key material.
        outcome.failed.push({ receiverId, error: err instanceof Error ? err.message : String(err) });
      }
    }
    return outcome;
  }

  /**
   * Evidence of terminations: one record per token death (revocation or expiry) matching the
   * filter (`since` inclusive, `until` exclusive, by the instant it died in the store; ISO 8601),
   * oldest first, streamed from a server-side cursor `fetchSize` rows at a time (default 500), so
   * memory stays flat whatever the count. The filter is checked before anything is read.
   */
  exportDeaths(filter: DeathFilterInput = {}, options: { fetchSize?: number } = {}): AsyncGenerator<DeathRecord> {
    const parsed = parseInput(deathFilterSchema, filter, 'export filter');
    if (options.fetchSize !== undefined) parseInput(fetchSizeSchema, options.fetchSize, 'fetchSize');
    return exportDeaths(this.pool, parsed, options);
  }

  async listReceivers(): Promise<ReceiverRecord[]> {
    return listReceivers(this.pool);
  }

  async removeReceiver(id: string): Promise<ReceiverRecord> {
    return removeReceiver(this.pool, parseInput(receiverIdSchema, id, 'receiver id'));
  }

  /**
   * Recomputes every audit chain (or one token's) from its stored text and checks the signed
   * checkpoints with the configured audit key: `ok` is false on any broken link or checkpoint
   * problem, each broken chain named with the seq of its first broken link.
   */
  async verifyAudit(input: AuditVerifyInput = {}): Promise<AuditVerifyReport> {
    const { tokenId, strict, expectCheckpoint } = parseInput(auditVerifySchema, input, 'audit verify options');
    const key = auditVerifyKeyFrom(this.settings);
    const report = await verifyAuditTrail(this.pool, {
      ...(tokenId !== undefined ? { tokenId } : {}),
      ...(key ? { key: key.key, keySource: key.source } : {}),
      previousKeys: (this.settings.auditPreviousPublicKeys ?? []).map(auditCheckingKey),
      // The writer's interval, then a reconciler pass (every minute) and two minutes of margin.
      staleAfterMs: (this.settings.auditCheckpointIntervalMs ?? DEFAULT_AUDIT_CHECKPOINT_INTERVAL_MS) + 3 * 60_000,
      ...(strict !== undefined ? { strict } : {}),
      ...(expectCheckpoint ? { expectCheckpoint } : {}),
    });
    // Nothing of it anywhere (no chain, no checkpoint head, no row): an unknown token, not a clean one.
    if (tokenId !== undefined && report.chains === 0 && report.broken.length === 0)
      throw new NotFoundError('token', tokenId);
    return report;
  }
}
