import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { SUMMARY_MAX_BYTES, summaryText, truncateUtf8, withoutControls } from '../common/text.js';

const utf8 = (s: string) => Buffer.byteLength(s, 'utf8');

describe('text with byte limits', () => {
  it('should leave text within the limit unchanged', () => {
    assert.equal(truncateUtf8('left the company', 300), 'left the company');
  });

  it('should cut CJK text by UTF-8 bytes, not UTF-16 units, and mark the cut', () => {
    const reason = '退職'.repeat(250); // 500 characters, 1500 bytes
    const cut = truncateUtf8(reason, 300);
    assert.ok(utf8(cut) <= 300, `${utf8(cut)} bytes`);
    assert.ok(cut.endsWith('…'));
    assert.ok(reason.startsWith(cut.slice(0, -1)));
  });

  it('should count the escapes JSON adds to quotes and backslashes', () => {
    const cut = truncateUtf8('"\\'.repeat(300), 300);
    assert.ok(Buffer.byteLength(JSON.stringify(cut), 'utf8') - 2 <= 300, `${JSON.stringify(cut).length} bytes`);
    assert.ok(cut.endsWith('…'));
  });

  it('should never split a surrogate pair', () => {
    const cut = truncateUtf8('🔑'.repeat(100), 50);
    assert.ok(utf8(cut) <= 50);
    assert.doesNotMatch(cut, /[\ud800-\udbff](?![\udc00-\udfff])/);
    assert.equal(cut, `${'🔑'.repeat(11)}…`);
  });

  it('should show control characters as spaces in a summary', () => {
    assert.equal(withoutControls('a\u001b[31mb\r\nc\u0007\u009b'), 'a [31mb  c  ');
    const s = summaryText(`revoke: ${'\u001b'.repeat(400)}`);
    assert.ok(utf8(s) <= SUMMARY_MAX_BYTES);
    // eslint-disable-next-line no-control-regex -- looking for control characters
    assert.doesNotMatch(s, /[\u0000-\u001f]/);
  });
});
