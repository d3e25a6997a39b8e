/** The HTTP API on loopback for tests: a real server, its captured log, keys of each scope. */
import { Writable } from 'node:stream';
import type { TokenVerifier } from '../../client/api/server.js';
import { createApiServer, type ApiServer } from '../../client/api/server.js';
import { createApiKey } from '../../common/store/api-keys.js';
import type { TestContext } from './context.js';
import { runLog } from './run-record.js';

let apiServers = 0;

export class LogCapture extends Writable {
  text = '';
  private readonly runLog = runLog(`api-${process.pid}-${++apiServers}`);
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    this.text += chunk.toString('utf8');
    this.runLog(chunk.toString('utf8'));
    done();
  }
}

export interface ApiHarness {
  server: ApiServer;
  url: string;
  log: LogCapture;
  keys: { admin: string; introspect: string; revoke: string };
  close(): Promise<void>;
}

export async function startApiHarness(
  ctx: TestContext,
  verifier: TokenVerifier,
  options: { apiKeyCacheTtlMs?: number } = {},
): Promise<ApiHarness> {
  const log = new LogCapture();
  const server = await createApiServer({
    warden: ctx.warden,
    verifier,
    logger: { stream: log, level: 'debug' },
    ...options,
  });
  await server.listen({ host: '127.0.0.1', port: 0 });
  const address = server.server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  const key = async (scope: 'admin' | 'introspect' | 'revoke') =>
    (await createApiKey(ctx.pool, { name: `test-${scope}`, scopes: [scope] })).key;
  return {
    server,
    url: `http://127.0.0.1:${port}`,
    log,
    keys: { admin: await key('admin'), introspect: await key('introspect'), revoke: await key('revoke') },
    close: () => server.close(),
  };
}

export interface ApiAnswer {
  status: number;
  headers: Headers;
  text: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  body: any;
}

/** One request; `form` sends application/x-www-form-urlencoded, `json` JSON, `raw` the bytes as given. */
export async function call(
  url: string,
  method: string,
  path: string,
  opts: {
    key?: string;
    json?: unknown;
    form?: Record<string, string>;
    raw?: { body: string; contentType: string };
    headers?: Record<string, string>;
  } = {},
): Promise<ApiAnswer> {
  const headers: Record<string, string> = { ...(opts.headers ?? {}) };
  if (opts.key) headers.authorization = `Bearer ${opts.key}`;
  let body: string | undefined;
  if (opts.json !== undefined) {
    headers['content-type'] = 'application/json';
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    headers['content-type'] = 'application/x-www-form-urlencoded';
    body = new URLSearchParams(opts.form).toString();
  } else if (opts.raw) {
    headers['content-type'] = opts.raw.contentType;
    body = opts.raw.body;
  }
  const res = await fetch(url + path, { method, headers, ...(body !== undefined ? { body } : {}) });
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  return { status: res.status, headers: res.headers, text, body: parsed };
}
