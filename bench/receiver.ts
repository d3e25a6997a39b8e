/**
 * The benchmark's receiver on loopback: answers every POST (204 by default) and records when each
 * event arrived (performance.now(), the clock the benchmarks time their calls with) and when it was
 * acknowledged, filed by the body's `token_id`. Every `webhook-id` acknowledged more than once is a
 * duplicate delivery, counted in `repeats`.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';

export interface Arrival {
  /** performance.now() when the whole body of the acknowledged request had arrived. */
  at: number;
  /** performance.now() when the 2xx answer was sent (after the configured delay). */
  ackedAt: number;
  /** Date.now() at the acknowledgement: comparable with the store's timestamps. */
  ackedAtEpochMs: number;
  webhookId: string;
  tokenId: string;
  /** Requests for this webhook-id up to and including the acknowledged one. */
  requests: number;
}

export interface ReceiverBehaviour {
  /** How long each answer waits (a receiver doing its own work before it acknowledges). */
  delayMs?: number;
  /** Answers 503 to the first `failFirst` requests of each webhook-id, then 204. */
  failFirst?: number;
}

export class ArrivalReceiver {
  /** Acknowledged events that arrived again (a retried delivery would make a latency look better than it is). */
  repeats = 0;
  /** Requests answered 503 on purpose (`failFirst`). */
  refused = 0;
  /** Acknowledged events with another webhook-id than the token's first one (one event per token is expected). */
  otherEvents = 0;
  private readonly byWebhookId = new Map<string, Arrival>();
  private readonly byTokenId = new Map<string, Arrival>();
  private readonly requestsByWebhookId = new Map<string, number>();
  private readonly waiters = new Map<string, (arrival: Arrival) => void>();

  private constructor(
    private readonly server: Server,
    private readonly behaviour: ReceiverBehaviour,
  ) {}

  static async start(log: (msg: string) => void, behaviour: ReceiverBehaviour = {}): Promise<ArrivalReceiver> {
    const server = createServer();
    const receiver = new ArrivalReceiver(server, behaviour);
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
        const request = receiver.countRequest(webhookId);
        const answer = () => {
          if (request <= (behaviour.failFirst ?? 0)) {
            receiver.refused++;
            res.writeHead(503).end();
            return;
          }
          res.writeHead(204).end();
          receiver.record({
            at,
            ackedAt: performance.now(),
            ackedAtEpochMs: Date.now(),
            webhookId,
            tokenId: tokenId as string,
            requests: request,
          });
        };
        if (behaviour.delayMs) setTimeout(answer, behaviour.delayMs);
        else answer();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return receiver;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/revocations`;
  }

  /** Events acknowledged so far (each webhook-id once). */
  get acknowledgedCount(): number {
    return this.byWebhookId.size;
  }

  /** The acknowledged event for `tokenId`, if it has been acknowledged. */
  acknowledgedOf(tokenId: string): Arrival | undefined {
    return this.byTokenId.get(tokenId);
  }

  /** The first acknowledged arrival of an event for `tokenId`, whether it already came or is still to come. */
  arrivalOf(tokenId: string, timeoutMs: number): Promise<Arrival> {
    const arrived = this.byTokenId.get(tokenId);
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

  private countRequest(webhookId: string): number {
    const n = (this.requestsByWebhookId.get(webhookId) ?? 0) + 1;
    this.requestsByWebhookId.set(webhookId, n);
    return n;
  }

  private record(arrival: Arrival): void {
    if (this.byWebhookId.has(arrival.webhookId)) {
      this.repeats++;
      return;
    }
    this.byWebhookId.set(arrival.webhookId, arrival);
    if (this.byTokenId.has(arrival.tokenId)) {
      this.otherEvents++;
      return;
    }
    this.byTokenId.set(arrival.tokenId, arrival);
    this.waiters.get(arrival.tokenId)?.(arrival);
    this.waiters.delete(arrival.tokenId);
  }
}
