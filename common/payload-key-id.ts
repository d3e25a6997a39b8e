/**
 * A payload key's public id, apart from the codec: settings check TOKENWARDEN_PAYLOAD_ENCRYPT_KEY_ID
 * with it, and commands that need only the store must not load Temporal's modules the codec needs.
 */
import { hkdfSync } from 'node:crypto';

/** The encrypting key id that encrypts nothing: every process first learns a key, then encryption starts. */
export const DECRYPT_ONLY = 'none';

/** A payload key's public id: derived, never a prefix of the key itself. */
export function payloadKeyId(key: Buffer): string {
  return Buffer.from(hkdfSync('sha256', key, Buffer.alloc(0), 'tokenwarden payload key id', 8)).toString('hex');
}
