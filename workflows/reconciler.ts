import {
  ApplicationFailure,
  continueAsNew,
  patched,
  proxyActivities,
  proxyLocalActivities,
  setCurrentDetails,
} from '@temporalio/workflow';
import type { Activities } from '../activities/index.js';
import { RECONCILE_SETS, type ReconcileSet } from '../common/names.js';
import { md } from './lifecycle-state.js';
import {
  addToReconcileReport,
  emptyReconcileReport,
  type ReconcileAction,
  type ReconcileInput,
  type ReconcileReport,
} from '../common/messages.js';

/** Rows one activity heals unless the input says otherwise (a few seconds of work). */
export const DEFAULT_RECONCILE_BATCH = 100;
/**
 * How long one run walks each set: four sets stay well inside the schedule's 15-minute run timeout,
 * whatever one set holds, so no set starves the sets after it.
 */
export const DEFAULT_RECONCILE_SET_BUDGET_MS = 2 * 60_000;
/** Ids (and errors) a report lists per kind; the counts cover every row. */
export const RECONCILE_REPORT_SAMPLE = 20;

// Many small activities, each heartbeating: a lost one (its worker killed, Temporal down) is
// retried within the heartbeat timeout instead of blocking every later pass until a long timeout.
const { reconcilePage } = proxyActivities<Activities>({
  heartbeatTimeout: '30s',
  startToCloseTimeout: '2m',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 5 },
});

/** One short read: which sets have rows at all (most passes find none). */
const { reconcileSetsWithRows } = proxyLocalActivities<Activities>({
  startToCloseTimeout: '30s',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '10s', maximumAttempts: 5 },
});

/** Signs the audit chains' heads: one transaction, quick when not due (the last is recent). */
const { writeAuditCheckpoint } = proxyLocalActivities<Activities>({
  startToCloseTimeout: '5m',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '10s', maximumAttempts: 3 },
});

/**
 * A fresh pass first asks which sets hold rows, and walks only those: a quiet pass costs one local
 * activity instead of one page activity per set (each is a billed action on Temporal Cloud).
 */
const QUIET_PASS_CHECK = 'quiet-pass-check';
/** The pass's last run ends with an audit checkpoint (a tampered trail fails the pass). */
const AUDIT_CHECKPOINT = 'audit-checkpoint';
/** The pass's result (or failure details) opens with what it healed in words, read in the Web UI. */
const RECONCILE_SUMMARY = 'reconcile-summary';

/** Ids a summary names per kind (the report's lists hold more, its counts every row). */
const SUMMARY_IDS = 3;
/** Kept short in a summary: an error's first line is enough to know where to look. */
const SUMMARY_ERROR_CHARS = 120;

const HEALED: Record<Exclude<ReconcileAction, 'wedged'>, string> = {
  expired: 'overdue, killed as expired',
  signalled: 'dead, handed to their workflow',
  restarted: 'propagation restarted',
  started: 'workflow started',
};

function someIds(ids: string[], count: number): string {
  const named = ids.slice(0, SUMMARY_IDS);
  return count > named.length ? `${named.join(', ')} and ${count - named.length} more` : named.join(', ');
}

/**
 * What a pass did in a few lines an operator reads in the Web UI (the run's result and current
 * details): how many tokens of each kind were healed, naming the first few, what could not be, and the checkpoint.
 */
export function describeReconcileReport(report: ReconcileReport): string {
  const kinds = (Object.keys(HEALED) as (keyof typeof HEALED)[]).filter((kind) => report.counts[kind] > 0);
  const healed = kinds.reduce((sum, kind) => sum + report.counts[kind], 0);
  const lines = [
    healed === 0
      ? 'Nothing healed.'
      : `Healed ${healed} token(s). ` +
        kinds
          .map((kind) => `${HEALED[kind]}: ${report.counts[kind]} (${someIds(report[kind], report.counts[kind])})`)
          .join('; ') +
        '.',
  ];
  if (report.counts.wedged > 0)
    lines.push(
      `Stuck, needs an operator (its workflow cannot make progress): ${report.counts.wedged} (${someIds(report.wedged, report.counts.wedged)}).`,
    );
  if (report.counts.errors > 0) {
    const named = report.errors
      .slice(0, SUMMARY_IDS)
      .map((e) => `${e.tokenId}: ${(e.error.split('\n')[0] ?? '').slice(0, SUMMARY_ERROR_CHARS)}`);
    const more = report.counts.errors - named.length;
    lines.push(
      `Not healed, retried next pass: ${report.counts.errors} (${named.join('; ')}${more > 0 ? `; and ${more} more` : ''}).`,
    );
  }
  const checkpoint = report.auditCheckpoint;
  if (checkpoint?.written)
    lines.push(`Audit checkpoint ${checkpoint.seq} signed (${checkpoint.chains} chains, ${checkpoint.events} events).`);
  else if (checkpoint) lines.push(`Audit checkpoint not written (${checkpoint.skipped ?? 'not due'}).`);
  return lines.join(' ');
}

/**
 * Run by a Temporal Schedule every minute: heals whatever a crash left between store and workflows.
 * Each run walks every set for at most its budget; a set cut off resumes in a new run (continue-as-new)
 * until every set was walked to its end. Rows it could not heal then fail the pass, so a failure shows
 * in the Schedule's recent actions and the Web UI instead of hiding in a result.
 */
export async function reconcile(input?: ReconcileInput): Promise<ReconcileReport> {
  const batchSize = input?.batchSize ?? DEFAULT_RECONCILE_BATCH;
  const setBudgetMs = input?.setBudgetMs ?? DEFAULT_RECONCILE_SET_BUDGET_MS;
  const report = input?.carried?.report ?? emptyReconcileReport();
  const walked = new Set<ReconcileSet>(input?.carried?.walked ?? []);
  if (!input?.carried && patched(QUIET_PASS_CHECK)) {
    const withRows = await reconcileSetsWithRows.executeWithOptions({ summary: 'which sets have rows' }, [
      input?.graceMs !== undefined ? { graceMs: input.graceMs } : {},
    ]);
    for (const set of RECONCILE_SETS) if (!withRows.includes(set)) walked.add(set);
  }
  const resumeAfter: Partial<Record<ReconcileSet, string>> = {};
  for (const set of RECONCILE_SETS) {
    if (walked.has(set)) continue;
    let afterId: string | null = input?.carried?.resumeAfter[set] ?? null;
    const setStarted = Date.now();
    do {
      // Current details only answer the UI's query: no history event, nothing to replay.
      setCurrentDetails(
        `Walking the **${set}** set after ${afterId ?? 'the start'}. So far: ${md(describeReconcileReport(report))}`,
      );
      const page = await reconcilePage.executeWithOptions(
        { summary: `heal ${set} rows after ${afterId ?? 'the start'}` },
        [
          {
            set,
            afterId,
            batchSize,
            sampleSize: RECONCILE_REPORT_SAMPLE,
            ...(input?.graceMs !== undefined ? { graceMs: input.graceMs } : {}),
          },
        ],
      );
      addToReconcileReport(report, page.report, RECONCILE_REPORT_SAMPLE);
      afterId = page.nextAfterId;
    } while (afterId !== null && Date.now() - setStarted < setBudgetMs);
    if (afterId === null) walked.add(set);
    else resumeAfter[set] = afterId;
  }
  if (walked.size < RECONCILE_SETS.length) {
    await continueAsNew<typeof reconcile>({
      version: 1,
      ...(input?.graceMs !== undefined ? { graceMs: input.graceMs } : {}),
      ...(input?.batchSize !== undefined ? { batchSize: input.batchSize } : {}),
      ...(input?.setBudgetMs !== undefined ? { setBudgetMs: input.setBudgetMs } : {}),
      carried: { walked: [...walked], resumeAfter, report },
    });
  }
  if (patched(AUDIT_CHECKPOINT)) {
    report.auditCheckpoint = await writeAuditCheckpoint.executeWithOptions(
      { summary: "sign the audit chains' heads" },
      [],
    );
  }
  const summary = describeReconcileReport(report);
  // Row errors quote other systems' text: escaped, so the UI shows it and never renders or fetches it.
  setCurrentDetails(md(summary));
  const result: ReconcileReport = patched(RECONCILE_SUMMARY) ? { summary, ...report } : report;
  if (report.counts.errors > 0) {
    const first = report.errors[0]!;
    throw ApplicationFailure.create({
      type: 'ReconcilePassIncomplete',
      message:
        `${report.counts.errors} row(s) could not be healed this pass (first: ${first.tokenId}: ${first.error})`.slice(
          0,
          500,
        ),
      nonRetryable: true,
      details: [result],
    });
  }
  return result;
}
