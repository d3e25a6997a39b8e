/**
 * Inactivity on the real engine: a token unused for its policy's idle timeout is revoked with
 * reason `inactive` (initiating entity system) through the one kill; a token in use is not. Uses
 * are recorded through the store's one last-use path (record_token_use), as the verifier does.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { TokenLifecycleResult } from '../common/messages.js';
import * as store from '../common/store/index.js';
import { recordTokenUse } from '../common/store/last-use.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { maybeRecordHistory } from './support/history.js';
import { insertPolicy, ownerFolder, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;

before(async () => {
  ctx = await TestContext.create('inactivity');
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

describe('inactivity', () => {
  it('should revoke an idle token as inactive, warn before, and leave a used one alive', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, {
      name: 'idle-3s',
      idleTimeoutMs: 3_000,
      warnBeforeMs: [1_500],
      ownerDir: dir,
    });
    const idle = await startToken(ctx, { ttlMs: 120_000, policy });
    const used = await startToken(ctx, { ttlMs: 120_000, policy });

    // The used token is used every 500 ms until the idle one is dead and one more timeout has passed.
    let using = true;
    const use = (async () => {
      while (using) {
        await recordTokenUse(ctx.sql, ctx.settings.databaseSchema, used.tokenId, 0);
        await new Promise((r) => setTimeout(r, 500));
      }
    })();
    try {
      const done = (await idle.handle.result()) as TokenLifecycleResult;
      assert.equal(done.status, 'revoked');
      const row = await store.requireToken(ctx.pool, idle.tokenId);
      assert.equal(row.revokeReason, 'inactive');
      assert.equal(row.initiatingEntity, 'system');
      const deadAt = Date.now();
      await waitUntil(() => Date.now() > deadAt + 3_500, 'one more idle timeout', 10_000, 100);
      assert.equal((await store.requireToken(ctx.pool, used.tokenId)).status, 'active', 'a used token stays');
    } finally {
      using = false;
      await use;
    }

    // The warning went to the owner once, before the revocation.
    const warnings = readdirSync(dir)
      .filter((f) => f.startsWith(`${idle.tokenId}.ntc_`))
      .map((f) => JSON.parse(readFileSync(path.join(dir, f), 'utf8')) as { type: string; reason: string });
    assert.equal(warnings.length, 1);
    assert.equal(warnings[0]!.type, 'token.expiring');
    assert.equal(warnings[0]!.reason, 'inactivity');
    await maybeRecordHistory(idle.handle, 'inactivity-revoke');

    // Unused from now on, the used token goes the same way.
    const second = (await used.handle.result()) as TokenLifecycleResult;
    assert.equal(second.status, 'revoked');
    assert.equal((await store.requireToken(ctx.pool, used.tokenId)).revokeReason, 'inactive');
  });
});
