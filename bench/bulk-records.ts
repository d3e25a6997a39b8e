/**
 * Import records as an adopting team would have them: one JSON object a line, each an existing token
 * known by its id, subject, receivers and expiry; half carry the token string (the importer hashes
 * it), half its SHA-256 (the importer takes it as is). The strings are random, made for this run.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { once } from 'node:events';
import { newTokenId } from '../common/ids.js';

export interface ImportRecord {
  tokenId: string;
  subject: string;
  receivers: string[];
  ttl: string;
  name: string;
  token?: string;
  secretHash?: string;
}

/** The i-th record of a run: subjects of 10 tokens each, a token string on even lines. */
export function importRecord(i: number, opts: { tag: string; receiver: string; subjectPrefix?: string }): ImportRecord {
  const secret = `legacy_${randomBytes(24).toString('base64url')}`;
  return {
    tokenId: newTokenId(),
    subject: `${opts.subjectPrefix ?? 'usr_import'}_${opts.tag}_${Math.floor(i / 10)}`,
    receivers: [opts.receiver],
    ttl: '30d',
    name: `legacy-${opts.tag}-${i}`,
    ...(i % 2 === 0 ? { token: secret } : { secretHash: createHash('sha256').update(secret).digest('hex') }),
  };
}

/** Writes `count` records to `file` as JSON lines, streaming (a million lines never sit in memory). */
export async function writeImportFile(
  file: string,
  count: number,
  record: (i: number) => ImportRecord,
): Promise<{ bytes: number }> {
  const out = createWriteStream(file, { mode: 0o600 });
  let bytes = 0;
  for (let i = 0; i < count; i++) {
    const line = `${JSON.stringify(record(i))}\n`;
    bytes += Buffer.byteLength(line);
    if (!out.write(line)) await once(out, 'drain');
  }
  out.end();
  await once(out, 'finish');
  return { bytes };
}
