/**
 * Determinism: recorded histories are replayed against the current workflow code (no server). A
 * change to the command sequence that is not gated by patched() fails here.
 *
 * test/histories/*.json(.gz) were recorded by the current code. A subfolder holds the histories of
 * the code before a patch, named after that patch, and stays as long as such runs may exist.
 * To record: `TOKENWARDEN_RECORD_HISTORIES=1 npm test -- lifecycle` writes the history of every
 * scenario whose test calls maybeRecordHistory(), skipping files that already exist. After adding a
 * patch, move the top-level files into a folder named after it, then record (a patch reached only
 * by some scenarios may move just those; the others then keep replaying the pre-patch path). Never delete and
 * re-record a history to make this test pass: that hides the very change it exists to catch.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Worker } from '@temporalio/worker';
import { WORKFLOWS_PATH } from '../worker/worker.js';
import { workerDataConverter } from '../common/data-converter.js';
import { SEARCH_ATTRIBUTE } from '../common/names.js';
import { historyFiles, loadHistory, RECORDING_PAYLOAD_KEY } from './support/history.js';
import { patchedUpserts } from './support/patches.js';

const files = historyFiles();
const bundle = process.env.TOKENWARDEN_TEST_WORKFLOW_BUNDLE;

describe('recorded histories replay', () => {
  it('should have the recorded scenarios checked in', () => {
    assert.deepEqual(files, [
      'before-audit-checkpoint/reconcile-pass.json',
      'before-local-store-calls/cancelled-mid-propagation.json',
      'before-local-store-calls/continue-as-new.json.gz',
      'before-local-store-calls/database-clock-wait.json',
      'before-local-store-calls/delivery-ended-retried.json',
      'before-local-store-calls/escalate-force.json',
      'before-local-store-calls/expire-deliver.json',
      'before-local-store-calls/force-while-killing.json',
      'before-local-store-calls/malformed-revoke.json',
      'before-local-store-calls/restart-adopts-stuck.json',
      'before-local-store-calls/revoke-stuck-retry.json',
      'before-pending-receivers/revoke-stuck-retry.json',
      'before-reconcile-summary/reconcile-pass.json',
      'before-store-driven-propagation/expire-deliver.json',
      'before-store-driven-propagation/revoke-stuck-retry.json',
      'cancelled-mid-propagation.json',
      'change-expiry-extend.json',
      'continue-as-new.json.gz',
      'database-clock-wait.json',
      'delivery-ended-retried.json',
      'escalate-force.json',
      'expire-deliver.json',
      'force-while-killing.json',
      'inactivity-revoke.json',
      'local-kill-fallback.json',
      'long-life-after-continue-as-new.json.gz',
      'malformed-revoke.json',
      'owner-down-warning-revoke.json',
      'policy-changed-revoke.json',
      'policy-changed-shorten.json',
      'reconcile-pass.json',
      'restart-adopts-stuck.json',
      'revoke-stuck-retry.json',
      'rotation-automatic.json',
      'rotation-cancelled-mid-send.json',
      'rotation-grace-end.json',
      'rotation-manual-local.json',
      'rotation-manual.json',
      'scheduled-revoke-cancelled.json',
      'scheduled-revoke.json',
      'suspend-resume.json',
      'suspicious-revoke.json',
      'suspicious-rotate.json',
      'warnings-expire.json',
    ]);
  });
  it('should hold a stuck propagation patched once for its pending receivers, each upsert a change', () => {
    // Recorded under the patch: its marker, then TokenPendingReceivers as the set shrank. Replay
    // fails if a later edit moves or repeats the upsert (into a query, before the patch call).
    const trail = patchedUpserts(
      loadHistory('revoke-stuck-retry.json'),
      'pending-receivers',
      SEARCH_ATTRIBUTE.pendingReceivers.name,
    );
    assert.equal(trail.markers, 1, JSON.stringify(trail));
    assert.ok(trail.markerFirst, JSON.stringify(trail));
    assert.ok(trail.upserts.length >= 2, JSON.stringify(trail));
    assert.equal(trail.upserts.at(-1), null, 'cleared once complete');
    for (let i = 1; i < trail.upserts.length; i++) {
      assert.notDeepEqual(trail.upserts[i], trail.upserts[i - 1], `upsert ${i} changes nothing`);
    }
    // Recorded before it: no marker, no upsert (the pre-patch path).
    const before = patchedUpserts(
      loadHistory('before-pending-receivers/revoke-stuck-retry.json'),
      'pending-receivers',
      SEARCH_ATTRIBUTE.pendingReceivers.name,
    );
    assert.deepEqual(before, { markers: 0, markerFirst: false, upserts: [] });
  });
  for (const file of files) {
    it(`should replay ${file} without a determinism error`, async () => {
      const history = loadHistory(file);
      assert.ok((history.events?.length ?? 0) > 10, 'a real history');
      await Worker.runReplayHistory(
        {
          ...(bundle ? { workflowBundle: { codePath: bundle } } : { workflowsPath: WORKFLOWS_PATH }),
          // As a worker runs: histories recorded before payload encryption pass through the codec.
          dataConverter: workerDataConverter({ payloadKeys: [RECORDING_PAYLOAD_KEY] }),
        },
        history,
      );
    });
  }
});
