/** Existing tokens brought under management in bulk: each record's token stored by hash, its workflow started. */
import { runBulk, type BulkDeps, type BulkOptions, type BulkReport } from './pipeline.js';
import { importPreparer, lineOf, type Prepared } from './records.js';
import type { SourceLine } from './reader.js';

/**
 * Imports records (objects shaped as ImportRecordInput, or the SourceLines of readRecords, which
 * carry their line numbers) and starts each new token's workflow. Idempotent: a rerun skips what a
 * crashed or aborted run did and finishes the rest; no workflow is started twice.
 */
export function startMany(
  deps: BulkDeps,
  records: AsyncIterable<unknown> | Iterable<unknown>,
  options: BulkOptions = {},
): Promise<BulkReport> {
  // A record without an id gets a fresh time-ordered one (importPreparer), so imported tokens sort by
  // import time in `list`; a rerun finds it by its hash (the store answers existing).
  const prepare = importPreparer(deps.settings.maxTtlMs);
  return runBulk(deps, prepared(records, prepare), { ...options, imported: true });
}

export async function* prepared(
  records: AsyncIterable<unknown> | Iterable<unknown>,
  prepare: (item: SourceLine) => Prepared,
): AsyncGenerator<Prepared> {
  let position = 0;
  for await (const item of records) yield prepare(lineOf(item, ++position));
}
