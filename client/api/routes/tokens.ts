/** /v1/tokens: issue, show, list (keyset pages), revoke. Admin scope. */
import { z } from 'zod';
import { INITIATING_ENTITIES } from '../../../common/names.js';
import { correlationIdSchema, reasonSchema } from '../../../common/validation.js';
import { issueSchema, type TokenWarden } from '../../index.js';
import { actorOf, onBehalfOfSchema } from '../auth.js';
import { problemSchema } from '../problems.js';
import { encodeCursor, listQuery, tokenIdParams, tokenSchema, tokenViewSchema, deliverySchema } from '../schemas.js';
import type { ApiInstance, TokenVerifier } from '../server.js';

const admin = { scopes: ['admin'] } as const;
const errors = { 400: problemSchema, 401: problemSchema, 403: problemSchema, 404: problemSchema };

export const revokeBody = z.object({
  reason: reasonSchema,
  /** Default: the API key (`apikey:<name> (<id>)`). */
  /** Who the caller acts for, recorded after the API key (which is always the actor). */
  actor: onBehalfOfSchema.optional(),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
  correlationId: correlationIdSchema.optional(),
});

export async function tokenRoutes(app: ApiInstance, warden: TokenWarden, verifier: TokenVerifier): Promise<void> {
  app.post(
    '/v1/tokens',
    {
      config: admin,
      schema: {
        summary: 'Issue a token; the raw token is in this response only',
        body: issueSchema(warden.settings.maxTtlMs),
        response: {
          201: z.object({ tokenId: z.string(), token: z.string(), expiresAt: z.string() }),
          ...errors,
        },
      },
    },
    async (request, reply) => {
      const issued = await warden.issue(request.body);
      return reply.code(201).header('cache-control', 'no-store').send(issued);
    },
  );

  app.get(
    '/v1/tokens/:id',
    {
      config: admin,
      schema: {
        summary: "A token as the store sees it, with each receiver's delivery",
        params: tokenIdParams,
        response: { 200: tokenViewSchema, ...errors },
      },
    },
    async (request) => {
      const view = await warden.show(request.params.id);
      return { ...view, deliveries: view.deliveries.map((d) => ({ ...d })) };
    },
  );

  app.get(
    '/v1/tokens',
    {
      config: admin,
      schema: {
        summary: 'List tokens, newest first, a page at a time (`next` is the cursor of the following page)',
        querystring: listQuery,
        response: { 200: z.object({ tokens: z.array(tokenSchema), next: z.string().nullable() }), ...errors },
      },
    },
    async (request) => {
      const { subject, status, limit, cursor } = request.query;
      // One more than asked: whether a next page exists, without a count.
      const tokens = await warden.list({
        ...(subject ? { subject } : {}),
        ...(status ? { status } : {}),
        ...(cursor ? { before: cursor } : {}),
        limit: limit + 1,
      });
      const page = tokens.slice(0, limit);
      return { tokens: page, next: tokens.length > limit ? encodeCursor(page.at(-1)!.id) : null };
    },
  );

  app.post(
    '/v1/tokens/:id/revoke',
    {
      config: admin,
      schema: {
        summary: "Revoke: answers once the token is dead in the store, with the receivers' delivery state so far",
        params: tokenIdParams,
        body: revokeBody,
        response: {
          200: z.looseObject({
            tokenId: z.string(),
            status: z.string(),
            changed: z.boolean(),
            revokedAt: z.string(),
            revokedBy: z.string(),
            reason: z.string(),
            workflowSignalled: z.boolean(),
            propagation: z.string(),
            deliveries: z.array(deliverySchema),
          }),
          ...errors,
        },
      },
    },
    async (request) => {
      const { reason, actor, initiatingEntity, correlationId } = request.body;
      const outcome = await warden.revoke({
        tokenId: request.params.id,
        reason,
        actor: actorOf(request.apiKey!, actor),
        initiatingEntity,
        ...(correlationId ? { correlationId } : {}),
      });
      // Dead in the store: this process's introspection refuses it now, not when the NOTIFY lands.
      verifier.forget(outcome.tokenId);
      // Read after the kill committed: the deliveries as far as they got.
      const view = await warden.show(outcome.tokenId);
      return { ...outcome, propagation: view.propagation, deliveries: view.deliveries.map((d) => ({ ...d })) };
    },
  );
}
