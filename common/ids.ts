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

/**
 * The ids of an imported secret that came without a token id: derived from its hash (domain-separated
 * per kind), so rerunning an import without ids finds the rows the first run wrote.
 */
export const importedTokenId = (secretHash: Buffer) => TOKEN_ID_PREFIX + derivedHex('token id', secretHash);
export const importedCredentialId = (secretHash: Buffer) =>
  CREDENTIAL_ID_PREFIX + derivedHex('credential id', secretHash);

const derivedHex = (kind: string, secretHash: Buffer) =>
  createHash('sha256').update(`tokenwarden import ${kind}\0`).update(secretHash).digest('hex').slice(0, 32);
