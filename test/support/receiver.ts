/** A real HTTP receiver on loopback with fault injection, verifying Standard Webhooks signatures. */
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';

export interface ReceivedRequest {
  n: number;
  at: number;
  headers: IncomingHttpHeaders;
  body: string;
  /** Whether the signature verified with the receiver's secret (the reference implementation). */
  verified: boolean;
  answered: number | 'dropped';
}

export interface Answer {
  status?: number;
  headers?: Record<string, string>;
  delayMs?: number;
  /** Answer once this settles (a request held until the test lets it go). */
  after?: Promise<unknown>;
  /** Destroy the socket without answering. */
  drop?: boolean;
}

export class TestReceiver {
  readonly requests: ReceivedRequest[] = [];
  /** TCP connections accepted: a sender that keeps connections open opens few. */
  connections = 0;
  secret: string | undefined;
  behaviour: (n: number, req: { headers: IncomingHttpHeaders; body: string }) => Answer = () => ({ status: 204 });

  private port = 0;
  private constructor(
    private readonly server: Server,
    readonly host: string,
  ) {}

  /** Listens on `host` (any loopback address) and `port` (a free one when 0). */
  static async start(listen: { host?: string; port?: number } = {}): Promise<TestReceiver> {
    const server = createServer();
    const receiver = new TestReceiver(server, listen.host ?? '127.0.0.1');
    server.on('connection', () => receiver.connections++);
    server.on('request', (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        const n = receiver.requests.length + 1;
        let verified = false;
        if (receiver.secret) {
          try {
            new Webhook(receiver.secret).verify(body, req.headers as Record<string, string>);
            verified = true;
          } catch {
            verified = false;
          }
        }
        const answer = receiver.behaviour(n, { headers: req.headers, body });
        const record: ReceivedRequest = {
          n,
          at: Date.now(),
          headers: req.headers,
          body,
          verified,
          answered: answer.drop ? 'dropped' : (answer.status ?? 204),
        };
        receiver.requests.push(record);
        const respond = () => {
          if (answer.drop) return req.socket.destroy();
          res.writeHead(answer.status ?? 204, answer.headers ?? {});
          res.end();
        };
        if (answer.after) void answer.after.finally(respond);
        else if (answer.delayMs) setTimeout(respond, answer.delayMs);
        else respond();
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listen.port ?? 0, receiver.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    receiver.port = (server.address() as AddressInfo).port;
    return receiver;
  }

  get url(): string {
    return `http://${this.host}:${this.port}/revocations`;
  }

  /** Stops listening: senders get connection refused until comeBack(). */
  async goDown(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve, reject) => this.server.close((err) => (err ? reject(err) : resolve())));
  }

  /** Listens again on the same port. */
  async comeBack(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.port, this.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  /** The requests of each logical event, by `webhook-id`. */
  byWebhookId(): Map<string, ReceivedRequest[]> {
    const events = new Map<string, ReceivedRequest[]>();
    for (const r of this.requests) {
      const id = String(r.headers['webhook-id']);
      events.set(id, [...(events.get(id) ?? []), r]);
    }
    return events;
  }

  /** The requests about one token (the body's `token_id`). */
  requestsFor(tokenId: string): ReceivedRequest[] {
    return this.requests.filter((r) => tokenIdOf(r) === tokenId);
  }

  /** Requests answered with 2xx. */
  acked(): ReceivedRequest[] {
    return this.requests.filter((r) => typeof r.answered === 'number' && r.answered < 300);
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** The `token_id` of an event body, or undefined for a body that is not one. */
export function tokenIdOf(request: ReceivedRequest): string | undefined {
  try {
    const body = JSON.parse(request.body) as { token_id?: unknown };
    return typeof body.token_id === 'string' ? body.token_id : undefined;
  } catch {
    return undefined;
  }
}
