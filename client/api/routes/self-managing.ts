/**
 * Self-managing tokens over HTTP: rotate, report suspicious activity, suspend, resume, schedule or
 * cancel a revocation, move the expiry; named policies (set, show, apply). Admin scope. Each route
 * calls the library; its refusals are field-level problems, an unreachable workflow a 503.
 */
import type { ServerResponse } from 'node:http';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { SUSPICIOUS_ACTIONS } from '../../../common/names.js';
import { policyNameSchema, reasonSchema, ttlSchema } from '../../../common/validation.js';
import type { TokenWarden } from '../../index.js';
import { policyFieldsSchema } from '../../policies.js';
import { evidenceSchema, futureInstantSchema, graceSchema, WorkflowUnavailableError } from '../../self-managing.js';
import { actorOf, onBehalfOfSchema } from '../auth.js';
import { problem, problemSchema, sendProblem } from '../problems.js';
import { tokenIdParams } from '../schemas.js';
import type { ApiInstance } from '../server.js';

const admin = { scopes: ['admin'] } as const;
const errors = {
  400: problemSchema,
  401: problemSchema,
  403: problemSchema,
  404: problemSchema,
  409: problemSchema.describe("the token's state refuses it (no longer active)"),
  503: problemSchema,
};

const policyParams = z.object({ name: policyNameSchema });
const operatorBody = z.strictObject({ reason: reasonSchema, actor: onBehalfOfSchema.optional() });

const timestamp = z.string().describe('ISO 8601');
const policySchema = z
  .looseObject({
    name: z.string(),
    version: z.number(),
    maxLifetimeMs: z.number().nullable(),
    idleTimeoutMs: z.number().nullable(),
    rotateEveryMs: z.number().nullable(),
    graceMs: z.number(),
    warnBeforeMs: z.array(z.number()),
    allowedScopes: z.array(z.string()).nullable(),
    onSuspicious: z.enum(SUSPICIOUS_ACTIONS),
    ownerReceiverId: z.string().nullable(),
    ownerDir: z.string().nullable(),
    createdAt: timestamp,
    updatedAt: timestamp,
  })
  .meta({ id: 'Policy' });

/** The workflow unreachable or silent is the service's state, not the request's fault: 503. */
async function orUnavailable<T>(request: FastifyRequest, reply: FastifyReply, fn: () => Promise<T>) {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof WorkflowUnavailableError) return sendProblem(reply, problem(request, 503, err.message));
    throw err;
  }
}

export async function selfManagingRoutes(app: ApiInstance, warden: TokenWarden): Promise<void> {
  // Applies in flight stop when the server closes: close() would otherwise wait for every one.
  const applies = new Set<AbortController>();
  app.addHook('preClose', async () => applies.forEach((apply) => apply.abort()));

  app.post(
    '/v1/tokens/:id/rotate',
    {
      config: admin,
      schema: {
        summary:
          'Rotate: a new secret (in this response only) becomes current; the old one stays valid for the grace, then is revoked at every receiver',
        params: tokenIdParams,
        body: z
          .strictObject({
            grace: graceSchema.optional().describe("e.g. 10m or 0; default the policy's, else the worker's"),
            reason: reasonSchema.optional(),
            actor: onBehalfOfSchema.optional(),
          })
          .default({}),
        response: {
          200: z.object({
            tokenId: z.string(),
            token: z.string(),
            credentialId: z.string(),
            previousCredentialId: z.string().nullable(),
            previousValidUntil: z.string().nullable(),
          }),
          ...errors,
        },
      },
    },
    async (request, reply) =>
      orUnavailable(request, reply, async () => {
        const { grace, reason, actor } = request.body;
        const rotated = await warden.rotate(request.params.id, {
          actor: actorOf(request.apiKey!, actor),
          ...(grace !== undefined ? { grace } : {}),
          ...(reason !== undefined ? { reason } : {}),
        });
        return reply.header('cache-control', 'no-store').send(rotated);
      }),
  );

  app.post(
    '/v1/tokens/:id/suspicious',
    {
      config: admin,
      schema: {
        summary:
          "Report suspicious activity: the token's policy rotates it (grace 0) or revokes it; evidence is audited",
        params: tokenIdParams,
        body: z.strictObject({
          reason: reasonSchema,
          evidence: evidenceSchema.optional().describe('any JSON, at most 8 KiB'),
          actor: onBehalfOfSchema.optional(),
        }),
        response: {
          202: z.object({ tokenId: z.string(), reportId: z.string(), action: z.enum(SUSPICIOUS_ACTIONS) }),
          ...errors,
        },
      },
    },
    async (request, reply) =>
      orUnavailable(request, reply, async () => {
        const { reason, evidence, actor } = request.body;
        const outcome = await warden.reportSuspicious(request.params.id, {
          reason,
          actor: actorOf(request.apiKey!, actor),
          ...(evidence !== undefined ? { evidence } : {}),
        });
        return reply.code(202).send(outcome);
      }),
  );

  for (const [path, suspend] of [
    ['suspend', true],
    ['resume', false],
  ] as const) {
    app.post(
      `/v1/tokens/:id/${path}`,
      {
        config: admin,
        schema: {
          summary: suspend
            ? 'Suspend: the token fails verification until resumed, but is not dead'
            : 'Resume a suspended token',
          params: tokenIdParams,
          body: operatorBody,
          response: {
            200: z.object({ tokenId: z.string(), suspended: z.boolean(), suspendedAt: z.string().nullable() }),
            ...errors,
          },
        },
      },
      async (request, reply) =>
        orUnavailable(request, reply, async () => {
          const input = { reason: request.body.reason, actor: actorOf(request.apiKey!, request.body.actor) };
          const outcome = suspend
            ? await warden.suspend(request.params.id, input)
            : await warden.resume(request.params.id, input);
          return reply.send(outcome);
        }),
    );
  }

  const scheduled = z.object({ tokenId: z.string(), revokeAt: z.string().nullable() });
  app.post(
    '/v1/tokens/:id/scheduled-revoke',
    {
      config: admin,
      schema: {
        summary: "Revoke at an instant (replaces an earlier schedule); the token's workflow carries it out",
        params: tokenIdParams,
        body: z.strictObject({ at: futureInstantSchema, reason: reasonSchema, actor: onBehalfOfSchema.optional() }),
        response: { 200: scheduled, ...errors },
      },
    },
    async (request, reply) =>
      orUnavailable(request, reply, async () => {
        const { at, reason, actor } = request.body;
        return reply.send(
          await warden.scheduleRevoke(request.params.id, { at, reason, actor: actorOf(request.apiKey!, actor) }),
        );
      }),
  );

  app.delete(
    '/v1/tokens/:id/scheduled-revoke',
    {
      config: admin,
      schema: {
        summary: 'Cancel a scheduled revocation',
        params: tokenIdParams,
        body: operatorBody,
        response: { 200: scheduled, ...errors },
      },
    },
    async (request, reply) =>
      orUnavailable(request, reply, async () => {
        const { reason, actor } = request.body;
        return reply.send(
          await warden.cancelScheduledRevoke(request.params.id, { reason, actor: actorOf(request.apiKey!, actor) }),
        );
      }),
  );

  app.post(
    '/v1/tokens/:id/expiry',
    {
      config: admin,
      schema: {
        summary:
          "Extend or shorten: the new expiry is now + ttl on the store's clock, within the policy's max lifetime (the store first, then the workflow)",
        params: tokenIdParams,
        body: z.strictObject({
          ttl: ttlSchema(warden.settings.maxTtlMs).describe('e.g. 30d'),
          mode: z.enum(['extend', 'shorten']),
          reason: reasonSchema,
          actor: onBehalfOfSchema.optional(),
        }),
        response: {
          200: z.object({ tokenId: z.string(), expiresAt: z.string(), previousExpiresAt: z.string() }),
          ...errors,
        },
      },
    },
    async (request, reply) =>
      orUnavailable(request, reply, async () => {
        const { ttl, mode, reason, actor } = request.body;
        const input = { ttl, reason, actor: actorOf(request.apiKey!, actor) };
        const outcome =
          mode === 'extend'
            ? await warden.extend(request.params.id, input)
            : await warden.shorten(request.params.id, input);
        return reply.send(outcome);
      }),
  );

  app.put(
    '/v1/policies/:name',
    {
      config: admin,
      schema: {
        summary:
          'Create or replace a named policy (every field; those not given take their defaults); apply it to tell its tokens',
        params: policyParams,
        body: policyFieldsSchema(warden.settings.maxTtlMs),
        response: { 200: policySchema, ...errors },
      },
    },
    async (request) => ({ ...(await warden.setPolicy(request.params.name, request.body)) }),
  );

  app.get(
    '/v1/policies/:name',
    {
      config: admin,
      schema: { summary: 'A named policy', params: policyParams, response: { 200: policySchema, ...errors } },
    },
    async (request) => ({ ...(await warden.showPolicy(request.params.name)) }),
  );

  app.post(
    '/v1/policies/:name/apply',
    {
      config: admin,
      schema: {
        summary:
          "Apply a policy: `dryRun` lists which live tokens would be shortened or revoked and why; otherwise every live token's workflow not yet told of this version is told, paced (call again to resume)",
        params: policyParams,
        body: z
          .strictObject({
            dryRun: z.boolean().default(false),
            rate: z.number().positive().max(10_000).optional(),
          })
          .default({ dryRun: false }),
        response: {
          200: z.looseObject({ policy: z.string(), version: z.number(), dryRun: z.boolean() }),
          ...errors,
          409: problemSchema.describe('another apply of this policy is running'),
        },
      },
    },
    async (request, reply) => {
      const { dryRun, rate } = request.body;
      // Paced by `rate`; a call cut short (the client gone, the server stopping) stops telling
      // workflows, and the next call resumes with the tokens not told.
      const stop = new AbortController();
      // ApiInstance leaves the raw types open (never); the server is node:http's.
      const response = reply.raw as unknown as ServerResponse;
      // The response closed before it was ended: the connection went away under it.
      const clientGone = () => {
        if (!response.writableEnded) stop.abort();
      };
      response.once('close', clientGone);
      applies.add(stop);
      try {
        return {
          ...(await warden.applyPolicy(request.params.name, {
            dryRun,
            ...(rate !== undefined ? { rate } : {}),
            signal: stop.signal,
          })),
        };
      } finally {
        applies.delete(stop);
        response.off('close', clientGone);
      }
    },
  );
}
