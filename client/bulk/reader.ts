/**
 * Records read one line at a time from a file or stdin (JSON Lines, or CSV with a header row), each
 * with its line number, so a bad line is reported and the others go on. Nothing holds more than the
 * line being read: the consumer's pace pulls the lines (readline pauses its input while unread lines
 * pile up).
 */
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';
import { InvalidInputError } from '../../common/errors.js';

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
  const lines = createInterface({ input, crlfDelay: Infinity });
  let number = 0;
  let header: string[] | undefined;
  try {
    for await (let text of lines) {
      number++;
      if (number === 1) text = text.replace(/^\uFEFF/, '');
      if (text.trim() === '') continue;
      if (format === 'jsonl') {
        yield jsonLine(number, text);
      } else if (!header) {
        header = csvHeader(number, text, columns);
      } else {
        yield csvLine(number, text, header);
      }
    }
  } finally {
    lines.close();
  }
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

function csvHeader(line: number, text: string, columns: readonly string[]): string[] {
  const names = csvFields(text);
  const unknown = names === undefined ? undefined : names.find((n) => !columns.includes(n.trim()));
  if (names === undefined || unknown !== undefined) {
    const what =
      names === undefined ? 'an unterminated quote' : `unknown column ${JSON.stringify(unknown!.slice(0, 40))}`;
    throw new InvalidInputError(`invalid CSV header (line ${line}): ${what}; the columns are ${columns.join(', ')}`, [
      { path: 'header', message: what },
    ]);
  }
  return names.map((n) => n.trim());
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
