/**
 * The bulk commands' runs: `tokenwarden import <file|->` and `tokenwarden issue --from <file> --out
 * <file>`. Records are streamed from the file or stdin, progress goes to stderr, every invalid or
 * failed record to the errors file as it happens, and a summary to stdout at the end (`--json`).
 * Exit code 0 only when no record was invalid or failed; 130 when interrupted (Ctrl-C), after the
 * partial summary.
 */
import { closeSync, constants, createReadStream, fstatSync, openSync, unlinkSync, writeSync } from 'node:fs';
import { access } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { z } from 'zod';
import { loadStoreSettings } from '../../common/config.js';
import { parseDuration } from '../../common/durations.js';
import { InvalidInputError } from '../../common/errors.js';
import { parseInput } from '../../common/validation.js';
import type { TokenWarden } from '../index.js';
import type { BulkError, BulkProgress, BulkReport } from './pipeline.js';
import {
  countRecords,
  formatOf,
  IMPORT_COLUMNS,
  ISSUE_COLUMNS,
  readRecords,
  type RecordFormat,
  type RecordProblem,
  type SourceLine,
} from './reader.js';
import { importPreparer, issueRecordSchema, lineOf, problemOf } from './records.js';
import { progressView, PLAIN_PROGRESS_EVERY_MS } from './progress.js';

export interface BulkCommandOptions {
  format?: RecordFormat;
  concurrency?: string;
  dryRun?: boolean;
  json?: boolean;
  errors?: string;
  progressEvery?: string;
}

/** What the command prints at the end (and `--json` prints as is). */
export interface BulkSummary {
  started: number;
  existing: number;
  invalid: number;
  failed: number;
  /** The errors file, or null when no record was invalid or failed (no file is left then). */
  errorsFile: string | null;
  aborted: boolean;
  stopped?: string;
  durationMs: number;
  /** Only with --dry-run: records that passed validation (nothing was written). */
  valid?: number;
  dryRun?: boolean;
  /** Only for bulk issue: where the raw tokens are. */
  outFile?: string;
  resumed?: number;
}

export const EXIT_INTERRUPTED = 130;

const optionsSchema = z.object({
  concurrency: z.coerce.number().int().min(1).max(256).optional(),
  progressEvery: z
    .string()
    .optional()
    .transform((v, ctx) => {
      if (v === undefined) return PLAIN_PROGRESS_EVERY_MS;
      const ms = parseDuration(v);
      if (ms === undefined) ctx.addIssue({ code: 'custom', message: 'expected a duration such as 500ms or 10s' });
      return ms ?? 0;
    }),
});

/** The errors file: opened (truncated) at the start, one JSON line per record written synchronously, removed when empty. */
class ErrorsFile {
  #fd: number;
  #count = 0;
  constructor(readonly file: string) {
    this.#fd = openSync(file, 'w');
  }
  write(error: BulkError): void {
    this.#count++;
    const { line, field, message, kind, tokenId, issues } = error;
    writeSync(this.#fd, `${JSON.stringify({ line, field: field ?? null, message, kind, tokenId, issues })}\n`);
  }
  /** The file's path, or null (and no file) when nothing was written. */
  close(): string | null {
    const empty = this.#count === 0 && fstatSync(this.#fd).size === 0;
    closeSync(this.#fd);
    if (empty) unlinkSync(this.file);
    return empty ? null : this.file;
  }
}

interface Source {
  input: Readable;
  format: RecordFormat;
  /** Records to come when known (a file is counted first); undefined for stdin. */
  total: number | undefined;
  errorsFile: string;
}

async function openSource(file: string, opts: BulkCommandOptions, kind: string): Promise<Source> {
  const stdin = file === '-';
  const format = opts.format ?? (stdin ? 'jsonl' : formatOf(file));
  const errorsFile = opts.errors ?? (stdin ? `tokenwarden-${kind}-errors.jsonl` : `${file}.errors.jsonl`);
  if (!stdin && path.resolve(errorsFile) === path.resolve(file)) {
    throw new InvalidInputError('invalid --errors: it is the input file', [
      { path: 'errors', message: 'is the input file' },
    ]);
  }
  if (!stdin) {
    try {
      await access(file, constants.R_OK);
    } catch (err) {
      const why = `cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`;
      throw new InvalidInputError(`invalid input file ${file}: ${why}`, [{ path: 'file', message: why }]);
    }
  }
  const total = stdin ? undefined : await countRecords(file, format);
  const input = stdin ? process.stdin : createReadStream(file);
  return { input, format, total, errorsFile };
}

/**
 * Runs one bulk command: the source's records through `run` (or validation only with --dry-run),
 * progress on stderr, errors to the errors file, Ctrl-C as an abort, the summary on stdout.
 */
async function runCommand(
  kind: 'import' | 'issue',
  file: string,
  opts: BulkCommandOptions,
  /** The validation alone, for --dry-run: a record's problem, or undefined when it is valid. */
  check: () => (item: SourceLine) => RecordProblem | undefined,
  run: (
    records: AsyncIterable<unknown>,
    common: {
      concurrency?: number;
      onProgress: (p: BulkProgress) => void;
      onError: (e: BulkError) => void;
      signal: AbortSignal;
    },
  ) => Promise<BulkReport & { outFile?: string; resumed?: number }>,
  print: (summary: BulkSummary) => string,
): Promise<number> {
  const parsed = parseInput(
    optionsSchema,
    { concurrency: opts.concurrency, progressEvery: opts.progressEvery },
    `${kind} options`,
  );
  const columns = kind === 'import' ? IMPORT_COLUMNS : ISSUE_COLUMNS;
  const source = await openSource(file, opts, kind);
  const records = readRecords(source.input, source.format, columns);
  const errors = new ErrorsFile(source.errorsFile);
  const view = await progressView(
    kind === 'import' ? 'importing' : 'issuing',
    source.total,
    process.stderr,
    parsed.progressEvery,
  );
  const stop = new AbortController();
  const onSigint = () => {
    stop.abort();
    // A pending read of stdin would wait for more input: ending it lets the run wind down.
    source.input.destroy();
  };
  process.once('SIGINT', onSigint);
  let summary: BulkSummary | undefined;
  try {
    if (opts.dryRun) {
      summary = await validateOnly(records, check(), errors, view, stop.signal);
    } else {
      const report = await run(records, {
        ...(parsed.concurrency !== undefined ? { concurrency: parsed.concurrency } : {}),
        onProgress: (p) => view.update(p),
        onError: (e) => errors.write(e),
        signal: stop.signal,
      });
      summary = {
        started: report.started,
        existing: report.existing,
        invalid: report.invalid,
        failed: report.failed,
        errorsFile: null,
        aborted: report.aborted,
        ...(report.stopped ? { stopped: report.stopped } : {}),
        durationMs: report.durationMs,
        ...(report.outFile !== undefined ? { outFile: report.outFile, resumed: report.resumed ?? 0 } : {}),
      };
    }
  } finally {
    process.off('SIGINT', onSigint);
    view.stop();
    const errorsFile = errors.close();
    if (summary) summary.errorsFile = errorsFile;
  }
  process.stdout.write(opts.json ? `${JSON.stringify(summary)}\n` : `${print(summary!)}\n`);
  if (summary!.aborted) return EXIT_INTERRUPTED;
  return summary!.invalid > 0 || summary!.failed > 0 || summary!.stopped ? 1 : 0;
}

async function validateOnly(
  records: AsyncIterable<unknown>,
  check: (item: SourceLine) => RecordProblem | undefined,
  errors: ErrorsFile,
  view: { update(p: BulkProgress): void },
  signal: AbortSignal,
): Promise<BulkSummary> {
  const begun = Date.now();
  let valid = 0;
  let invalid = 0;
  let aborted = false;
  let position = 0;
  for await (const record of records) {
    if (signal.aborted) {
      aborted = true;
      break;
    }
    const item = lineOf(record, ++position);
    const problem = check(item);
    if (problem) {
      invalid++;
      errors.write({ line: item.line, kind: 'invalid', ...problem });
    } else valid++;
    view.update({ done: valid + invalid, started: 0, existing: 0, invalid, failed: 0 });
  }
  return {
    started: 0,
    existing: 0,
    invalid,
    failed: 0,
    errorsFile: null,
    aborted: aborted || signal.aborted,
    durationMs: Date.now() - begun,
    valid,
    dryRun: true,
  };
}

const problems = (s: BulkSummary) =>
  `${s.invalid} invalid, ${s.failed} failed` + (s.errorsFile ? ` (one line each in ${s.errorsFile})` : '');
const ending = (s: BulkSummary, again: string) =>
  (s.aborted ? `\ninterrupted: run the same command again to finish (${again})` : '') +
  (s.stopped ? `\nstopped early: ${s.stopped}` : '');

/** `tokenwarden import <file|->`. Resolves to the exit code. */
export async function importCommand(
  file: string,
  opts: BulkCommandOptions,
  withWarden: <T>(fn: (tw: TokenWarden) => Promise<T>) => Promise<T>,
): Promise<number> {
  return runCommand(
    'import',
    file,
    opts,
    () => {
      const prepare = importPreparer(loadStoreSettings().maxTtlMs);
      return (item) => {
        const prepared = prepare(item);
        return 'problem' in prepared ? prepared.problem : undefined;
      };
    },
    (records, common) => withWarden((tw) => tw.startMany(records, common)),
    (s) =>
      s.dryRun
        ? `dry run: ${s.valid} valid, ${problems(s)}; nothing was written`
        : `imported: ${s.started} started, ${s.existing} already managed, ${problems(s)}` +
          ending(s, 'what is done is skipped'),
  );
}

/** `tokenwarden issue --from <file> --out <file>`. Resolves to the exit code. */
export async function issueFromCommand(
  file: string,
  out: string | undefined,
  opts: BulkCommandOptions,
  withWarden: <T>(fn: (tw: TokenWarden) => Promise<T>) => Promise<T>,
): Promise<number> {
  if (!opts.dryRun && out === undefined) {
    throw new InvalidInputError('invalid issue: --from needs --out <file> (where the raw tokens are written)', [
      { path: 'out', message: 'required with --from' },
    ]);
  }
  return runCommand(
    'issue',
    file,
    opts,
    () => {
      const schema = issueRecordSchema(loadStoreSettings().maxTtlMs);
      return (item) => {
        if (item.problem) return item.problem;
        const parsed = schema.safeParse(item.record);
        return parsed.success ? undefined : problemOf(parsed.error);
      };
    },
    (records, common) => withWarden((tw) => tw.issueMany(records, { ...common, out: out! })),
    (s) =>
      s.dryRun
        ? `dry run: ${s.valid} valid, ${problems(s)}; nothing was issued`
        : `issued: ${s.started} new token(s), ${s.existing} issued before (${s.resumed ?? 0} found in the out file), ${problems(s)}\n` +
          `the raw tokens are in ${s.outFile} (mode 0600): hand them over, then delete it` +
          ending(s, 'the out file is resumed, nothing is issued twice'),
  );
}
