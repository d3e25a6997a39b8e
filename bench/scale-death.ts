/**
 * Mass death, measured through the store and the receiver: an expiry wave (N tokens, each with one
 * receiver, all expiring at about the same instant) and a mass revoke (N tokens revoked through the
 * library at concurrency 16). "Dead" is a row with status <> 'active' whose death is in its audit
 * chain; "delivered" is the receiver's 2xx to the event (each webhook-id once, repeats counted).
 */
import { performance } from 'node:perf_hooks';
import type { TokenWarden } from '../client/index.js';
import { tokenWorkflowId } from '../common/names.js';
import { countHistory, waitAfterFirstTimer } from './histories.js';
import type { ArrivalReceiver } from './receiver.js';
import { watchPeakMemory } from './scale-memory.js';
import { addReceiver, issueTokens, poll, round, type Rig } from './scale-rig.js';
import { summarize } from './stats.js';
import { mapLimited } from './workflows.js';

export const GOALS_MS = {
  waveDead: 10_000,
  waveDelivered: 30_000,
  revokeDead: 5_000,
  revokeDelivered: 30_000,
} as const;

const LONG_TTL = '30d';
const REVOKE_CONCURRENCY = 16;
/** Expiry-wave tokens whose histories are read for the profile (after the measurement). */
const PROFILED_HISTORIES = 20;
/** Kinds of the audit event a kill appends (the store's kill_token). */
const DEATH_EVENT_KINDS = ['token.expired', 'token.revoked'];

interface Progress {
  count: number;
  /** Epoch ms of the last one, once all are there. */
  lastAtMs?: number;
}

interface MassDeath {
  dead: Progress;
  delivered: Progress;
}

async function deathsInStore(warden: TokenWarden, tokenIds: string[]): Promise<Progress> {
  const t = warden.pool.tables;
  const { rows } = await warden.pool.query<{ dead: number; last: Date | null }>(
    `SELECT count(*)::int AS dead, max(a.recorded_at) AS last
       FROM ${t.token} tk JOIN ${t.audit_event} a ON a.token_id = tk.id AND a.kind = ANY($2::text[])
      WHERE tk.id = ANY($1::text[]) AND tk.status <> 'active'`,
    [tokenIds, DEATH_EVENT_KINDS],
  );
  const { dead, last } = rows[0]!;
  return { count: dead, ...(dead === tokenIds.length && last ? { lastAtMs: last.getTime() } : {}) };
}

function deliveries(receiver: ArrivalReceiver, tokenIds: string[]): Progress {
  let count = 0;
  let last = 0;
  for (const tokenId of tokenIds) {
    const arrival = receiver.acknowledgedOf(tokenId);
    if (!arrival) continue;
    count++;
    last = Math.max(last, arrival.ackedAtEpochMs);
  }
  return { count, ...(count === tokenIds.length ? { lastAtMs: last } : {}) };
}

/** Polls the store and the receiver until every token is dead and delivered, or time runs out. */
async function watchMassDeath(
  rig: Rig,
  tokenIds: string[],
  receiver: ArrivalReceiver,
  timeoutMs: number,
): Promise<MassDeath> {
  const state: MassDeath = { dead: { count: 0 }, delivered: { count: 0 } };
  let reported = 0;
  await poll(
    rig,
    async () => {
      if (state.dead.lastAtMs === undefined) state.dead = await deathsInStore(rig.warden, tokenIds);
      if (state.delivered.lastAtMs === undefined) state.delivered = deliveries(receiver, tokenIds);
      if (performance.now() - reported > 5_000) {
        reported = performance.now();
        rig.say(`  ${state.dead.count}/${tokenIds.length} dead, ${state.delivered.count} delivered`);
      }
      return state.dead.lastAtMs !== undefined && state.delivered.lastAtMs !== undefined ? state : undefined;
    },
    { timeoutMs },
  );
  return state;
}

const after = (progress: Progress, fromMs: number) =>
  progress.lastAtMs === undefined ? null : round(progress.lastAtMs - fromMs);

function deathFigures(state: MassDeath, fromMs: number, total: number, receiver: ArrivalReceiver) {
  return {
    deadAfterMs: after(state.dead, fromMs),
    deadCount: state.dead.count,
    deliveredAfterMs: after(state.delivered, fromMs),
    deliveredCount: state.delivered.count,
    allDead: state.dead.count === total,
    allDelivered: state.delivered.count === total,
    duplicateDeliveries: receiver.repeats,
    otherEvents: receiver.otherEvents,
  };
}

/** How long the wave's first workflow tasks waited for a worker, from a sample of histories. */
async function waveProfile(rig: Rig, tokenIds: string[]) {
  const step = Math.max(1, Math.floor(tokenIds.length / PROFILED_HISTORIES));
  const sample = tokenIds.filter((_, i) => i % step === 0).slice(0, PROFILED_HISTORIES);
  const histories = await mapLimited(sample.length, 4, (i) =>
    rig.client.workflow.getHandle(tokenWorkflowId(sample[i]!)).fetchHistory(),
  );
  const waits = histories.map(waitAfterFirstTimer).filter((ms): ms is number => ms !== undefined);
  const counts = histories.map(countHistory);
  const median = (values: number[]) => summarize(values).p50Ms;
  return {
    sampledTokens: sample.length,
    expiryToWorkflowTaskStartedMs: waits.length ? summarize(waits) : null,
    workflowTasksPerTokenP50: median(counts.map((c) => c.workflowTasks.completed)),
    workflowTaskTimeoutsTotal: counts.reduce((sum, c) => sum + c.workflowTasks.timedOut, 0),
    activityAttemptsPerTokenP50: median(counts.map((c) => c.activities.attempts)),
  };
}

/** The wave's lead: long enough to issue every token before the common expiry instant. */
async function waveLeadMs(rig: Rig, tokens: number, leadOverrideMs: number | undefined): Promise<number> {
  if (leadOverrideMs !== undefined) return leadOverrideMs;
  if (rig.issueRate === undefined) {
    const pilot = Math.min(100, tokens);
    rig.say(`  timing ${pilot} pilot issues (ttl ${LONG_TTL}) to size the wave's lead`);
    await issueTokens(rig, pilot, 32, (i) => ({ subject: `usr_pilot_${rig.tag}_${i}`, ttl: LONG_TTL }));
  }
  return Math.max(15_000, Math.ceil((tokens / rig.issueRate!) * 1500) + 10_000);
}

export async function expiryWaveSection(rig: Rig, opts: { tokens: number; leadMs?: number; timeoutMs: number }) {
  const { id, receiver } = await addReceiver(rig, 'wave');
  const leadMs = await waveLeadMs(rig, opts.tokens, opts.leadMs);
  const expiry = Date.now() + leadMs;
  rig.say(`  issuing ${opts.tokens} tokens expiring at ${new Date(expiry).toISOString()} (in ${leadMs / 1000} s)`);
  const issued = await issueTokens(rig, opts.tokens, 32, (i) => {
    const ttlMs = expiry - Date.now();
    if (ttlMs < 1_000) {
      throw new Error(
        `issuing the wave outran its lead (token ${i} would live ${ttlMs} ms): pass a longer --wave-lead`,
      );
    }
    return { subject: `usr_wave_${rig.tag}_${i}`, receivers: [id], ttl: `${ttlMs}ms` };
  });
  rig.say(`  issued in ${issued.seconds} s; waiting for the wave`);
  const peak = watchPeakMemory(rig);
  const state = await watchMassDeath(rig, issued.tokenIds, receiver, leadMs + opts.timeoutMs);
  const memory = peak();
  const window = await expiryWindow(rig.warden, issued.tokenIds);
  const figures = deathFigures(state, window.lastMs, opts.tokens, receiver);
  rig.say(`  reading ${Math.min(PROFILED_HISTORIES, opts.tokens)} histories`);
  return {
    tokens: opts.tokens,
    issue: { seconds: issued.seconds, perSecond: issued.perSecond, leadMs },
    expiryWindowMs: round(window.lastMs - window.firstMs),
    measuredFrom: 'the last expires_at',
    ...figures,
    ...memory,
    histories: await waveProfile(rig, issued.tokenIds),
    goalMs: { dead: GOALS_MS.waveDead, delivered: GOALS_MS.waveDelivered },
    goalMet: {
      dead: figures.deadAfterMs !== null && figures.deadAfterMs <= GOALS_MS.waveDead,
      delivered: figures.deliveredAfterMs !== null && figures.deliveredAfterMs <= GOALS_MS.waveDelivered,
    },
  };
}

async function expiryWindow(warden: TokenWarden, tokenIds: string[]): Promise<{ firstMs: number; lastMs: number }> {
  const { rows } = await warden.pool.query<{ first: Date; last: Date }>(
    `SELECT min(expires_at) AS first, max(expires_at) AS last FROM ${warden.pool.tables.token} WHERE id = ANY($1::text[])`,
    [tokenIds],
  );
  return { firstMs: rows[0]!.first.getTime(), lastMs: rows[0]!.last.getTime() };
}

export async function massRevokeSection(
  rig: Rig,
  opts: { tokens: number; timeoutMs: number; settle: () => Promise<unknown> },
) {
  const { id, receiver } = await addReceiver(rig, 'revoke');
  rig.say(`  issuing ${opts.tokens} tokens (ttl ${LONG_TTL}) at concurrency 32`);
  const issued = await issueTokens(rig, opts.tokens, 32, (i) => ({
    subject: `usr_revoke_${rig.tag}_${i}`,
    receivers: [id],
    ttl: LONG_TTL,
  }));
  rig.say(`  issued in ${issued.seconds} s; waiting for the worker to settle`);
  await opts.settle();
  rig.say(`  revoking ${opts.tokens} tokens at concurrency ${REVOKE_CONCURRENCY}`);
  const peak = watchPeakMemory(rig);
  const startedMs = Date.now();
  const t0 = performance.now();
  let notSignalled = 0;
  const callMs = await mapLimited(opts.tokens, REVOKE_CONCURRENCY, async (i) => {
    const c0 = performance.now();
    const outcome = await rig.warden.revoke({ tokenId: issued.tokenIds[i]!, reason: 'mass revoke benchmark' });
    if (!outcome.changed) throw new Error(`${outcome.tokenId} was already dead before its revoke`);
    if (!outcome.workflowSignalled) notSignalled++;
    return performance.now() - c0;
  });
  const callsDoneMs = round(performance.now() - t0);
  const state = await watchMassDeath(rig, issued.tokenIds, receiver, opts.timeoutMs);
  const figures = deathFigures(state, startedMs, opts.tokens, receiver);
  return {
    tokens: opts.tokens,
    concurrency: REVOKE_CONCURRENCY,
    measuredFrom: 'the first revoke call',
    callsDoneMs,
    revokeCall: summarize(callMs),
    workflowsNotSignalled: notSignalled,
    ...figures,
    ...peak(),
    goalMs: { dead: GOALS_MS.revokeDead, delivered: GOALS_MS.revokeDelivered },
    goalMet: {
      dead: figures.deadAfterMs !== null && figures.deadAfterMs <= GOALS_MS.revokeDead,
      delivered: figures.deliveredAfterMs !== null && figures.deliveredAfterMs <= GOALS_MS.revokeDelivered,
    },
  };
}
