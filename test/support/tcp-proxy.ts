/**
 * A loopback TCP proxy in front of PostgreSQL, to put a real connection into the states a verifier
 * must survive: new connections refused, answers held back, a connection gone silent.
 */
import net from 'node:net';

interface Pair {
  client: net.Socket;
  server: net.Socket;
  frozen: boolean;
}

export class TcpProxy {
  private readonly pairs = new Set<Pair>();
  private refusing = false;
  private holding = false;
  private held: Array<{ pair: Pair; chunk: Buffer }> = [];
  private onHeld: Array<() => void> = [];

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async start(target: { host: string; port: number }): Promise<TcpProxy> {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new TcpProxy(server, (server.address() as net.AddressInfo).port);
    server.on('connection', (client: net.Socket) => proxy.accept(client, target));
    return proxy;
  }

  /** `databaseUrl` with its host and port replaced by this proxy's. */
  static targetOf(databaseUrl: string): { host: string; port: number } {
    const url = new URL(databaseUrl);
    return { host: url.hostname, port: Number(url.port || 5432) };
  }

  url(databaseUrl: string): string {
    const url = new URL(databaseUrl);
    url.hostname = '127.0.0.1';
    url.port = String(this.port);
    return url.href;
  }

  private accept(client: net.Socket, target: { host: string; port: number }): void {
    if (this.refusing) {
      client.destroy();
      return;
    }
    const server = net.connect(target);
    const pair: Pair = { client, server, frozen: false };
    this.pairs.add(pair);
    const end = () => {
      client.destroy();
      server.destroy();
      this.pairs.delete(pair);
    };
    client.on('error', end).on('close', end);
    server.on('error', end).on('close', end);
    client.on('data', (chunk) => {
      if (!pair.frozen) server.write(chunk);
    });
    server.on('data', (chunk) => {
      if (pair.frozen) return;
      if (this.holding) {
        this.held.push({ pair, chunk });
        for (const resolve of this.onHeld.splice(0)) resolve();
      } else client.write(chunk);
    });
  }

  /** While on, new connections are closed at once (as if the server were unreachable). */
  refuse(on: boolean): void {
    this.refusing = on;
  }

  /** Existing connections stop passing bytes either way, without closing: a server gone silent. */
  freeze(): void {
    for (const pair of this.pairs) pair.frozen = true;
  }

  /** Server bytes are held back from now on, until release(). */
  hold(): void {
    this.holding = true;
  }

  /** Resolves once some server bytes are held (the server has answered). */
  async heldSomething(): Promise<void> {
    if (this.held.length > 0) return;
    await new Promise<void>((resolve) => this.onHeld.push(resolve));
  }

  release(): void {
    this.holding = false;
    for (const { pair, chunk } of this.held.splice(0)) pair.client.write(chunk);
  }

  async close(): Promise<void> {
    for (const pair of this.pairs) {
      pair.client.destroy();
      pair.server.destroy();
    }
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
