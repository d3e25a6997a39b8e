/**
 * An example downstream service that tokenwarden tells of revocations: it keeps a cache of the
 * token ids it accepts, takes signed revocation events (Standard Webhooks, verified with the
 * reference library) and drops the token from that cache, and answers tokenwarden's verification
 * probe: does this service still accept the token? Node's own HTTP server, no framework.
 *
 *   POST /events             a signed revocation event → 204 (a duplicate `webhook-id` too, done once)
 *   GET  /probe/:tokenId     a signed probe → 200 {"tokenId": "...", "accepted": true|false}
 *
 * Signatures: `webhook-signature` over `${webhook-id}.${webhook-timestamp}.${payload}`, where the
 * payload is the event's raw body, or, for a probe, the request's path (`/probe/tok_…`), so a probe
 * signature answers for one token only. Any configured secret may match (a secret roll); timestamps
 * more than 5 minutes away are refused (the library's tolerance); a `webhook-id` is used once.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';

/** The library's tolerance: a `webhook-id` older than this cannot verify again, so it is forgotten. */
const TOLERANCE_MS = 5 * 60_000;
/** Events are small JSON objects; a larger body is refused before it is read whole. */
const MAX_BODY_BYTES = 64 * 1024;
const TOKEN_ID = /^[A-Za-z0-9_-]{1,100}$/;

export interface ReceiverOptions {
  /** The signing secrets (`whsec_…`) to accept, e.g. the new and the old one during a roll. */
  secrets: readonly string[];
  /** Where to listen (default 127.0.0.1, a free port). */
  host?: string;
  port?: number;
  /** Token ids this service accepts at start. */
  acceptedTokens?: Iterable<string>;
  /** One line per request outcome (default: none). Never a secret; token and event ids only. */
  log?: (line: string) => void;
}

/** A revocation event this service acted on. */
export interface HandledEvent {
  webhookId: string;
  type: string;
  tokenId: string;
}

export interface ExampleReceiver {
  /** Base URL, e.g. `http://127.0.0.1:8390`. */
  url: string;
  /** Where tokenwarden POSTs events: `<url>/events` (`receiver add --url`). */
  eventsUrl: string;
  /** The probe's base: `<url>/probe` (`receiver add --probe-url`); tokenwarden asks `<url>/probe/<tokenId>`. */
  probeUrl: string;
  /** The service starts accepting a token (in a real service: it verified it and cached the answer). */
  accept(tokenId: string): void;
  accepts(tokenId: string): boolean;
  /** Events acted on, once each, in order. */
  readonly handled: readonly HandledEvent[];
  /** Requests refused, duplicates acknowledged again, probes answered. */
  readonly counts: { refused: number; duplicates: number; probes: number };
  /** Replaces the accepted secrets (a roll while running). */
  setSecrets(secrets: readonly string[]): void;
  close(): Promise<void>;
}

type Verified = { ok: true; webhookId: string } | { ok: false; why: string };

export async function startReceiver(options: ReceiverOptions): Promise<ExampleReceiver> {
  let verifiers = toVerifiers(options.secrets);
  const accepted = new Set(options.acceptedTokens ?? []);
  /** `webhook-id`s seen, with when they may be forgotten. */
  const seen = new Map<string, number>();
  const handled: HandledEvent[] = [];
  const counts = { refused: 0, duplicates: 0, probes: 0 };
  const log = options.log ?? (() => {});

  /** Checks the signature with every configured secret; the library also checks the timestamp. */
  function verify(payload: string, req: IncomingMessage): Verified {
    const headers = {
      'webhook-id': header(req, 'webhook-id'),
      'webhook-timestamp': header(req, 'webhook-timestamp'),
      'webhook-signature': header(req, 'webhook-signature'),
    };
    let why = 'no secret configured';
    for (const webhook of verifiers) {
      try {
        webhook.verify(payload, headers, { jsonParse: false });
        return { ok: true, webhookId: headers['webhook-id'] };
      } catch (err) {
        why = err instanceof Error ? err.message : String(err);
        // A stale or missing header fails the same way under every secret.
        if (!/signature found/i.test(why)) break;
      }
    }
    return { ok: false, why };
  }

  /** Whether this `webhook-id` was already used. */
  function seenBefore(webhookId: string): boolean {
    const now = Date.now();
    for (const [id, forgetAt] of seen) if (forgetAt <= now) seen.delete(id);
    return seen.has(webhookId);
  }

  /** Remembers a `webhook-id` once acted on: an event refused or failing half way is handled on its retry. */
  function remember(webhookId: string): void {
    // Twice the tolerance: the timestamp may lie up to 5 minutes either way.
    seen.set(webhookId, Date.now() + 2 * TOLERANCE_MS);
  }

  function refuse(res: ServerResponse, status: number, why: string, what: string): void {
    counts.refused++;
    log(`refused ${what}: ${why}`);
    json(res, status, { error: why });
  }

  async function onEvent(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const body = await readBody(req);
    if (body === undefined) return refuse(res, 413, `body over ${MAX_BODY_BYTES} bytes`, 'event');
    const verified = verify(body, req);
    if (!verified.ok) return refuse(res, 401, verified.why, 'event');
    if (seenBefore(verified.webhookId)) {
      // Acknowledged again (the sender lost the first answer), acted on once.
      counts.duplicates++;
      log(`duplicate event ${verified.webhookId}: already handled`);
      res.writeHead(204).end();
      return;
    }
    let event: { type?: unknown; token_id?: unknown };
    try {
      event = JSON.parse(body) as typeof event;
    } catch {
      return refuse(res, 400, 'the body is not JSON', 'event');
    }
    if (typeof event.type !== 'string' || typeof event.token_id !== 'string') {
      return refuse(res, 400, 'expected "type" and "token_id" strings', 'event');
    }
    // Every event tokenwarden sends ends a token (token.revoked, token.expired): drop it.
    const dropped = accepted.delete(event.token_id);
    handled.push({ webhookId: verified.webhookId, type: event.type, tokenId: event.token_id });
    remember(verified.webhookId);
    log(`${event.type} ${event.token_id}: ${dropped ? 'no longer accepted' : 'was not accepted here'}`);
    res.writeHead(204).end();
  }

  function onProbe(req: IncomingMessage, res: ServerResponse, tokenId: string): void {
    // The signed payload is the path as requested: the signature answers for this token only.
    const verified = verify(req.url ?? '', req);
    if (!verified.ok) return refuse(res, 401, verified.why, 'probe');
    if (seenBefore(verified.webhookId)) return refuse(res, 401, 'replayed probe', 'probe');
    remember(verified.webhookId);
    counts.probes++;
    json(res, 200, { tokenId, accepted: accepted.has(tokenId) });
  }

  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0]!;
    const probe = /^\/probe\/([^/]+)$/.exec(path);
    const route =
      req.method === 'POST' && path === '/events'
        ? onEvent(req, res)
        : req.method === 'GET' && probe && TOKEN_ID.test(probe[1]!)
          ? onProbe(req, res, probe[1]!)
          : json(res, 404, { error: 'not found' });
    Promise.resolve(route).catch((err: unknown) => {
      log(`error: ${err instanceof Error ? err.message : String(err)}`);
      if (!res.headersSent) json(res, 500, { error: 'internal error' });
      else res.destroy();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;

  return {
    url,
    eventsUrl: `${url}/events`,
    probeUrl: `${url}/probe`,
    accept: (tokenId) => void accepted.add(tokenId),
    accepts: (tokenId) => accepted.has(tokenId),
    handled,
    counts,
    setSecrets: (secrets) => void (verifiers = toVerifiers(secrets)),
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function toVerifiers(secrets: readonly string[]): Webhook[] {
  if (secrets.length === 0) throw new Error('at least one whsec_ signing secret is required');
  return secrets.map((secret, i) => {
    if (!/^whsec_[A-Za-z0-9+/]+={0,2}$/.test(secret)) {
      throw new Error(`secret ${i + 1}: expected whsec_ followed by base64`);
    }
    return new Webhook(secret);
  });
}

function header(req: IncomingMessage, name: string): string {
  const value = req.headers[name];
  return Array.isArray(value) ? value.join(' ') : (value ?? '');
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

/** The raw body (signatures cover the exact bytes), or undefined past MAX_BODY_BYTES. */
async function readBody(req: IncomingMessage): Promise<string | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) return undefined;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}
