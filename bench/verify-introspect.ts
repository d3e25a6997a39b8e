/**
 * Introspection over HTTP (the API's POST /oauth/introspect: auth, zod, logging, the verifier with a
 * warm cache) against a bare fastify route doing the same lookup (form parse + verifier.verify),
 * in the same run, with the same load loop: node's http, keep-alive, fixed concurrency. Goal ≥ 0.7×.
 *
 *   npm run build && node dist/bench/verify-introspect.js [--seconds 5] [--concurrency 16] [--rounds 3]
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { Writable } from 'node:stream';
import formbody from '@fastify/formbody';
import Fastify from 'fastify';
import { createApiServer, type TokenVerifier } from '../client/api/server.js';
import { TokenWarden } from '../client/index.js';
import { createVerifier } from '../client/verifier.js';
import { DEFAULT_MAX_TTL_MS, WORKER_TUNING_DEFAULTS, type Settings } from '../common/config.js';
import { createApiKey } from '../common/store/api-keys.js';
import { startBenchServices } from './services.js';
import { ratio, summarize, type LatencySummary } from './stats.js';

export interface IntrospectionBenchOptions {
  databaseUrl: string;
  schema: string;
  temporalAddress: string;
  namespace: string;
  /** Length of each measured round per server. */
  seconds?: number;
  concurrency?: number;
  /** Rounds per server, alternating (bare, api, bare, api…); the median round counts. */
  rounds?: number;
  log?: (msg: string) => void;
}

export interface LoadFigures {
  requests: number;
  perSecond: number;
  latency: LatencySummary;
}

export interface IntrospectionBenchFigures {
  concurrency: number;
  seconds: number;
  rounds: number;
  bare: LoadFigures;
  api: LoadFigures;
  /** API requests per second over the bare route's: the goal is ≥ 0.7. */
  ratio: number;
  loadAverage: number[];
}

/** Sends `body` to `url` from `concurrency` loops on keep-alive connections for `seconds`. */
async function load(
  url: URL,
  headers: Record<string, string>,
  body: string,
  concurrency: number,
  seconds: number,
): Promise<LoadFigures> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const latencies: number[] = [];
  const deadline = performance.now() + seconds * 1000;
  const once = () =>
    new Promise<void>((resolve, reject) => {
      const started = performance.now();
      const req = http.request(
        url,
        { method: 'POST', agent, headers: { ...headers, 'content-length': Buffer.byteLength(body) } },
        (res) => {
          res.resume();
          res.on('end', () => {
            if (res.statusCode !== 200) reject(new Error(`${url.pathname} answered ${res.statusCode}`));
            latencies.push(performance.now() - started);
            resolve();
          });
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  const began = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) await once();
    }),
  );
  const elapsed = (performance.now() - began) / 1000;
  agent.destroy();
  return {
    requests: latencies.length,
    perSecond: Math.round(latencies.length / elapsed),
    latency: summarize(latencies),
  };
}

const median = (rounds: LoadFigures[]) =>
  [...rounds].sort((a, b) => a.perSecond - b.perSecond)[Math.floor(rounds.length / 2)]!;

export async function runIntrospectionBench(opts: IntrospectionBenchOptions): Promise<IntrospectionBenchFigures> {
  const log = opts.log ?? (() => {});
  const seconds = opts.seconds ?? 5;
  const concurrency = opts.concurrency ?? 16;
  const rounds = opts.rounds ?? 3;
  const settings: Settings = {
    temporal: {
      connectionOptions: { address: opts.temporalAddress },
      namespace: opts.namespace,
      taskQueue: `bench-${opts.schema}`,
    },
    databaseUrl: opts.databaseUrl,
    databaseSchema: opts.schema,
    dataDir: '/nonexistent',
    timing: { escalateAfterMs: 3_600_000, retryInitialMs: 1_000, retryMaxMs: 600_000 },
    expirySweepIntervalMs: 1_000,
    reconcileGraceMs: 60_000,
    masterKey: randomBytes(32),
    previousMasterKeys: [],
    payloadKeys: [],
    receiverAllow: [],
    maxTtlMs: DEFAULT_MAX_TTL_MS,
    worker: WORKER_TUNING_DEFAULTS,
  };
  const warden = await TokenWarden.connect(settings);
  const verifier = await createVerifier({ databaseUrl: opts.databaseUrl, schema: opts.schema });
  const discard = new Writable({ write: (_chunk, _encoding, done) => done() });
  const api = await createApiServer({ warden, verifier, logger: { stream: discard } });
  const bare = Fastify();
  try {
    await bare.register(formbody);
    const lookup: TokenVerifier = verifier;
    bare.post('/introspect', async (request) => lookup.verify((request.body as { token: string }).token));
    const apiUrl = await api.listen({ host: '127.0.0.1', port: 0 });
    const bareUrl = await bare.listen({ host: '127.0.0.1', port: 0 });

    const { token } = await warden.issue({ subject: 'usr_bench', ttl: '1h', scopes: ['read'] });
    const { key } = await createApiKey(warden.pool, { name: 'bench', scopes: ['introspect'] });
    const body = new URLSearchParams({ token }).toString();
    const form = { 'content-type': 'application/x-www-form-urlencoded' };
    // Warm the verifier's cache, the key cache and both servers' code paths.
    const warm = await verifier.verify(token);
    if (!warm.active) throw new Error('the bench token does not verify');
    await load(new URL('/introspect', bareUrl), form, body, concurrency, 1);
    await load(new URL('/oauth/introspect', apiUrl), { ...form, authorization: `Bearer ${key}` }, body, concurrency, 1);

    const bareRounds: LoadFigures[] = [];
    const apiRounds: LoadFigures[] = [];
    for (let i = 0; i < rounds; i++) {
      bareRounds.push(await load(new URL('/introspect', bareUrl), form, body, concurrency, seconds));
      log(`round ${i + 1}: bare route ${bareRounds.at(-1)!.perSecond}/s`);
      apiRounds.push(
        await load(
          new URL('/oauth/introspect', apiUrl),
          { ...form, authorization: `Bearer ${key}` },
          body,
          concurrency,
          seconds,
        ),
      );
      log(`round ${i + 1}: API ${apiRounds.at(-1)!.perSecond}/s`);
    }
    const b = median(bareRounds);
    const a = median(apiRounds);
    return {
      concurrency,
      seconds,
      rounds,
      bare: b,
      api: a,
      ratio: ratio(a.perSecond, b.perSecond),
      loadAverage: (await import('node:os')).loadavg().map((x) => Math.round(x * 100) / 100),
    };
  } finally {
    await api.close();
    await bare.close();
    await verifier.close();
    await warden.close();
  }
}

function flag(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const value = Number(process.argv[i + 1]);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`--${name} must be a positive number`);
  return value;
}

async function main(): Promise<void> {
  const log = (msg: string) => process.stderr.write(`[verify-introspect] ${msg}\n`);
  const services = await startBenchServices({ label: 'introspect', workflows: {}, log });
  try {
    const figures = await runIntrospectionBench({
      databaseUrl: services.databaseUrl,
      schema: services.schema,
      temporalAddress: services.temporalAddress,
      namespace: services.namespace,
      seconds: flag('seconds', 5),
      concurrency: flag('concurrency', 16),
      rounds: flag('rounds', 3),
      log,
    });
    log(
      `bare route ${figures.bare.perSecond}/s (p50 ${figures.bare.latency.p50Ms} ms), API ${figures.api.perSecond}/s (p50 ${figures.api.latency.p50Ms} ms): ×${figures.ratio} (goal ≥ 0.7)`,
    );
    process.stdout.write(`${JSON.stringify({ bench: 'verify-introspect', ...figures })}\n`);
  } finally {
    await services.stop();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  });
}
