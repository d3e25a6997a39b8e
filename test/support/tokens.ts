/**
 * A token row written straight to the store, as the issuer's first step leaves it (no workflow, no
 * raw token anyone holds): for tests of the store, the kill and the reconciler.
 */
import { randomBytes } from 'node:crypto';
import type { StorePool } from '../../common/db.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import * as store from '../../common/store/index.js';

export const insertTokenRow = (pool: StorePool, overrides: Partial<store.NewToken> = {}) =>
  store.insertToken(pool, {
    tokenId: newTokenId(),
    credentialId: newCredentialId(),
    subject: 'usr_test',
    name: null,
    scopes: [],
    receivers: [],
    ttlMs: 60_000,
    secretHash: randomBytes(32),
    ...overrides,
  });
