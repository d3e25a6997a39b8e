/**
 * History events and Temporal Cloud actions of one token-year of typical use, counted from real
 * histories: a token issued for a year under a policy of monthly rotation (secret to the owner's
 * folder), a grace, warnings 30, 7 and 1 days before its deadlines and an idle timeout, used daily
 * through the verifier, until it expires. Time is scaled (one day = `dayMs`), so the workflow meets
 * the same sequence of deadlines as in a real year. Every run of the continue-as-new chain counts.
 */
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { tokenWorkflowId } from '../common/names.js';
import { addActions, cloudActions, countHistory, type CloudActions, type History } from './histories.js';
import { BILLING_RULES_URL } from './scale-actions.js';
import { addReceiver, round, within, type Rig } from './scale-rig.js';
import { epochMs } from './timeline.js';

export interface YearOptions {
  dayMs: number;
  tokens: number;
  idleDays: number;
  graceDays: number;
  useProbes: number;
  timeoutMs: number;
}

const DAYS_PER_YEAR = 365;
const ROTATE_EVERY_DAYS = 30;
const WARN_DAYS = [30, 7, 1];

/** The chain of runs of a workflow, first to last, following continue-as-new. */
async function chainHistories(rig: Rig, workflowId: string, firstRunId: string): Promise<History[]> {
  const histories: History[] = [];
  let runId: string | undefined = firstRunId;
  while (runId) {
    const history: History = await rig.client.workflow.getHandle(workflowId, runId).fetchHistory();
    histories.push(history);
    const last = history.events?.[history.events.length - 1];
    runId = last?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId ?? undefined;
  }
  return histories;
}

/** Raw tokens the owner has: the issued one, then each rotated one as its file appears in the owner's folder. */
class OwnerSecrets {
  private readonly known = new Set<string>();
  /** Newest first. */
  readonly secrets: string[];

  constructor(
    private readonly dir: string,
    private readonly tokenId: string,
    issued: string,
  ) {
    this.secrets = [issued];
  }

  async refresh(): Promise<void> {
    for (const name of await readdir(this.dir)) {
      if (!name.startsWith(`${this.tokenId}.`) || !name.endsWith('.json') || this.known.has(name)) continue;
      this.known.add(name);
      const body = JSON.parse(await readFile(path.join(this.dir, name), 'utf8')) as { type?: string; token?: string };
      if (body.type === 'token.rotated' && body.token) this.secrets.unshift(body.token);
    }
  }
}

/**
 * Daily use: once a (scaled) day, the newest secret the owner has is verified; while a new
 * credential is still pending (its file written before it is promoted), the one before it.
 */
async function useDaily(rig: Rig, verifier: Verifier, owner: OwnerSecrets, dayMs: number, done: () => boolean) {
  let uses = 0;
  let refused = 0;
  while (!done()) {
    rig.signal.throwIfAborted();
    const next = performance.now() + dayMs;
    await owner.refresh();
    let active = false;
    for (const secret of owner.secrets.slice(0, 2)) {
      if ((await verifier.verify(secret)).active) {
        active = true;
        break;
      }
    }
    uses++;
    if (!active) refused++;
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, next - performance.now())));
  }
  return { uses, refused };
}

/** The median of a month's run: started and ended by continue-as-new, holding exactly one rotation. */
function monthRun(histories: History[]) {
  const months = histories
    .slice(1, -1)
    .map((h) => countHistory(h))
    .filter((c) => c.activities.byType.rotateAutomatically?.attempts === 1);
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)] ?? 0;
  return {
    runs: months.length,
    historyEvents: median(months.map((c) => c.events)),
    actions: median(months.map((c) => cloudActions(c).total)),
  };
}

/**
 * Each automatic rotation: when it was scheduled, in (scaled) days since the token's workflow
 * started, and whether it completed (the store refuses one of a token already expired).
 */
function rotationsOf(histories: History[], dayMs: number) {
  const started = epochMs(histories[0]?.events?.[0]?.eventTime);
  const days: number[] = [];
  let completed = 0;
  for (const history of histories) {
    const rotationIds = new Set<string>();
    for (const event of history.events ?? []) {
      if (event.activityTaskScheduledEventAttributes?.activityType?.name === 'rotateAutomatically') {
        rotationIds.add(String(event.eventId));
        days.push(round((epochMs(event.eventTime) - started) / dayMs, 1));
      }
      const done = event.activityTaskCompletedEventAttributes;
      if (done && rotationIds.has(String(done.scheduledEventId))) completed++;
    }
  }
  return { scheduledOnDay: days, completed };
}

function sumCounts(histories: History[], dayMs: number) {
  const perRun = histories.map((h) => countHistory(h));
  const byType: Record<string, number> = {};
  const markers: Record<string, number> = {};
  for (const c of perRun) {
    for (const [name, n] of Object.entries(c.markers.byName)) markers[name] = (markers[name] ?? 0) + n;
    for (const [type, a] of Object.entries(c.activities.byType)) byType[type] = (byType[type] ?? 0) + a.attempts;
  }
  const actions: CloudActions = addActions(...perRun.map((c) => cloudActions(c)));
  return {
    runs: histories.length,
    events: perRun.reduce((n, c) => n + c.events, 0),
    largestRunEvents: Math.max(...perRun.map((c) => c.events)),
    activityAttemptsByType: byType,
    markersByName: markers,
    timers: perRun.reduce((n, c) => n + c.timers, 0),
    workflowTasksTimedOutOrFailed: perRun.reduce((n, c) => n + c.workflowTasks.timedOut + c.workflowTasks.failed, 0),
    actions,
    month: monthRun(histories),
    rotation: rotationsOf(histories, dayMs),
  };
}

export async function yearSection(rig: Rig, opts: YearOptions, settle: () => Promise<unknown>) {
  const day = opts.dayMs;
  // Owner folders must lie under the stack's TOKENWARDEN_OWNER_DIR_ROOT (its <data dir>/owner).
  const root = rig.stack.settings.ownerDirRoot;
  if (root === undefined) throw new Error('the stack has no owner folder root (TOKENWARDEN_OWNER_DIR_ROOT)');
  await mkdir(root, { recursive: true, mode: 0o700 });
  const ownerDir = await mkdtemp(path.join(root, 'bench-owner-'));
  rig.teardown.push({ name: 'owner folder', stop: () => rm(ownerDir, { recursive: true, force: true }) });
  const { id: receiverId } = await addReceiver(rig, 'year');
  const policy = `bench-year-${rig.tag}`;
  const fields = {
    rotateEvery: ROTATE_EVERY_DAYS * day,
    grace: opts.graceDays * day,
    warn: WARN_DAYS.map((d) => d * day),
    idleTimeout: opts.idleDays * day,
    ownerDir,
  };
  await rig.warden.setPolicy(policy, fields);
  // Every use is written (no throttle here): the idle deadline sees each day's use.
  const verifier = await createVerifier({
    databaseUrl: rig.stack.settings.databaseUrl,
    schema: rig.stack.settings.databaseSchema,
    cacheTtlMs: 0,
    lastUseIntervalMs: 1,
  });
  rig.teardown.push({ name: 'verifier', stop: () => verifier.close() });

  // Does a use touch the workflow? The same policy's token, between two deadlines: N verifications
  // with their last-use writes, and the history before and after.
  const usePolicy = `${policy}-use`;
  await rig.warden.setPolicy(usePolicy, { idleTimeout: `${opts.idleDays}d` });
  const probe = await rig.warden.issue({
    subject: `usr_use_${rig.tag}`,
    receivers: [receiverId],
    ttl: '1h',
    policy: usePolicy,
  });
  await settle();
  const probeHandle = rig.client.workflow.getHandle(tokenWorkflowId(probe.tokenId));
  const before = await probeHandle.describe();
  const eventsBefore = (await probeHandle.fetchHistory()).events?.length ?? 0;
  const writesBefore = verifier.stats().lastUseWrites;
  let probeActive = 0;
  for (let i = 0; i < opts.useProbes; i++) {
    if ((await verifier.verify(probe.token)).active) probeActive++;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  await settle();
  const after = await probeHandle.describe();
  const useProbe = {
    verifications: opts.useProbes,
    active: probeActive,
    lastUseWrites: verifier.stats().lastUseWrites - writesBefore,
    historyEventsBefore: eventsBefore,
    historyEventsAfter: (await probeHandle.fetchHistory()).events?.length ?? 0,
    sameRun: before.runId === after.runId,
  };
  rig.say(
    `  use: ${useProbe.verifications} verifications (${useProbe.lastUseWrites} last-use writes) → history ${useProbe.historyEventsBefore} → ${useProbe.historyEventsAfter} events`,
  );

  rig.say(
    `  a year of ${opts.tokens} token(s): one day = ${day} ms, year = ${round((DAYS_PER_YEAR * day) / 1000, 1)} s`,
  );
  const years = await Promise.all(
    Array.from({ length: opts.tokens }, async (_, i) => {
      const issued = await rig.warden.issue({
        subject: `usr_year_${rig.tag}_${i}`,
        receivers: [receiverId],
        ttl: DAYS_PER_YEAR * day,
        policy,
      });
      const workflowId = tokenWorkflowId(issued.tokenId);
      const handle = rig.client.workflow.getHandle(workflowId);
      const { runId: firstRunId } = await handle.describe();
      let ended = false;
      const owner = new OwnerSecrets(ownerDir, issued.tokenId, issued.token);
      // Used every day of its life (not after its expiry, while its workflow propagates the death).
      const expiresAtMs = Date.parse(issued.expiresAt);
      const use = useDaily(rig, verifier, owner, day, () => ended || Date.now() >= expiresAtMs - day / 2);
      try {
        await within(rig, handle.result(), opts.timeoutMs, `the year of ${issued.tokenId}`);
      } finally {
        ended = true;
      }
      const daily = await use;
      const histories = await chainHistories(rig, workflowId, firstRunId);
      const startedMs = epochMs(histories[0]?.events?.[0]?.eventTime);
      const expiryDay = round((expiresAtMs - startedMs) / day, 1);
      return { tokenId: issued.tokenId, daily, expiryDay, ...sumCounts(histories, day) };
    }),
  );

  const perToken = years.map((y) => ({
    tokenId: y.tokenId,
    runs: y.runs,
    historyEvents: y.events,
    largestRunEvents: y.largestRunEvents,
    actions: y.actions.total,
    actionsBreakdown: y.actions.breakdown,
    activityAttemptsByType: y.activityAttemptsByType,
    markersByName: y.markersByName,
    timers: y.timers,
    workflowTasksTimedOutOrFailed: y.workflowTasksTimedOutOrFailed,
    rotations: y.rotation.completed,
    rotationAttempts: y.activityAttemptsByType.rotateAutomatically ?? 0,
    warnings: y.activityAttemptsByType.sendWarning ?? 0,
    lastUseReads: y.activityAttemptsByType.readLastUse ?? 0,
    rotationDays: y.rotation.scheduledOnDay,
    expiryDay: y.expiryDay,
    monthRun: y.month,
    dailyUses: y.daily.uses,
    usesRefused: y.daily.refused,
  }));
  const expected = { rotations: Math.floor((DAYS_PER_YEAR - 1) / ROTATE_EVERY_DAYS), warnings: WARN_DAYS.length };
  // Rotations lost to scaled time's drift are added at the measured cost of a month's run.
  const missing = (t: (typeof perToken)[number]) => Math.max(0, expected.rotations - t.rotations);
  const mean = (f: (t: (typeof perToken)[number]) => number) =>
    round(perToken.reduce((n, t) => n + f(t), 0) / perToken.length, 1);
  return {
    billingRules: BILLING_RULES_URL,
    scenario:
      `issued for ${DAYS_PER_YEAR} days and left to expire; policy: rotate every ${ROTATE_EVERY_DAYS} d (secret to the owner's folder), ` +
      `grace ${opts.graceDays} d, warnings ${WARN_DAYS.join(', ')} d before expiry and before the idle deadline, idle timeout ${opts.idleDays} d; ` +
      `one receiver; used once a day through the verifier with the newest secret the owner has`,
    dayMs: day,
    policy: fields,
    useProbe,
    expected,
    // Scaled time drifts: each deadline is re-armed from when the last one was handled, so a slow
    // worker may fit fewer rotations in the year than real time would.
    matchesScenario: perToken.every(
      (t) => t.rotations === expected.rotations && t.warnings === expected.warnings && t.usesRefused === 0,
    ),
    perToken,
    perTokenYear: {
      historyEvents: mean((t) => t.historyEvents),
      actions: mean((t) => t.actions),
      runs: mean((t) => t.runs),
      rotations: mean((t) => t.rotations),
      warnings: mean((t) => t.warnings),
      lastUseReads: mean((t) => t.lastUseReads),
    },
    perTokenYearWithAllRotations: {
      how: `the measured year plus, for each rotation short of ${expected.rotations}, the median run of one month (started and ended by continue-as-new, one rotation) of the same token`,
      historyEvents: mean((t) => t.historyEvents + missing(t) * t.monthRun.historyEvents),
      actions: mean((t) => t.actions + missing(t) * t.monthRun.actions),
    },
  };
}
