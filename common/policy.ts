/**
 * What a policy says about one live token: pure, shared by `policy apply --dry-run` (client) and the
 * workflow applying the policy, so that the dry run lists exactly what the apply then does. No I/O,
 * no clock (the caller passes `nowMs`), no zod: this module is bundled into the workflow sandbox.
 */
import type { PolicySnapshot } from './messages.js';

export interface PolicySubject {
  issuedAt: string;
  expiresAt: string;
  scopes: string[];
  /** Last recorded use; null when never used (the idle clock then starts at issue). */
  lastUsedAt: string | null;
}

export type PolicyVerdict =
  | { kind: 'ok' }
  /** The expiry moves earlier, to the policy's maximum lifetime. */
  | { kind: 'shorten'; expiresAt: string; why: string }
  | { kind: 'revoke'; reason: 'policy' | 'inactive'; why: string };

/**
 * Scopes outside the allowed list, or a lifetime already past the maximum → revoke (`policy`); idle
 * longer than the idle timeout → revoke (`inactive`); an expiry beyond the maximum → shorten.
 */
export function evaluatePolicy(token: PolicySubject, policy: PolicySnapshot, nowMs: number): PolicyVerdict {
  if (policy.allowedScopes !== null) {
    const allowed = new Set(policy.allowedScopes);
    const refused = token.scopes.filter((s) => !allowed.has(s));
    if (refused.length > 0) {
      return {
        kind: 'revoke',
        reason: 'policy',
        why: `scope${refused.length === 1 ? '' : 's'} ${refused.join(', ')} not allowed by policy ${policy.name}`,
      };
    }
  }
  const issuedMs = Date.parse(token.issuedAt);
  if (policy.maxLifetimeMs !== null) {
    const limitMs = issuedMs + policy.maxLifetimeMs;
    if (limitMs <= nowMs) {
      return {
        kind: 'revoke',
        reason: 'policy',
        why: `older than policy ${policy.name}'s max lifetime (${policy.maxLifetimeMs} ms)`,
      };
    }
    if (Date.parse(token.expiresAt) > limitMs) {
      return {
        kind: 'shorten',
        expiresAt: new Date(limitMs).toISOString(),
        why: `expiry beyond policy ${policy.name}'s max lifetime (${policy.maxLifetimeMs} ms)`,
      };
    }
  }
  if (policy.idleTimeoutMs !== null) {
    const lastMs = token.lastUsedAt !== null ? Date.parse(token.lastUsedAt) : issuedMs;
    if (lastMs + policy.idleTimeoutMs <= nowMs) {
      return {
        kind: 'revoke',
        reason: 'inactive',
        why: `unused for longer than policy ${policy.name}'s idle timeout (${policy.idleTimeoutMs} ms)`,
      };
    }
  }
  return { kind: 'ok' };
}
