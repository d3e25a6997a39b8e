/**
 * Records read one line at a time from a file or stdin (JSON Lines, or CSV with a header row), each
 * with its line number, so a bad line is reported and the others go on. Nothing holds more than one
 * line, and a line at most MAX_LINE_BYTES: a longer one (a JSON array, a whole export on one line) is
 * reported and skipped as it streams by. The consumer's pace pulls the input.
 */
import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { InvalidInputError } from '../../common/errors.js';

/** The longest line read: a record is small (a token is at most 4096 characters). */
export const MAX_LINE_BYTES = 64 * 1024;

export const RECORD_FORMATS = ['jsonl', 'csv'] as const;
export type RecordFormat = (typeof RECORD_FORMATS)[number];

/** What is wrong with one record: the field at fault (`(line)` for the line as a whole) and why. */
export interface RecordProblem {
  field: string;
  message: string;
}

/** One record of the input with its line number, or the reason its line is not a record. */
export class SourceLine {
  constructor(
    readonly line: number,
    readonly record: unknown,
    readonly problem?: RecordProblem,
  ) {}
}

/** The columns a CSV header may name, per kind of input. */
export const IMPORT_COLUMNS = [
  'tokenId',
  'secretHash',
  'token',
  'subject',
  'receivers',
  'scopes',
  'expiresAt',
  'ttl',
  'name',
];
export const ISSUE_COLUMNS = ['subject', 'receivers', 'scopes', 'ttl', 'name'];
/** Columns holding lists: their items are separated by `;` in a CSV cell. */
const LIST_COLUMNS = new Set(['receivers', 'scopes']);

/** The format a file name says (`.csv` or else JSON Lines). */
export const formatOf = (file: string): RecordFormat => (/\.csv$/i.test(file) ? 'csv' : 'jsonl');

/**
 * Yields the records of `input` in order. Blank lines are skipped (their numbers still count).
 * A CSV header naming an unknown column stops everything: every record would be read wrongly.
 */
export async function* readRecords(
  input: Readable,
  format: RecordFormat,
  columns: readonly string[] = IMPORT_COLUMNS,
): AsyncGenerator<SourceLine> {
  let header: string[] | undefined;
  for await (const { number, text } of linesOf(input)) {
    if (text === undefined) {
      if (format === 'csv' && !header) {
        const what = `longer than ${MAX_LINE_BYTES} bytes`;
        throw new InvalidInputError(`invalid CSV header (line ${number}): ${what}`, [
          { path: 'header', message: what },
        ]);
      }
      yield new SourceLine(number, undefined, {
        field: '(line)',
        message:
          `longer than ${MAX_LINE_BYTES} bytes; ` +
          (format === 'jsonl' ? 'a JSON array? write one record per line' : 'a record is one line'),
      });
      continue;
    }
    if (text.trim() === '') continue;
    if (format === 'jsonl') {
      yield jsonLine(number, text);
    } else if (!header) {
      header = csvHeader(number, text, columns);
    } else {
      yield csvLine(number, text, header);
    }
  }
}

/**
 * The lines of `input` split on LF (a CR before it dropped), numbered from 1, a UTF-8 BOM at the
 * start dropped. A line longer than MAX_LINE_BYTES comes as `text: undefined`: its bytes are
 * dropped as they arrive, never gathered.
 */
async function* linesOf(input: Readable): AsyncGenerator<{ number: number; text: string | undefined }> {
  let parts: Buffer[] = [];
  let size = 0;
  let overlong = false;
  let number = 0;
  const end = () => {
    number++;
    let text: string | undefined;
    if (!overlong) {
      let bytes = Buffer.concat(parts, size);
      if (bytes.at(-1) === 0x0d) bytes = bytes.subarray(0, -1);
      if (number === 1 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) bytes = bytes.subarray(3);
      if (bytes.length <= MAX_LINE_BYTES) text = bytes.toString('utf8');
    }
    parts = [];
    size = 0;
    overlong = false;
    return { number, text };
  };
  const take = (piece: Buffer) => {
    if (overlong || piece.length === 0) return;
    // A CR ending the line is not counted: CRLF files get the same limit.
    if (size + piece.length > MAX_LINE_BYTES + 1) {
      overlong = true;
      parts = [];
      size = 0;
      return;
    }
    parts.push(piece);
    size += piece.length;
  };
  try {
    for await (const data of input as AsyncIterable<Buffer | string>) {
      const chunk = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
      let from = 0;
      for (let at = chunk.indexOf(0x0a); at !== -1; at = chunk.indexOf(0x0a, from)) {
        take(chunk.subarray(from, at));
        from = at + 1;
        yield end();
      }
      take(chunk.subarray(from));
    }
  } catch (err) {
    // Destroyed on purpose (Ctrl-C ends a pending read of stdin): the input ends here.
    if ((err as NodeJS.ErrnoException).code === 'ERR_STREAM_PREMATURE_CLOSE') return;
    throw err;
  }
  if (size > 0 || overlong) yield end();
}

function jsonLine(line: number, text: string): SourceLine {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    // JSON.parse quotes the text around the error: it may be a token, so only the position is kept.
    const at = /position (\d+)/.exec((err as Error).message)?.[1];
    return new SourceLine(line, undefined, {
      field: '(line)',
      message: `not valid JSON${at === undefined ? '' : ` (at character ${Number(at) + 1})`}`,
    });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return new SourceLine(line, undefined, { field: '(line)', message: 'expected a JSON object' });
  }
  return new SourceLine(line, value);
}

/**
 * How a message names a field or column someone wrote: as written when it is short and shaped like
 * a name, else by its length only (a file without a header row has a token where a name should be).
 */
export function fieldName(text: string): string {
  return /^[A-Za-z0-9_]{1,20}$/.test(text) ? text : `(${text.length} characters, not shown)`;
}

function csvHeader(line: number, text: string, columns: readonly string[]): string[] {
  const names = csvFields(text)?.map((n) => n.trim());
  const unknown = names === undefined ? -1 : names.findIndex((n) => !columns.includes(n));
  if (names === undefined || unknown !== -1) {
    const shown = names === undefined ? '' : fieldName(names[unknown]!);
    const what =
      names === undefined
        ? 'an unterminated quote'
        : shown.startsWith('(')
          ? `column ${unknown + 1} is no column name (${names[unknown]!.length} characters, not shown: is the first line a header row?)`
          : `unknown column ${unknown + 1} "${shown}"`;
    throw new InvalidInputError(`invalid CSV header (line ${line}): ${what}; the columns are ${columns.join(', ')}`, [
      { path: 'header', message: what },
    ]);
  }
  return names;
}

function csvLine(line: number, text: string, header: string[]): SourceLine {
  const cells = csvFields(text);
  if (cells === undefined) {
    return new SourceLine(line, undefined, { field: '(line)', message: 'unterminated quote (a record is one line)' });
  }
  if (cells.length !== header.length) {
    return new SourceLine(line, undefined, {
      field: '(line)',
      message: `expected ${header.length} fields as in the header, got ${cells.length}`,
    });
  }
  const record: Record<string, unknown> = {};
  header.forEach((name, i) => {
    const cell = cells[i]!;
    // An empty cell is an absent field; a list cell is `;`-separated.
    if (cell === '') return;
    record[name] = LIST_COLUMNS.has(name)
      ? cell
          .split(';')
          .map((s) => s.trim())
          .filter((s) => s !== '')
      : cell;
  });
  return new SourceLine(line, record);
}

/** RFC 4180 fields of one line (`"` quotes, `""` inside them); undefined when a quote is left open. */
function csvFields(text: string): string[] | undefined {
  const fields: string[] = [];
  let i = 0;
  for (;;) {
    let field = '';
    if (text[i] === '"') {
      i++;
      for (;;) {
        if (i >= text.length) return undefined;
        if (text[i] === '"') {
          if (text[i + 1] === '"') {
            field += '"';
            i += 2;
            continue;
          }
          i++;
          break;
        }
        field += text[i++];
      }
      // Anything between the closing quote and the comma is kept as written.
      while (i < text.length && text[i] !== ',') field += text[i++];
    } else {
      const end = text.indexOf(',', i);
      field = text.slice(i, end === -1 ? text.length : end);
      i = end === -1 ? text.length : end;
    }
    fields.push(field);
    if (i >= text.length) return fields;
    i++; // the comma
  }
}

/**
 * The number of records in a file, read through once before the import (for the progress bar's
 * total and ETA): its non-blank lines, less the header of a CSV file. Bytes are scanned, not decoded.
 */
export async function countRecords(file: string, format: RecordFormat): Promise<number> {
  let count = 0;
  let content = false;
  for await (const chunk of createReadStream(file) as AsyncIterable<Buffer>) {
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i]!;
      if (byte === 0x0a) {
        if (content) count++;
        content = false;
      } else if (byte > 0x20) {
        content = true;
      }
    }
  }
  if (content) count++;
  return format === 'csv' ? Math.max(0, count - 1) : count;
}
