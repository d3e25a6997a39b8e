/**
 * Text for places with a byte limit and a human reader (Temporal summaries, terminal output). Pure:
 * also used by workflow code (TextEncoder is available in the sandbox).
 */

/**
 * Temporal's default `limit.userMetadataSummarySize` is 400 bytes for the whole encoded payload:
 * encrypted (common/payload-codec.ts), a summary of n bytes of JSON text is about n + 114 (nonce,
 * tag, the inner payload's framing and encoding, the key id), so 240 leaves room to spare.
 */
export const SUMMARY_MAX_BYTES = 240;

const encoder = new TextEncoder();

/** Control characters (C0, DEL, C1) shown as a space: a summary or a terminal line is one line of text. */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
export const withoutControls = (text: string): string => text.replace(/[\u0000-\u001f\u007f-\u009f]/g, ' ');

/** Bytes of `char` inside a JSON string: its UTF-8, plus the backslash that escapes `"` and `\\`. */
const jsonBytes = (char: string): number => encoder.encode(char).length + (char === '"' || char === '\\' ? 1 : 0);

/**
 * `text` cut so that, as a JSON string (how summaries are encoded), its content takes at most
 * `maxBytes` of UTF-8 — never inside a character (a surrogate pair stays whole), with `…` marking a
 * cut. The byte count, not the UTF-16 length, is what servers limit. Control characters, which JSON
 * escapes at up to six bytes each, are expected to be removed first (see summaryText).
 */
export function truncateUtf8(text: string, maxBytes: number): string {
  let total = 0;
  for (const char of text) total += jsonBytes(char);
  if (total <= maxBytes) return text;
  const budget = maxBytes - 3; // the ellipsis is 3 bytes of UTF-8
  let bytes = 0;
  let out = '';
  for (const char of text) {
    const size = jsonBytes(char);
    if (bytes + size > budget) break;
    bytes += size;
    out += char;
  }
  return `${out}…`;
}

/** One line for a Temporal summary: no control characters, at most SUMMARY_MAX_BYTES of UTF-8. */
export const summaryText = (text: string): string => truncateUtf8(withoutControls(text), SUMMARY_MAX_BYTES);
