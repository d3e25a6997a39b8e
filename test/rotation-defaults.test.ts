/**
 * What a rotation does when nobody says: a rotate without a grace takes the worker's
 * TOKENWARDEN_DEFAULT_GRACE (no policy); suspicious activity under a policy that says rotate but
 * names no owner destination revokes, and the audit says why; a suspicious rotation leaves the
 * suspect credential revoked at once, not previous.
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { loadSettings } from '../common/config.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import * as store from '../common/store/index.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { insertPolicy, isValid, ownerFolder, startToken } from './support/self-managing.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;

before(async () => {
  ctx = await TestContext.create('rotdefaults');
  // The worker's settings as its process reads them from the environment.
  const fromEnv = loadSettings({ ...ctx.childEnv(), TOKENWARDEN_DEFAULT_GRACE: '7s' });
  assert.equal(fromEnv.defaultGraceMs, 7_000);
  worker = await ctx.startWorker({ ...ctx.settings, defaultGraceMs: fromEnv.defaultGraceMs! });
});
after(async () => {
  await worker?.stop();
  await ctx?.close();
});

const dbNow = async () => ((await ctx.sql.query('SELECT now() AS now')).rows[0].now as Date).getTime();

const auditOf = async (tokenId: string) =>
  (await store.readAudit(ctx.pool, tokenId)).map((e) => ({ kind: e.kind, data: JSON.parse(e.canonical).data }));

describe('rotation defaults', () => {
  it('should give the previous credential TOKENWARDEN_DEFAULT_GRACE when rotate has no --grace and no policy', async () => {
    const t = await startToken(ctx, { ttlMs: 3_600_000 });
    const before = await dbNow();
    const run = await runCli(['rotate', t.tokenId, '--json'], ctx.childEnv());
    const afterNow = await dbNow();
    assert.equal(run.code, 0, run.stderr);
    const rotated = JSON.parse(run.stdout) as { previousValidUntil: string };
    const until = Date.parse(rotated.previousValidUntil);
    assert.ok(
      until >= before + 7_000 && until <= afterNow + 7_000,
      `valid until ${rotated.previousValidUntil}: 7 s after the rotation (database clock)`,
    );
    assert.equal(await isValid(ctx, t.token), true, 'the old secret is valid in its grace');
  });

  it('should revoke on suspicious activity when the policy says rotate but names no owner destination, and audit why', async () => {
    // A row written past the library (which refuses rotate without an owner), or an owner removed since.
    const policy = await insertPolicy(ctx, { name: 'rotate-nowhere', onSuspicious: 'rotate' });
    const t = await startToken(ctx, { ttlMs: 3_600_000, policy });
    const answer = await ctx.warden.reportSuspicious(t.tokenId, { reason: 'seen from a new country' });
    assert.equal(answer.action, 'revoke', 'the library says what the workflow does');
    const done = (await t.handle.result()) as TokenLifecycleResult;
    assert.equal(done.status, 'revoked');
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).revokeReason, 'suspicious_activity');
    const report = (await auditOf(t.tokenId)).find((e) => e.kind === 'token.suspicious');
    assert.equal(report?.data.action, 'revoke');
    assert.match(String(report?.data.actionNote), /names no owner destination/);
  });

  it('should leave the suspect credential revoked at once after a suspicious rotation, not previous', async () => {
    const dir = ownerFolder();
    const policy = await insertPolicy(ctx, { name: 'rotate-suspect', onSuspicious: 'rotate', ownerDir: dir });
    const t = await startToken(ctx, { ttlMs: 3_600_000, policy });
    await ctx.warden.reportSuspicious(t.tokenId, { reason: 'leaked in a log' });
    await waitUntil(() => readdirSync(dir).some((f) => f.startsWith(`${t.tokenId}.cred_`)), 'the new secret delivered');
    await waitUntil(
      async () =>
        (await store.listCredentials(ctx.pool, t.tokenId)).find((c) => c.id === t.credentialId)?.state === 'revoked',
      'the suspect credential revoked',
      5_000,
    );
    assert.equal(await isValid(ctx, t.token), false);
    assert.equal((await store.requireToken(ctx.pool, t.tokenId)).status, 'active', 'the token lives on');
  });
});
