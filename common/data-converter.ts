/**
 * The one place that decides how tokenwarden's payloads reach Temporal: the worker, the library,
 * the CLI and the API all take their data converter from here, so every process encrypts with the
 * same keys and decodes what the others wrote.
 */
import path from 'node:path';
import type { DataConverter, PayloadCodec } from '@temporalio/common';
import { PACKAGE_ROOT, type StoreSettings } from './config.js';
import { EncryptionCodec } from './payload-codec.js';
import { payloadKeyId } from './payload-key-id.js';

/** Tolerates undecodable payloads (workflows/payload-converter.ts); bundles must be built with it too. */
export const PAYLOAD_CONVERTER_PATH = path.join(PACKAGE_ROOT, 'dist', 'workflows', 'payload-converter.js');
/** Moves failure messages into an encoded attribute (workflows/failure-converter.ts); bundles too. */
export const FAILURE_CONVERTER_PATH = path.join(PACKAGE_ROOT, 'dist', 'workflows', 'failure-converter.js');

type PayloadKeySettings = Pick<StoreSettings, 'payloadKeys' | 'payloadEncryptKeyId'>;

/** A codec per process and key set (by ids, never key material): its "unknown key" report then comes once per key id. */
const codecs = new Map<string, EncryptionCodec>();

const newCodec = (settings: PayloadKeySettings, reporter: string) =>
  new EncryptionCodec(settings.payloadKeys, {
    ...(settings.payloadEncryptKeyId !== undefined ? { encryptKeyId: settings.payloadEncryptKeyId } : {}),
    onUnknownKey: (keyId) =>
      process.stderr.write(
        `tokenwarden${reporter}: a payload is encrypted with key ${keyId}, which is not configured: add that key to TOKENWARDEN_PAYLOAD_KEYS (after the key that encrypts) to read it\n`,
      ),
  });

/**
 * The payload codecs for these settings. Always one, even without keys: it then encrypts nothing
 * but still reports the encrypted payloads it meets, so a process missing the keys says so.
 */
export function payloadCodecs(settings: PayloadKeySettings): PayloadCodec[] {
  const cacheKey = `${settings.payloadKeys.map(payloadKeyId).join(',')}/${settings.payloadEncryptKeyId ?? ''}`;
  let codec = codecs.get(cacheKey);
  if (!codec) {
    codec = newCodec(settings, '');
    codecs.set(cacheKey, codec);
  }
  return [codec];
}

/**
 * The codecs of the API's codec endpoints: an instance of their own, so callers sending made-up key
 * ids exhaust its reports only, never those of a worker in the same process.
 */
export function codecEndpointCodecs(settings: PayloadKeySettings): PayloadCodec[] {
  return [newCodec(settings, ' api (codec endpoint)')];
}

/** What the process encrypts with, for its start-up line: a mixed fleet then shows in the logs. */
export function describePayloadEncryption(settings: PayloadKeySettings): string {
  const codec = newCodec(settings, '');
  const decrypts = codec.keyIds.length ? codec.keyIds.join(', ') : 'none';
  return `payloads encrypted with key ${codec.keyId ?? 'none (plaintext)'}; keys that decrypt: ${decrypts}`;
}

/** What a client (library, CLI, API) uses: Temporal's payload converter, our failure converter and codecs. */
export function clientDataConverter(settings: PayloadKeySettings): DataConverter {
  return { failureConverterPath: FAILURE_CONVERTER_PATH, payloadCodecs: payloadCodecs(settings) };
}

/** What a worker uses: the tolerant payload converter besides the client's. */
export function workerDataConverter(settings: PayloadKeySettings): DataConverter {
  return { ...clientDataConverter(settings), payloadConverterPath: PAYLOAD_CONVERTER_PATH };
}
