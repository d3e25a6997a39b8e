/**
 * One record of a bulk import or bulk issue: validated alone (zod), so a bad record is reported with
 * its fields and the others go on. A raw token is hashed as soon as it is valid and never quoted in a
 * message.
 */
import { z } from 'zod';
import { formatDuration } from '../../common/durations.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import { hashToken } from '../../common/secrets.js';
import type { ImportedToken } from '../../common/store/index.js';
import {
  UNPRINTABLE,
  codePoint,
  FIELD_PURPOSE,
  nameSchema,
  receiverIdSchema,
  subjectSchema,
  tokenIdSchema,
  ttlSchema,
} from '../../common/validation.js';
import { issueSchema } from '../index.js';
import { fieldName, SourceLine, type RecordProblem } from './reader.js';

export const scopeSchema = z.string().regex(/^[\x21-\x7e]{1,100}$/, 'expected a scope without spaces');

/** A token of another system: any printable text (it is identified by its hash only). */
const rawTokenSchema = z
  .string()
  .min(1, 'expected the raw token, not an empty string')
  .max(4096, 'at most 4096 characters')
  .superRefine((value, ctx) => {
    const found = UNPRINTABLE.exec(value);
    if (found)
      ctx.addIssue({ code: 'custom', message: `must not contain control characters (found ${codePoint(found[0])})` });
    else if (value.trim() !== value)
      ctx.addIssue({ code: 'custom', message: 'must not begin or end with white space' });
  });

export const importRecordSchema = (maxTtlMs: number) =>
  z
    .strictObject({
      tokenId: tokenIdSchema.optional(),
      secretHash: z
        .string()
        .regex(/^[0-9a-fA-F]{64}$/, 'expected the SHA-256 of the token string as 64 hex digits')
        .optional(),
      token: rawTokenSchema.optional(),
      subject: subjectSchema,
      receivers: z.array(receiverIdSchema).default([]),
      expiresAt: z.iso.datetime({ offset: true, message: 'expected an ISO 8601 time with its offset' }).optional(),
      ttl: ttlSchema(maxTtlMs).optional(),
      name: nameSchema.optional(),
      scopes: z.array(scopeSchema).default([]),
    })
    .superRefine((r, ctx) => {
      // Columns swapped: the record's own secret where plaintext goes (a foreign format no shape knows).
      for (const field of ['subject', 'name'] as const) {
        if (r.token !== undefined && r[field] === r.token) {
          ctx.addIssue({ code: 'custom', path: [field], message: `is the record's token; ${FIELD_PURPOSE[field]}` });
        }
      }
      if ((r.token === undefined) === (r.secretHash === undefined)) {
        ctx.addIssue({
          code: 'custom',
          path: [r.token === undefined ? 'token' : 'secretHash'],
          message: 'expected exactly one of token (the raw token) and secretHash (its SHA-256 in hex)',
        });
      }
      if ((r.expiresAt === undefined) === (r.ttl === undefined)) {
        ctx.addIssue({ code: 'custom', path: ['expiresAt'], message: 'expected exactly one of expiresAt and ttl' });
      } else if (r.expiresAt !== undefined) {
        const ms = Date.parse(r.expiresAt) - Date.now();
        if (ms <= 0) ctx.addIssue({ code: 'custom', path: ['expiresAt'], message: 'must be in the future' });
        else if (ms > maxTtlMs) {
          ctx.addIssue({
            code: 'custom',
            path: ['expiresAt'],
            message: `at most ${formatDuration(maxTtlMs)} from now (TOKENWARDEN_MAX_TTL)`,
          });
        }
      }
    });

export type ImportRecordInput = z.input<ReturnType<typeof importRecordSchema>>;

/** A record for bulk issue: the single issue's fields, no other. */
export const issueRecordSchema = (maxTtlMs: number) => z.strictObject(issueSchema(maxTtlMs).shape);
export type IssueRecordInput = z.input<ReturnType<typeof issueRecordSchema>>;
export type IssueRecord = z.output<ReturnType<typeof issueRecordSchema>>;

/** A record ready for the store, or why its line is not one. */
export type Prepared =
  { line: number; token: ImportedToken } | { line: number; problem: RecordProblem & { issues?: RecordProblem[] } };

/** The problem of a record as one entry: its first field, every issue when there are several. */
export function problemOf(error: z.ZodError): RecordProblem & { issues?: RecordProblem[] } {
  const issues = error.issues.map((issue) => ({
    field:
      issue.code === 'unrecognized_keys'
        ? issue.keys.map(fieldName).join(',')
        : issue.path.map(String).join('.') || '(record)',
    message: issue.code === 'unrecognized_keys' ? 'unknown field' : issue.message,
  }));
  return issues.length === 1 ? issues[0]! : { ...issues[0]!, issues };
}

/** Turns each input item (a SourceLine of the reader, or a plain record) into a line number and a record. */
export function lineOf(item: unknown, position: number): SourceLine {
  return item instanceof SourceLine ? item : new SourceLine(position, item);
}

/** Validates and hashes import records; a record without a token id gets a fresh, time-ordered one. */
export function importPreparer(maxTtlMs: number): (item: SourceLine) => Prepared {
  const schema = importRecordSchema(maxTtlMs);
  return (item) => {
    if (item.problem) return { line: item.line, problem: item.problem };
    const parsed = schema.safeParse(item.record);
    if (!parsed.success) return { line: item.line, problem: problemOf(parsed.error) };
    const r = parsed.data;
    const secretHash = r.token !== undefined ? hashToken(r.token) : Buffer.from(r.secretHash!, 'hex');
    return {
      line: item.line,
      token: {
        tokenId: r.tokenId ?? newTokenId(),
        credentialId: newCredentialId(),
        idGiven: r.tokenId !== undefined,
        secretHash,
        subject: r.subject,
        name: r.name ?? null,
        scopes: r.scopes,
        receivers: [...new Set(r.receivers)].sort(),
        expiresAt: r.expiresAt === undefined ? null : new Date(r.expiresAt).toISOString(),
        ttlMs: r.ttl ?? null,
      },
    };
  };
}
