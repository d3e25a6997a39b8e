/**
 * Names that cross a process boundary: a wire contract. Workflows sleeping for months depend on
 * them, so they never change once released. This module is imported by workflow code: it must stay
 * pure (no Node built-ins, no I/O).
 */
import type { SearchAttributeType } from '@temporalio/common';
import type { SearchAttributeKey } from '@temporalio/common/lib/search-attributes.js';

export const DEFAULT_NAMESPACE = 'tokenwarden';
export const DEFAULT_TASK_QUEUE = 'tokenwarden';

export const WORKFLOW_TYPE = {
  tokenLifecycle: 'tokenLifecycle',
  reconcile: 'reconcile',
} as const;

export const SIGNAL = {
  /** Revoke the token. Also the path for Temporal batch operations, which can signal but not update. */
  revoke: 'revoke',
  /** Suspicious activity was seen: the token's policy decides whether it is rotated or revoked. */
  reportSuspicious: 'reportSuspicious',
  /** The token's policy changed: the workflow re-reads it and recomputes its deadlines. */
  policyChanged: 'policyChanged',
} as const;

export const UPDATE = {
  retryPropagation: 'retryPropagation',
  forceComplete: 'forceComplete',
  /** A new credential (its hash; the caller holds the secret) becomes current; the old one enters its grace. */
  rotate: 'rotate',
  suspend: 'suspend',
  resume: 'resume',
  /** Revoke at a given instant (replaces an earlier schedule), or cancel the schedule. */
  scheduleRevoke: 'scheduleRevoke',
  cancelScheduledRevoke: 'cancelScheduledRevoke',
  /** Extend or shorten the expiry within the policy's max lifetime (the store first, then the timer). */
  changeExpiry: 'changeExpiry',
} as const;

export const QUERY = {
  describe: 'describe',
} as const;

/** Activity names are the keys of createActivities(); a test holds them to this list. */
export const ACTIVITY_NAMES = [
  'killToken',
  'deliverRevocation',
  'deliverRevocationToAll',
  'setPropagation',
  'forceCompleteDeliveries',
  'recordAudit',
  'loadPropagation',
  'killAndLoad',
  'reconcilePage',
  'reconcileSetsWithRows',
  'rotateCredential',
  'rotateAutomatically',
  'endGrace',
  'readLastUse',
  'sendWarning',
  'setSuspended',
  'setScheduledRevoke',
  'changeExpiry',
  'applyPolicy',
  'writeAuditCheckpoint',
] as const;

/**
 * The SDK's search attribute keys, written as the plain objects its `defineSearchAttributeKey`
 * returns: importing the SDK's runtime here would load it into every store-only command.
 */
const searchAttributeKey = <T extends SearchAttributeType>(name: string, type: T): SearchAttributeKey<T> => ({
  name,
  type,
});

export const SEARCH_ATTRIBUTE = {
  subject: searchAttributeKey('TokenSubject', 'KEYWORD'),
  status: searchAttributeKey('TokenStatus', 'KEYWORD'),
  propagation: searchAttributeKey('TokenPropagation', 'KEYWORD'),
  expiresAt: searchAttributeKey('TokenExpiresAt', 'DATETIME'),
  receivers: searchAttributeKey('TokenReceivers', 'KEYWORD_LIST'),
  policy: searchAttributeKey('TokenPolicy', 'KEYWORD'),
  /** Whether the token is suspended (it fails verification but is not dead). */
  suspended: searchAttributeKey('TokenSuspended', 'BOOL'),
  /** The token's name (a label people read; never a secret, refused on issue). */
  name: searchAttributeKey('TokenName', 'KEYWORD'),
  /** While its death propagates: the receivers that have not confirmed yet (none once complete). */
  pendingReceivers: searchAttributeKey('TokenPendingReceivers', 'KEYWORD_LIST'),
} as const;

const CLI_TYPE_NAMES: Record<SearchAttributeType, string> = {
  KEYWORD: 'Keyword',
  TEXT: 'Text',
  INT: 'Int',
  DOUBLE: 'Double',
  BOOL: 'Bool',
  DATETIME: 'Datetime',
  KEYWORD_LIST: 'KeywordList',
};

/** The same list in the `temporal --search-attribute NAME=Type` spelling, for the dev server. */
export const SEARCH_ATTRIBUTE_CLI_TYPES: Record<string, string> = Object.fromEntries(
  Object.values(SEARCH_ATTRIBUTE).map((key) => [key.name, CLI_TYPE_NAMES[key.type]!]),
);

/** Failure type of a receiver's non-retryable answer (4xx other than 408/429, 410): waits for an operator. */
export const RECEIVER_REJECTED = 'ReceiverRejected';

export const RECONCILER_SCHEDULE_ID = 'tokenwarden-reconciler';
/**
 * The sets of rows a reconciler pass walks, in this order (see common/store/reconciler.ts): a token
 * killed as overdue is told at once, so the untold set before it does not tell it twice.
 */
export const RECONCILE_SETS = ['untold', 'overdue', 'unfinished', 'unstarted'] as const;
export type ReconcileSet = (typeof RECONCILE_SETS)[number];
/** Metrics the reconciler emits (through the worker's Runtime; exported when TOKENWARDEN_METRICS_ADDRESS is set). */
export const RECONCILER_METRIC = {
  /** Rows healed, by `action` (expired, signalled, restarted, started). */
  healed: 'tokenwarden_reconciler_healed',
  /** Propagations found making no progress although their workflow runs (marked stuck). */
  wedged: 'tokenwarden_reconciler_wedged',
  /** Rows that could not be healed, by `set`. */
  errors: 'tokenwarden_reconciler_errors',
} as const;
export const RECONCILER_WORKFLOW_ID = 'tokenwarden-reconcile';
/** Metrics of the expiry sweep every worker process runs (worker/expiry-sweeper.ts). */
export const EXPIRY_SWEEP_METRIC = {
  /** Tokens past their expiry the sweep recorded dead. */
  swept: 'tokenwarden_expiry_swept',
  /** Sweeps that failed (e.g. the store unreachable) and tokens whose kill failed. */
  errors: 'tokenwarden_expiry_sweep_errors',
} as const;

export const TOKEN_ID_PREFIX = 'tok_';
export const CREDENTIAL_ID_PREFIX = 'cred_';
export const EVENT_ID_PREFIX = 'evt_';
/** The prefix of raw token strings: `tw_<base62 body>_<checksum>`. */
export const TOKEN_STRING_PREFIX = 'tw';

export const tokenWorkflowId = (tokenId: string): string => `token:${tokenId}`;

/** Postgres NOTIFY channel on which every kill is announced (payload: `<schema>:<tokenId>`). */
export const KILL_CHANNEL = 'tokenwarden_token_killed';
/**
 * Postgres NOTIFY channel on which a change that leaves the token alive is announced (a suspend or
 * resume, a rotation, a credential's end of grace, an expiry change); same payload as the kill's.
 */
export const CHANGE_CHANNEL = 'tokenwarden_token_changed';

export const TOKEN_STATUSES = ['active', 'revoked', 'expired'] as const;
export type TokenStatus = (typeof TOKEN_STATUSES)[number];
export const PROPAGATION_STATES = ['none', 'pending', 'complete', 'stuck'] as const;
export type PropagationState = (typeof PROPAGATION_STATES)[number];
export const DELIVERY_STATES = ['pending', 'delivered', 'failed', 'forced', 'cancelled'] as const;
export type DeliveryState = (typeof DELIVERY_STATES)[number];
/** CAEP initiating_entity values. */
/** The states of a token's credential (secret version). `pending`: stored, not yet delivered, never valid. */
export const CREDENTIAL_STATES = ['pending', 'current', 'previous', 'revoked'] as const;
export type CredentialState = (typeof CREDENTIAL_STATES)[number];
/** What a policy does on suspicious activity. */
export const SUSPICIOUS_ACTIONS = ['rotate', 'revoke'] as const;
export type SuspiciousAction = (typeof SUSPICIOUS_ACTIONS)[number];
/** Revoke reasons the workflow itself gives (besides `expired`). */
export const SYSTEM_REVOKE_REASON = {
  inactive: 'inactive',
  policy: 'policy',
  reuseDetected: 'reuse_detected',
  suspicious: 'suspicious_activity',
} as const;

export const INITIATING_ENTITIES = ['admin', 'user', 'policy', 'system'] as const;
export type InitiatingEntity = (typeof INITIATING_ENTITIES)[number];

/**
 * How propagation is paced (short in tests, long in production). The worker owns these settings:
 * a token's workflow reads them from its worker when propagation starts.
 */
export interface PropagationTiming {
  /** A receiver that has not confirmed after this long makes propagation `stuck` (retries continue). */
  escalateAfterMs: number;
  /** First retry interval of a delivery; doubles on each attempt. */
  retryInitialMs: number;
  /** Upper bound of the retry interval. */
  retryMaxMs: number;
}
