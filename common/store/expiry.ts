/**
 * extend / shorten: a token's new expiry is now() + ttl on the database clock, written to the store
 * first (the workflow then adopts it), within the policy's max lifetime and the global maximum.
 */
import type { Queryable } from '../db.js';
import { InvalidInputError, NotFoundError } from '../errors.js';
import { CHANGE_CHANNEL } from '../names.js';
import { storeRefusal } from './credentials.js';
import { routine, toToken, tokenColumns, type TokenRecord } from './rows.js';

export interface ExpiryChangeRequest {
  tokenId: string;
  ttlMs: number;
  mode: 'extend' | 'shorten';
  /** The global maximum lifetime (TOKENWARDEN_MAX_TTL), counted from issued_at like a policy's. */
  maxLifetimeMs: number;
  actor: string;
  reason: string;
  /** Makes a retry the same change (e.g. the workflow's update id): its first facts are returned. */
  requestId: string;
}

export interface ExpiryChangeResult {
  /** False for a retry of a change already made. */
  changed: boolean;
  previousExpiresAt: string;
  token: TokenRecord;
}

const REFUSALS: Record<string, (limit: string) => string> = {
  expiry_policy_max_lifetime: (limit) => `would pass the policy's max lifetime: the expiry may be at most ${limit}`,
  expiry_global_max_lifetime: (limit) =>
    `would pass the maximum lifetime (TOKENWARDEN_MAX_TTL): the expiry may be at most ${limit}`,
  expiry_extend_earlier: (limit) => `extend cannot move the expiry earlier than ${limit}`,
  expiry_shorten_later: (limit) => `shorten cannot move the expiry later than ${limit}`,
};

/**
 * Sets expires_at = now() + ttlMs (database clock), audited, NOTIFY (cached answers are bounded by
 * the old expiry). Refuses with InvalidInputError on field `ttl`, naming the limit, writing nothing:
 * beyond issued_at + the policy's max lifetime or + maxLifetimeMs; an earlier expiry for `extend`,
 * a later one for `shorten`. Throws TokenNotActiveError for a dead or expired token.
 */
export async function changeExpiry(db: Queryable, req: ExpiryChangeRequest): Promise<ExpiryChangeResult> {
  if (!Number.isSafeInteger(req.ttlMs) || req.ttlMs <= 0) {
    throw new InvalidInputError('ttl: must be a positive whole number of milliseconds', [
      { path: 'ttl', message: 'must be a positive whole number of milliseconds' },
    ]);
  }
  try {
    const { rows } = await db.query(
      `SELECT changed, previous_expires_at, ${tokenColumns(db.tables)}
         FROM (SELECT c.changed, c.previous_expires_at, (c.facts).*
                 FROM ${routine(db.tables, 'change_expiry')}($1, $2, $3, $4, $5, $6, $7, $8, $9) AS c) AS changed_expiry`,
      [
        db.tables.schema,
        req.tokenId,
        req.ttlMs,
        req.mode,
        req.maxLifetimeMs,
        req.actor,
        req.reason,
        req.requestId,
        CHANGE_CHANNEL,
      ],
    );
    const row = rows[0];
    if (!row) throw new NotFoundError('token', req.tokenId);
    return {
      changed: row.changed === true,
      previousExpiresAt: (row.previous_expires_at as Date).toISOString(),
      token: toToken(row),
    };
  } catch (err) {
    const e = err as { code?: string; constraint?: string; detail?: string };
    const refusal = e.code === '22023' && e.constraint ? REFUSALS[e.constraint] : undefined;
    if (refusal) {
      const message = refusal(e.detail ?? '?');
      throw new InvalidInputError(`ttl: ${message}`, [{ path: 'ttl', message }]);
    }
    return storeRefusal(err, req.tokenId);
  }
}

/**
 * `policy apply`'s shorten: expires_at becomes the token's policy's limit (issued_at + max lifetime)
 * when it is later, an instant read under the token's lock rather than a ttl counted from a clock
 * read earlier. Never later; a token already within the limit, dead, or without one is unchanged.
 */
export async function shortenToPolicyLimit(
  db: Queryable,
  req: { tokenId: string; actor: string; reason: string },
): Promise<ExpiryChangeResult> {
  const { rows } = await db.query(
    `SELECT changed, previous_expires_at, ${tokenColumns(db.tables)}
       FROM (SELECT c.changed, c.previous_expires_at, (c.facts).*
               FROM ${routine(db.tables, 'shorten_to_policy_limit')}($1, $2, $3, $4, $5) AS c) AS shortened`,
    [db.tables.schema, req.tokenId, req.actor, req.reason, CHANGE_CHANNEL],
  );
  const row = rows[0];
  if (!row) throw new NotFoundError('token', req.tokenId);
  return {
    changed: row.changed === true,
    previousExpiresAt: (row.previous_expires_at as Date).toISOString(),
    token: toToken(row),
  };
}
