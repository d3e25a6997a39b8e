/** /v1/receivers: register (the signing secret answered once), list, show, remove. Admin scope. */
import { z } from 'zod';
import { NotFoundError } from '../../../common/errors.js';
import { receiverSchema as receiverRequestSchema } from '../../store.js';
import type { TokenWarden } from '../../index.js';
import { problemSchema } from '../problems.js';
import { receiverIdParams, receiverSchema } from '../schemas.js';
import type { ApiInstance } from '../server.js';

const admin = { scopes: ['admin'] } as const;
const errors = { 400: problemSchema, 401: problemSchema, 403: problemSchema, 404: problemSchema };

export async function receiverRoutes(app: ApiInstance, warden: TokenWarden): Promise<void> {
  app.post(
    '/v1/receivers',
    {
      config: admin,
      schema: {
        summary: 'Register a receiver; its generated signing secret is in this response only',
        // The library's own receiver schema: whatever it accepts (e.g. probeUrl) the API accepts.
        body: receiverRequestSchema(warden.settings.receiverAllow),
        response: { 201: receiverSchema.extend({ secret: z.string() }), ...errors },
      },
    },
    async (request, reply) => {
      const added = await warden.addReceiver(request.body);
      return reply
        .code(201)
        .header('cache-control', 'no-store')
        .send({ ...added });
    },
  );

  app.get(
    '/v1/receivers',
    {
      config: admin,
      schema: {
        summary: 'The registered receivers',
        response: { 200: z.object({ receivers: z.array(receiverSchema) }), ...errors },
      },
    },
    async () => ({ receivers: (await warden.listReceivers()).map((r) => ({ ...r })) }),
  );

  app.get(
    '/v1/receivers/:id',
    {
      config: admin,
      schema: { summary: 'One receiver', params: receiverIdParams, response: { 200: receiverSchema, ...errors } },
    },
    async (request) => {
      const found = (await warden.listReceivers()).find((r) => r.id === request.params.id);
      if (!found) throw new NotFoundError('receiver', request.params.id);
      return { ...found };
    },
  );

  app.delete(
    '/v1/receivers/:id',
    {
      config: admin,
      schema: {
        summary: 'Remove a receiver (new tokens can no longer name it; pending deliveries are cancelled)',
        params: receiverIdParams,
        response: { 200: receiverSchema, ...errors },
      },
    },
    async (request) => ({ ...(await warden.removeReceiver(request.params.id)) }),
  );
}
