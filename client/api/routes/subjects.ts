/** POST /v1/subjects/:subject/revoke: offboarding, every active token of a subject. Admin scope. */
import { z } from 'zod';
import { INITIATING_ENTITIES } from '../../../common/names.js';
import { reasonSchema } from '../../../common/validation.js';
import type { TokenWarden } from '../../index.js';
import { actorOf, onBehalfOfSchema } from '../auth.js';
import { problemSchema } from '../problems.js';
import { subjectParams } from '../schemas.js';
import type { ApiInstance, TokenVerifier } from '../server.js';

const offboardBody = z.object({
  reason: reasonSchema,
  /** Who the caller acts for, recorded after the API key (which is always the actor). */
  actor: onBehalfOfSchema.optional(),
  initiatingEntity: z.enum(INITIATING_ENTITIES).default('admin'),
});

export async function subjectRoutes(app: ApiInstance, warden: TokenWarden, verifier: TokenVerifier): Promise<void> {
  app.post(
    '/v1/subjects/:subject/revoke',
    {
      config: { scopes: ['admin'] },
      schema: {
        summary:
          "Offboard a subject: every active token of theirs dead in the store in one transaction, then each token's workflow told to propagate",
        params: subjectParams,
        body: offboardBody,
        response: {
          200: z.looseObject({
            subject: z.string(),
            operationId: z.string(),
            revoked: z.array(z.string()),
            alreadyDead: z.array(z.string()),
          }),
          400: problemSchema,
          401: problemSchema,
          403: problemSchema,
        },
      },
    },
    async (request) => {
      const { reason, actor, initiatingEntity } = request.body;
      const report = await warden.offboard({
        subject: request.params.subject,
        reason,
        actor: actorOf(request.apiKey!, actor),
        initiatingEntity,
      });
      // Dead in the store: this process's introspection refuses them now, not when the NOTIFYs land.
      for (const tokenId of [...report.revoked, ...report.alreadyDead]) verifier.forget(tokenId);
      return { ...report };
    },
  );
}
