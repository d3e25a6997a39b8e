/**
 * Payload encryption for everything tokenwarden stores in Temporal: workflow inputs, Signals,
 * Updates, activity arguments and results, summaries, and failure messages (with the failure
 * converter in workflows/failure-converter.ts). AES-256-GCM; the key's id travels in the payload's
 * metadata, so keys roll: one configured key encrypts (the first, unless another is named, or none
 * while a fleet learns a new key), every configured key decrypts, and a payload that was never
 * encrypted (histories recorded before encryption) passes through unchanged. This gives
 * confidentiality, not integrity: plaintext payloads are accepted by design, so anyone who may send
 * a Signal can forge one, and the constant associated data does not bind a ciphertext to a workflow.
 *
 * A payload this codec cannot decrypt (a key no longer configured, bytes that fail authentication, a
 * forged `binary/encrypted` payload sent by hand) is returned as it is, never thrown: a decode that
 * throws fails the workflow task on every retry and would wedge the token. The worker's payload
 * converter then turns it into an undecodable value, which the handlers treat as a malformed
 * message (a revoke still revokes). The key id it named is logged, once, so an operator who dropped
 * a key too early sees which one to put back.
 *
 * Runs outside the workflow sandbox (client, worker, API), so node:crypto is fine here.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import type { Payload, PayloadCodec } from '@temporalio/common';
import proto from '@temporalio/proto';
import { DECRYPT_ONLY, payloadKeyId } from './payload-key-id.js';

const { temporal } = proto;

/** The metadata encoding of an encrypted payload (Temporal's samples use the same name). */
export const ENCRYPTED_ENCODING = 'binary/encrypted';
/** The metadata key naming the key that encrypted a payload. */
export const KEY_ID_METADATA = 'encryption-key-id';

const IV_BYTES = 12;
const TAG_BYTES = 16;
/** Bound into every ciphertext: a payload encrypted by anything else with the same key does not decrypt here. */
const AAD = Buffer.from('tokenwarden payload v1');

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface PayloadCodecOptions {
  /** The id of the configured key that encrypts, or DECRYPT_ONLY; the first key when unset. */
  encryptKeyId?: string;
  /** Called once per key id the codec met but does not hold (the id only, never key material). */
  onUnknownKey?: (keyId: string) => void;
}

/**
 * Without keys it encrypts nothing and still reports the encrypted payloads it meets: a process
 * started without keys in an encrypted deployment then says so instead of reading them as malformed.
 */
export class EncryptionCodec implements PayloadCodec {
  private readonly current: { id: string; key: Buffer } | undefined;
  private readonly byId = new Map<string, Buffer>();
  private readonly reported = new Set<string>();

  /** Every key decrypts; `options.encryptKeyId` (default: `keys[0]`) encrypts. */
  constructor(
    keys: readonly Buffer[],
    private readonly options: PayloadCodecOptions = {},
  ) {
    for (const key of keys) {
      if (key.length !== 32) throw new Error('payload keys must be 32 bytes');
      const id = payloadKeyId(key);
      if (!this.byId.has(id)) this.byId.set(id, key);
    }
    const encryptId = options.encryptKeyId ?? (keys[0] && payloadKeyId(keys[0]));
    if (encryptId === undefined || encryptId === DECRYPT_ONLY) this.current = undefined;
    else {
      const key = this.byId.get(encryptId);
      if (!key) throw new Error(`the payload key ${encryptId} that should encrypt is not configured`);
      this.current = { id: encryptId, key };
    }
  }

  /** The id of the key that encrypts; undefined when none does. */
  get keyId(): string | undefined {
    return this.current?.id;
  }

  /** The ids of the keys that decrypt. */
  get keyIds(): string[] {
    return [...this.byId.keys()];
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    const current = this.current;
    return current ? payloads.map((payload) => this.encrypt(payload, current)) : payloads;
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((payload) => this.decrypt(payload) ?? payload);
  }

  private encrypt(payload: Payload, current: { id: string; key: Buffer }): Payload {
    const plaintext = temporal.api.common.v1.Payload.encode(payload).finish();
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', current.key, iv);
    cipher.setAAD(AAD);
    const data = Buffer.concat([iv, cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
    return {
      metadata: { encoding: encoder.encode(ENCRYPTED_ENCODING), [KEY_ID_METADATA]: encoder.encode(current.id) },
      data: new Uint8Array(data),
    };
  }

  /** The payload inside, or undefined when it is not one of ours or cannot be decrypted. */
  private decrypt(payload: Payload): Payload | undefined {
    const metadata = payload.metadata ?? {};
    const encoding = metadata.encoding && decoder.decode(metadata.encoding);
    if (encoding !== ENCRYPTED_ENCODING) return undefined;
    const keyIdBytes = metadata[KEY_ID_METADATA];
    const keyId = keyIdBytes ? decoder.decode(keyIdBytes) : '';
    const key = this.byId.get(keyId);
    if (!key) {
      this.reportUnknown(keyId);
      return undefined;
    }
    const data = payload.data;
    if (!data || data.length < IV_BYTES + TAG_BYTES) return undefined;
    try {
      const decipher = createDecipheriv('aes-256-gcm', key, data.subarray(0, IV_BYTES));
      decipher.setAAD(AAD);
      decipher.setAuthTag(data.subarray(data.length - TAG_BYTES));
      const plaintext = Buffer.concat([
        decipher.update(data.subarray(IV_BYTES, data.length - TAG_BYTES)),
        decipher.final(),
      ]);
      const inner = temporal.api.common.v1.Payload.decode(plaintext);
      return { metadata: inner.metadata ?? {}, data: inner.data ?? new Uint8Array() };
    } catch {
      // Authentication failed (tampered, forged) or the plaintext is not a payload: left as it is.
      return undefined;
    }
  }

  private reportUnknown(keyId: string): void {
    // Metadata is caller-controlled: report a bounded, printable id.
    const shown = keyId.replace(/[^\x20-\x7e]/g, '?').slice(0, 64) || '(none)';
    if (this.reported.has(shown) || this.reported.size >= 100) return;
    this.reported.add(shown);
    this.options.onUnknownKey?.(shown);
  }
}
