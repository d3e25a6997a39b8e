/**
 * The `rotate` Update's latency through the library (`TokenWarden.rotate`: the client generates the
 * secret, the workflow stores its hash) against the cheapest Update the token workflow has, on the
 * same workflows, interleaved. The token workflow has no no-op Update, and every Update it accepts
 * writes the store; the baseline is `retryPropagation` sent to an active token, which its validator
 * refuses: the same client → server → worker → client round trip (a speculative workflow task on the
 * cached workflow), with nothing written to the store or to history.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { WorkflowUpdateFailedError } from '@temporalio/client';
import { retryPropagationUpdate } from '../common/messages.js';
import { tokenWorkflowId } from '../common/names.js';
import { startNoopFloor } from './rotate-floor.js';
import { cloudActions, countHistory, type History } from './histories.js';
import { addReceiver, issueTokens, round, within, type Rig } from './scale-rig.js';
import { ratio, summarize } from './stats.js';
import { epochMs, historyMarks, stepMedians, type Mark } from './timeline.js';

export interface LatencyOptions {
  tokens: number;
  rotations: number;
  warmup: number;
  graceMs: number;
  timeoutMs: number;
  /** Also measure a true no-op Update on a bench-only workflow. */
  noopFloor: boolean;
}

export const GOAL_RATIO = 1.5;
const UPDATE_DEADLINE_MS = 10_000;
/** The validator's refusal of an operator Update on a token that is not propagating a revocation. */
const BASELINE_REFUSAL = /is not propagating a revocation/;

/** The workflow's current run once it has no task or activity pending (a rotation's continue-as-new done). */
async function idleRun(rig: Rig, workflowId: string): Promise<string> {
  const handle = rig.client.workflow.getHandle(workflowId);
  const deadline = Date.now() + 60_000;
  for (;;) {
    const { runId, raw } = await handle.describe();
    if (!raw.pendingWorkflowTask && !raw.pendingActivities?.length) return runId;
    rig.signal.throwIfAborted();
    if (Date.now() > deadline) throw new Error(`workflow ${workflowId} still busy after 60 s`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** One baseline Update: refused by the token workflow's validator, as it must be for an active token. */
async function refusedUpdate(rig: Rig, tokenId: string): Promise<number> {
  const handle = rig.client.workflow.getHandle(tokenWorkflowId(tokenId));
  const t0 = performance.now();
  try {
    await rig.client.connection.withDeadline(Date.now() + UPDATE_DEADLINE_MS, () =>
      handle.executeUpdate(retryPropagationUpdate, {
        args: [{ reason: 'bench: baseline Update', actor: 'bench' }],
        updateId: randomUUID(),
      }),
    );
  } catch (err) {
    const elapsed = performance.now() - t0;
    if (err instanceof WorkflowUpdateFailedError && BASELINE_REFUSAL.test(err.cause?.message ?? '')) return elapsed;
    throw err;
  }
  throw new Error(`token ${tokenId}: the baseline Update was accepted; expected its validator to refuse it`);
}

interface RotationRun {
  tokenId: string;
  runId: string;
  callStartEpochMs: number;
  callEndEpochMs: number;
}

const SERIES = ['rotate', 'refused', 'noop'] as const;

export async function latencySection(rig: Rig, opts: LatencyOptions, settle: () => Promise<unknown>) {
  const { id: receiverId } = await addReceiver(rig, 'rotate');
  const subject = `usr_rotate_${rig.tag}`;
  rig.say(`  issuing ${opts.tokens} tokens (ttl 1h, one receiver)`);
  const { tokenIds } = await issueTokens(rig, opts.tokens, 8, () => ({ subject, receivers: [receiverId], ttl: '1h' }));
  const floor = opts.noopFloor ? await startNoopFloor(rig, opts.tokens) : undefined;
  await settle();

  const rotate: number[] = [];
  const baseline: number[] = [];
  const noop: number[] = [];
  const runs: RotationRun[] = [];
  const rounds = opts.warmup + opts.rotations;
  for (let r = 0; r < rounds; r++) {
    const recorded = r >= opts.warmup;
    let graceEndsMs = 0;
    const t0 = performance.now();
    for (let i = 0; i < tokenIds.length; i++) {
      const tokenId = tokenIds[i]!;
      // The series take turns going first, token by token and round by round.
      const shift = (r + i) % SERIES.length;
      const order = [...SERIES.slice(shift), ...SERIES.slice(0, shift)].filter((x) => x !== 'noop' || floor);
      for (const series of order) {
        if (series === 'noop') {
          await idleRun(rig, floor!.workflowId(i));
          const elapsed = await floor!.update(i);
          if (recorded) noop.push(elapsed);
          continue;
        }
        // Each call starts once the workflow is idle: the previous rotation's continue-as-new is done.
        const runId = await idleRun(rig, tokenWorkflowId(tokenId));
        if (series === 'refused') {
          const elapsed = await refusedUpdate(rig, tokenId);
          if (recorded) baseline.push(elapsed);
          continue;
        }
        const callStartEpochMs = Date.now();
        const start = performance.now();
        const outcome = await rig.warden.rotate(tokenId, { grace: opts.graceMs, reason: 'bench: rotation latency' });
        const elapsed = performance.now() - start;
        if (recorded) {
          rotate.push(elapsed);
          runs.push({ tokenId, runId, callStartEpochMs, callEndEpochMs: callStartEpochMs + elapsed });
        }
        if (outcome.previousValidUntil) graceEndsMs = Math.max(graceEndsMs, Date.parse(outcome.previousValidUntil));
      }
    }
    const roundSeconds = round((performance.now() - t0) / 1000, 1);
    // Every rotation finds the token with no credential in grace (as a monthly rotation does): wait
    // for this round's graces to end and their credential.revoked events to be delivered.
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, graceEndsMs + 100 - Date.now())));
    for (const tokenId of tokenIds) await idleRun(rig, tokenWorkflowId(tokenId));
    await settle();
    rig.say(`  round ${r + 1}/${rounds}${recorded ? '' : ' (warm-up)'}: ${roundSeconds} s`);
  }

  const rotateSummary = summarize(rotate);
  const baselineSummary = summarize(baseline);
  const noopSummary = noop.length > 0 ? summarize(noop) : null;
  const profile = await rotationProfile(rig, runs, opts.timeoutMs);
  return {
    tokens: opts.tokens,
    rotationsPerToken: opts.rotations,
    warmupRounds: opts.warmup,
    graceMs: opts.graceMs,
    order:
      'per token, rotate and the baseline alternate which goes first; each call starts once the workflow is idle; ' +
      'between rounds every grace ends and the stack is quiet',
    baselineIs:
      "retryPropagation Update sent to the active token's workflow, refused by its validator (nothing written to the store or history)",
    rotate: rotateSummary,
    baseline: baselineSummary,
    ratio: {
      p50: ratio(rotateSummary.p50Ms, baselineSummary.p50Ms),
      p99: ratio(rotateSummary.p99Ms, baselineSummary.p99Ms),
      mean: ratio(rotateSummary.meanMs, baselineSummary.meanMs),
    },
    noopIs: noopSummary
      ? "a bench-only workflow's Update whose handler returns at once (accepted and completed in one workflow task, written to history), run by a worker in the benchmark's process"
      : 'not measured (--no-floor)',
    noop: noopSummary,
    ratioToNoop: noopSummary
      ? {
          p50: ratio(rotateSummary.p50Ms, noopSummary.p50Ms),
          p99: ratio(rotateSummary.p99Ms, noopSummary.p99Ms),
          mean: ratio(rotateSummary.meanMs, noopSummary.meanMs),
        }
      : null,
    goalRatio: GOAL_RATIO,
    goalMet: rotateSummary.p50Ms / baselineSummary.p50Ms <= GOAL_RATIO,
    ...profile,
  };
}

/**
 * Where a rotation's time goes, and what a manual rotation costs in Temporal actions: read from the
 * runs each measured rotation closed (a rotation continues as new, so each run holds exactly one).
 */
async function rotationProfile(rig: Rig, runs: RotationRun[], timeoutMs: number) {
  const marks: Mark[][] = [];
  const actions: number[] = [];
  const events: number[] = [];
  let breakdown: Record<string, number> = {};
  for (const run of runs) {
    const handle = rig.client.workflow.getHandle(tokenWorkflowId(run.tokenId), run.runId);
    const history: History = await within(rig, handle.fetchHistory(), timeoutMs, `the history of ${run.runId}`);
    marks.push([
      { label: 'rotate call starts', at: run.callStartEpochMs },
      ...updateMarks(history),
      ...historyMarks(history).filter((m) => m.label.startsWith('rotateCredential')),
      { label: 'rotate call returns', at: run.callEndEpochMs },
    ]);
    const cost = cloudActions(countHistory(history));
    actions.push(cost.total);
    events.push(history.events?.length ?? 0);
    breakdown = cost.breakdown;
  }
  for (const m of marks) m.sort((a, b) => a.at - b.at);
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)] ?? null;
  return {
    rotateStepsP50Ms: Object.fromEntries(stepMedians(marks).map((s) => [s.step, s.p50Ms])),
    runOfOneRotation: {
      runs: runs.length,
      historyEventsP50: median(events),
      actionsP50: median(actions),
      actionsMax: actions.length ? Math.max(...actions) : null,
      lastBreakdown: breakdown,
    },
  };
}

function updateMarks(history: History): Mark[] {
  const marks: Mark[] = [];
  for (const event of history.events ?? []) {
    const at = epochMs(event.eventTime);
    if (event.workflowExecutionUpdateAcceptedEventAttributes) marks.push({ label: 'update accepted', at });
    if (event.workflowExecutionUpdateCompletedEventAttributes) marks.push({ label: 'update completed', at });
  }
  return marks;
}
