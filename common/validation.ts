import { z } from 'zod';
import { formatDuration, parseDuration, DURATION_HINT } from './durations.js';
import { InvalidInputError } from './errors.js';
import { EMAIL_ADDRESS, EMAIL_IN_REASON, OWN_TOKEN_SHAPE, SECRET_SHAPES } from './secret-shapes.js';
import { isWellFormedToken } from './secrets.js';

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
        message: `expected ${DURATION_HINT} (or a positive number of milliseconds), got ${described(value)}`,
      });
      return z.NEVER;
    }
    if (ms > maxMs) {
      ctx.addIssue({ code: 'custom', message: `at most ${formatDuration(maxMs)} (TOKENWARDEN_MAX_TTL)` });
      return z.NEVER;
    }
    return ms;
  });

/**
 * What a wrong value was, for a message: the value itself only when it looks like a duration (a
 * secret pasted into the wrong field must not be echoed), else its type and length.
 */
function described(value: unknown): string {
  if (typeof value === 'string') {
    return /^\s*\d{1,12}\s*[A-Za-z]{1,8}\s*$/.test(value)
      ? JSON.stringify(value)
      : `a string of ${value.length} characters`;
  }
  if (typeof value === 'number') return 'a number that is not a positive whole number';
  if (Array.isArray(value)) return `an array of ${value.length} items`;
  if (value === null || value === undefined) return value === null ? 'null' : 'nothing';
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

const OWN_TOKEN_SHAPE_ALL = new RegExp(OWN_TOKEN_SHAPE.source, 'g');

/** What kind of secret `text` holds (`a GitHub token`), or undefined when it looks like none. */
export function secretKind(text: string): string | undefined {
  for (const match of text.matchAll(OWN_TOKEN_SHAPE_ALL)) {
    if (isWellFormedToken(match[0])) return 'a tokenwarden token';
  }
  return SECRET_SHAPES.find((shape) => shape.re.test(text))?.kind;
}

/** What a subject and a name are, said when a value is refused instead of echoing it. */
export const FIELD_PURPOSE = {
  subject: 'a subject is an opaque user or service id',
  name: 'a name is a label people read, sent in plaintext to receivers',
  reason: 'a reason is kept in plaintext (workflow history, audit trail, receivers)',
  actor: 'an actor names who acted, kept in plaintext (workflow history, audit trail, receivers)',
} as const;

/** Refuses a value holding a secret, saying what the field is for instead of echoing it. */
const noSecret =
  (what: string) =>
  (value: string, ctx: z.core.$RefinementCtx<string>): void => {
    const kind = secretKind(value);
    if (kind !== undefined) ctx.addIssue({ code: 'custom', message: `looks like a secret (${kind}); ${what}` });
  };

/**
 * A subject as a lookup names it (list, offboard, revoke by filter): the format only, so a subject
 * stored before secret-shaped ones were refused can still be found and cleaned up.
 */
export const subjectLookupSchema = z
  .string()
  .regex(
    /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/,
    'expected an opaque id of letters, digits and _.:- (max 128), not an email',
  );

/** Opaque subject ids (user or account ids) as written to a new token. Emails are refused: search attributes are plaintext. */
export const subjectSchema = subjectLookupSchema.superRefine(noSecret(FIELD_PURPOSE.subject));

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

export const reasonSchema = freeText(500, 'a reason is required')
  .superRefine(noSecret(FIELD_PURPOSE.reason))
  .superRefine((value, ctx) => {
    if (EMAIL_ADDRESS.test(value)) ctx.addIssue({ code: 'custom', message: EMAIL_IN_REASON });
  });

export const actorSchema = freeText(200, 'expected a non-empty actor').superRefine(noSecret(FIELD_PURPOSE.actor));

export const nameSchema = freeText(200, 'expected a non-empty name').superRefine(noSecret(FIELD_PURPOSE.name));

export const correlationIdSchema = freeText(200, 'expected a non-empty correlation id');

/** An instant: an ISO 8601 date (midnight UTC) or date-time with Z or an offset. */
export const instantSchema = z.union([z.iso.datetime({ offset: true }), z.iso.date()], {
  error: 'expected an ISO 8601 date or date-time, e.g. 2026-01-31 or 2026-01-31T12:00:00Z',
});

/** A policy's name, as the `policy` table's check: lowercase, digits, `.`, `_`, `-`. */
export const policyNameSchema = z
  .string()
  .regex(/^[a-z0-9][a-z0-9._-]{0,62}$/, 'expected a lowercase name of a-z, 0-9, ., _ and - (max 63)');

/** A policy's name given alone (an argument, a URL), checked as the field `name`. */
export const parsePolicyName = (name: unknown): string =>
  parseInput(z.object({ name: policyNameSchema }), { name }, 'policy name').name;
