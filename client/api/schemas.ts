/** Schemas shared by the routes: path parameters, the cursor, and the records the API answers with. */
import { z } from 'zod';
import { TOKEN_STATUSES } from '../../common/names.js';
import { receiverIdSchema, subjectLookupSchema, tokenIdSchema } from '../../common/validation.js';

export const tokenIdParams = z.object({ id: tokenIdSchema });
export const receiverIdParams = z.object({ id: receiverIdSchema });
export const subjectParams = z.object({ subject: subjectLookupSchema });

const CURSOR_VERSION = 'v1';

/** An opaque page cursor: the last token id of the page, versioned and base64url-encoded. */
export const encodeCursor = (lastId: string) => Buffer.from(`${CURSOR_VERSION}:${lastId}`).toString('base64url');

export const cursorSchema = z.string().transform((text, ctx) => {
  const decoded = /^[A-Za-z0-9_-]{1,200}$/.test(text) ? Buffer.from(text, 'base64url').toString('utf8') : '';
  const [version, id, ...extra] = decoded.split(':');
  if (version !== CURSOR_VERSION || extra.length > 0 || !tokenIdSchema.safeParse(id).success) {
    ctx.addIssue({ code: 'custom', message: 'expected the `next` cursor of a previous page' });
    return z.NEVER;
  }
  return id!;
});

export const listQuery = z.object({
  subject: subjectLookupSchema.optional(),
  status: z.enum(TOKEN_STATUSES).optional(),
  limit: z
    .string()
    .regex(/^\d{1,4}$/, 'expected a whole number from 1 to 1000')
    .transform(Number)
    .pipe(z.number().int().min(1, 'at least 1').max(1000, 'at most 1000'))
    .default(100),
  cursor: cursorSchema.optional(),
});

const timestamp = z.string().describe('ISO 8601');
const nullableTimestamp = timestamp.nullable();

/** A token as the store sees it (fields added later pass through). */
export const tokenSchema = z
  .looseObject({
    id: z.string(),
    subject: z.string(),
    name: z.string().nullable(),
    scopes: z.array(z.string()),
    receivers: z.array(z.string()),
    status: z.enum(TOKEN_STATUSES).describe('what a verifier sees now'),
    recordedStatus: z.enum(TOKEN_STATUSES),
    valid: z.boolean(),
    propagation: z.string(),
    issuedAt: timestamp,
    expiresAt: timestamp,
    revokedAt: nullableTimestamp,
    revokedBy: z.string().nullable(),
    revokeReason: z.string().nullable(),
  })
  .meta({ id: 'Token' });

export const deliverySchema = z
  .looseObject({ receiverId: z.string(), status: z.string(), attempts: z.number() })
  .meta({ id: 'Delivery' });

export const tokenViewSchema = tokenSchema.extend({ deliveries: z.array(deliverySchema) }).meta({ id: 'TokenView' });

export const receiverSchema = z
  .looseObject({ id: z.string(), url: z.string(), enabled: z.boolean(), createdAt: timestamp })
  .meta({ id: 'Receiver' });
