/**
 * The central store: every SQL statement of tokenwarden lives in this folder, one module per role.
 * Validity is decided by the database clock: a token is valid iff `status = 'active' AND
 * expires_at > now()`. Every statement names its schema (see db.ts `Tables`).
 */
export * from './rows.js';
export * from './audit.js';
// Verification of the audit chains and their signed checkpoints (migrations/0021).
export * from './audit-verify.js';
export * from './receivers.js';
export * from './tokens.js';
export * from './kill.js';
export * from './deliveries.js';
export * from './reconciler.js';
export * from './bulk-revoke.js';
export * from './import.js';
// Tokens that manage themselves (migrations/0015, 0017).
export * from './credentials.js';
export * from './suspension.js';
export * from './expiry.js';
export * from './notices.js';
export { readLastUse, type LastUse } from './last-use.js';
// Named policies (migrations/0016).
export * from './policies.js';
