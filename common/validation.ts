import { z } from 'zod';
import { formatDuration, parseDuration, DURATION_HINT } from './durations.js';
import { InvalidInputError } from './errors.js';

/** Parses with a zod schema; on failure throws InvalidInputError naming every bad field. */
export function parseInput<S extends z.ZodType>(schema: S, input: unknown, what: string): z.output<S> {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const fields = result.error.issues.map((issue) => ({
    path: issue.path.map(String).join('.') || '(input)',
    message: issue.message,
  }));
  const detail = fields.map((f) => `${f.path}: ${f.message}`).join('; ');
  throw new InvalidInputError(`invalid ${what}: ${detail}`, fields);
}

/**
 * A lifetime: a duration string (`30s`, `90d`) or a positive number of milliseconds, at most
 * `maxMs` (TOKENWARDEN_MAX_TTL): an unbounded one overflows dates in JS and in Temporal.
 */
export const ttlSchema = (maxMs: number) =>
  z.unknown().transform((value, ctx) => {
    const ms =
      typeof value === 'number' && Number.isSafeInteger(value) && value > 0
        ? value
        : typeof value === 'string'
          ? parseDuration(value)
          : undefined;
    if (ms === undefined) {
      ctx.addIssue({
        code: 'custom',
        // The value is echoed only when short: a long one may be a secret pasted into the wrong field.
        message: `expected ${DURATION_HINT} (or a positive number of milliseconds), got ${
          typeof value === 'string' && value.length > 24
            ? `a string of ${value.length} characters`
            : (JSON.stringify(value) ?? 'nothing')
        }`,
      });
      return z.NEVER;
    }
    if (ms > maxMs) {
      ctx.addIssue({ code: 'custom', message: `at most ${formatDuration(maxMs)} (TOKENWARDEN_MAX_TTL)` });
      return z.NEVER;
    }
    return ms;
  });

/** Opaque subject ids (user or account ids). Emails are refused: search attributes are plaintext. */
export const subjectSchema = z
  .string()
  .regex(
    /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/,
    'expected an opaque id of letters, digits and _.:- (max 128), not an email',
  );

export const receiverIdSchema = z
  .string()
  .regex(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'expected a lowercase id of a-z, 0-9, _ and - (max 63)');

export const tokenIdSchema = z
  .string()
  .regex(/^tok_[0-9a-f]{32}$/, 'expected a token id like tok_0193…(32 hex digits)');

/**
 * Characters that steer a terminal or reorder text instead of showing: C0 and C1 controls (NUL,
 * BEL, ESC, CR, LF, tab…), DEL, line and paragraph separators, and bidirectional overrides.
 */
export const UNPRINTABLE = /[\p{Cc}\u2028\u2029\u202a-\u202e\u2066-\u2069]/u;

/** U+001B for ESC: how an error names a character it cannot show. */
export const codePoint = (char: string) => `U+${char.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}`;

/** Free text stored, printed and sent to receivers: printable characters only (PostgreSQL text cannot hold NUL either). */
const freeText = (max: number, empty: string) =>
  z
    .string()
    .trim()
    .min(1, empty)
    .max(max, `at most ${max} characters`)
    .superRefine((value, ctx) => {
      const found = UNPRINTABLE.exec(value);
      if (found)
        ctx.addIssue({ code: 'custom', message: `must not contain control characters (found ${codePoint(found[0])})` });
    });

export const reasonSchema = freeText(500, 'a reason is required');

export const actorSchema = freeText(200, 'expected a non-empty actor');

export const nameSchema = freeText(200, 'expected a non-empty name');

export const correlationIdSchema = freeText(200, 'expected a non-empty correlation id');
