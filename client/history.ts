/**
 * A token's whole life as a timeline, read from Temporal's history of its workflow: every run of
 * the workflow id (continued-as-new runs, and later runs a revoke or the reconciler opened), each
 * payload decoded through the client's data converter (its codecs, then its payload and failure
 * converters). When Temporal no longer holds a run (retention, deletion), the store's audit events
 * stand in for what is missing, and the timeline says so. See README "History of a token" for
 * every entry kind.
 */
import type { Client } from '@temporalio/client';
import type { LoadedDataConverter, Payload } from '@temporalio/common';
import {
  decodeArrayFromPayloads,
  decodeOptionalFailureToOptionalError,
  decodeUserMetadata,
} from '@temporalio/common/lib/internal-non-workflow/index.js';
import type { SerializationContext } from '@temporalio/common/lib/converter/serialization-context.js';
import { optionalTsToMs } from '@temporalio/common/lib/time.js';
import proto from '@temporalio/proto';
import type { StorePool } from '../common/db.js';
import { RECEIVER_REJECTED, tokenWorkflowId } from '../common/names.js';
import { withCallDeadline } from '../common/temporal.js';
import { listDeliveryReports, readAudit, type TokenRecord } from '../common/store/index.js';

const { temporal } = proto;
type HistoryEvent = proto.temporal.api.history.v1.IHistoryEvent;
const EventType = temporal.api.enums.v1.EventType;

/**
 * One entry of the timeline. Every entry has `at` (ISO 8601), `kind` and `source`: `history` (read
 * from the workflow's history; `runId` names the run) or `store` (the central store: its audit
 * events, or the delivery rows as they are now). The other fields depend on the kind (README).
 */
export interface HistoryEntry {
  at: string;
  kind: HistoryEntryKind;
  source: 'history' | 'store';
  runId?: string;
  [field: string]: unknown;
}

export const HISTORY_ENTRY_KINDS = [
  'issued',
  'run.started',
  'run.continued',
  'run.ended',
  'completed',
  'revoke.requested',
  'suspicious.reported',
  'policy.changed',
  'signal',
  'operator',
  'operator.done',
  'killed',
  'delivery',
  'escalated',
  'propagation',
  'forced',
  'rotated',
  'timer.started',
  'timer.fired',
  'timer.cancelled',
  'activity',
  'workflow-task.failed',
  'history.unavailable',
  'history.partial',
  'audit',
  'delivery.state',
] as const;
export type HistoryEntryKind = (typeof HISTORY_ENTRY_KINDS)[number];

/** What reading a token's history needs: the Temporal client (its data converter) and the store. */
export interface HistoryDeps {
  client: Client;
  pool: StorePool;
}

/** One run of the token's workflow id, with its events (raw, as the server holds them). */
export interface WorkflowRun {
  runId: string;
  events: HistoryEvent[];
  /** Of a run still open: its activities in flight, as the server describes them (attempt, last failure). */
  pendingActivities?: proto.temporal.api.workflow.v1.IPendingActivityInfo[];
}

/**
 * The token's timeline: every retained run of its workflow, oldest first, then the store's delivery
 * rows as they are now. Runs Temporal no longer holds are stood in for by the store's audit events.
 */
export async function tokenHistory(deps: HistoryDeps, token: TokenRecord): Promise<HistoryEntry[]> {
  const workflowId = tokenWorkflowId(token.id);
  let runs: WorkflowRun[];
  let unreadable: string | undefined;
  try {
    runs = await fetchRuns(deps.client, workflowId);
  } catch (err) {
    // Temporal down or refusing: the operator still gets the store's account, and is told why.
    if (grpcCode(err) === undefined) throw err;
    runs = [];
    unreadable = err instanceof Error ? err.message : String(err);
  }
  const audit = await auditEntries(deps.pool, token.id);
  const entries: HistoryEntry[] = [];
  if (runs.length === 0) {
    entries.push({
      at: audit[0]?.at ?? token.issuedAt,
      kind: 'history.unavailable',
      source: 'store',
      reason:
        unreadable !== undefined
          ? `Temporal could not be read (${unreadable}): the store's audit events follow`
          : `Temporal holds no history of ${workflowId} (its retention has passed, or it was deleted): the store's audit events follow`,
    });
    entries.push(...audit);
  } else {
    const converter = deps.client.options.loadedDataConverter;
    const fromHistory = await renderRuns(converter, deps.client.options.namespace, workflowId, runs);
    entries.push(...standIn(workflowId, runs, fromHistory, audit));
  }
  entries.push(...(await deliveryStates(deps.pool, token.id)));
  return entries;
}

/**
 * The history's entries with the store's audit events of the times no retained run covers (a run
 * Temporal no longer holds, or a change made while no run was open), each such stretch preceded
 * by a `history.partial` entry that says which. Audit events inside a run are left out: the run's
 * own entries tell them. The issue's record before the issue's run is the `issued` entry.
 */
function standIn(
  workflowId: string,
  runs: WorkflowRun[],
  fromHistory: HistoryEntry[],
  audit: HistoryEntry[],
): HistoryEntry[] {
  const spans = runs.map((run) => ({
    from: eventMs(run.events[0]),
    to: isClosed(run) ? eventMs(run.events.at(-1)) : Number.POSITIVE_INFINITY,
  }));
  const firstIsIssue = fromHistory[0]?.kind === 'issued';
  const outside = audit.filter((e) => {
    const ms = Date.parse(e.at);
    if (spans.some((span) => ms >= span.from && ms <= span.to)) return false;
    return !(firstIsIssue && ms < spans[0]!.from && ISSUE_AUDIT_KINDS.has(e.event as string));
  });
  const merged = [...fromHistory, ...outside]
    .map((entry, index) => ({ entry, index, ms: Date.parse(entry.at) }))
    .sort((a, b) => a.ms - b.ms || a.index - b.index)
    .map(({ entry }) => entry);
  const out: HistoryEntry[] = [];
  for (const [i, entry] of merged.entries()) {
    const startsStretch = entry.source === 'store' && (i === 0 || merged[i - 1]!.source !== 'store');
    if (startsStretch) {
      const next = merged.slice(i).find((e) => e.source === 'history');
      const beforeAnyRun = !merged.slice(0, i).some((e) => e.source === 'history');
      const reason =
        next?.kind === 'run.continued' && next.previousRunRetained === false
          ? `Temporal no longer holds the run(s) of ${workflowId} before ${next.at} (retention or deletion): the store's audit events stand in`
          : beforeAnyRun && next !== undefined
            ? `Temporal holds no run of ${workflowId} before ${next.at} (not started yet, or dropped by retention): the store's audit events stand in`
            : `recorded in the store while no run of ${workflowId} was open: the store's audit events`;
      out.push({ at: entry.at, kind: 'history.partial', source: 'store', reason });
    }
    out.push(entry);
  }
  return out;
}

/** The audit kind written when a token comes under management (issue or import), before its workflow starts. */
const ISSUE_AUDIT_KINDS = new Set(['token.issued']);

/**
 * Every run of the workflow id Temporal still holds: those its visibility lists, and any run a
 * continue-as-new points to that visibility has not listed yet. Oldest first.
 */
export async function fetchRuns(client: Client, workflowId: string): Promise<WorkflowRun[]> {
  const runIds = new Set<string>();
  // Token ids are validated (tok_ and hex digits): nothing in them needs escaping in the query.
  await withCallDeadline(client, async () => {
    for await (const execution of client.workflow.list({ query: `WorkflowId = '${workflowId}'` })) {
      runIds.add(execution.runId);
    }
  });
  const runs = new Map<string, WorkflowRun>();
  const pending = [...runIds];
  // The latest run, in case visibility lags behind its start.
  const latest = await fetchRun(client, workflowId, undefined);
  if (latest) runs.set(latest.runId, latest);
  while (pending.length > 0) {
    const runId = pending.shift()!;
    if (runs.has(runId)) continue;
    const run = await fetchRun(client, workflowId, runId);
    if (!run) continue;
    runs.set(runId, run);
  }
  // Follow continue-as-new links visibility did not list.
  for (const run of [...runs.values()]) {
    let next = continuedTo(run);
    while (next && !runs.has(next)) {
      const found = await fetchRun(client, workflowId, next);
      if (!found) break;
      runs.set(next, found);
      next = continuedTo(found);
    }
  }
  const sorted = [...runs.values()].sort((a, b) => eventMs(a.events[0]) - eventMs(b.events[0]));
  const open = sorted.filter((run) => !isClosed(run));
  for (const run of open) {
    try {
      const described = await withCallDeadline(client, () =>
        client.workflowService.describeWorkflowExecution({
          namespace: client.options.namespace,
          execution: { workflowId, runId: run.runId },
        }),
      );
      run.pendingActivities = described.pendingActivities ?? [];
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }
  return sorted;
}

const CLOSE_EVENTS = new Set<number>([
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
  EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
]);
const isClosed = (run: WorkflowRun): boolean => CLOSE_EVENTS.has(run.events.at(-1)?.eventType ?? 0);

function continuedTo(run: WorkflowRun): string | undefined {
  const last = run.events.at(-1);
  return last?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId ?? undefined;
}

/** One run's events; undefined when Temporal does not hold it (never existed, or deleted). */
async function fetchRun(
  client: Client,
  workflowId: string,
  runId: string | undefined,
): Promise<WorkflowRun | undefined> {
  const events: HistoryEvent[] = [];
  let nextPageToken: Uint8Array | undefined;
  let resolvedRunId = runId;
  try {
    if (resolvedRunId === undefined) {
      const described = await withCallDeadline(client, () => client.workflow.getHandle(workflowId).describe());
      resolvedRunId = described.runId;
    }
    do {
      const page = nextPageToken;
      const response = await withCallDeadline(client, () =>
        client.workflowService.getWorkflowExecutionHistory({
          namespace: client.options.namespace,
          execution: { workflowId, runId: resolvedRunId },
          ...(page ? { nextPageToken: page } : {}),
        }),
      );
      events.push(...(response.history?.events ?? []));
      nextPageToken = response.nextPageToken?.length ? response.nextPageToken : undefined;
    } while (nextPageToken);
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
  return events.length > 0 ? { runId: resolvedRunId, events } : undefined;
}

/** The gRPC status of a failed Temporal call: on the error (a raw call) or its cause (the SDK's ServiceError). */
function grpcCode(err: unknown): number | undefined {
  for (let e = err; e instanceof Error; e = e.cause) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'number') return code;
  }
  return undefined;
}

/** The server's NOT_FOUND (gRPC code 5), as a raw call or the SDK's WorkflowNotFoundError. */
function isNotFound(err: unknown): boolean {
  return (err instanceof Error && err.name === 'WorkflowNotFoundError') || grpcCode(err) === 5;
}

const eventMs = (event: HistoryEvent | undefined): number => optionalTsToMs(event?.eventTime) ?? 0;
const iso = (ms: number): string => new Date(ms).toISOString();

// ---------------------------------------------------------------- rendering

/** Decoded values: a payload the converter cannot read is shown as such, never fails the timeline. */
async function decodeAll(
  converter: LoadedDataConverter,
  payloads: Payload[] | null | undefined,
  context: SerializationContext,
): Promise<unknown[]> {
  if (!payloads?.length) return [];
  try {
    return await decodeArrayFromPayloads(converter, payloads, context);
  } catch (err) {
    return payloads.map(() => ({ undecodable: err instanceof Error ? err.name : 'error' }));
  }
}

async function decodeOne(
  converter: LoadedDataConverter,
  payloads: Payload[] | null | undefined,
  context: SerializationContext,
): Promise<unknown> {
  return (await decodeAll(converter, payloads, context))[0];
}

/** A failure's message and type (through the failure converter), and its cause's message. */
interface FailureText {
  message: string;
  type: string | null;
  cause: string | null;
}

async function decodeFailureText(
  converter: LoadedDataConverter,
  failure: proto.temporal.api.failure.v1.IFailure | null | undefined,
  context: SerializationContext,
): Promise<FailureText | null> {
  if (!failure) return null;
  try {
    const error = await decodeOptionalFailureToOptionalError(converter, failure, context);
    if (!error) return null;
    const type = (error as { type?: unknown }).type;
    return {
      message: error.message,
      type: typeof type === 'string' ? type : null,
      cause: error.cause instanceof Error ? error.cause.message : null,
    };
  } catch (err) {
    return { message: `undecodable failure (${err instanceof Error ? err.name : 'error'})`, type: null, cause: null };
  }
}

async function summaryOf(
  converter: LoadedDataConverter,
  event: HistoryEvent,
  context: SerializationContext,
): Promise<string | undefined> {
  if (!event.userMetadata?.summary) return undefined;
  try {
    return (await decodeUserMetadata(converter, event.userMetadata, context)).staticSummary;
  } catch {
    return undefined;
  }
}

const record = (value: unknown): Record<string, unknown> =>
  value && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : {};
const text = (value: unknown): string | undefined => (typeof value === 'string' ? value : undefined);
const defined = <T extends Record<string, unknown>>(fields: T): Partial<T> =>
  Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined)) as Partial<T>;

/** "receiver x answered HTTP 503" → 503: the delivery activity's failures name the answer so. */
const statusInMessage = (message: string | undefined): number | null => {
  const m = message ? /answered HTTP (\d{3})\b/.exec(message) : null;
  return m ? Number(m[1]) : null;
};

/** A scheduled activity (or a local activity's marker) and what closing it needs to render. */
interface ActivityCall {
  name: string;
  activityId: string;
  local: boolean;
  input: Record<string, unknown>;
  summary: string | undefined;
  /** Temporal's attempt count; null when history has not recorded it (no start event yet). */
  attempt: number | null;
  lastFailure: FailureText | null;
  scheduledMs: number;
  /** When the workflow asked to cancel it (an operator's retry or force interrupts a delivery). */
  cancelRequestedMs?: number;
  closed: boolean;
}

/** The timeline of the given runs (oldest first): one entry per event a person cares about. */
export async function renderRuns(
  converter: LoadedDataConverter,
  namespace: string,
  workflowId: string,
  runs: WorkflowRun[],
): Promise<HistoryEntry[]> {
  const entries: HistoryEntry[] = [];
  const workflowContext: SerializationContext = { type: 'workflow', namespace, workflowId };
  const activityContext = (activityId: string, isLocal: boolean): SerializationContext => ({
    type: 'activity',
    namespace,
    activityId,
    workflowId,
    isLocal,
  });
  const knownRuns = new Set(runs.map((r) => r.runId));

  for (const [index, run] of runs.entries()) {
    const activities = new Map<string, ActivityCall>();
    const timers = new Map<string, string | undefined>();
    const updates = new Map<string, string>();
    let revocationEventId: string | undefined;
    const push = (event: HistoryEvent, kind: HistoryEntryKind, fields: Record<string, unknown>) =>
      entries.push({ at: iso(eventMs(event)), kind, source: 'history', runId: run.runId, ...fields });

    const closeActivity = async (event: HistoryEvent, call: ActivityCall, outcome: ActivityOutcome) => {
      call.closed = true;
      for (const { kind, ...fields } of renderActivity(call, outcome, revocationEventId)) {
        push(event, kind as HistoryEntryKind, fields);
      }
    };

    for (const event of run.events) {
      const type = event.eventType ?? EventType.EVENT_TYPE_UNSPECIFIED;
      switch (type) {
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: {
          const a = event.workflowExecutionStartedEventAttributes!;
          const input = record(await decodeOne(converter, a.input?.payloads, workflowContext));
          revocationEventId = text(input.revocationEventId);
          const policy = text(record(input.policy).name);
          const previous = a.continuedExecutionRunId || undefined;
          if (previous) {
            push(event, 'run.continued', {
              previousRunId: previous,
              previousRunRetained: knownRuns.has(previous),
              expiresAt: text(input.expiresAt),
              ...defined({ policy }),
            });
          } else if (index === 0 && input.carried === undefined && !startedToRevoke(run)) {
            push(event, 'issued', {
              subject: text(input.subject),
              receivers: Array.isArray(input.receivers) ? input.receivers : [],
              expiresAt: text(input.expiresAt),
              ...defined({ policy }),
            });
          } else {
            push(event, 'run.started', {
              identity: a.identity || null,
              why: startedToRevoke(run)
                ? 'started with a revoke (a revoke or the reconciler found no running workflow)'
                : 'started again (the reconciler found no running workflow)',
              expiresAt: text(input.expiresAt),
            });
          }
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: {
          const a = event.workflowExecutionSignaledEventAttributes!;
          const payload = record(await decodeOne(converter, a.input?.payloads, workflowContext));
          const identity = a.identity || null;
          switch (a.signalName) {
            case 'revoke':
              push(event, 'revoke.requested', {
                reason: text(payload.reason) ?? null,
                actor: text(payload.actor) ?? null,
                initiatingEntity: text(payload.initiatingEntity) ?? null,
                ...defined({ correlationId: text(payload.correlationId) }),
                // Still revokes (reason `unspecified`, audited as signal.malformed).
                ...(text(payload.reason) === undefined ? { malformed: true } : {}),
                identity,
              });
              break;
            case 'reportSuspicious':
              push(event, 'suspicious.reported', {
                reason: text(payload.reason) ?? null,
                actor: text(payload.actor) ?? null,
                ...defined({ reportId: text(payload.reportId) }),
                identity,
              });
              break;
            case 'policyChanged':
              push(event, 'policy.changed', {
                ...defined({ policy: text(payload.policy), operationId: text(payload.operationId) }),
                identity,
              });
              break;
            default:
              push(event, 'signal', { name: a.signalName ?? null, input: payload, identity });
          }
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: {
          const a = event.workflowExecutionUpdateAcceptedEventAttributes!;
          const name = a.acceptedRequest?.input?.name ?? '(unnamed)';
          const updateId = a.acceptedRequest?.meta?.updateId ?? '';
          updates.set(updateId, name);
          const request = record(await decodeOne(converter, a.acceptedRequest?.input?.args?.payloads, workflowContext));
          const { reason, actor, ...rest } = request;
          push(event, 'operator', {
            action: name,
            updateId,
            actor: text(actor) ?? null,
            reason: text(reason) ?? null,
            request: rest,
            identity: a.acceptedRequest?.meta?.identity || null,
          });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED: {
          const a = event.workflowExecutionUpdateCompletedEventAttributes!;
          const updateId = a.meta?.updateId ?? '';
          const action = updates.get(updateId) ?? null;
          if (a.outcome?.failure) {
            const failure = await decodeFailureText(converter, a.outcome.failure, workflowContext);
            push(event, 'operator.done', { action, updateId, error: failure?.message ?? null });
          } else {
            const result = await decodeOne(converter, a.outcome?.success?.payloads, workflowContext);
            push(event, 'operator.done', { action, updateId, result: result ?? null });
          }
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: {
          const a = event.activityTaskScheduledEventAttributes!;
          const activityId = a.activityId ?? '';
          activities.set(String(event.eventId), {
            name: a.activityType?.name ?? '(unnamed)',
            activityId,
            local: false,
            input: record(await decodeOne(converter, a.input?.payloads, activityContext(activityId, false))),
            summary: await summaryOf(converter, event, workflowContext),
            attempt: null,
            lastFailure: null,
            scheduledMs: eventMs(event),
            closed: false,
          });
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED: {
          const a = event.activityTaskStartedEventAttributes!;
          const call = activities.get(String(a.scheduledEventId));
          if (call) {
            call.attempt = a.attempt ?? 1;
            call.lastFailure = await decodeFailureText(
              converter,
              a.lastFailure,
              activityContext(call.activityId, false),
            );
          }
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: {
          const a = event.activityTaskCompletedEventAttributes!;
          const call = activities.get(String(a.scheduledEventId));
          if (call) {
            const result = await decodeOne(converter, a.result?.payloads, activityContext(call.activityId, false));
            await closeActivity(event, call, { result });
          }
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: {
          const a = event.activityTaskFailedEventAttributes!;
          const call = activities.get(String(a.scheduledEventId));
          if (call) {
            const failure = await decodeFailureText(converter, a.failure, activityContext(call.activityId, false));
            await closeActivity(event, call, { failure, how: 'failed' });
          }
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: {
          const a = event.activityTaskTimedOutEventAttributes!;
          const call = activities.get(String(a.scheduledEventId));
          if (call) {
            const failure = await decodeFailureText(converter, a.failure, activityContext(call.activityId, false));
            await closeActivity(event, call, { failure, how: 'timed-out' });
          }
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED: {
          const call = activities.get(String(event.activityTaskCancelRequestedEventAttributes?.scheduledEventId));
          if (call) call.cancelRequestedMs = eventMs(event);
          break;
        }
        case EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: {
          const a = event.activityTaskCanceledEventAttributes!;
          const call = activities.get(String(a.scheduledEventId));
          if (call) await closeActivity(event, call, { failure: null, how: 'cancelled' });
          break;
        }
        case EventType.EVENT_TYPE_MARKER_RECORDED: {
          const a = event.markerRecordedEventAttributes!;
          if (a.markerName !== 'core_local_activity') break;
          const data = record(await decodeOne(converter, a.details?.data?.payloads, workflowContext));
          const activityId = String(data.activity_id ?? '');
          const call: ActivityCall = {
            name: text(data.activity_type) ?? '(unnamed)',
            activityId,
            local: true,
            input: {},
            summary: await summaryOf(converter, event, workflowContext),
            attempt: typeof data.attempt === 'number' ? data.attempt : 1,
            lastFailure: null,
            scheduledMs: eventMs(event),
            closed: false,
          };
          if (a.failure) {
            const failure = await decodeFailureText(converter, a.failure, activityContext(activityId, true));
            await closeActivity(event, call, { failure, how: 'failed' });
          } else {
            const result = await decodeOne(converter, a.details?.result?.payloads, activityContext(activityId, true));
            await closeActivity(event, call, { result });
          }
          break;
        }
        case EventType.EVENT_TYPE_TIMER_STARTED: {
          const a = event.timerStartedEventAttributes!;
          const summary = await summaryOf(converter, event, workflowContext);
          timers.set(a.timerId ?? '', summary);
          const ms = optionalTsToMs(a.startToFireTimeout) ?? 0;
          push(event, 'timer.started', {
            timerId: a.timerId ?? '',
            summary: summary ?? null,
            fireAt: iso(eventMs(event) + ms),
          });
          break;
        }
        case EventType.EVENT_TYPE_TIMER_FIRED: {
          const timerId = event.timerFiredEventAttributes?.timerId ?? '';
          push(event, 'timer.fired', { timerId, summary: timers.get(timerId) ?? null });
          break;
        }
        case EventType.EVENT_TYPE_TIMER_CANCELED: {
          const timerId = event.timerCanceledEventAttributes?.timerId ?? '';
          push(event, 'timer.cancelled', { timerId, summary: timers.get(timerId) ?? null });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED: {
          const a = event.workflowTaskFailedEventAttributes!;
          const failure = await decodeFailureText(converter, a.failure, workflowContext);
          const cause = temporal.api.enums.v1.WorkflowTaskFailedCause[a.cause ?? 0] ?? String(a.cause);
          push(event, 'workflow-task.failed', {
            cause: cause.replace(/^WORKFLOW_TASK_FAILED_CAUSE_/, ''),
            message: failure?.message ?? null,
          });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: {
          const a = event.workflowExecutionCompletedEventAttributes!;
          const result = record(await decodeOne(converter, a.result?.payloads, workflowContext));
          push(event, 'completed', {
            status: text(result.status) ?? null,
            propagation: text(result.propagation) ?? null,
            forced: result.forced === true,
            receivers: (Array.isArray(result.deliveries) ? result.deliveries : []).map((d) => {
              const row = record(d);
              return { receiverId: row.receiverId, status: row.status, attempts: row.attempts };
            }),
          });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: {
          // The next run's start says it: `run.continued`.
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: {
          const a = event.workflowExecutionFailedEventAttributes!;
          const failure = await decodeFailureText(converter, a.failure, workflowContext);
          push(event, 'run.ended', { status: 'failed', reason: failure?.message ?? null });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: {
          const a = event.workflowExecutionTerminatedEventAttributes!;
          push(event, 'run.ended', { status: 'terminated', reason: a.reason || null, identity: a.identity || null });
          break;
        }
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED:
          push(event, 'run.ended', { status: 'cancelled', reason: null });
          break;
        case EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
          push(event, 'run.ended', { status: 'timed-out', reason: null });
          break;
        default:
          // Workflow tasks, patch markers, search attribute upserts: the machinery, not the story.
          break;
      }
    }
    // Activities the run's history does not close: interrupted (a cancel was asked and the run went
    // on without waiting), or still in flight (the server's description gives the attempt so far).
    for (const call of activities.values()) {
      if (call.closed) continue;
      const pending = run.pendingActivities?.find((p) => p.activityId === call.activityId);
      let outcome: ActivityOutcome;
      let atMs: number;
      if (call.cancelRequestedMs !== undefined) {
        outcome = { failure: null, how: 'interrupted' };
        atMs = call.cancelRequestedMs;
      } else if (pending) {
        call.attempt = pending.attempt ?? call.attempt;
        const context = activityContext(call.activityId, false);
        outcome = {
          failure: await decodeFailureText(converter, pending.lastFailure, context),
          how: 'in-flight',
          nextAttemptAt: optionalTsToMs(pending.nextAttemptScheduleTime),
        };
        atMs = optionalTsToMs(pending.lastStartedTime) ?? call.scheduledMs;
      } else if (!isClosed(run)) {
        outcome = { failure: null, how: 'in-flight' };
        atMs = call.scheduledMs;
      } else continue;
      for (const { kind, ...fields } of renderActivity(call, outcome, revocationEventId)) {
        entries.push({ at: iso(atMs), kind: kind as HistoryEntryKind, source: 'history', runId: run.runId, ...fields });
      }
    }
  }
  // Event order within a run, but commands carry their task's completion time: by time, stably.
  return entries
    .map((entry, index) => ({ entry, index, ms: Date.parse(entry.at) }))
    .sort((a, b) => a.ms - b.ms || a.index - b.index)
    .map(({ entry }) => entry);
}

/** Whether the run was opened by a revoke's signal-with-start (its first signal precedes any task). */
function startedToRevoke(run: WorkflowRun): boolean {
  for (const event of run.events.slice(1)) {
    if (event.eventType === EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) {
      return event.workflowExecutionSignaledEventAttributes?.signalName === 'revoke';
    }
    if (event.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED) return false;
  }
  return false;
}

/** How a delivery or other activity ended, or that it has not: `in-flight` (retrying) or `interrupted`. */
type ActivityEnding = {
  failure: FailureText | null;
  how: 'failed' | 'timed-out' | 'cancelled' | 'interrupted' | 'in-flight';
  nextAttemptAt?: number | undefined;
};
type ActivityOutcome = { result: unknown } | ActivityEnding;

/** The entries one closed activity makes (a delivery to several receivers makes one per receiver). */
function renderActivity(
  call: ActivityCall,
  outcome: ActivityOutcome,
  revocationEventId: string | undefined,
): Record<string, unknown>[] {
  const failed = 'how' in outcome ? outcome : undefined;
  const result = 'result' in outcome ? outcome.result : undefined;
  const attempts = { activityAttempts: call.attempt, previousError: call.lastFailure?.message ?? null };
  switch (call.name) {
    case 'deliverRevocation': {
      const eventId = text(call.input.eventId) ?? null;
      const receiverId = text(call.input.receiverId) ?? null;
      const base = { receiverId, eventId, credentialEvent: eventId !== null && eventId !== revocationEventId };
      if (failed) return [{ kind: 'delivery', ...base, ...failedDelivery(failed), ...attempts, storeAttempts: null }];
      return [{ kind: 'delivery', ...base, ...settledDelivery(record(result)), ...attempts }];
    }
    case 'deliverRevocationToAll': {
      const eventId = text(call.input.eventId) ?? null;
      const base = { eventId, credentialEvent: eventId !== null && eventId !== revocationEventId };
      if (failed) {
        // The activity itself ended (its worker lost, a timeout): every receiver in it is retried alone.
        const receiverIds = Array.isArray(call.input.receiverIds) ? call.input.receiverIds : [];
        return receiverIds.map((receiverId) => ({
          kind: 'delivery',
          receiverId,
          ...base,
          ...failedDelivery(failed),
          ...attempts,
          storeAttempts: null,
        }));
      }
      return (Array.isArray(result) ? result : []).map((o) => {
        const outcome = record(o);
        const row = record(outcome.row);
        const receiverId = text(outcome.receiverId) ?? null;
        if (outcome.kind === 'result')
          return { kind: 'delivery', receiverId, ...base, ...settledDelivery(row), ...attempts };
        const message = text(outcome.message) ?? null;
        return {
          kind: 'delivery',
          receiverId,
          ...base,
          outcome: outcome.kind === 'rejected' ? 'rejected' : 'failed',
          statusCode:
            typeof row.lastStatusCode === 'number' ? row.lastStatusCode : statusInMessage(message ?? undefined),
          error: message,
          ...attempts,
          storeAttempts: typeof row.attempts === 'number' ? row.attempts : null,
        };
      });
    }
    case 'killToken':
    case 'killAndLoad': {
      if (failed) return [genericActivity(call, failed)];
      const res = record(result);
      const kill = record(call.name === 'killAndLoad' ? res.kill : res);
      const token = record(kill.token);
      // Not yet expired on the database clock: nothing died.
      if (typeof kill.notYetExpiredMs === 'number') {
        return [{ kind: 'activity', name: call.name, summary: 'expiry: the database clock is behind, not dead yet' }];
      }
      return [
        {
          kind: 'killed',
          status: text(token.status) ?? null,
          by: text(token.revokedBy) ?? null,
          reason: text(token.revokeReason) ?? null,
          initiatingEntity: text(token.initiatingEntity) ?? null,
          diedAt: text(token.revokedAt) ?? null,
          // False: the token was already dead (the caller's kill committed first); these are its facts.
          byThisRun: kill.changed === true,
        },
      ];
    }
    case 'setPropagation': {
      if (failed) return [genericActivity(call, failed)];
      // Local calls record no input: the state comes from the row the store returned.
      const state = text(call.input.state) ?? text(record(result).propagation) ?? null;
      const detail = record(call.input.detail);
      if (state === 'stuck') {
        return [{ kind: 'escalated', receivers: Array.isArray(detail.receivers) ? detail.receivers : [] }];
      }
      return [
        {
          kind: 'propagation',
          state,
          ...defined({ forced: typeof detail.forced === 'boolean' ? detail.forced : undefined }),
        },
      ];
    }
    case 'forceCompleteDeliveries': {
      if (failed) return [genericActivity(call, failed)];
      return [
        {
          kind: 'forced',
          receivers: Array.isArray(result) ? result : [],
          actor: text(call.input.actor) ?? null,
          reason: text(call.input.reason) ?? null,
        },
      ];
    }
    case 'rotateCredential':
    case 'rotateAutomatically': {
      if (failed) return [genericActivity(call, failed)];
      const res = record(result);
      return [
        {
          kind: 'rotated',
          automatic: call.name === 'rotateAutomatically',
          credentialId: text(res.credentialId) ?? null,
          previousCredentialId: text(res.previousCredentialId) ?? null,
          previousValidUntil: text(res.previousValidUntil) ?? null,
          ...defined({
            actor: text(call.input.actor),
            reason: text(call.input.reason) ?? text(call.input.why),
          }),
        },
      ];
    }
    case 'loadPropagation':
      // A read of the worker's timing and the delivery rows: its findings show in the deliveries.
      return [];
    default:
      return [genericActivity(call, failed)];
  }
}

function genericActivity(call: ActivityCall, failed: ActivityEnding | undefined): Record<string, unknown> {
  return {
    kind: 'activity',
    name: call.name,
    summary: call.summary ?? null,
    outcome: failed ? failed.how : 'completed',
    activityAttempts: call.attempt,
    ...(failed ? { error: failed.failure?.message ?? null } : {}),
  };
}

/** A delivery activity that returned the store's row: its last attempt settled it (or it was already). */
function settledDelivery(row: Record<string, unknown>): Record<string, unknown> {
  return {
    outcome: text(row.status) ?? null,
    statusCode: typeof row.lastStatusCode === 'number' ? row.lastStatusCode : null,
    error: text(row.lastError) ?? null,
    storeAttempts: typeof row.attempts === 'number' ? row.attempts : null,
  };
}

function failedDelivery(failed: ActivityEnding) {
  const message = failed.failure?.message ?? null;
  const outcome =
    failed.how === 'cancelled' || failed.how === 'interrupted'
      ? 'interrupted'
      : failed.how === 'in-flight'
        ? 'in-flight'
        : failed.how === 'timed-out'
          ? 'timed-out'
          : failed.failure?.type === RECEIVER_REJECTED
            ? 'rejected'
            : 'failed';
  return {
    outcome,
    statusCode: statusInMessage(message ?? undefined),
    error: message,
    ...(failed.nextAttemptAt !== undefined ? { nextAttemptAt: iso(failed.nextAttemptAt) } : {}),
  };
}

// ---------------------------------------------------------------- the store's side

/** The token's audit events, oldest first, as timeline entries. */
async function auditEntries(pool: StorePool, tokenId: string): Promise<HistoryEntry[]> {
  return (await readAudit(pool, tokenId)).map((event) => {
    const body = JSON.parse(event.canonical) as { at: string; data?: unknown };
    return { at: body.at, kind: 'audit', source: 'store', event: event.kind, seq: event.seq, data: body.data ?? {} };
  });
}

/** Each delivery row as the store holds it now: the attempts history cannot show (see README). */
async function deliveryStates(pool: StorePool, tokenId: string): Promise<HistoryEntry[]> {
  const now = new Date().toISOString();
  return (await listDeliveryReports(pool, tokenId)).map((d) => ({
    at: d.lastAttemptAt ?? now,
    kind: 'delivery.state',
    source: 'store',
    receiverId: d.receiverId,
    eventId: d.eventId,
    status: d.status,
    attempts: d.attempts,
    probes: d.probes,
    lastStatusCode: d.lastStatusCode,
    lastError: d.lastError,
    lastAttemptAt: d.lastAttemptAt,
    ackedAt: d.ackedAt,
    verifiedAt: d.verifiedAt,
  }));
}

// ---------------------------------------------------------------- human output

/**
 * The timeline for people: a header, then one line per entry (time, kind, what happened), aligned,
 * with a line naming each run where it begins. Lines, not one text: values from history may hold
 * line breaks (a Signal sent straight to Temporal bypasses validation), so the caller makes each
 * line printable on its own and no value can start a line of its own.
 */
export function formatTimeline(tokenId: string, entries: HistoryEntry[]): string[] {
  const runs = [...new Set(entries.flatMap((e) => (e.runId ? [e.runId] : [])))];
  const unavailable = entries.find((e) => e.kind === 'history.unavailable');
  const header = unavailable
    ? `history of ${tokenId}: from the store's audit events only (${String(unavailable.reason).replace(/: the store's audit events follow$/, '')})`
    : `history of ${tokenId}: ${runs.length} run(s) of its workflow`;
  const kindWidth = Math.max(...entries.map((e) => e.kind.length), 4);
  const lines = [header];
  let run: string | undefined;
  let storeBlock = false;
  for (const entry of entries) {
    if (entry.runId && entry.runId !== run) {
      run = entry.runId;
      lines.push(`-- run ${run}`);
    }
    if (entry.kind === 'delivery.state' && !storeBlock) {
      storeBlock = true;
      lines.push('-- delivery rows in the store now (every attempt counted)');
    }
    lines.push(`${entry.at}  ${entry.kind.padEnd(kindWidth)}  ${describeEntry(entry)}`);
  }
  return lines;
}

const list = (value: unknown): string => (Array.isArray(value) && value.length ? value.join(', ') : 'none');
const by = (actor: unknown, reason: unknown): string =>
  `${actor ? `by ${String(actor)}` : 'by an unnamed actor'}${reason ? `: ${String(reason)}` : ''}`;
const sentVia = (identity: unknown): string => (identity ? `; sent by client ${String(identity)}` : '');
const plural = (n: unknown, word: string): string => `${String(n)} ${word}${n === 1 ? '' : 's'}`;

function describeEntry(e: HistoryEntry): string {
  switch (e.kind) {
    case 'issued':
      return `subject ${String(e.subject)}; receivers ${list(e.receivers)}; expires ${String(e.expiresAt)}${e.policy ? `; policy ${String(e.policy)}` : ''}`;
    case 'run.continued':
      return `continued as new from run ${String(e.previousRunId)}; expires ${String(e.expiresAt)}`;
    case 'run.started':
      return `${String(e.why)}${e.identity ? ` (${String(e.identity)})` : ''}`;
    case 'run.ended':
      return `run ${String(e.status)}${e.reason ? `: ${String(e.reason)}` : ''}`;
    case 'completed':
      return `${String(e.status)}, propagation ${String(e.propagation)}${e.forced ? ' (forced by an operator)' : ''}; ${
        (e.receivers as { receiverId: string; status: string; attempts: number }[])
          .map((r) => `${r.receiverId} ${r.status} after ${plural(r.attempts, 'attempt')}`)
          .join(', ') || 'no receivers'
      }`;
    // The actor is what the sender wrote; the client identity is what Temporal recorded of the sender.
    case 'revoke.requested':
      return e.malformed
        ? `a revoke signal that could not be read (it still revokes, reason unspecified)${sentVia(e.identity)}`
        : `${by(e.actor, e.reason)}${e.initiatingEntity ? ` (${String(e.initiatingEntity)})` : ''}${sentVia(e.identity)}`;
    case 'suspicious.reported':
      return `${by(e.actor, e.reason)}${sentVia(e.identity)}`;
    case 'policy.changed':
      return `policy ${String(e.policy ?? '(unnamed)')}${e.operationId ? ` (operation ${String(e.operationId)})` : ''}`;
    case 'signal':
      return `signal ${String(e.name)}`;
    case 'operator': {
      const rest = Object.entries(record(e.request))
        .filter(([k]) => k !== 'secretHash')
        .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`);
      return `${String(e.action)} ${by(e.actor, e.reason)}${rest.length ? ` (${rest.join(', ')})` : ''}`;
    }
    case 'operator.done':
      return `${String(e.action)} ${'error' in e ? `failed: ${String(e.error)}` : `done: ${JSON.stringify(e.result)}`}`;
    case 'killed':
      return `${String(e.status)} ${by(e.by, e.reason)}${e.byThisRun ? '' : ' (the kill had already committed in the store)'}; dead since ${String(e.diedAt)}`;
    case 'delivery': {
      const what = e.credentialEvent ? 'credential revocation' : 'revocation';
      const answer = e.statusCode !== null ? `, HTTP ${String(e.statusCode)}` : e.error ? `, ${String(e.error)}` : '';
      const error = e.error && e.statusCode !== null ? ` (${String(e.error)})` : '';
      const attempts =
        e.activityAttempts === null
          ? 'attempts not in history'
          : e.outcome === 'in-flight'
            ? `attempt ${String(e.activityAttempts)} in this activity`
            : `${plural(e.activityAttempts, 'attempt')} in this activity`;
      const total = e.storeAttempts !== null ? `, ${plural(e.storeAttempts, 'POST')} in all` : '';
      const next = e.nextAttemptAt ? `, next attempt ${String(e.nextAttemptAt)}` : '';
      const previous = e.previousError ? `; the attempt before: ${String(e.previousError)}` : '';
      return `${what} to ${String(e.receiverId)}: ${String(e.outcome)}${answer}${error}; ${attempts}${total}${next}${previous}`;
    }
    case 'escalated':
      return `propagation stuck: ${
        (e.receivers as Record<string, unknown>[])
          .map(
            (r) =>
              `${String(r.receiverId)} ${String(r.status)} after ${plural(r.attempts, 'attempt')}${r.lastError ? ` (${String(r.lastError)})` : ''}`,
          )
          .join(', ') || 'no receiver named'
      }`;
    case 'propagation':
      return `propagation ${String(e.state)}${e.forced ? ' (forced)' : ''}`;
    case 'forced':
      return `${list(e.receivers)} marked forced ${by(e.actor, e.reason)}`;
    case 'rotated':
      return `${e.automatic ? 'automatic rotation' : 'rotation'}: ${String(e.credentialId)} current${
        e.previousCredentialId ? `; ${String(e.previousCredentialId)} valid until ${String(e.previousValidUntil)}` : ''
      }${e.actor || e.reason ? ` ${by(e.actor, e.reason)}` : ''}`;
    case 'timer.started':
      return `${String(e.summary ?? `timer ${String(e.timerId)}`)} (fires ${String(e.fireAt)})`;
    case 'timer.fired':
    case 'timer.cancelled':
      return String(e.summary ?? `timer ${String(e.timerId)}`);
    case 'activity':
      return `${String(e.summary ?? e.name)}: ${String(e.outcome)}${e.error ? ` (${String(e.error)})` : ''}`;
    case 'workflow-task.failed':
      return `${String(e.cause)}${e.message ? `: ${String(e.message)}` : ''}`;
    case 'history.unavailable':
    case 'history.partial':
      return String(e.reason);
    case 'audit':
      return `${String(e.event)} #${String(e.seq)} ${JSON.stringify(e.data)}`;
    case 'delivery.state':
      return `${String(e.receiverId)} (${String(e.eventId)}): ${String(e.status)}, ${plural(e.attempts, 'POST')}${
        e.lastStatusCode !== null ? `, last HTTP ${String(e.lastStatusCode)}` : ''
      }${e.lastError ? `, last error: ${String(e.lastError)}` : ''}${e.ackedAt ? `; acknowledged ${String(e.ackedAt)}` : ''}${
        e.verifiedAt ? `; verified ${String(e.verifiedAt)}` : ''
      }`;
  }
}
