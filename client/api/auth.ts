/**
 * API key authentication (`Authorization: Bearer twk_…`) and scopes. Missing, malformed, unknown
 * and revoked keys all answer 401 alike; a key without the route's scope 403. `admin` implies all.
 */
import { createHash } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Queryable } from '../../common/db.js';
import { authenticateApiKey, type ApiKeyRecord, type ApiKeyScope } from '../../common/store/api-keys.js';
import { actorSchema } from '../../common/validation.js';
import { problem, sendProblem } from './problems.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The authenticated API key (routes with a scope only). */
    apiKey?: ApiKeyRecord;
  }
  interface FastifyContextConfig {
    /** Scopes that may call the route (`admin` always may). */
    scopes?: readonly ApiKeyScope[];
    /** No authentication: a route must declare this or scopes (checked when it is registered). */
    public?: boolean;
    /** A scoped route's callers that need no key (decided before the body is read); the rest need one. */
    keyless?: (request: FastifyRequest) => boolean;
  }
}

/** How an authenticated request's caller is named in the audit trail and receivers' events. */
/** Who an API caller acts for (the body's `actor`): short, since the key comes first. */
export const onBehalfOfSchema = actorSchema.refine((v) => v.length <= 100, 'at most 100 characters');

/**
 * Who did it, as audited: always the API key (a body may not claim another actor), with the person
 * or system the caller acts for after it when given. Bounded to the store's 200 characters.
 */
export const actorOf = (key: ApiKeyRecord, onBehalfOf?: string) =>
  `apikey:${key.id} (${key.name.slice(0, 40)})${onBehalfOf ? ` for ${onBehalfOf}` : ''}`;

/**
 * Checks keys against the store, remembering an accepted key for `cacheTtlMs` (by the SHA-256 of the
 * presented string, never the string): a key revoked meanwhile is refused at most that much later.
 */
export class ApiKeyAuthenticator {
  readonly #accepted = new Map<string, { key: ApiKeyRecord; until: number }>();

  constructor(
    private readonly db: Queryable,
    private readonly cacheTtlMs: number,
  ) {}

  async authenticate(presented: string): Promise<ApiKeyRecord | undefined> {
    const now = Date.now();
    const cacheKey = createHash('sha256').update(presented).digest('base64');
    const hit = this.#accepted.get(cacheKey);
    if (hit && hit.until > now) return hit.key;
    this.#accepted.delete(cacheKey);
    const key = await authenticateApiKey(this.db, presented);
    if (key && this.cacheTtlMs > 0) {
      if (this.#accepted.size >= 10_000) this.#accepted.clear();
      this.#accepted.set(cacheKey, { key, until: now + this.cacheTtlMs });
    }
    return key;
  }

  /** The onRequest hook: routes configured with scopes require a key holding one of them. */
  hook() {
    return async (request: FastifyRequest, reply: FastifyReply) => {
      const { scopes, keyless } = request.routeOptions.config;
      if (!scopes || keyless?.(request)) return;
      const header = request.headers.authorization;
      const match = typeof header === 'string' ? /^Bearer ([\x21-\x7e]{1,200})$/i.exec(header) : null;
      const key = match ? await this.authenticate(match[1]!) : undefined;
      if (!key) {
        reply.header('www-authenticate', 'Bearer realm="tokenwarden"');
        return sendProblem(reply, problem(request, 401, 'a valid API key is required'));
      }
      if (!key.scopes.includes('admin') && !key.scopes.some((s) => scopes.includes(s))) {
        return sendProblem(reply, problem(request, 403, 'this API key may not call this endpoint'));
      }
      request.apiKey = key;
    };
  }
}
