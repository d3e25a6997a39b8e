/**
 * `npm run bench:verify [-- --tokens N --seconds S --concurrency C --revokes R]` (R split between the library's
 * revoke and the store's kill): the verifier on the
 * stack a user gets (`tokenwarden start`: embedded PostgreSQL with its default durability, the
 * worker in the stack), each figure against its floor measured in the same run:
 *  (a) verifies per CPU-second of the verifying process, warm cache and cache miss, against a raw
 *      `SELECT` by primary key on a pool of the same size at the same concurrency;
 *  (b) revoke returning (TokenWarden.revoke; the store's kill alone too) → rejection by a warmed verifier in another process,
 *      against raw NOTIFY delivery (pg_notify returning → a LISTENing client in that process).
 * Human lines on stderr, then one JSON line on stdout.
 */
import { spawn } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { TokenWarden } from '../client/index.js';
import { createVerifier, type Verifier, type VerifierOptions } from '../client/verifier.js';
import { PACKAGE_ROOT } from '../common/config.js';
import { createPool } from '../common/db.js';
import { quoteIdent } from '../common/identifiers.js';
import { killToken } from '../common/store/kill.js';
import { waitUntilQuiet } from './proc.js';
import { startUserStack } from './scale-stack.js';
import { ms, ratio, summarize } from './stats.js';
import { runIntrospectionBench } from './verify-introspect.js';

const say = (msg: string) => process.stderr.write(`[bench:verify] ${msg}\n`);
const now = () => performance.timeOrigin + performance.now();
const RAW_CHANNEL = 'tokenwarden_bench_raw';
const POOL_SIZE = 10;
/** Throughput series run interleaved, so background work (a reconciler pass) and warming weigh on each alike. */
const ROUNDS = 3;
const tally = (): Tally => ({ ops: 0, wallSeconds: 0, cpuSeconds: 0 });

interface Options {
  tokens: number;
  seconds: number;
  concurrency: number;
  revokes: number;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      tokens: { type: 'string', default: '1000' },
      seconds: { type: 'string', default: '5' },
      concurrency: { type: 'string', default: '32' },
      revokes: { type: 'string', default: '200' },
    },
  });
  const int = (name: keyof typeof values, min: number) => {
    const text = values[name]!;
    if (!/^\d+$/.test(text) || Number(text) < min)
      throw new Error(`--${name} must be an integer ≥ ${min}, got ${JSON.stringify(text)}`);
    return Number(text);
  };
  return {
    tokens: int('tokens', 1),
    seconds: int('seconds', 1),
    concurrency: int('concurrency', 1),
    revokes: int('revokes', 1),
  };
}

interface Throughput {
  ops: number;
  opsPerSecond: number;
  /** Operations per CPU-second of this process (user + system): what one core of the service buys. */
  opsPerCpuSecond: number;
}

interface Tally {
  ops: number;
  wallSeconds: number;
  cpuSeconds: number;
}

/** Runs `op` with `concurrency` callers for `seconds`, adding what it did to `tally`. */
async function measure(tally: Tally, seconds: number, concurrency: number, op: (i: number) => Promise<unknown>) {
  let ops = 0;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async (_, lane) => {
      for (let i = lane; performance.now() < deadline; i += concurrency) {
        await op(i);
        ops++;
      }
    }),
  );
  const cpu = process.cpuUsage(cpu0);
  tally.ops += ops;
  tally.wallSeconds += (performance.now() - t0) / 1000;
  tally.cpuSeconds += (cpu.user + cpu.system) / 1e6;
}

const throughputOf = (t: Tally): Throughput => ({
  ops: t.ops,
  opsPerSecond: Math.round(t.ops / t.wallSeconds),
  opsPerCpuSecond: Math.round(t.ops / t.cpuSeconds),
});

/** The other process: a warmed verifier and a raw LISTENing client (bench/verify-child.ts). */
async function startChild(options: VerifierOptions) {
  const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'bench', 'verify-child.js')], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const waiting = new Map<string, (message: Record<string, unknown>) => void>();
  createInterface({ input: child.stdout }).on('line', (line) => {
    const message = JSON.parse(line) as Record<string, unknown>;
    const key = Object.keys(message)[0]!;
    const id = `${key}:${String(message[key])}`;
    const resolve = waiting.get(id) ?? waiting.get(key);
    if (resolve) {
      waiting.delete(id);
      waiting.delete(key);
      resolve(message);
    }
  });
  const next = (id: string) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the verifying process did not send ${id} within 30 s`)), 30_000);
      waiting.set(id, (message) => {
        clearTimeout(timer);
        resolve(message);
      });
    });
  const send = (message: object) => child.stdin.write(`${JSON.stringify(message)}\n`);
  const ready = next('ready');
  send({ options, rawChannel: RAW_CHANNEL });
  if ((await ready).ready !== true) throw new Error('the verifying process is not listening');
  return {
    next,
    send,
    stop: () =>
      new Promise<void>((resolve) => {
        child.once('exit', () => resolve());
        child.stdin.end();
      }),
  };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const halt = new AbortController();
  process.once('SIGINT', () => halt.abort());
  const stack = await startUserStack({ workers: 0, log: say, signal: halt.signal });
  const closers: Array<() => Promise<unknown>> = [() => stack.stop()];
  try {
    const { databaseUrl, databaseSchema: schema } = stack.settings;
    // The stack's own work (workflows of the tokens just issued or revoked) is over before each series.
    const settle = async (what: string) => {
      const q = await waitUntilQuiet(() => [stack.stackPid, ...stack.serverPids()], {
        maxCores: 0.2,
        windowMs: 1_000,
        timeoutMs: 60_000,
        signal: halt.signal,
      });
      say(
        `${what}: the stack ${q.quiet ? 'quiet' : `still busy (${q.cores} cores)`} after ${(q.waitedMs / 1000).toFixed(1)} s`,
      );
    };
    const warden = await TokenWarden.connect(stack.settings);
    closers.push(() => warden.close());
    say(`issuing ${options.tokens + options.revokes} tokens`);
    const issue = async (n: number) => {
      const out: { tokenId: string; token: string }[] = [];
      for (let i = 0; i < n; i += 20) {
        const batch = await Promise.all(
          Array.from({ length: Math.min(20, n - i) }, () =>
            warden.issue({ subject: 'usr_bench_verify', ttl: '1h', scopes: ['read'] }),
          ),
        );
        out.push(...batch.map(({ tokenId, token }) => ({ tokenId, token })));
      }
      return out;
    };
    const tokens = await issue(options.tokens);
    const victims = await issue(options.revokes);

    // (a) Throughput.
    const verifierOptions: VerifierOptions = { databaseUrl, schema, poolSize: POOL_SIZE };
    const cached = await createVerifier({ ...verifierOptions, cacheTtlMs: 600_000 });
    const uncached = await createVerifier({ ...verifierOptions, cacheTtlMs: 0 });
    const prepared = await createVerifier({ ...verifierOptions, cacheTtlMs: 0, prepare: true });
    closers.push(() => prepared.close());
    const raw = new pg.Pool({ connectionString: databaseUrl, max: POOL_SIZE });
    closers.push(
      () => cached.close(),
      () => uncached.close(),
      () => raw.end(),
    );
    const rawSql = `SELECT id, subject, scopes, issued_at, expires_at FROM ${quoteIdent(schema)}.token WHERE id = $1`;
    const verifyAll = (v: Verifier) => async (i: number) => {
      if (!(await v.verify(tokens[i % tokens.length]!.token)).active) throw new Error('a live token was refused');
    };
    for (const t of tokens) await cached.verify(t.token);
    const lookups = {
      warm: verifyAll(cached),
      miss: verifyAll(uncached),
      prepared: verifyAll(prepared),
      raw: (i: number) => raw.query(rawSql, [tokens[i % tokens.length]!.tokenId]),
    };
    // Warm-ups: connections open, JIT warm, the first round's last-use writes out of the way.
    for (const op of Object.values(lookups))
      await measure({ ops: 0, wallSeconds: 0, cpuSeconds: 0 }, 1, options.concurrency, op);
    await settle('throughput');
    say(
      `throughput: ${ROUNDS} interleaved rounds of ${options.seconds} s each, ${options.concurrency} callers, pool of ${POOL_SIZE}, ${os.cpus().length} cores`,
    );
    const tallies = { warm: tally(), miss: tally(), prepared: tally(), raw: tally() };
    for (let round = 0; round < ROUNDS; round++) {
      for (const name of ['warm', 'miss', 'prepared', 'raw'] as const) {
        await measure(tallies[name], options.seconds, options.concurrency, lookups[name]);
      }
    }
    const warm = throughputOf(tallies.warm);
    const miss = throughputOf(tallies.miss);
    const missPrepared = throughputOf(tallies.prepared);
    const rawSelect = throughputOf(tallies.raw);
    const line = (name: string, t: Throughput) =>
      say(
        `  ${name.padEnd(26)} ${String(t.opsPerCpuSecond).padStart(9)} /CPU-s  ${String(t.opsPerSecond).padStart(8)} /s`,
      );
    line('verify, warm cache', warm);
    line('verify, cache miss', miss);
    line('verify, cache miss, prepare', missPrepared);
    line('raw SELECT by id (floor)', rawSelect);
    say(
      `  cache miss / raw SELECT: ×${ratio(miss.opsPerCpuSecond, rawSelect.opsPerCpuSecond)} per CPU-s, ×${ratio(miss.opsPerSecond, rawSelect.opsPerSecond)} per s`,
    );

    // (b) Revoke returning → rejection in another process, against raw NOTIFY delivery.
    const child = await startChild({ databaseUrl, schema, cacheTtlMs: 600_000 });
    closers.push(() => child.stop());
    /** Revokes each victim with `revoke`, one at a time; instants from the call's start and return to the other process hearing the kill and refusing the token. */
    const series = async (
      label: string,
      victims: { tokenId: string; token: string }[],
      revoke: (tokenId: string) => Promise<unknown>,
    ) => {
      await settle(label);
      const out = {
        fromReturn: [] as number[],
        fromStart: [] as number[],
        heardFromReturn: [] as number[],
        call: [] as number[],
      };
      say(`${label}: ${victims.length} revocations, one at a time`);
      for (const victim of victims) {
        const i = armedCount++;
        const armed = child.next(`armed:${i}`);
        child.send({ arm: i, token: victim.token });
        const a = await armed;
        if (a.active !== true || a.fromCache !== true) throw new Error(`token ${i} was not warm in the other process`);
        const rejected = child.next(`rejected:${i}`);
        const started = now();
        await revoke(victim.tokenId);
        const returned = now();
        const r = await rejected;
        if (r.active !== false) throw new Error(`token ${i} still accepted after its kill notification`);
        out.fromReturn.push((r.at as number) - returned);
        out.fromStart.push((r.at as number) - started);
        out.heardFromReturn.push((r.heardAt as number) - returned);
        out.call.push(returned - started);
      }
      return out;
    };
    let armedCount = 0;
    const half = Math.ceil(victims.length / 2);
    const library = await series('TokenWarden.revoke → rejection', victims.slice(0, half), (tokenId) =>
      warden.revoke({ tokenId, reason: 'bench' }),
    );
    const storePool = createPool(databaseUrl, schema, 2);
    closers.push(() => storePool.end());
    const storeKill = await series('store kill → rejection', victims.slice(half), (tokenId) =>
      killToken(storePool, { tokenId, reason: 'bench', actor: 'bench', initiatingEntity: 'admin' }),
    );
    const fromReturn = library.fromReturn;
    await settle('raw NOTIFY');
    const notifyDelivery: number[] = [];
    const notifier = new pg.Client({ connectionString: databaseUrl });
    await notifier.connect();
    closers.push(() => notifier.end());
    for (let i = 0; i < options.revokes; i++) {
      const heard = child.next(`heard:${i}`);
      await notifier.query('SELECT pg_notify($1, $2)', [RAW_CHANNEL, String(i)]);
      const returned = now();
      notifyDelivery.push(((await heard).at as number) - returned);
    }
    const rejection = summarize(fromReturn);
    const floor = summarize(notifyDelivery);
    const lat = (name: string, samples: number[]) => {
      const x = summarize(samples);
      say(`  ${name.padEnd(46)} p50 ${x.p50Ms} ms  p99 ${x.p99Ms} ms  (min ${x.minMs}, max ${x.maxMs})`);
    };
    say('latency (negative: the other process had refused the token before the call returned):');
    lat('TokenWarden.revoke returned → rejected', library.fromReturn);
    lat('  … returned → kill NOTIFY heard', library.heardFromReturn);
    lat('  revoke started → rejected', library.fromStart);
    lat('  revoke call', library.call);
    lat(
      '  kill NOTIFY heard → rejected',
      library.fromReturn.map((x, i) => x - library.heardFromReturn[i]!),
    );
    lat('store kill returned → rejected', storeKill.fromReturn);
    lat('  … returned → kill NOTIFY heard', storeKill.heardFromReturn);
    lat('  store kill call', storeKill.call);
    lat(
      '  kill NOTIFY heard → rejected',
      storeKill.fromReturn.map((x, i) => x - storeKill.heardFromReturn[i]!),
    );
    lat('raw: pg_notify returned → heard (floor)', notifyDelivery);
    say(`  goal p99 ≤ 10 ms from revoke returning: ${rejection.p99Ms <= 10 ? 'met' : 'NOT met'}`);
    const rejectedBeforeReturn = fromReturn.filter((x) => x <= 0).length;
    say(`  rejected before TokenWarden.revoke returned: ${rejectedBeforeReturn} of ${fromReturn.length}`);

    // (c) Introspection over HTTP against a bare fastify route doing the same lookup.
    await settle('introspection');
    const introspection = await runIntrospectionBench({
      databaseUrl,
      schema,
      temporalAddress: stack.settings.temporal.connectionOptions.address!,
      namespace: stack.settings.temporal.namespace,
      seconds: options.seconds,
      log: say,
    });
    say(
      `introspection over HTTP: API ${introspection.api.perSecond}/s, bare fastify route ${introspection.bare.perSecond}/s: ×${introspection.ratio} (goal ≥ 0.7)`,
    );

    process.stdout.write(
      `${JSON.stringify({
        bench: 'verify',
        options,
        cores: os.cpus().length,
        database: 'tokenwarden start (embedded PostgreSQL, default durability)',
        throughput: {
          warmCache: warm,
          cacheMiss: miss,
          cacheMissPrepared: missPrepared,
          rawSelectById: rawSelect,
          missVsRawPerCpu: ratio(miss.opsPerCpuSecond, rawSelect.opsPerCpuSecond),
        },
        revokeToRejection: {
          fromRevokeReturnedMs: rejection,
          heardFromRevokeReturnedMs: summarize(library.heardFromReturn),
          fromRevokeStartedMs: summarize(library.fromStart),
          revokeCallMs: summarize(library.call),
          rejectedBeforeRevokeReturned: rejectedBeforeReturn,
          fromStoreKillReturnedMs: summarize(storeKill.fromReturn),
          heardFromStoreKillReturnedMs: summarize(storeKill.heardFromReturn),
          storeKillCallMs: summarize(storeKill.call),
          rawNotifyDeliveryMs: floor,
          p99GoalMs: 10,
          p99GoalMet: rejection.p99Ms <= 10,
          overRawNotifyP99Ms: ms(rejection.p99Ms - floor.p99Ms),
        },
        introspection,
      })}\n`,
    );
  } finally {
    for (const close of closers.reverse()) await close().catch((err: Error) => say(`cleanup: ${err.message}`));
  }
}

main().catch((err: unknown) => {
  say(err instanceof Error ? (err.stack ?? err.message) : String(err));
  process.exit(1);
});
