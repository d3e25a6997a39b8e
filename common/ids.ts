import { createHash } from 'node:crypto';
import { v7 as uuidv7 } from 'uuid';
import { CREDENTIAL_ID_PREFIX, EVENT_ID_PREFIX, TOKEN_ID_PREFIX } from './names.js';

/** Sortable, prefixed ids: prefix + UUIDv7 as 32 hex digits (time-ordered). */
export const newTokenId = () => TOKEN_ID_PREFIX + uuidv7().replaceAll('-', '');
export const newCredentialId = () => CREDENTIAL_ID_PREFIX + uuidv7().replaceAll('-', '');

/**
 * Deterministic event id for one logical event about a token: the same id whichever path (request,
 * expiry, reconciler) produces it, so receivers can deduplicate on `webhook-id`.
 */
export function revocationEventId(tokenId: string): string {
  return EVENT_ID_PREFIX + createHash('sha256').update(`${tokenId}:token-revoked`).digest('hex').slice(0, 32);
}

/** Deterministic event id of one credential's `credential.revoked` event (the store's credential_revocation_event_id). */
export function credentialRevocationEventId(credentialId: string): string {
  return EVENT_ID_PREFIX + createHash('sha256').update(`${credentialId}:credential-revoked`).digest('hex').slice(0, 32);
}
