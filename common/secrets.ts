/**
 * Everything that touches secret material: token strings, their hashes, receivers' signing keys
 * (encrypted at rest) and Standard Webhooks signatures. Never imported by workflow code.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  hkdfSync,
  randomBytes,
  randomInt,
} from 'node:crypto';
import { crc32 } from 'node:zlib';
import { TOKEN_STRING_PREFIX } from './names.js';

const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
/** 43 base62 characters carry 43·log2(62) ≈ 256.03 bits. */
const BODY_LENGTH = 43;
const CHECKSUM_LENGTH = 6;
const TOKEN_RE = new RegExp(`^${TOKEN_STRING_PREFIX}_([0-9A-Za-z]{${BODY_LENGTH}})_([0-9A-Za-z]{${CHECKSUM_LENGTH}})$`);

function base62(value: number, width: number): string {
  let out = '';
  for (let i = 0; i < width; i++) {
    out = BASE62[value % 62] + out;
    value = Math.floor(value / 62);
  }
  return out;
}

function checksum(body: string): string {
  return base62(crc32(`${TOKEN_STRING_PREFIX}_${body}`), CHECKSUM_LENGTH);
}

/** A fresh token string `tw_<43 base62 chars>_<6 char CRC32>`; uniform per character (randomInt rejects bias). */
export function generateTokenString(): string {
  let body = '';
  for (let i = 0; i < BODY_LENGTH; i++) body += BASE62[randomInt(62)];
  return `${TOKEN_STRING_PREFIX}_${body}_${checksum(body)}`;
}

/** Offline check that a string is shaped like a tokenwarden token and its checksum matches. */
export function isWellFormedToken(text: string): boolean {
  const match = TOKEN_RE.exec(text);
  return match !== null && checksum(match[1]!) === match[2];
}

/**
 * A string another system may have issued (an imported token keeps its own format): printable ASCII
 * of a plausible length that does not claim our `tw_` format (those are checked by isWellFormedToken).
 */
export function isForeignToken(text: string): boolean {
  return !text.startsWith(`${TOKEN_STRING_PREFIX}_`) && /^[\x21-\x7e]{16,4096}$/.test(text);
}

/** The store's lookup key: SHA-256 of the whole token string. */
export function hashToken(token: string): Buffer {
  return createHash('sha256').update(token, 'utf8').digest();
}

/** A Standard Webhooks signing secret: `whsec_` + base64 of 32 random bytes. */
export function generateSigningSecret(): string {
  return `whsec_${randomBytes(32).toString('base64')}`;
}

export function signingKeyBytes(secret: string): Buffer {
  return Buffer.from(secret.replace(/^whsec_/, ''), 'base64');
}

/** `v1,<base64 HMAC-SHA256(key, "${id}.${timestamp}.${body}")>` per Standard Webhooks. */
export function signWebhook(secret: string, id: string, timestampSeconds: number, body: string): string {
  const mac = createHmac('sha256', signingKeyBytes(secret))
    .update(`${id}.${timestampSeconds}.${body}`)
    .digest('base64');
  return `v1,${mac}`;
}

/**
 * Key id of a master key, stored next to each ciphertext so a keyring can pick the key it needs.
 * HKDF under its own label, not a plain hash: the id is no fingerprint usable anywhere else. Like
 * any GCM tag it still confirms a guessed key, which is why keys must be 32 random bytes.
 */
export function masterKeyId(key: Buffer): string {
  return Buffer.from(hkdfSync('sha256', key, Buffer.alloc(0), 'tokenwarden master key id', 8)).toString('hex');
}

/** The id earlier versions stored (a truncated SHA-256 of the key): still read, replaced by rekey. */
const legacyMasterKeyId = (key: Buffer): string => createHash('sha256').update(key).digest('hex').slice(0, 16);

/**
 * The master keys of a deployment: the current key encrypts, every key decrypts. Rolling the key:
 * configure the new current key with the old one as previous, run `receiver rekey`, then drop the
 * old key.
 */
export class MasterKeyring {
  private readonly byId = new Map<string, Buffer>();
  readonly currentId: string | undefined;

  constructor(
    private readonly current: Buffer | undefined,
    previous: readonly Buffer[] = [],
  ) {
    this.currentId = current && masterKeyId(current);
    const keys = [...(current ? [current] : []), ...previous];
    // First come, first kept: the current key, then current-format ids, win any collision.
    for (const idOf of [masterKeyId, legacyMasterKeyId]) {
      for (const key of keys) if (!this.byId.has(idOf(key))) this.byId.set(idOf(key), key);
    }
  }

  /** Encrypts under the current key; undefined when no key is configured. */
  encrypt(plaintext: string, aad: string): { ciphertext: Buffer; keyId: string } | undefined {
    if (!this.current || !this.currentId) return undefined;
    return { ciphertext: encryptSecret(this.current, plaintext, aad), keyId: this.currentId };
  }

  /** Decrypts with the key the id names; undefined when the keyring does not hold it. */
  decrypt(keyId: string, ciphertext: Buffer, aad: string): string | undefined {
    const key = this.byId.get(keyId);
    return key && decryptSecret(key, ciphertext, aad);
  }
}

/** AES-256-GCM; output is iv(12) ‖ tag(16) ‖ ciphertext. `aad` binds the ciphertext to its row. */
export function encryptSecret(key: Buffer, plaintext: string, aad: string): Buffer {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  cipher.setAAD(Buffer.from(aad, 'utf8'));
  const ct = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), ct]);
}

export function decryptSecret(key: Buffer, blob: Buffer, aad: string): string {
  const decipher = createDecipheriv('aes-256-gcm', key, blob.subarray(0, 12));
  decipher.setAAD(Buffer.from(aad, 'utf8'));
  decipher.setAuthTag(blob.subarray(12, 28));
  return Buffer.concat([decipher.update(blob.subarray(28)), decipher.final()]).toString('utf8');
}
