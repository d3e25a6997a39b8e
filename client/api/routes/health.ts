/**
 * GET /healthz (no key: Temporal and PostgreSQL reachability, each reported, and whether the
 * verifier hears kills) and GET /openapi.json.
 */
import { z } from 'zod';
import type { TokenWarden } from '../../index.js';
import type { ApiInstance, TokenVerifier } from '../server.js';

const HEALTH_TIMEOUT_MS = 2_000;

const reachability = z.object({ reachable: z.boolean() });
/** A deaf verifier still answers correctly (from the store, nothing cached): reported, not a 503. */
const listener = z.object({ listening: z.boolean() });

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

export async function healthRoutes(app: ApiInstance, warden: TokenWarden, verifier: TokenVerifier): Promise<void> {
  app.get(
    '/healthz',
    {
      config: { public: true },
      schema: {
        summary:
          'Whether Temporal and PostgreSQL answer (503 when either does not), and whether introspection hears kills (its cache is off while not)',
        security: [],
        response: {
          200: z.object({
            status: z.literal('ok'),
            temporal: reachability,
            postgres: reachability,
            verifier: listener,
          }),
          503: z.object({
            status: z.literal('unavailable'),
            temporal: reachability,
            postgres: reachability,
            verifier: listener,
          }),
        },
      },
    },
    async (_request, reply) => {
      const [temporal, postgres] = await Promise.all([
        reachable(() => warden.checkTemporal(HEALTH_TIMEOUT_MS)),
        reachable(() => warden.pool.query('SELECT 1')),
      ]);
      const body = {
        temporal: { reachable: temporal },
        postgres: { reachable: postgres },
        verifier: { listening: verifier.listening },
      };
      return temporal && postgres
        ? reply.code(200).send({ status: 'ok' as const, ...body })
        : reply.code(503).send({ status: 'unavailable' as const, ...body });
    },
  );

  app.get('/openapi.json', { config: { public: true }, schema: { hide: true } }, async () => app.swagger());
}
