/** GET /healthz (no key: Temporal and PostgreSQL reachability, each reported) and GET /openapi.json. */
import { z } from 'zod';
import type { TokenWarden } from '../../index.js';
import type { ApiInstance } from '../server.js';

const HEALTH_TIMEOUT_MS = 2_000;

const reachability = z.object({ reachable: z.boolean() });

async function reachable(check: () => Promise<unknown>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('timed out')), HEALTH_TIMEOUT_MS);
  });
  try {
    await Promise.race([check(), timeout]);
    return true;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

export async function healthRoutes(app: ApiInstance, warden: TokenWarden): Promise<void> {
  app.get(
    '/healthz',
    {
      config: { public: true },
      schema: {
        summary: 'Whether Temporal and PostgreSQL answer (503 when either does not)',
        security: [],
        response: {
          200: z.object({ status: z.literal('ok'), temporal: reachability, postgres: reachability }),
          503: z.object({ status: z.literal('unavailable'), temporal: reachability, postgres: reachability }),
        },
      },
    },
    async (_request, reply) => {
      const [temporal, postgres] = await Promise.all([
        reachable(() => warden.checkTemporal(HEALTH_TIMEOUT_MS)),
        reachable(() => warden.pool.query('SELECT 1')),
      ]);
      const body = { temporal: { reachable: temporal }, postgres: { reachable: postgres } };
      return temporal && postgres
        ? reply.code(200).send({ status: 'ok' as const, ...body })
        : reply.code(503).send({ status: 'unavailable' as const, ...body });
    },
  );

  app.get('/openapi.json', { config: { public: true }, schema: { hide: true } }, async () => app.swagger());
}
