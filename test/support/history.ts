import { writeFileSync } from 'node:fs';
import path from 'node:path';
import type { WorkflowHandle } from '@temporalio/client';
import proto from '@temporalio/proto';

const { temporal } = proto;
import { PACKAGE_ROOT } from '../../common/config.js';

export const HISTORIES_DIR = path.join(PACKAGE_ROOT, 'test', 'histories');

/** Every string and every byte payload of a history, decoded, for "does this secret appear?" checks. */
export function historyText(value: unknown, out: string[] = []): string[] {
  if (typeof value === 'string') out.push(value);
  else if (value instanceof Uint8Array) out.push(Buffer.from(value).toString('utf8'));
  else if (Array.isArray(value)) for (const v of value) historyText(v, out);
  else if (value && typeof value === 'object') for (const v of Object.values(value)) historyText(v, out);
  return out;
}

/** With TOKENWARDEN_RECORD_HISTORIES=1, checks a finished workflow's history into test/histories/ for replay. */
export async function maybeRecordHistory(handle: WorkflowHandle, name: string): Promise<void> {
  if (!process.env.TOKENWARDEN_RECORD_HISTORIES) return;
  const history = temporal.api.history.v1.History.fromObject(await handle.fetchHistory());
  writeFileSync(path.join(HISTORIES_DIR, `${name}.json`), JSON.stringify(history.toJSON(), null, 1));
}

/** Reads a history written by maybeRecordHistory (protobuf's own JSON mapping). */
export function loadHistory(json: string): ReturnType<typeof temporal.api.history.v1.History.fromObject> {
  return temporal.api.history.v1.History.fromObject(JSON.parse(json));
}
