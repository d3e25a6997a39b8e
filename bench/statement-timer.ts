/**
 * Profiles a store function without touching it: a view of a pg.Pool whose statements (sent on the
 * pool or on a client checked out of it) report how long each took, as the caller saw it (round trip
 * plus the server's execution).
 */
import { performance } from 'node:perf_hooks';
import type pg from 'pg';

export type StatementListener = (statement: string, ms: number) => void;

export function timeStatements<P extends pg.Pool>(pool: P, onStatement: StatementListener): P {
  return new Proxy(pool, {
    get(target, prop, receiver) {
      if (prop === 'query') return timedQuery(target, onStatement);
      if (prop !== 'connect') return bound(target, Reflect.get(target, prop, receiver));
      return async () => {
        const t0 = performance.now();
        const client = await target.connect();
        onStatement('(pool.connect)', performance.now() - t0);
        return timedClient(client, onStatement);
      };
    },
  });
}

function timedClient(client: pg.PoolClient, onStatement: StatementListener): pg.PoolClient {
  return new Proxy(client, {
    get(target, prop, receiver) {
      if (prop === 'query') return timedQuery(target, onStatement);
      return bound(target, Reflect.get(target, prop, receiver));
    },
  });
}

/** The target's query(), timed; on a pool it includes taking a connection from the pool. */
function timedQuery(target: pg.Pool | pg.PoolClient, onStatement: StatementListener) {
  return async (...args: unknown[]) => {
    const t0 = performance.now();
    try {
      return await (target.query as (...a: unknown[]) => Promise<unknown>).apply(target, args);
    } finally {
      onStatement(statementLabel(args[0]), performance.now() - t0);
    }
  };
}

/** pg's methods use `this`: call them on the real object, not on the proxy. */
const bound = (target: object, value: unknown) => (typeof value === 'function' ? value.bind(target) : value);

/** The statement's first words, enough to tell the statements of one function apart. */
function statementLabel(query: unknown): string {
  const text = typeof query === 'string' ? query : ((query as { text?: string }).text ?? '?');
  const words = text.replace(/\s+/g, ' ').trim();
  return words.length > 48 ? `${words.slice(0, 47)}…` : words;
}
