/**
 * Evidence of a suspicious report nests at most MAX_JSON_DEPTH levels: the library refuses deeper,
 * naming the field; a raw Signal's is cut there, so a few KiB nested thousands deep cannot overflow
 * the stack inside the workflow's handler (which would wedge the run).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { evidenceSchema } from '../client/self-managing.js';
import { MAX_JSON_DEPTH, nestsTooDeep } from '../common/secret-shapes.js';
import { parseSuspiciousReport } from '../workflows/lifecycle-state.js';

/** `[[[…'x'…]]]`, `depth` arrays deep. */
const nested = (depth: number): unknown => {
  let value: unknown = 'x';
  for (let i = 0; i < depth; i++) value = [value];
  return value;
};

describe('suspicious evidence nesting', () => {
  it('should cut a raw Signal’s evidence nested 10,000 deep instead of overflowing the stack', () => {
    const report = parseSuspiciousReport({ reason: 'r', evidence: nested(10_000) });
    assert.equal(report.malformed, false);
    let cursor: unknown = report.evidence;
    let depth = 0;
    while (Array.isArray(cursor)) {
      cursor = cursor[0];
      depth++;
    }
    assert.equal(depth, MAX_JSON_DEPTH, 'kept down to the limit');
    assert.match(String(cursor), /nested deeper than 32 levels/);
  });

  it('should keep evidence within the limit whole', () => {
    const report = parseSuspiciousReport({ reason: 'r', evidence: nested(MAX_JSON_DEPTH) });
    assert.deepEqual(report.evidence, nested(MAX_JSON_DEPTH));
    assert.equal(nestsTooDeep(nested(MAX_JSON_DEPTH)), false);
    assert.equal(nestsTooDeep(nested(MAX_JSON_DEPTH + 1)), true);
    assert.equal(nestsTooDeep({ a: [{ b: 'ok' }], c: 1 }), false);
  });

  it('should refuse evidence nested too deep in the library, naming the limit', () => {
    assert.equal(evidenceSchema.safeParse(nested(MAX_JSON_DEPTH)).success, true);
    for (const depth of [MAX_JSON_DEPTH + 1, 4_000]) {
      const result = evidenceSchema.safeParse(nested(depth));
      assert.equal(result.success, false, `depth ${depth}`);
      assert.match(result.error!.issues[0]!.message, /nested at most 32 levels deep/);
    }
  });
});
