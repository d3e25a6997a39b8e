/**
 * The evidence export's input and its CSV form. Records come from common/store/audit-export.ts;
 * JSON Lines is each record as JSON, CSV one row per death with the receivers as a JSON cell.
 */
import { z } from 'zod';
import type { DeathFilter, DeathRecord } from '../common/store/audit-export.js';
import { instantSchema, subjectLookupSchema, UNPRINTABLE } from '../common/validation.js';

export const DEATH_EXPORT_FORMATS = ['jsonl', 'csv'] as const;
export type DeathExportFormat = (typeof DEATH_EXPORT_FORMATS)[number];

const instant = instantSchema.transform((text) => new Date(text).toISOString());

export const deathFilterSchema = z
  .strictObject({
    since: instant.optional(),
    until: instant.optional(),
    subject: subjectLookupSchema.optional(),
  })
  .refine((f) => f.since === undefined || f.until === undefined || f.since < f.until, {
    message: 'must be after since (since is inclusive, until exclusive)',
    path: ['until'],
  }) satisfies z.ZodType<DeathFilter>;
export type DeathFilterInput = z.input<typeof deathFilterSchema>;

/** The CSV's columns, in order: a record's scalar fields, then its receivers as one JSON cell. */
export const DEATH_CSV_COLUMNS = [
  'tokenId',
  'subject',
  'name',
  'policy',
  'status',
  'reason',
  'actor',
  'initiatingEntity',
  'correlationId',
  'issuedAt',
  'expiresAt',
  'requestedAt',
  'deadInStoreAt',
  'recordedAt',
  'deadEverywhereAt',
  'timeToDeadInStoreMs',
  'timeToDeadEverywhereMs',
  'propagation',
  'stuckAt',
  'propagationCompletedAt',
  'eventId',
  'receiversTotal',
  'receiversConfirmed',
  'receiversForced',
  'receiversUnconfirmed',
  'receivers',
  'auditSeqs',
  'asOf',
] as const;

const UNPRINTABLE_ALL = new RegExp(UNPRINTABLE.source, 'gu');
/**
 * A spreadsheet runs a cell that begins with one of these as a formula (CSV injection), the
 * fullwidth forms too (some Excel locales). Tab and CR never start a cell: they are escaped first.
 */
const FORMULA_START = /^[=+\-@\uff1d\uff0b\uff0d\uff20]/;

/**
 * One RFC 4180 field. Text a spreadsheet would run as a formula gets a leading `'` (OWASP's CSV
 * injection advice); control characters, which validated input never holds, are written `\uXXXX`.
 */
function csvField(value: string | number | null): string {
  if (value === null) return '';
  if (typeof value === 'number') return String(value);
  let text = value.replace(UNPRINTABLE_ALL, (c) => `\\u${c.codePointAt(0)!.toString(16).padStart(4, '0')}`);
  if (FORMULA_START.test(text)) text = `'${text}`;
  return /[",\r\n]|^\s|\s$/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

export const deathCsvHeader = (): string => `${DEATH_CSV_COLUMNS.join(',')}\r\n`;

/** A record as one CSV line (CRLF-terminated, as RFC 4180 has it). */
export function deathCsvRow(record: DeathRecord): string {
  const count = (outcomes: string[]) => record.receivers.filter((r) => outcomes.includes(r.outcome)).length;
  const cells: Record<(typeof DEATH_CSV_COLUMNS)[number], string | number | null> = {
    ...record,
    receiversTotal: record.receivers.length,
    receiversConfirmed: count(['verified', 'acknowledged']),
    receiversForced: count(['forced']),
    receiversUnconfirmed: count(['pending', 'failed', 'cancelled', 'untold']),
    receivers: JSON.stringify(record.receivers),
    auditSeqs: record.auditSeqs.join(' '),
  };
  return `${DEATH_CSV_COLUMNS.map((column) => csvField(cells[column])).join(',')}\r\n`;
}
