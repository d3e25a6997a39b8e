import { z } from 'zod';
import { parseDuration, DURATION_HINT } from './durations.js';
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

/** A lifetime: a duration string (`30s`, `90d`) or a positive number of milliseconds. */
export const ttlSchema = z.unknown().transform((value, ctx) => {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value > 0) return value;
  const ms = typeof value === 'string' ? parseDuration(value) : undefined;
  if (ms !== undefined) return ms;
  ctx.addIssue({
    code: 'custom',
    message: `expected ${DURATION_HINT} (or a positive number of milliseconds), got ${JSON.stringify(value) ?? 'nothing'}`,
  });
  return z.NEVER;
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

/** Free text stored and sent to receivers: PostgreSQL text cannot hold NUL. */
const freeText = (max: number, empty: string) =>
  z
    .string()
    .trim()
    .min(1, empty)
    .max(max, `at most ${max} characters`)
    .refine((v) => !v.includes('\u0000'), 'must not contain NUL characters');

export const reasonSchema = freeText(500, 'a reason is required');

export const actorSchema = freeText(200, 'expected a non-empty actor');
