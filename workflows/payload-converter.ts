/**
 * The payload converter of the worker (workflow sandbox and activities). It is Temporal's default
 * converter, except that a payload it cannot decode (an unknown encoding, bytes that are not the JSON
 * they claim) becomes an `UndecodablePayload` value instead of an exception. An exception would fail
 * every workflow task of the token for good (a Signal stays in history and is replayed), so one bad
 * `temporal workflow signal` could wedge a token; with this value the message handlers see a
 * malformed message and act on it: a revoke still revokes (reason `unspecified`, audited), an Update
 * is rejected by its validator.
 */
import { defaultPayloadConverter, type Payload, type PayloadConverter } from '@temporalio/common';

export interface UndecodablePayload {
  /** The payload's encoding and the error's class; never its bytes or message (they may quote the data). */
  undecodablePayload: { encoding: string; error: string };
}

export function isUndecodablePayload(value: unknown): value is UndecodablePayload {
  return typeof value === 'object' && value !== null && 'undecodablePayload' in value;
}

const encodingOf = (payload: Payload): string => {
  const raw = payload.metadata?.encoding;
  // Metadata is caller-controlled: keep what is recorded short and printable.
  return raw
    ? new TextDecoder()
        .decode(raw)
        .replace(/[^\x20-\x7e]/g, '?')
        .slice(0, 100)
    : '(none)';
};

export const payloadConverter: PayloadConverter = {
  toPayload: (value, context, hint) => defaultPayloadConverter.toPayload(value, context, hint),
  fromPayload<T>(...args: Parameters<PayloadConverter['fromPayload']>): T {
    try {
      return defaultPayloadConverter.fromPayload<T>(...(args as [Payload]));
    } catch (err) {
      const error = err instanceof Error ? err.name : 'undecodable';
      return { undecodablePayload: { encoding: encodingOf(args[0]), error } } as T;
    }
  },
};
