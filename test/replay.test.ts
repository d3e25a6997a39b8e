/**
 * Determinism: recorded histories of released workflow code are replayed against the current
 * code. A change that is not gated by patched() fails here. No server needed.
 * Re-record (only for a deliberate, versioned change): TOKENWARDEN_RECORD_HISTORIES=1 npm test -- lifecycle
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { Worker } from '@temporalio/worker';
import { WORKFLOWS_PATH } from '../worker/worker.js';
import { HISTORIES_DIR, loadHistory } from './support/history.js';

const files = readdirSync(HISTORIES_DIR)
  .filter((f) => f.endsWith('.json'))
  .sort();
const bundle = process.env.TOKENWARDEN_TEST_WORKFLOW_BUNDLE;

describe('recorded histories replay', () => {
  it('should have the recorded scenarios checked in', () => {
    assert.deepEqual(files, ['expire-deliver.json', 'revoke-stuck-retry.json']);
  });
  for (const file of files) {
    it(`should replay ${file} without a determinism error`, async () => {
      const history = loadHistory(readFileSync(path.join(HISTORIES_DIR, file), 'utf8'));
      assert.ok((history.events?.length ?? 0) > 10, 'a real history');
      await Worker.runReplayHistory(
        bundle ? { workflowBundle: { codePath: bundle } } : { workflowsPath: WORKFLOWS_PATH },
        history,
      );
    });
  }
});
