/**
 * The codec server for Temporal's Web UI and CLI (`--codec-endpoint <api>/codec`): POST /codec/encode
 * and /codec/decode take and answer `{"payloads": [...]}` in protobuf JSON (metadata values and data
 * in base64), through the same payload codecs as the worker, so an operator sees decoded payloads
 * while Temporal stores only ciphertext. The browser calls it from the UI's origin: the preflight is
 * answered for the configured origins only.
 *
 * A key with the `codec` scope (or `admin`) is required; the dev stack may open it to loopback
 * callers without a key (its Web UI cannot send one), see `keylessCaller`.
 */
import type { AddressInfo } from 'node:net';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import type { Payload } from '@temporalio/common';
import { isLoopbackHost } from '../../../common/addresses.js';
import { codecEndpointCodecs } from '../../../common/data-converter.js';
import type { TokenWarden } from '../../index.js';
import { problem, problemSchema, sendProblem } from '../problems.js';
import type { ApiInstance } from '../server.js';

export interface CodecOptions {
  /** Origins allowed to call from a browser (the Web UI's, e.g. http://localhost:8233). */
  origins: readonly string[];
  /** No key needed from a loopback caller of a loopback host (the dev stack's UI); a key from anyone else. */
  keylessLoopback: boolean;
}

/** A history page's payloads: the UI decodes a page at a time. */
const CODEC_BODY_LIMIT = 4 * 1024 * 1024;
const MAX_PAYLOADS = 10_000;

const base64 = z
  .string()
  .max(CODEC_BODY_LIMIT)
  .regex(/^[A-Za-z0-9+/]*={0,2}$/, 'expected base64');

const payloadJson = z.strictObject({
  metadata: z.record(z.string().min(1).max(256), base64).optional(),
  data: base64.optional(),
  // Payloads stored outside Temporal: tokenwarden stores none, and encrypting one would drop its reference.
  externalPayloads: z
    .array(z.unknown())
    .max(0, 'payloads stored externally are not supported: this codec would drop their reference')
    .optional(),
});
type PayloadJson = z.infer<typeof payloadJson>;

const codecBody = z.strictObject({ payloads: z.array(payloadJson).max(MAX_PAYLOADS) });

const toPayload = (p: PayloadJson): Payload => ({
  metadata: Object.fromEntries(Object.entries(p.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64')])),
  data: Buffer.from(p.data ?? '', 'base64'),
});

const toJson = (p: Payload): PayloadJson => ({
  metadata: Object.fromEntries(
    Object.entries(p.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v ?? new Uint8Array()).toString('base64')]),
  ),
  data: Buffer.from(p.data ?? new Uint8Array()).toString('base64'),
});

/** The names a Host header gives this machine: a page of another site reaching loopback names its own. */
function loopbackHostHeader(request: FastifyRequest): boolean {
  let url: URL;
  try {
    url = new URL(`http://${request.headers.host ?? ''}`);
  } catch {
    return false;
  }
  const listening = request.server.server.address() as AddressInfo | null;
  const port = url.port === '' ? 80 : Number(url.port);
  return isLoopbackHost(url.hostname.replace(/^\[(.*)\]$/, '$1')) && port === listening?.port;
}

/**
 * Who may call without a key: a loopback TCP peer (a proxy's forwarding headers make it remote: a
 * proxy on this host is a loopback peer), naming a loopback host (DNS rebinding names another), from
 * no browser page or an allowed origin's. Decided before the body is read; anyone else needs a key.
 */
function keylessCaller(allowed: ReadonlySet<string>) {
  return (request: FastifyRequest): boolean => {
    const peer = request.socket.remoteAddress ?? '';
    if (!isLoopbackHost(peer.startsWith('::ffff:') ? peer.slice('::ffff:'.length) : peer)) return false;
    if (FORWARDING_HEADERS.some((h) => h in request.headers)) return false;
    if (!loopbackHostHeader(request)) return false;
    const origin = request.headers.origin;
    return origin === undefined || allowed.has(origin);
  };
}

const FORWARDING_HEADERS = ['forwarded', 'x-forwarded-for', 'x-forwarded-host', 'x-real-ip'];

export async function codecRoutes(app: ApiInstance, warden: TokenWarden, options: CodecOptions): Promise<void> {
  const codecs = codecEndpointCodecs(warden.settings);
  const namespace = warden.settings.temporal.namespace;
  const allowed = new Set(options.origins);

  /**
   * CORS for an allowed origin only, on every answer (a refusal too: the UI then shows why, not a
   * network error). No credentials: the key travels in Authorization, never in a cookie.
   */
  const cors = async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
    const origin = request.headers.origin;
    reply.header('vary', 'Origin');
    if (typeof origin === 'string' && allowed.has(origin)) reply.header('access-control-allow-origin', origin);
    return payload;
  };

  for (const operation of ['encode', 'decode'] as const) {
    const url = `/codec/${operation}`;
    app.options(
      url,
      {
        config: { public: true },
        onSend: cors,
        schema: { summary: "CORS preflight for the Web UI's origin (no key: a browser sends none here)", security: [] },
      },
      async (_request, reply) => {
        return reply
          .code(204)
          .header('access-control-allow-methods', 'POST, OPTIONS')
          .header('access-control-allow-headers', 'content-type, x-namespace, authorization')
          .header('access-control-max-age', '600')
          .send();
      },
    );

    app.post(
      url,
      {
        config: { scopes: ['codec'], ...(options.keylessLoopback ? { keyless: keylessCaller(allowed) } : {}) },
        onSend: cors,
        bodyLimit: CODEC_BODY_LIMIT,
        schema: {
          summary:
            operation === 'encode'
              ? "Encrypt payloads with the deployment's payload key (Temporal's codec-server protocol)"
              : 'Decrypt payloads stored in Temporal (payloads not encrypted by tokenwarden come back unchanged)',
          body: codecBody,
          headers: z.object({ 'x-namespace': z.string().max(1000).optional() }),
          response: { 200: codecBody, 400: problemSchema, 401: problemSchema, 403: problemSchema },
        },
      },
      async (request, reply) => {
        const asked = request.headers['x-namespace'];
        // Decoding another namespace's payloads leaves them as they are; encoding them with this
        // deployment's key would make them unreadable to their own workers.
        if (operation === 'encode' && asked !== undefined && asked !== namespace) {
          return sendProblem(
            reply,
            problem(request, 400, `this codec encodes for namespace ${namespace} only`, {
              errors: [{ in: 'header', path: 'x-namespace', message: `expected ${namespace}` }],
            }),
          );
        }
        let payloads = request.body.payloads.map(toPayload);
        if (operation === 'encode') for (const codec of codecs) payloads = await codec.encode(payloads);
        else for (const codec of [...codecs].reverse()) payloads = await codec.decode(payloads);
        return reply.header('cache-control', 'no-store').send({ payloads: payloads.map(toJson) });
      },
    );
  }
}
