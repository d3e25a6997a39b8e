/** One error type per failure kind the user can act on. Messages never contain secrets. */

/** Bad input: names the field and what was expected. Nothing was changed. */
export class InvalidInputError extends Error {
  override readonly name = 'InvalidInputError';
  constructor(
    message: string,
    readonly fields: { path: string; message: string }[] = [],
  ) {
    super(message);
  }
}

export class NotFoundError extends Error {
  override readonly name = 'NotFoundError';
  constructor(
    readonly kind: 'token' | 'receiver' | 'api key' | 'revoke operation' | 'policy',
    readonly id: string,
  ) {
    super(`${kind} ${JSON.stringify(id)} not found`);
  }
}

/** A required setting is missing or malformed; names the environment variable. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

/**
 * The token's state refuses the request, though the request itself is well formed: nothing was
 * changed (the API answers 409, the CLI exits 4). `show` tells the state; retrying as it is fails again.
 */
export class TokenStateConflictError extends Error {
  override readonly name: string = 'TokenStateConflictError';
  constructor(
    readonly tokenId: string,
    message: string,
  ) {
    super(message);
  }
}

/** The token is revoked, expired or past its expiry: it can no longer be rotated, suspended or re-timed. */
export class TokenNotActiveError extends TokenStateConflictError {
  override readonly name = 'TokenNotActiveError';
}

/** Retry and force apply only while a revocation propagates (pending or stuck). */
export class NotPropagatingError extends TokenStateConflictError {
  override readonly name = 'NotPropagatingError';
}

/** An apply of the same policy is running (in this or another process): one at a time, so the namespace sees one rate. */
export class PolicyApplyInProgressError extends Error {
  override readonly name = 'PolicyApplyInProgressError';
  constructor(readonly policy: string) {
    super(
      `policy ${policy}: another apply of this policy is running; wait for it to finish (or stop it), then run apply again to tell the rest`,
    );
  }
}
