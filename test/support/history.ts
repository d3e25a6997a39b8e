import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import type { WorkflowHandle } from '@temporalio/client';
import type { LoadedDataConverter, Payload } from '@temporalio/common';
import { optionalTsToMs } from '@temporalio/common/lib/time.js';
import proto from '@temporalio/proto';

const { temporal } = proto;
import { PACKAGE_ROOT } from '../../common/config.js';

export const HISTORIES_DIR = path.join(PACKAGE_ROOT, 'test', 'histories');

/**
 * The payload key of runs that record histories (TOKENWARDEN_RECORD_HISTORIES=1): the replay test
 * decodes the corpus with it. A test fixture, never a deployment's key: other runs use random keys.
 */
export const RECORDING_PAYLOAD_KEY = Buffer.from('dG9rZW53YXJkZW4gcmVwbGF5IGNvcnB1cyBrZXkgISE=', 'base64');

/** Every string and every byte payload of a history, decoded, for "does this secret appear?" checks. */
export function historyText(value: unknown, out: string[] = []): string[] {
  if (typeof value === 'string') out.push(value);
  else if (value instanceof Uint8Array) out.push(Buffer.from(value).toString('utf8'));
  else if (Array.isArray(value)) for (const v of value) historyText(v, out);
  else if (value && typeof value === 'object') for (const v of Object.values(value)) historyText(v, out);
  return out;
}

/**
 * With TOKENWARDEN_RECORD_HISTORIES=1, checks a finished workflow's history into test/histories/
 * for replay. A file that exists is kept: a recorded history stands for the code that ran it, and
 * re-recording it would hide the very change replay must catch. `gzip` for long histories.
 */
export async function maybeRecordHistory(
  handle: WorkflowHandle,
  name: string,
  opts: { gzip?: boolean } = {},
): Promise<void> {
  if (!process.env.TOKENWARDEN_RECORD_HISTORIES) return;
  const file = path.join(HISTORIES_DIR, `${name}.json${opts.gzip ? '.gz' : ''}`);
  if (existsSync(file)) return;
  const history = temporal.api.history.v1.History.fromObject(await handle.fetchHistory());
  const json = JSON.stringify(history.toJSON(), null, 1);
  writeFileSync(file, opts.gzip ? gzipSync(json) : json);
}

/** The checked-in histories, relative to HISTORIES_DIR (subfolders hold those of earlier code). */
export function historyFiles(): string[] {
  return readdirSync(HISTORIES_DIR, { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.json') || f.endsWith('.json.gz'))
    .sort();
}

/** Reads a history written by maybeRecordHistory (protobuf's own JSON mapping, maybe gzipped). */
export function loadHistory(file: string): ReturnType<typeof temporal.api.history.v1.History.fromObject> {
  const bytes = readFileSync(path.join(HISTORIES_DIR, file));
  const json = file.endsWith('.gz') ? gunzipSync(bytes).toString('utf8') : bytes.toString('utf8');
  return temporal.api.history.v1.History.fromObject(JSON.parse(json));
}

/**
 * A workflow's history as one line per event, milliseconds from `since`: what a test that timed out
 * waiting on a workflow attaches to its failure, so a slow run on a loaded machine can be read
 * afterwards (which task or attempt was late). Ids and types only, never a payload.
 */
export async function historyTimeline(handle: WorkflowHandle, since: number): Promise<string> {
  const { events } = await handle.fetchHistory();
  const { EventType, TaskQueueKind, TimeoutType } = temporal.api.enums.v1;
  return (events ?? [])
    .map((e) => {
      const at = optionalTsToMs(e.eventTime) ?? 0;
      const type = EventType[e.eventType ?? 0] ?? String(e.eventType);
      const offset = at - since;
      const details = [
        e.activityTaskScheduledEventAttributes?.activityType?.name,
        // Which queue a workflow task went to (STICKY: the worker that ran the last one) and why one timed out.
        e.workflowTaskScheduledEventAttributes &&
          `queue ${TaskQueueKind[e.workflowTaskScheduledEventAttributes.taskQueue?.kind ?? 0]} attempt ${e.workflowTaskScheduledEventAttributes.attempt ?? 1}`,
        e.workflowTaskTimedOutEventAttributes && TimeoutType[e.workflowTaskTimedOutEventAttributes.timeoutType ?? 0],
        e.activityTaskStartedEventAttributes && `attempt ${e.activityTaskStartedEventAttributes.attempt ?? 1}`,
        e.activityTaskTimedOutEventAttributes &&
          TimeoutType[e.activityTaskTimedOutEventAttributes.failure?.timeoutFailureInfo?.timeoutType ?? 0],
      ].filter(Boolean);
      return `${String(e.eventId)} ${offset >= 0 ? '+' : ''}${offset}ms ${type.replace(/^EVENT_TYPE_/, '')}${details.length ? ` ${details.join(' ')}` : ''}`;
    })
    .join('\n');
}

/** Payloads in a history: objects whose metadata names an encoding. */
function isPayload(value: Record<string, unknown>): boolean {
  const metadata = value.metadata as Record<string, unknown> | null | undefined;
  return !!metadata && typeof metadata === 'object' && 'encoding' in metadata;
}

/**
 * A workflow's history with every payload decoded through its client's codecs (in place), as the
 * Web UI shows it through the codec endpoint: what tests read for content, and what secret checks
 * search (the raw history is ciphertext, where any check of absence would pass by itself).
 */
export async function decodedHistory(
  handle: WorkflowHandle,
): Promise<Awaited<ReturnType<WorkflowHandle['fetchHistory']>>> {
  const history = await handle.fetchHistory();
  const { payloadCodecs } = (handle.client.options as { loadedDataConverter: LoadedDataConverter }).loadedDataConverter;
  const decodeIn = async (value: unknown): Promise<void> => {
    if (Array.isArray(value)) {
      for (const v of value) await decodeIn(v);
      return;
    }
    if (!value || typeof value !== 'object' || value instanceof Uint8Array) return;
    const o = value as Record<string, unknown>;
    if (isPayload(o)) {
      let decoded = [o as Payload];
      for (const codec of [...payloadCodecs].reverse()) decoded = await codec.decode(decoded);
      o.metadata = decoded[0]!.metadata;
      o.data = decoded[0]!.data;
      return;
    }
    for (const v of Object.values(o)) await decodeIn(v);
  };
  await decodeIn(history.events);
  return history;
}
