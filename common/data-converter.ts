/**
 * The one place that decides how tokenwarden's payloads reach Temporal: the worker, the library,
 * the CLI and the API all take their data converter from here, so every process encrypts with the
 * same keys and decodes what the others wrote.
 */
import path from 'node:path';
import type { DataConverter, PayloadCodec } from '@temporalio/common';
import { PACKAGE_ROOT, type StoreSettings } from './config.js';
import { EncryptionCodec } from './payload-codec.js';

/** Tolerates undecodable payloads (workflows/payload-converter.ts); bundles must be built with it too. */
export const PAYLOAD_CONVERTER_PATH = path.join(PACKAGE_ROOT, 'dist', 'workflows', 'payload-converter.js');
/** Moves failure messages into an encoded attribute (workflows/failure-converter.ts); bundles too. */
export const FAILURE_CONVERTER_PATH = path.join(PACKAGE_ROOT, 'dist', 'workflows', 'failure-converter.js');

/** A codec per process and key set: its "unknown key" report then comes once per key id. */
const codecs = new Map<string, EncryptionCodec>();

/** The payload codecs for these settings: encryption when payload keys are configured, none otherwise. */
export function payloadCodecs(settings: Pick<StoreSettings, 'payloadKeys'>): PayloadCodec[] {
  if (settings.payloadKeys.length === 0) return [];
  const cacheKey = settings.payloadKeys.map((k) => k.toString('base64')).join(',');
  let codec = codecs.get(cacheKey);
  if (!codec) {
    codec = new EncryptionCodec(settings.payloadKeys, {
      onUnknownKey: (keyId) =>
        process.stderr.write(
          `tokenwarden: a payload is encrypted with key ${keyId}, which is not configured: add that key to TOKENWARDEN_PAYLOAD_KEYS (after the key that encrypts) to read it\n`,
        ),
    });
    codecs.set(cacheKey, codec);
  }
  return [codec];
}

/** What a client (library, CLI, API) uses: Temporal's payload converter, our failure converter and codecs. */
export function clientDataConverter(settings: Pick<StoreSettings, 'payloadKeys'>): DataConverter {
  return { failureConverterPath: FAILURE_CONVERTER_PATH, payloadCodecs: payloadCodecs(settings) };
}

/** What a worker uses: the tolerant payload converter besides the client's. */
export function workerDataConverter(settings: Pick<StoreSettings, 'payloadKeys'>): DataConverter {
  return { ...clientDataConverter(settings), payloadConverterPath: PAYLOAD_CONVERTER_PATH };
}
