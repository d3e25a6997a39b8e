/**
 * Where the time goes after a signal: the steps of a workflow run read from its history (the
 * server's clock), joined with the benchmark's own marks (call start, receiver arrival).
 */
import type { WorkflowHandle } from '@temporalio/client';
import { tsToMs } from '@temporalio/common/lib/time.js';
import { ms, percentile } from './stats.js';

type History = Awaited<ReturnType<WorkflowHandle['fetchHistory']>>;
type Timestamp = Parameters<typeof tsToMs>[0];

export interface Mark {
  label: string;
  /** Epoch milliseconds, sub-millisecond precision. */
  at: number;
}

/** The run's signal and its activities' scheduled / started / completed times, in time order. */
export function historyMarks(history: History): Mark[] {
  const marks: Mark[] = [];
  const activityNames = new Map<string, string>();
  const nameOf = (scheduledEventId: unknown) => activityNames.get(String(scheduledEventId)) ?? 'activity';
  for (const event of history.events ?? []) {
    const at = epochMs(event.eventTime);
    if (event.workflowExecutionSignaledEventAttributes) marks.push({ label: 'signal recorded', at });
    const scheduled = event.activityTaskScheduledEventAttributes;
    if (scheduled) {
      const name = scheduled.activityType?.name ?? 'activity';
      activityNames.set(String(event.eventId), name);
      marks.push({ label: `${name} scheduled`, at });
    }
    const started = event.activityTaskStartedEventAttributes;
    if (started) marks.push({ label: `${nameOf(started.scheduledEventId)} started`, at });
    const completed = event.activityTaskCompletedEventAttributes;
    if (completed) marks.push({ label: `${nameOf(completed.scheduledEventId)} completed`, at });
  }
  // A started event is written with the completion, but carries the time the attempt started.
  return marks.sort((a, b) => a.at - b.at);
}

/** Per step between consecutive marks ("A → B"), the median over all runs, in first-seen order. */
export function stepMedians(runs: Mark[][]): Array<{ step: string; n: number; p50Ms: number }> {
  const steps = new Map<string, number[]>();
  for (const marks of runs) {
    for (let i = 1; i < marks.length; i++) {
      const step = `${marks[i - 1]!.label} → ${marks[i]!.label}`;
      const durations = steps.get(step) ?? [];
      durations.push(marks[i]!.at - marks[i - 1]!.at);
      steps.set(step, durations);
    }
  }
  return [...steps].map(([step, durations]) => ({
    step,
    n: durations.length,
    p50Ms: ms(
      percentile(
        [...durations].sort((a, b) => a - b),
        50,
      ),
    ),
  }));
}

export function epochMs(ts: Timestamp): number {
  if (!ts) throw new Error('history event without a time');
  // tsToMs truncates to whole milliseconds; the steps measured here are a few milliseconds long.
  return tsToMs({ seconds: ts.seconds, nanos: 0 }) + (ts.nanos ?? 0) / 1e6;
}
