/**
 * The HTTP API: a fastify server over the library (TokenWarden) and the verifier. Every body, query
 * and path parameter is a zod schema (validation and the OpenAPI document come from the same
 * schemas); errors are problem details; keys, tokens and Authorization headers are never logged.
 */
import formbody from '@fastify/formbody';
import swagger from '@fastify/swagger';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import {
  jsonSchemaTransform,
  jsonSchemaTransformObject,
  serializerCompiler,
  validatorCompiler,
  type ZodTypeProvider,
} from 'fastify-type-provider-zod';
import type { DestinationStream } from 'pino';
import { DEFAULT_CODEC_ORIGINS } from '../../common/config.js';
import type { TokenWarden } from '../index.js';
import type { Verifier } from '../verifier.js';
import { ApiKeyAuthenticator } from './auth.js';
import { handleError, pathOf, problem, sendProblem } from './problems.js';
import { codecRoutes, type CodecOptions } from './routes/codec.js';
import { healthRoutes } from './routes/health.js';
import { oauthRoutes } from './routes/oauth.js';
import { receiverRoutes } from './routes/receivers.js';
import { selfManagingRoutes } from './routes/self-managing.js';
import { subjectRoutes } from './routes/subjects.js';
import { tokenRoutes } from './routes/tokens.js';

/** What introspection asks: tokenwarden/verifier (cached, dropped on the store's kill NOTIFY). */
export type TokenVerifier = Pick<Verifier, 'verify' | 'forget' | 'listening'>;

export interface ApiServerOptions {
  warden: TokenWarden;
  verifier: TokenVerifier;
  /** Where request logs go (pino lines; default stdout) and from which level; `false`: no logging. */
  logger?: { stream?: DestinationStream; level?: string } | false;
  /** How long an accepted API key is remembered (default 1 s): a revoked key is refused at most this late. */
  apiKeyCacheTtlMs?: number;
  /** The codec endpoints' browser origins and key rule (default: the dev Web UI's origins, a key required). */
  codec?: CodecOptions;
}

/** One route as the auth tests see it: they walk this table, so a new route cannot be forgotten. */
export interface RouteEntry {
  method: string;
  url: string;
  scopes: readonly string[] | undefined;
}

export type ApiServer = FastifyInstance & { readonly routeTable: RouteEntry[] };

export type ApiInstance = FastifyInstance<FastifyInstance['server'], never, never, FastifyBaseLogger, ZodTypeProvider>;

export async function createApiServer(options: ApiServerOptions): Promise<ApiServer> {
  const { warden, verifier } = options;
  const logger =
    options.logger === false
      ? false
      : {
          level: options.logger?.level ?? 'info',
          ...(options.logger?.stream ? { stream: options.logger.stream } : {}),
          // Belt and braces: the one request line below carries no header, query or body.
          redact: {
            paths: ['req.headers.authorization', 'req.headers.cookie', 'req.body', 'body', 'token', 'key'],
            censor: '[redacted]',
          },
        };
  const app = Fastify({
    logger,
    bodyLimit: 64 * 1024,
    // In-flight requests finish on close; idle keep-alive connections are closed at once.
    forceCloseConnections: 'idle',
    return503OnClosing: true,
    // One line per request, written below, instead of fastify's two (which carry the URL with its query).
    logController: new LogController({ disableRequestLogging: true }),
    // Errors fastify raises before routing (a malformed percent-encoding): a problem too, URL masked.
    frameworkErrors: (error, request, reply) =>
      void sendProblem(
        reply,
        problem(request, 400, 'the request URL could not be read', {
          errors: [{ in: 'params', path: '(url)', message: 'expected a well-formed, percent-encoded URL' }],
        }),
      ),
  }) as unknown as ApiServer;
  app.addHook('onResponse', (request, reply, done) => {
    request.log.info(
      {
        method: request.method,
        // The route's pattern (`/v1/tokens/:id`), not the path: a careless client may put a token in it.
        route: request.routeOptions.url ?? '(no route)',
        statusCode: reply.statusCode,
        ms: Math.round(reply.elapsedTime * 10) / 10,
      },
      'request',
    );
    done();
  });
  const routeTable: RouteEntry[] = [];
  Object.defineProperty(app, 'routeTable', { value: routeTable });
  app.addHook('onRoute', (route) => {
    // Deny by default: a route without scopes is public only when it says so.
    if (!route.config?.scopes && !route.config?.public) {
      throw new Error(`route ${String(route.method)} ${route.url} declares neither scopes nor public`);
    }
    const methods = Array.isArray(route.method) ? route.method : [route.method];
    for (const method of methods) {
      if (method === 'HEAD') continue;
      routeTable.push({ method, url: route.url, scopes: route.config?.scopes });
    }
  });

  // A request answered while closing ends its keep-alive connection: close() would otherwise wait
  // for the client to drop it (fastify's keep-alive timeout is 72 s).
  let closing = false;
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close');
    done(null, payload);
  });

  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((request, reply) =>
    sendProblem(reply, problem(request, 404, `no endpoint ${request.method} ${pathOf(request)}`)),
  );
  await app.register(formbody);
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'tokenwarden',
        version: '1.0.0',
        description:
          'Token lifecycle API: admin endpoints (/v1), RFC 7009 revocation and RFC 7662 introspection (/oauth). Errors are RFC 9457 problem details; under /oauth/ they use the OAuth error shape.',
      },
      components: { securitySchemes: { apiKey: { type: 'http', scheme: 'bearer', description: 'twk_… API key' } } },
      security: [{ apiKey: [] }],
    },
    transform: jsonSchemaTransform,
    transformObject: jsonSchemaTransformObject,
  });

  const auth = new ApiKeyAuthenticator(warden.pool, options.apiKeyCacheTtlMs ?? 1_000);
  app.addHook('onRequest', auth.hook());

  const typed = app.withTypeProvider<ZodTypeProvider>() as unknown as ApiInstance;
  await healthRoutes(typed, warden, verifier);
  await tokenRoutes(typed, warden, verifier);
  await subjectRoutes(typed, warden, verifier);
  await receiverRoutes(typed, warden);
  await oauthRoutes(typed, warden, verifier);
  await selfManagingRoutes(typed, warden);
  await codecRoutes(typed, warden, options.codec ?? { origins: DEFAULT_CODEC_ORIGINS, keylessLoopback: false });
  return app;
}
