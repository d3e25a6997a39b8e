/**
 * A policy's owner destination: a removed receiver is refused, and owner folders must lie inside
 * TOKENWARDEN_OWNER_DIR_ROOT (refused by the library, API and CLI when outside or unset; refused
 * by the worker too, symbolic links included, before it creates a folder or writes a secret).
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger } from '@temporalio/worker';
import { setPolicy } from '../client/policies.js';
import { createVerifier, type Verifier } from '../client/verifier.js';
import { createReceiverAgents } from '../activities/propagation.js';
import { createSelfManagingActivities } from '../activities/self-managing.js';
import { InvalidInputError } from '../common/errors.js';
import { MasterKeyring } from '../common/secrets.js';
import * as store from '../common/store/index.js';
import { call, startApiHarness, type ApiHarness } from './support/api.js';
import { runCli } from './support/cli.js';
import { TestContext } from './support/context.js';
import { insertPolicy } from './support/self-managing.js';
import { insertTokenRow } from './support/tokens.js';

let ctx: TestContext;
let api: ApiHarness;
let verifier: Verifier;
/** This file's root for owner folders. */
let root: string;

before(async () => {
  ctx = await TestContext.create('policyowner');
  root = mkdtempSync(path.join(os.tmpdir(), 'tw-owner-root-'));
  (ctx.settings as { ownerDirRoot?: string }).ownerDirRoot = root;
  verifier = await createVerifier({ databaseUrl: ctx.settings.databaseUrl, schema: ctx.settings.databaseSchema });
  api = await startApiHarness(ctx, verifier);
});
after(async () => {
  await api?.close();
  await verifier?.close();
  await ctx?.close();
});

async function refused(attempt: Promise<unknown>, field: string, message: RegExp): Promise<void> {
  const err = await attempt.then(
    () => assert.fail('accepted'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof InvalidInputError, String(err));
  assert.deepEqual(
    err.fields.map((f) => f.path),
    [field],
  );
  assert.match(err.message, message);
}

const policyExists = async (name: string) =>
  (await ctx.sql.query('SELECT 1 FROM policy WHERE name = $1', [name])).rows.length > 0;

describe('owner receiver', () => {
  it('should refuse a removed receiver, naming ownerReceiver, and write nothing', async () => {
    await ctx.warden.addReceiver({ id: 'gone-hook', url: 'http://127.0.0.1:1/gone' });
    await store.removeReceiver(ctx.pool, 'gone-hook');
    await refused(
      ctx.warden.setPolicy('to-gone', { ownerReceiver: 'gone-hook', warn: ['1h'] }),
      'ownerReceiver',
      /receiver gone-hook was removed/,
    );
    const res = await call(api.url, 'PUT', '/v1/policies/to-gone', {
      key: api.keys.admin,
      json: { ownerReceiver: 'gone-hook' },
    });
    assert.equal(res.status, 400, res.text);
    assert.deepEqual(
      res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
      ['body ownerReceiver'],
    );
    assert.equal(await policyExists('to-gone'), false);
  });
});

describe('owner folder', () => {
  it('should accept a folder inside the root and refuse one outside it, naming ownerDir', async () => {
    const inside = path.join(root, 'team-a');
    assert.equal((await ctx.warden.setPolicy('dir-ok', { ownerDir: inside })).ownerDir, inside);
    for (const outside of ['/etc/tokenwarden', `${root}/../elsewhere`, `${root}-sibling`]) {
      await refused(ctx.warden.setPolicy('dir-out', { ownerDir: outside }), 'ownerDir', /must lie inside/);
    }
    const res = await call(api.url, 'PUT', '/v1/policies/dir-out', {
      key: api.keys.admin,
      json: { ownerDir: '/root/x' },
    });
    assert.equal(res.status, 400, res.text);
    assert.deepEqual(
      res.body.errors.map((e: { in: string; path: string }) => `${e.in} ${e.path}`),
      ['body ownerDir'],
    );
    const cli = await runCli(['policy', 'set', 'dir-out', '--owner-dir', '/var/x'], ctx.childEnv());
    assert.equal(cli.code, 2, cli.stderr);
    assert.match(cli.stderr, /--owner-dir: must lie inside/);
    assert.equal(await policyExists('dir-out'), false);
  });

  it('should refuse every owner folder when no root is configured', async () => {
    const deps = { pool: ctx.pool, temporal: ctx.client, maxTtlMs: ctx.settings.maxTtlMs };
    await refused(setPolicy(deps, 'no-root', { ownerDir: path.join(root, 'x') }), 'ownerDir', /owner folders are off/);
    const env = ctx.childEnv();
    delete env.TOKENWARDEN_OWNER_DIR_ROOT;
    const cli = await runCli(['policy', 'set', 'no-root', '--owner-dir', path.join(root, 'x')], env);
    assert.equal(cli.code, 2, cli.stderr);
    assert.match(cli.stderr, /--owner-dir: owner folders are off: set TOKENWARDEN_OWNER_DIR_ROOT/);
    assert.equal(await policyExists('no-root'), false);
  });

  it('should not let a worker create or write an owner folder outside its root, even through a symbolic link', async () => {
    const outside = mkdtempSync(path.join(os.tmpdir(), 'tw-outside-'));
    const link = path.join(root, 'link-out');
    symlinkSync(outside, link);
    const { rotateAutomatically } = createSelfManagingActivities(ctx.pool, {
      pool: ctx.pool,
      keyring: new MasterKeyring(ctx.settings.masterKey),
      receiverAllow: ctx.settings.receiverAllow,
      agents: createReceiverAgents(),
      ownerDirRoot: root,
      defaultGraceMs: 1_000,
      maxTtlMs: ctx.settings.maxTtlMs,
    });
    // Rows written past the library (an older policy, another process's settings).
    for (const [name, dir] of [
      ['row-outside', path.join(outside, 'made-by-worker')],
      ['row-link', link],
    ] as const) {
      await insertPolicy(ctx, { name, ownerDir: dir });
      const token = await insertTokenRow(ctx.pool, { subject: 'usr_owner' });
      await ctx.sql.query('UPDATE token SET policy = $2 WHERE id = $1', [token.id, name]);
      const err = await new MockActivityEnvironment(undefined, { logger: new DefaultLogger('ERROR') })
        .run(rotateAutomatically, { tokenId: token.id, rotationId: `${token.id}:rot:1`, why: 'test' })
        .then(
          () => assert.fail('the worker wrote the secret'),
          (e: unknown) => e,
        );
      assert.ok(err instanceof ApplicationFailure, String(err));
      assert.equal(err.type, 'OwnerRefused');
      assert.equal(err.nonRetryable, true);
    }
    assert.equal(existsSync(path.join(outside, 'made-by-worker')), false, 'no folder made outside the root');
    assert.deepEqual(readdirSync(outside), [], 'no secret written outside the root');
  });
});
