/**
 * What a workflow run cost, read from its history: workflow tasks, activities and their attempts,
 * local activities (markers), timers, signals, updates and search-attribute upserts, and the
 * Temporal Cloud actions they bill by the published rules (https://docs.temporal.io/cloud/actions):
 *  - workflow started (client start, continue-as-new; a signal-with-start bills one action in all);
 *  - every activity attempt ("started or retried");
 *  - local activities: all markers recorded in one workflow task are one action;
 *  - every timer started, signal received, update accepted, search-attribute upsert (one per
 *    command; an upsert of TemporalChangeVersion alone is exempt);
 *  - a child workflow: two. Workflow tasks themselves are not billed. Queries, activity heartbeats
 *    and rejected updates bill too but leave no history event (none happen in these runs).
 */
import type { WorkflowHandle } from '@temporalio/client';
import { epochMs } from './timeline.js';

export type History = Awaited<ReturnType<WorkflowHandle['fetchHistory']>>;

export interface HistoryCounts {
  events: number;
  workflowTasks: { completed: number; timedOut: number; failed: number };
  /** Activities scheduled, and their attempts (retries included). */
  activities: { scheduled: number; attempts: number; byType: Record<string, { scheduled: number; attempts: number }> };
  /** Markers (local activity results, patch markers) and the workflow tasks that recorded any. */
  markers: { recorded: number; byName: Record<string, number>; workflowTasksWithMarkers: number };
  timers: number;
  signals: number;
  updates: number;
  /** Upsert commands, and those billed (not TemporalChangeVersion alone). */
  upserts: { recorded: number; billed: number };
  childWorkflows: number;
  workflowStarts: number;
}

export interface CloudActions {
  total: number;
  breakdown: Record<string, number>;
}

const EXEMPT_SEARCH_ATTRIBUTE = 'TemporalChangeVersion';

export function countHistory(history: History): HistoryCounts {
  const counts: HistoryCounts = {
    events: 0,
    workflowTasks: { completed: 0, timedOut: 0, failed: 0 },
    activities: { scheduled: 0, attempts: 0, byType: {} },
    markers: { recorded: 0, byName: {}, workflowTasksWithMarkers: 0 },
    timers: 0,
    signals: 0,
    updates: 0,
    upserts: { recorded: 0, billed: 0 },
    childWorkflows: 0,
    workflowStarts: 0,
  };
  const activityType = new Map<string, string>();
  const tasksWithMarkers = new Set<string>();
  const byType = (type: string) => (counts.activities.byType[type] ??= { scheduled: 0, attempts: 0 });
  for (const event of history.events ?? []) {
    counts.events++;
    if (event.workflowExecutionStartedEventAttributes) counts.workflowStarts++;
    if (event.workflowTaskCompletedEventAttributes) counts.workflowTasks.completed++;
    if (event.workflowTaskTimedOutEventAttributes) counts.workflowTasks.timedOut++;
    if (event.workflowTaskFailedEventAttributes) counts.workflowTasks.failed++;
    const scheduled = event.activityTaskScheduledEventAttributes;
    if (scheduled) {
      const type = scheduled.activityType?.name ?? 'activity';
      activityType.set(String(event.eventId), type);
      counts.activities.scheduled++;
      byType(type).scheduled++;
    }
    const started = event.activityTaskStartedEventAttributes;
    if (started) {
      // Written once, when the activity closes, with the number of its last attempt.
      const attempts = started.attempt ?? 1;
      counts.activities.attempts += attempts;
      byType(activityType.get(String(started.scheduledEventId)) ?? 'activity').attempts += attempts;
    }
    const marker = event.markerRecordedEventAttributes;
    if (marker) {
      counts.markers.recorded++;
      const name = marker.markerName ?? 'marker';
      counts.markers.byName[name] = (counts.markers.byName[name] ?? 0) + 1;
      tasksWithMarkers.add(String(marker.workflowTaskCompletedEventId));
    }
    if (event.timerStartedEventAttributes) counts.timers++;
    if (event.workflowExecutionSignaledEventAttributes) counts.signals++;
    if (event.workflowExecutionUpdateAcceptedEventAttributes) counts.updates++;
    if (event.startChildWorkflowExecutionInitiatedEventAttributes) counts.childWorkflows++;
    const upsert = event.upsertWorkflowSearchAttributesEventAttributes;
    if (upsert) {
      counts.upserts.recorded++;
      const names = Object.keys(upsert.searchAttributes?.indexedFields ?? {});
      if (names.some((name) => name !== EXEMPT_SEARCH_ATTRIBUTE)) counts.upserts.billed++;
    }
  }
  counts.markers.workflowTasksWithMarkers = tasksWithMarkers.size;
  return counts;
}

export function cloudActions(c: HistoryCounts): CloudActions {
  const breakdown = {
    workflowStarted: c.workflowStarts,
    activityAttempts: c.activities.attempts,
    localActivityTasks: c.markers.workflowTasksWithMarkers,
    timers: c.timers,
    signals: c.signals,
    updates: c.updates,
    searchAttributeUpserts: c.upserts.billed,
    childWorkflows: 2 * c.childWorkflows,
  };
  return { total: Object.values(breakdown).reduce((sum, n) => sum + n, 0), breakdown };
}

/** Sums counts of several runs (a token's runs, or a sample of tokens). */
export function addActions(...all: CloudActions[]): CloudActions {
  const breakdown: Record<string, number> = {};
  for (const actions of all) {
    for (const [name, n] of Object.entries(actions.breakdown)) breakdown[name] = (breakdown[name] ?? 0) + n;
  }
  return { total: all.reduce((sum, a) => sum + a.total, 0), breakdown };
}

/**
 * How long the first timer's firing (a token's expiry) waited for a worker: from TimerFired to the
 * next WorkflowTaskStarted. Undefined when no timer fired.
 */
export function waitAfterFirstTimer(history: History): number | undefined {
  const events = history.events ?? [];
  const fired = events.findIndex((event) => event.timerFiredEventAttributes);
  if (fired < 0) return undefined;
  const started = events.slice(fired).find((event) => event.workflowTaskStartedEventAttributes);
  return started ? epochMs(started.eventTime) - epochMs(events[fired]!.eventTime) : undefined;
}
