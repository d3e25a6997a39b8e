/**
 * Errors as RFC 9457 problem details (`application/problem+json`), except under /oauth/, where
 * RFC 6749 §5.2's `{"error": …}` shape is what OAuth clients parse. Both name each bad field.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod';
import { z } from 'zod';
import {
  InvalidInputError,
  NotFoundError,
  PolicyApplyInProgressError,
  TokenStateConflictError,
} from '../../common/errors.js';

/** Where a bad field was: the request part, then its path inside it (`subject`, `receivers.0`). */
export interface FieldProblem {
  in: 'body' | 'query' | 'params' | 'header';
  path: string;
  message: string;
}

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  instance: string;
  errors?: FieldProblem[];
}

export const problemSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    detail: z.string(),
    instance: z.string(),
    errors: z
      .array(z.object({ in: z.enum(['body', 'query', 'params', 'header']), path: z.string(), message: z.string() }))
      .optional(),
  })
  .meta({ id: 'Problem' });

export const PROBLEM_TYPE = {
  invalidInput: 'urn:tokenwarden:problem:invalid-input',
  notFound: 'urn:tokenwarden:problem:not-found',
  /** Another apply of the policy is running (here or in another process): try again when it ends. */
  applyInProgress: 'urn:tokenwarden:problem:policy-apply-in-progress',
  /** The token's state refuses the request (not propagating, no longer active); `show` tells it. */
  tokenState: 'urn:tokenwarden:problem:token-state-conflict',
  /** Status-only problems: the title is the HTTP status phrase (RFC 9457 §4.2.1). */
  blank: 'about:blank',
} as const;

const TITLES: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  406: 'Not Acceptable',
  409: 'Conflict',
  413: 'Content Too Large',
  415: 'Unsupported Media Type',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

/** Token-, key- and secret-shaped text (a careless client may put one in a path). */
const SECRET_SHAPED = /\b(tw|twk|whsec)_[A-Za-z0-9_+/=%-]+/g;

/**
 * The path as echoed in a problem: without its query string (queries are never echoed nor logged),
 * secret-shaped segments masked, bounded.
 */
export const pathOf = (request: FastifyRequest) =>
  request.url.split('?')[0]!.replace(SECRET_SHAPED, '$1_…').slice(0, 200);

export function problem(
  request: FastifyRequest,
  status: number,
  detail: string,
  extra: Partial<Problem> = {},
): Problem {
  return {
    type: PROBLEM_TYPE.blank,
    title: TITLES[status] ?? 'Error',
    status,
    detail,
    instance: pathOf(request),
    ...extra,
  };
}

export const isOAuthRoute = (request: FastifyRequest) => pathOf(request).startsWith('/oauth/');

/** Sends a problem, or its OAuth error under /oauth/. */
export function sendProblem(reply: FastifyReply, p: Problem): FastifyReply {
  if (isOAuthRoute(reply.request)) {
    const error =
      p.status === 401
        ? 'invalid_client'
        : p.status === 403
          ? 'insufficient_scope'
          : p.status >= 500
            ? p.status === 503
              ? 'temporarily_unavailable'
              : 'server_error'
            : 'invalid_request';
    const fields = p.errors?.map((f) => `${f.path}: ${f.message}`).join('; ');
    return reply
      .code(p.status)
      .header('cache-control', 'no-store')
      .type('application/json')
      .send({ error, error_description: fields || p.detail, ...(p.errors ? { errors: p.errors } : {}) });
  }
  return reply.code(p.status).type('application/problem+json').send(p);
}

const LOCATIONS = { body: 'body', querystring: 'query', params: 'params', headers: 'header' } as const;

/** Library field names that are path parameters of the API. */
const PARAM_FIELDS: Record<string, string> = { tokenId: 'id' };

/** The one error handler: validation → 400, library errors → 400/404/409, fastify's 4xx kept, the rest 500. */
export function handleError(error: FastifyError, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  if (hasZodFastifySchemaValidationErrors(error)) {
    const where = LOCATIONS[(error.validationContext ?? 'body') as keyof typeof LOCATIONS] ?? 'body';
    const errors = error.validation.map((v) => ({
      in: where,
      path: v.instancePath.replace(/^\//, '').replaceAll('/', '.') || '(root)',
      message: v.message ?? 'invalid',
    }));
    return sendInvalid(request, reply, errors);
  }
  if (error instanceof InvalidInputError) {
    const errors = error.fields.map((f): FieldProblem =>
      f.path in PARAM_FIELDS
        ? { in: 'params', path: PARAM_FIELDS[f.path]!, message: f.message }
        : { in: 'body', path: f.path, message: f.message },
    );
    return sendInvalid(request, reply, errors);
  }
  if (error instanceof NotFoundError) {
    return sendProblem(
      reply,
      problem(request, 404, `${error.kind} not found`, { type: PROBLEM_TYPE.notFound, title: 'Not Found' }),
    );
  }
  if (error instanceof PolicyApplyInProgressError) {
    return sendProblem(
      reply,
      problem(request, 409, error.message, { type: PROBLEM_TYPE.applyInProgress, title: 'Policy apply in progress' }),
    );
  }
  if (error instanceof TokenStateConflictError) {
    return sendProblem(
      reply,
      problem(request, 409, error.message, { type: PROBLEM_TYPE.tokenState, title: "Conflict with the token's state" }),
    );
  }
  const status = error.statusCode ?? 500;
  if (status >= 400 && status < 500) return sendProblem(reply, clientProblem(request, error, status));
  request.log.error({ err: { type: error.name, message: error.message, stack: error.stack } }, 'request failed');
  return sendProblem(reply, problem(request, 500, 'the request could not be completed; see the server log'));
}

function sendInvalid(request: FastifyRequest, reply: FastifyReply, errors: FieldProblem[]): FastifyReply {
  return sendProblem(
    reply,
    problem(request, 400, errors.map((e) => `${e.in} ${e.path}: ${e.message}`).join('; '), {
      type: PROBLEM_TYPE.invalidInput,
      title: 'Invalid input',
      errors,
    }),
  );
}

/**
 * Fastify's own 4xx (bad JSON, wrong media type, body too large), named by the part at fault. Their
 * messages are not echoed: a JSON parser's message quotes the body, which may hold a token.
 */
function clientProblem(request: FastifyRequest, error: FastifyError, status: number): Problem {
  const field = (where: FieldProblem['in'], path: string, message: string) =>
    problem(request, status, `${where} ${path}: ${message}`, {
      type: PROBLEM_TYPE.invalidInput,
      title: TITLES[status] ?? 'Invalid input',
      errors: [{ in: where, path, message }],
    });
  switch (error.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return field(
        'header',
        'content-type',
        'expected application/json (application/x-www-form-urlencoded under /oauth/)',
      );
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return field('body', '(body)', 'too large');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return field('body', '(body)', 'expected a JSON body');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return field('header', 'content-length', 'does not match the body');
    default:
      if (error instanceof SyntaxError || error.code === 'FST_ERR_CTP_INVALID_JSON_BODY')
        return field('body', '(body)', 'not valid JSON');
      return field('body', '(body)', 'the request was refused');
  }
}
