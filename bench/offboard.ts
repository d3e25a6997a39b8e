/**
 * `npm run bench:offboard`: offboarding a subject with N tokens (default 1,000, each with one
 * receiver on loopback) on the stack a user gets, against a raw signal loop in the same run (N other
 * tokens, each workflow sent the revoke signal at the same concurrency, nothing else: each workflow
 * then kills its token itself). Measured: until every token is dead in the store (seen by another
 * connection polling the rows), until every workflow was told, until every receiver acknowledged.
 * Human lines on stderr, a final JSON line on stdout.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { OFFBOARD_DEFAULTS } from '../client/index.js';
import type { RevokeRequest } from '../common/messages.js';
import { signalRevokeRunning } from '../common/temporal.js';
import { waitUntilQuiet } from './proc.js';
import { watchedPids } from './scale-memory.js';
import {
  addReceiver,
  issueTokens,
  round,
  section,
  watchAllDead,
  watchDelivered,
  type Rig,
  type Teardown,
} from './scale-rig.js';
import { closeRig, haltOnSignals, machineFacts, openUserRig } from './user-rig.js';
import { mapLimited } from './workflows.js';

const say = (msg: string) => process.stderr.write(`[bench:offboard] ${msg}\n`);

const GOAL_DEAD_MS = 1_000;

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      tokens: { type: 'string', default: '1000' },
      rate: { type: 'string', default: '10000' },
      timeout: { type: 'string', default: '300' },
    },
  });
  const tokens = Number(values.tokens);
  const rate = Number(values.rate);
  const timeoutMs = Number(values.timeout) * 1000;
  if (!Number.isInteger(tokens) || tokens < 1) throw new Error('--tokens: expected a positive integer');
  if (!(rate > 0)) throw new Error('--rate: expected a positive number (signals per second)');
  if (!(timeoutMs > 0)) throw new Error('--timeout: expected seconds');
  return { tokens, rate, concurrency: OFFBOARD_DEFAULTS.concurrency, timeoutMs };
}

type Options = ReturnType<typeof parseOptions>;

async function prepare(rig: Rig, name: string, count: number, settle: () => Promise<unknown>) {
  const { id, receiver } = await addReceiver(rig, name);
  const subject = `usr_${name}_${rig.tag}`;
  rig.say(`  issuing ${count} tokens of ${subject} at concurrency 32`);
  const issued = await issueTokens(rig, count, 32, () => ({ subject, receivers: [id], ttl: '30d' }));
  rig.say(`  issued in ${issued.seconds} s; waiting for the worker to settle`);
  await settle();
  return { subject, receiver, tokenIds: issued.tokenIds };
}

async function offboardSection(rig: Rig, opts: Options, settle: () => Promise<unknown>) {
  const { subject, receiver, tokenIds } = await prepare(rig, 'offboard', opts.tokens, settle);
  rig.say(`  offboarding ${subject} (rate ${opts.rate}/s, concurrency ${opts.concurrency})`);
  const startedEpoch = Date.now();
  const t0 = performance.now();
  const dead = watchAllDead(rig, tokenIds, t0, opts.timeoutMs);
  const report = await rig.warden.offboard({
    subject,
    reason: 'bench: offboarding',
    rate: opts.rate,
    concurrency: opts.concurrency,
  });
  const returnedMs = performance.now() - t0;
  const deadMs = await dead;
  const deliveredMs = await watchDelivered(rig, receiver, tokenIds, startedEpoch, opts.timeoutMs);
  return {
    tokens: opts.tokens,
    revoked: report.revoked.length,
    signalled: report.signalled,
    notSignalled: report.notSignalled.length,
    killTransactionMs: report.durationsMs.kill,
    deadSeenByAnotherConnectionMs: deadMs,
    allToldMs: round(returnedMs),
    allDeliveredMs: deliveredMs,
    duplicateDeliveries: receiver.repeats,
    goalDeadMs: GOAL_DEAD_MS,
    goalMet: deadMs !== null && deadMs <= GOAL_DEAD_MS,
  };
}

async function rawSignalSection(rig: Rig, opts: Options, settle: () => Promise<unknown>) {
  const { receiver, tokenIds } = await prepare(rig, 'raw', opts.tokens, settle);
  const request: RevokeRequest = {
    reason: 'bench: raw signal loop',
    actor: 'bench',
    initiatingEntity: 'admin',
    requestId: randomUUID(),
  };
  rig.say(`  signalling ${opts.tokens} workflows at concurrency ${opts.concurrency}, nothing else`);
  const startedEpoch = Date.now();
  const t0 = performance.now();
  const dead = watchAllDead(rig, tokenIds, t0, opts.timeoutMs);
  await mapLimited(tokenIds.length, opts.concurrency, (i) => signalRevokeRunning(rig.client, tokenIds[i]!, request));
  const signalledMs = performance.now() - t0;
  const deadMs = await dead;
  const deliveredMs = await watchDelivered(rig, receiver, tokenIds, startedEpoch, opts.timeoutMs);
  return {
    tokens: opts.tokens,
    deadSeenByAnotherConnectionMs: deadMs,
    allToldMs: round(signalledMs),
    allDeliveredMs: deliveredMs,
    duplicateDeliveries: receiver.repeats,
  };
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const halt = haltOnSignals(say);
  const teardown: Teardown = [];
  let results: Record<string, unknown> = {};
  let failure: unknown;
  try {
    const rig = await openUserRig(halt.signal, say, teardown);
    const settle = () => waitUntilQuiet(() => watchedPids(rig), { timeoutMs: opts.timeoutMs, signal: halt.signal });
    const offboard = await section(rig, 'offboard', () => offboardSection(rig, opts, settle));
    await settle();
    const raw = await section(rig, 'raw signal loop', () => rawSignalSection(rig, opts, settle));
    results = {
      offboard,
      rawSignalLoop: raw,
      ratios: {
        deadVsRaw: ratio(offboard.deadSeenByAnotherConnectionMs, raw.deadSeenByAnotherConnectionMs),
        toldVsRaw: ratio(offboard.allToldMs, raw.allToldMs),
        deliveredVsRaw: ratio(offboard.allDeliveredMs, raw.allDeliveredMs),
      },
    };
  } catch (err) {
    failure = err;
  } finally {
    await closeRig(teardown, say);
  }
  const final = {
    bench: 'offboard',
    date: new Date().toISOString(),
    options: opts,
    machine: machineFacts(),
    stack: 'tokenwarden start (Temporal dev server on SQLite, embedded PostgreSQL with fsync on, in-process worker)',
    ...results,
    ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
  };
  printSummary(final);
  process.stdout.write(`${JSON.stringify(final)}\n`);
  if (failure) throw failure;
}

function ratio(value: number | null, baseline: number | null): number | null {
  return value === null || baseline === null || baseline === 0 ? null : round(value / baseline, 2);
}

function printSummary(final: Record<string, unknown>): void {
  const o = final.offboard as Awaited<ReturnType<typeof offboardSection>> | undefined;
  const r = final.rawSignalLoop as Awaited<ReturnType<typeof rawSignalSection>> | undefined;
  if (!o || !r) return;
  const line = (text: string) => process.stdout.write(`${text}\n`);
  line(`offboarding a subject with ${o.tokens} tokens (one receiver each), against a raw signal loop:`);
  line(`                      offboard        raw signal loop`);
  line(
    `  all dead in store   ${String(o.deadSeenByAnotherConnectionMs).padStart(8)} ms   ${String(r.deadSeenByAnotherConnectionMs).padStart(8)} ms   (goal ≤ ${o.goalDeadMs} ms: ${o.goalMet ? 'met' : 'not met'}; the kill transaction ${o.killTransactionMs} ms)`,
  );
  line(`  all told            ${String(o.allToldMs).padStart(8)} ms   ${String(r.allToldMs).padStart(8)} ms`);
  line(`  all delivered       ${String(o.allDeliveredMs).padStart(8)} ms   ${String(r.allDeliveredMs).padStart(8)} ms`);
  line(
    `  repeats             ${String(o.duplicateDeliveries).padStart(8)}      ${String(r.duplicateDeliveries).padStart(8)}`,
  );
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
