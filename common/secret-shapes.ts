/**
 * Well-known shapes of secrets, searched anywhere in a text. Pure (no node built-ins): workflow code
 * uses it too, to keep a secret that arrived by Signal out of activities and the audit trail.
 */

/** Subjects, names, reasons and evidence travel in plaintext (history, search attributes, audit, webhooks). */
export const SECRET_SHAPES: ReadonlyArray<{ kind: string; re: RegExp }> = [
  { kind: 'a GitHub token', re: /(?:^|[^A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,})/ },
  { kind: 'a Stripe key', re: /(?:^|[^A-Za-z0-9])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}/ },
  { kind: 'a Slack token', re: /(?:^|[^A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}/ },
  { kind: 'an AWS access key id', re: /(?:^|[^A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])/ },
  { kind: 'a GitLab token', re: /(?:^|[^A-Za-z0-9])glpat-[A-Za-z0-9_-]{16,}/ },
  { kind: 'a JSON Web Token', re: /(?:^|[^A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*/ },
  { kind: 'a private key', re: /-----BEGIN [A-Z ]*PRIVATE KEY-----/ },
  { kind: 'a signing secret', re: /(?:^|[^A-Za-z0-9])whsec_[A-Za-z0-9+/=]{16,}/ },
  { kind: 'a tokenwarden API key', re: /(?:^|[^A-Za-z0-9])twk_[A-Za-z0-9]{8,}_[A-Za-z0-9]{16,}/ },
];

/**
 * An email address anywhere in a text. Reasons are audit data kept for years (history, audit
 * trail, receivers' events, exports): people are named by an opaque id there, never an address.
 * Every repetition is bounded, so a long text costs linear time (it runs in workflow validators).
 */
export const EMAIL_ADDRESS = /[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![A-Za-z])/;

/** What a refused reason says instead of echoing it. */
export const EMAIL_IN_REASON =
  'contains an email address; a reason is audit data kept for years (history, audit trail, receivers): name people by an opaque id';

/** The shape of our own token strings, checksum unchecked (checking it needs CRC32, see secrets.ts). */
export const OWN_TOKEN_SHAPE = /tw_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}/;

/**
 * What kind of secret `text` looks like, or undefined. Stricter callers check our own tokens'
 * checksum first (validation.ts); here any token-shaped string counts, erring towards a secret.
 */
export function secretShapeKind(text: string): string | undefined {
  if (OWN_TOKEN_SHAPE.test(text)) return 'a tokenwarden token';
  return SECRET_SHAPES.find((shape) => shape.re.test(text))?.kind;
}

/** `text`, or a note naming what it looked like when it holds a secret: the whole string goes. */
export const redactedText = (text: string): string => {
  const kind = secretShapeKind(text);
  return kind === undefined ? text : `[redacted: ${kind}]`;
};

/**
 * A JSON value with every string (and object key) that looks like a secret replaced by a note:
 * for data that bypassed the library's refusal (a raw Signal) on its way to the audit trail.
 */
export function redactSecrets(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return redactedText(value);
  // A raw Signal can nest thousands deep in a few KiB: recursing on would overflow the stack.
  if (depth >= MAX_JSON_DEPTH && typeof value === 'object' && value !== null) return TOO_DEEP;
  if (Array.isArray(value)) return value.map((inner) => redactSecrets(inner, depth + 1));
  if (typeof value === 'object' && value !== null) {
    const out: Record<string, unknown> = {};
    let n = 0;
    for (const [key, inner] of Object.entries(value)) {
      out[secretShapeKind(key) === undefined ? key : `[redacted key ${++n}]`] = redactSecrets(inner, depth + 1);
    }
    return out;
  }
  return value;
}

/** How deep evidence may nest: the library refuses deeper, a raw Signal's is cut there. */
export const MAX_JSON_DEPTH = 32;
const TOO_DEEP = `[cut: nested deeper than ${MAX_JSON_DEPTH} levels]`;

/** Whether a JSON value nests deeper than MAX_JSON_DEPTH arrays or objects (iterative: any depth is safe). */
export function nestsTooDeep(value: unknown): boolean {
  const stack: Array<{ value: unknown; depth: number }> = [{ value, depth: 0 }];
  for (let next = stack.pop(); next !== undefined; next = stack.pop()) {
    if (typeof next.value !== 'object' || next.value === null) continue;
    if (next.depth >= MAX_JSON_DEPTH) return true;
    for (const inner of Object.values(next.value)) stack.push({ value: inner, depth: next.depth + 1 });
  }
  return false;
}

/**
 * The path of the first string (or object key) in a JSON value that looks like a secret, and its
 * kind; `isSecret` decides (the library's stricter check).
 */
export function findSecret(
  value: unknown,
  isSecret: (text: string) => string | undefined,
  path: Array<string | number> = [],
): { path: Array<string | number>; kind: string } | undefined {
  if (typeof value === 'string') {
    const kind = isSecret(value);
    return kind === undefined ? undefined : { path, kind };
  }
  if (Array.isArray(value)) {
    for (const [i, inner] of value.entries()) {
      const found = findSecret(inner, isSecret, [...path, i]);
      if (found) return found;
    }
    return undefined;
  }
  if (typeof value === 'object' && value !== null) {
    for (const [key, inner] of Object.entries(value)) {
      const keyKind = isSecret(key);
      if (keyKind !== undefined) return { path: [...path, '(a key)'], kind: keyKind };
      const found = findSecret(inner, isSecret, [...path, key]);
      if (found) return found;
    }
  }
  return undefined;
}
