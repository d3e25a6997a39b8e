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
  /** Destroy the socket without answering. */
  drop?: boolean;
}

export class TestReceiver {
  readonly requests: ReceivedRequest[] = [];
  secret: string | undefined;
  behaviour: (n: number, req: { headers: IncomingHttpHeaders; body: string }) => Answer = () => ({ status: 204 });

  private constructor(private readonly server: Server) {}

  static async start(): Promise<TestReceiver> {
    const server = createServer();
    const receiver = new TestReceiver(server);
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
        if (answer.delayMs) setTimeout(respond, answer.delayMs);
        else respond();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return receiver;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/revocations`;
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
