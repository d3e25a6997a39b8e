/**
 * A database server that vanishes without a reset (failover, partition) must cost a bounded time,
 * never a hung process: connections and statements time out, and a connection left mid-statement is
 * destroyed rather than handed to the next caller. A loopback proxy in front of the real PostgreSQL
 * "blackholes" traffic on demand.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import { createPool, DATABASE_TIMEOUTS, type StorePool } from '../common/db.js';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';

let ctx: TestContext;
let proxy: BlackholeProxy;
const pools: StorePool[] = [];

/** Forwards TCP to PostgreSQL until `blackhole` is set: then bytes both ways are dropped silently. */
class BlackholeProxy {
  blackhole = false;
  port = 0;
  private readonly sockets = new Set<net.Socket>();
  private readonly server: net.Server;

  constructor(private readonly target: { host: string; port: number }) {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target.port, this.target.host);
      for (const [from, to] of [
        [client, upstream],
        [upstream, client],
      ] as const) {
        this.sockets.add(from);
        from.on('error', () => {});
        from.on('data', (chunk) => void (this.blackhole || to.write(chunk)));
        from.on('close', () => {
          this.sockets.delete(from);
          to.destroy();
        });
      }
    });
  }

  async listen(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

before(async () => {
  ctx = await TestContext.create('timeouts');
  const url = new URL(ctx.settings.databaseUrl);
  proxy = await new BlackholeProxy({ host: url.hostname, port: Number(url.port) }).listen();
});
after(async () => {
  for (const p of pools) await p.end().catch(() => {});
  await proxy?.close();
  await ctx?.close();
});

/** A one-connection pool through the proxy, with short timeouts. */
function proxiedPool(): StorePool {
  const url = new URL(ctx.settings.databaseUrl);
  url.hostname = '127.0.0.1';
  url.port = String(proxy.port);
  const pool = createPool(url.toString(), ctx.settings.databaseSchema, 1, () => {}, {
    connectMs: 1_000,
    queryMs: 1_000,
  });
  pools.push(pool);
  return pool;
}

async function failsWithin<T>(ms: number, work: Promise<T>): Promise<Error> {
  const started = Date.now();
  const err = await work.then(
    () => assert.fail('expected a failure'),
    (e: unknown) => e as Error,
  );
  assert.ok(Date.now() - started < ms, `failed after ${Date.now() - started} ms`);
  return err;
}

describe('database timeouts', () => {
  it('should bound connections and statements by default', () => {
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    pools.push(pool);
    const options = pool.options as unknown as Record<string, unknown>;
    assert.equal(options.connectionTimeoutMillis, DATABASE_TIMEOUTS.connectMs);
    assert.equal(options.query_timeout, DATABASE_TIMEOUTS.queryMs);
    assert.equal(options.keepAlive, true);
    assert.ok(DATABASE_TIMEOUTS.queryMs < 15_000, 'below the delivery activity’s start-to-close timeout');
  });

  it('should fail a statement on a server that stopped answering, then recover on a fresh connection', async () => {
    const pool = proxiedPool();
    assert.equal((await pool.query('SELECT 1 AS one')).rows[0].one, 1);
    proxy.blackhole = true;
    await failsWithin(5_000, pool.query('SELECT 2'));
    proxy.blackhole = false;
    // One connection in the pool: reusing the desynchronised one would hang here.
    assert.equal((await pool.query('SELECT 3 AS three')).rows[0].three, 3);
  });

  it('should fail a transaction on a server that stopped answering, then commit the next one', async () => {
    const pool = proxiedPool();
    const token = await ctx.warden.issue({ subject: 'usr_timeouts', ttl: '1h' }).catch(() => undefined);
    const tokenId = token?.tokenId ?? assert.fail('issue failed');
    proxy.blackhole = true;
    await failsWithin(8_000, store.recordAudit(pool, tokenId, 'blackholed', 'test.blackholed', {}));
    proxy.blackhole = false;
    await store.recordAudit(pool, tokenId, 'after', 'test.after', {});
    const kinds = (await store.readAudit(ctx.pool, tokenId)).map((e) => e.kind);
    assert.ok(kinds.includes('test.after') && !kinds.includes('test.blackholed'), kinds.join(', '));
  });

  it('should fail to connect to a server that accepts but never answers', async () => {
    proxy.blackhole = true;
    try {
      await failsWithin(5_000, proxiedPool().query('SELECT 1'));
    } finally {
      proxy.blackhole = false;
    }
  });
});
