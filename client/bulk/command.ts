/**
 * The bulk commands' runs: `tokenwarden import <file|->` and `tokenwarden issue --from <file> --out
 * <file>`. Records are streamed from the file or stdin, progress goes to stderr, every invalid or
 * failed record to the errors file as it happens, and a summary to stdout at the end (`--json`).
 * Exit code 0 only when no record was invalid or failed; 130 when interrupted (Ctrl-C), after the
 * partial summary.
 */
import {
  closeSync,
  constants,
  createReadStream,
  fchmodSync,
  fstatSync,
  lstatSync,
  openSync,
  renameSync,
  rmSync,
  unlinkSync,
  writeSync,
  type Stats,
} from 'node:fs';
import { open, realpath, stat } from 'node:fs/promises';
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

const refuseErrors = (file: string, why: string) =>
  new InvalidInputError(`invalid --errors ${file}: ${why}`, [{ path: 'errors', message: why }]);

/**
 * The errors file: written to a private temporary file beside it (mode 0600: it names token ids;
 * never through a symbolic link) and renamed into place at the end, so a second run refused at its
 * start, or running at the same time, never truncates the file of a run in progress. A run that
 * wrote no error removes the previous run's file; one that ended by an error before any record
 * keeps it.
 */
class ErrorsFile {
  #fd: number;
  #count = 0;
  readonly #temp: string;
  constructor(readonly file: string) {
    let existing: Stats | undefined;
    try {
      existing = lstatSync(file);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT') throw refuseErrors(file, `cannot be written (${code ?? 'error'})`);
    }
    if (existing?.isSymbolicLink()) throw refuseErrors(file, 'is a symbolic link');
    if (existing && !existing.isFile()) throw refuseErrors(file, 'is not a regular file');
    this.#temp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
    const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;
    try {
      this.#fd = openSync(this.#temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw refuseErrors(file, `cannot be written (${code ?? 'error'} on ${this.#temp})`);
    }
    try {
      fchmodSync(this.#fd, 0o600); // the umask may have narrowed it, never widened: stated anyway
    } catch (err) {
      closeSync(this.#fd);
      unlinkSync(this.#temp);
      throw refuseErrors(file, `cannot be made private (${String(err)})`);
    }
  }
  write(error: BulkError): void {
    this.#count++;
    const { line, field, message, kind, tokenId, issues } = error;
    writeSync(this.#fd, `${JSON.stringify({ line, field: field ?? null, message, kind, tokenId, issues })}\n`);
  }
  /** The file's path, or null (and no file) when nothing was written; `ran`: the run got to its end. */
  close(ran: boolean): string | null {
    closeSync(this.#fd);
    if (this.#count > 0) {
      renameSync(this.#temp, this.file);
      return this.file;
    }
    unlinkSync(this.#temp);
    if (ran) rmSync(this.file, { force: true });
    return null;
  }
}

interface Source {
  input: Readable;
  format: RecordFormat;
  /** Records to come when known (a regular file is counted first); undefined for stdin or a pipe. */
  total: number | undefined;
  /** A regular file (or stdin redirected from one), not a pipe: reading nothing from it is no fault. */
  regular: boolean;
  errorsFile: string;
}

const isFileDescriptorOfFile = (fd: number) => {
  try {
    return fstatSync(fd).isFile();
  } catch {
    return false;
  }
};

/** What a path names: its file (device and inode, through links) when it exists, else its real path. */
async function fileIdentity(file: string): Promise<string> {
  try {
    const st = await stat(file);
    return `file ${st.dev}:${st.ino}`;
  } catch {
    const dir = path.dirname(path.resolve(file));
    return `path ${path.join(await realpath(dir).catch(() => dir), path.basename(file))}`;
  }
}

async function openSource(file: string, opts: BulkCommandOptions, kind: string, out?: string): Promise<Source> {
  const stdin = file === '-';
  const format = opts.format ?? (stdin ? 'jsonl' : formatOf(file));
  let input: Readable;
  let regular: boolean;
  if (stdin) {
    input = process.stdin;
    regular = isFileDescriptorOfFile(0);
  } else {
    // Opened once and read once: a pipe (`<(jq …)`) cannot be read a second time.
    let handle;
    try {
      handle = await open(file, 'r');
      regular = (await handle.stat()).isFile();
    } catch (err) {
      await handle?.close();
      const why = `cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`;
      throw new InvalidInputError(`invalid input file ${file}: ${why}`, [{ path: 'file', message: why }]);
    }
    input = createReadStream('', { fd: handle });
  }
  // Next to the input when it is a file; in the working directory for stdin or a pipe (/dev/fd/63).
  const errorsFile = opts.errors ?? (stdin || !regular ? `tokenwarden-${kind}-errors.jsonl` : `${file}.errors.jsonl`);
  const errorsId = await fileIdentity(errorsFile);
  for (const [option, other] of [
    ['the input file', stdin ? undefined : file],
    ['the --out file', out],
  ] as const) {
    if (other !== undefined && errorsId === (await fileIdentity(other))) {
      input.destroy();
      throw refuseErrors(errorsFile, `it is ${option}`);
    }
  }
  const total = !stdin && regular ? await countRecords(file, format) : undefined;
  return { input, format, total, regular, errorsFile };
}

/**
 * Runs one bulk command: the source's records through `run` (or validation only with --dry-run),
 * progress on stderr, errors to the errors file, Ctrl-C as an abort, the summary on stdout.
 */
async function runCommand(
  kind: 'import' | 'issue',
  file: string,
  out: string | undefined,
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
  const source = await openSource(file, opts, kind, out);
  let read = 0;
  const records = (async function* () {
    for await (const record of readRecords(source.input, source.format, columns)) {
      read++;
      yield record;
    }
  })();
  let errors: ErrorsFile;
  try {
    errors = new ErrorsFile(source.errorsFile);
  } catch (err) {
    source.input.destroy();
    throw err;
  }
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
    const errorsFile = errors.close(summary !== undefined);
    if (summary) summary.errorsFile = errorsFile;
  }
  process.stdout.write(opts.json ? `${JSON.stringify(summary)}\n` : `${print(summary!)}\n`);
  if (summary!.aborted) return EXIT_INTERRUPTED;
  // Nothing from a pipe is most likely the command writing it failing: said, and not a success.
  const nothing = read === 0 && !summary!.stopped;
  if (nothing) {
    const from = file === '-' ? 'stdin' : file;
    process.stderr.write(
      `tokenwarden: no records read from ${from}` +
        (source.regular ? ' (the file holds none)\n' : ' (did the command writing to it fail?)\n'),
    );
  }
  return summary!.invalid > 0 || summary!.failed > 0 || summary!.stopped || (nothing && !source.regular) ? 1 : 0;
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
    undefined,
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
    out,
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
