/**
 * RFC 7009 revocation and RFC 7662 introspection, form-encoded. Unknown, malformed, revoked and
 * expired tokens look alike: revocation answers 200, introspection `{"active": false}`.
 */
import { z } from 'zod';
import { findTokenIdByHash } from '../../../common/store/tokens.js';
import { hashToken, isForeignToken, isWellFormedToken } from '../../../common/secrets.js';
import type { TokenWarden } from '../../index.js';
import { actorOf } from '../auth.js';
import type { ApiInstance, TokenVerifier } from '../server.js';

/** RFC 6749 §5.2 error shape (the /oauth/ routes' errors, see problems.ts). */
const oauthError = z.object({ error: z.string(), error_description: z.string().optional() }).loose();

const tokenRequest = z.object({
  // Longer strings are no token (revocation answers 200, introspection inactive); this only bounds the body.
  token: z.string({ error: 'required: the token to act on' }).max(65_536, 'at most 65536 characters'),
  /** RFC 7009 §2.1 / RFC 7662 §2.1: a hint the server may ignore; an unknown one is ignored. */
  token_type_hint: z.string().max(100).optional(),
});

const errors = { 400: oauthError, 401: oauthError, 403: oauthError, 503: oauthError };

const seconds = (iso: string) => Math.floor(new Date(iso).getTime() / 1000);

export async function oauthRoutes(app: ApiInstance, warden: TokenWarden, verifier: TokenVerifier): Promise<void> {
  app.post(
    '/oauth/revoke',
    {
      config: { scopes: ['revoke'] },
      schema: {
        summary: 'RFC 7009: revoke a token (200 also when it was unknown or already invalid)',
        consumes: ['application/x-www-form-urlencoded'],
        body: tokenRequest,
        response: { 200: z.undefined(), ...errors },
      },
    },
    async (request, reply) => {
      reply.header('cache-control', 'no-store');
      const { token } = request.body;
      // Garbage is refused offline: no lookup, nothing to revoke. An imported token of another format
      // is looked up by its hash (callers are authenticated, so the query is theirs to spend).
      const candidate = isWellFormedToken(token) || isForeignToken(token);
      const tokenId = candidate ? await findTokenIdByHash(warden.pool, hashToken(token)) : undefined;
      if (tokenId) {
        try {
          await warden.revoke({
            tokenId,
            reason: 'revoked through the RFC 7009 endpoint',
            actor: actorOf(request.apiKey!),
            initiatingEntity: 'user',
          });
          // Dead in the store: this process's introspection refuses it now, not when the NOTIFY lands.
          verifier.forget(tokenId);
        } catch (err) {
          // RFC 7009 §2.2.1: 503 means "assume the token is still valid"; try again.
          request.log.error(
            { err: { type: (err as Error).name, message: (err as Error).message } },
            'revocation failed',
          );
          return reply
            .code(503)
            .header('retry-after', '1')
            .send({ error: 'temporarily_unavailable', error_description: 'the token could not be revoked now' });
        }
      }
      return reply.code(200).send();
    },
  );

  app.post(
    '/oauth/introspect',
    {
      config: { scopes: ['introspect'] },
      schema: {
        summary: 'RFC 7662: is this token active? (through the verifier: cached, dropped at once on a kill)',
        consumes: ['application/x-www-form-urlencoded'],
        body: tokenRequest,
        response: {
          200: z.union([
            z.object({
              active: z.literal(true),
              scope: z.string(),
              sub: z.string(),
              exp: z.number().int(),
              iat: z.number().int(),
              jti: z.string(),
              token_type: z.literal('Bearer'),
            }),
            z.object({ active: z.literal(false) }),
          ]),
          ...errors,
        },
      },
    },
    async (request, reply) => {
      // The hot path: the answer is built here from the verifier's typed result, so it is written with
      // JSON.stringify rather than checked again against the response schema (which documents it).
      reply.header('cache-control', 'no-store').type('application/json; charset=utf-8').serializer(JSON.stringify);
      let verdict;
      try {
        verdict = await verifier.verify(request.body.token);
      } catch (err) {
        request.log.error(
          { err: { type: (err as Error).name, message: (err as Error).message } },
          'verification failed',
        );
        return reply
          .code(503)
          .header('retry-after', '1')
          .send({ error: 'temporarily_unavailable', error_description: 'the token could not be checked now' });
      }
      if (!verdict.active) return reply.send({ active: false as const });
      return reply.send({
        active: true as const,
        scope: verdict.scopes.join(' '),
        sub: verdict.subject,
        exp: seconds(verdict.expiresAt),
        iat: seconds(verdict.issuedAt),
        jti: verdict.tokenId,
        token_type: 'Bearer' as const,
      });
    },
  );
}
