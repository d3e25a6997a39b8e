/**
 * The benchmark's receiver on loopback: answers 204 to every POST and records when each event
 * arrived (performance.now(), the clock the benchmark times its calls with), filed by the body's `token_id`.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';

export interface Arrival {
  /** performance.now() when the whole request body had arrived. */
  at: number;
  webhookId: string;
  tokenId: string;
}

export class ArrivalReceiver {
  /** Events that arrived more than once (a retried delivery would make a latency look better than it is). */
  repeats = 0;
  private readonly arrivals = new Map<string, Arrival>();
  private readonly waiters = new Map<string, (arrival: Arrival) => void>();

  private constructor(private readonly server: Server) {}

  static async start(log: (msg: string) => void): Promise<ArrivalReceiver> {
    const server = createServer();
    const receiver = new ArrivalReceiver(server);
    server.on('request', (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (chunk: Buffer) => chunks.push(chunk));
      req.on('end', () => {
        const at = performance.now();
        const webhookId = req.headers['webhook-id'];
        let tokenId: unknown;
        try {
          tokenId = (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { token_id?: unknown }).token_id;
        } catch {
          tokenId = undefined;
        }
        if (typeof webhookId !== 'string' || typeof tokenId !== 'string') {
          log(`receiver: rejected a request without a webhook-id header or a token_id in its JSON body`);
          res.writeHead(400).end();
          return;
        }
        receiver.record({ at, webhookId, tokenId });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return receiver;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/revocations`;
  }

  /** The first arrival of an event for `tokenId`, whether it already came or is still to come. */
  arrivalOf(tokenId: string, timeoutMs: number): Promise<Arrival> {
    const arrived = this.arrivals.get(tokenId);
    if (arrived) return Promise.resolve(arrived);
    return new Promise<Arrival>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(tokenId);
        reject(new Error(`no event for ${tokenId} reached the receiver within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.set(tokenId, (arrival) => {
        clearTimeout(timer);
        resolve(arrival);
      });
    });
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve, reject) => this.server.close((err) => (err ? reject(err) : resolve())));
  }

  private record(arrival: Arrival): void {
    if (this.arrivals.has(arrival.tokenId)) {
      this.repeats++;
      return;
    }
    this.arrivals.set(arrival.tokenId, arrival);
    this.waiters.get(arrival.tokenId)?.(arrival);
    this.waiters.delete(arrival.tokenId);
  }
}
