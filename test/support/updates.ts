/**
 * An Update sent straight to a token's workflow as the library sends one: one Update id, sent again
 * when the server aborted it because a workflow task failed ("unexpected workflow task failure", a
 * transient race on a loaded machine). A refusal or a handler's failure is never resent.
 */
import { randomUUID } from 'node:crypto';
import type { WorkflowHandle, WorkflowUpdateOptions } from '@temporalio/client';
import type { UpdateDefinition } from '@temporalio/common';
import { sendWithAbortRetries } from '../../client/errors.js';

/** Far above any Update a test sends; the resends stop at UPDATE_ABORT_ATTEMPTS anyway. */
const DEADLINE_MS = 60_000;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function retriedUpdate<Ret, Args extends [any, ...any[]]>(
  handle: WorkflowHandle,
  def: UpdateDefinition<Ret, Args>,
  options: WorkflowUpdateOptions & { args: Args },
): Promise<Ret> {
  const once = { ...options, updateId: options.updateId ?? randomUUID() };
  return sendWithAbortRetries(() => handle.executeUpdate(def, once), Date.now() + DEADLINE_MS);
}
