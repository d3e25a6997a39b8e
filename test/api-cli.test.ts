/** `tokenwarden apikey` and `tokenwarden api` as a user runs them: child processes, exit codes, no Temporal for keys. */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { spawn } from 'node:child_process';
import { PACKAGE_ROOT } from '../common/config.js';
import { authenticateApiKey, createApiKey } from '../common/store/api-keys.js';
import { call } from './support/api.js';
import { waitUntil } from './support/wait.js';
import { runCli } from './support/cli.js';
import { TestContext } from './support/context.js';
import { recordingModulesTo, temporalSdkFiles } from './support/loaded-modules.js';
import { runOutput } from './support/run-record.js';

let ctx: TestContext;
let dir: string;

before(async () => {
  ctx = await TestContext.create('apicli');
  dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-apikey-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
  await ctx?.close();
});

let runs = 0;
/** Runs a command with this file's store, recording the Temporal SDK files it loaded. */
async function cli(args: string[], extraEnv: Record<string, string> = {}) {
  const file = path.join(dir, `${runs++}.json`);
  const run = await runCli(args, { ...ctx.childEnv(), ...recordingModulesTo(file), ...extraEnv });
  return { ...run, sdk: await temporalSdkFiles(file).catch(() => ['(not recorded)']) };
}

describe('tokenwarden apikey', () => {
  it('should create a key shown once, list without it, revoke it, all without loading Temporal', async () => {
    const created = await cli([
      'apikey',
      'create',
      'ci-deploy',
      '--scope',
      'revoke',
      '--scope',
      'introspect',
      '--json',
    ]);
    assert.equal(created.code, 0, created.stderr);
    assert.deepEqual(created.sdk, []);
    const { id, key } = JSON.parse(created.stdout) as { id: string; key: string };
    assert.deepEqual(Object.keys(JSON.parse(created.stdout)).sort(), ['id', 'key']);
    assert.match(id, /^key_[0-9a-f]{32}$/);
    assert.match(key, new RegExp(`^twk_${id.slice(4)}_[0-9a-f]{64}$`), 'twk_<id>_<256-bit secret>');
    const accepted = await authenticateApiKey(ctx.pool, key);
    assert.deepEqual(accepted?.scopes, ['introspect', 'revoke']);
    const { rows } = await ctx.sql.query('SELECT key_hash FROM api_key WHERE id = $1', [id]);
    assert.ok(!rows[0].key_hash.toString('hex').includes(key.slice(-64)), 'stored hashed');

    const listed = await cli(['apikey', 'list', '--json']);
    assert.equal(listed.code, 0, listed.stderr);
    assert.deepEqual(listed.sdk, []);
    assert.ok(!listed.stdout.includes(key.slice(-64)), 'never the key');
    const mine = (JSON.parse(listed.stdout) as { id: string; name: string; revokedAt: string | null }[]).find(
      (k) => k.id === id,
    );
    assert.deepEqual([mine?.name, mine?.revokedAt], ['ci-deploy', null]);
    const human = await cli(['apikey', 'list']);
    assert.match(human.stdout, new RegExp(`${id}  ci-deploy  introspect,revoke  created `));

    const revoked = await cli(['apikey', 'revoke', id, '--json']);
    assert.equal(revoked.code, 0, revoked.stderr);
    assert.deepEqual(revoked.sdk, []);
    assert.ok(JSON.parse(revoked.stdout).revokedAt);
    assert.equal(await authenticateApiKey(ctx.pool, key), undefined, 'a revoked key is refused');
    const twice = await cli(['apikey', 'revoke', id, '--json']);
    assert.equal(twice.code, 0, 'revoking twice is harmless');
    assert.equal(JSON.parse(twice.stdout).revokedAt, JSON.parse(revoked.stdout).revokedAt);
  });

  it('should refuse bad input naming it, with exit 2 (3 for an unknown key)', async () => {
    const noScope = await cli(['apikey', 'create', 'x']);
    assert.equal(noScope.code, 2);
    assert.match(
      noScope.stderr,
      /^tokenwarden: invalid API key: scopes: at least one scope: admin, codec, introspect, revoke\n$/,
    );
    const badScope = await cli(['apikey', 'create', 'x', '--scope', 'root']);
    assert.equal(badScope.code, 2);
    assert.match(badScope.stderr, /scopes\.0: expected admin, codec, introspect, revoke/);
    const badId = await cli(['apikey', 'revoke', 'tok_1']);
    assert.equal(badId.code, 2);
    assert.match(badId.stderr, /invalid API key id: .*expected an API key id/);
    const unknown = await cli(['apikey', 'revoke', `key_${'0'.repeat(32)}`]);
    assert.equal(unknown.code, 3);
    assert.match(unknown.stderr, /api key "key_0+" not found/);
    const { rows } = await ctx.sql.query(`SELECT count(*)::int AS n FROM api_key WHERE name = 'x'`);
    assert.equal(rows[0].n, 0);
  });

  it('should refuse a bad TOKENWARDEN_API_PORT or --port naming it', async () => {
    const bad = await cli(['api', '--port', '70000']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /TOKENWARDEN_API_PORT: TOKENWARDEN_API_PORT must be a port number/);
    const env = await cli(['api'], { TOKENWARDEN_API_PORT: 'http' });
    assert.equal(env.code, 1);
    assert.match(env.stderr, /TOKENWARDEN_API_PORT must be a port number/);
  });
});

describe('tokenwarden api', () => {
  it('should serve until SIGTERM, then finish the request in flight before it exits', async () => {
    const { key } = await createApiKey(ctx.pool, { name: 'shutdown', scopes: ['admin'] });
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_shutdown', ttl: '1h' });
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'api', '--port', '0'], {
      env: { ...ctx.childEnv() },
    });
    let stderr = '';
    const log = runOutput('api');
    child.stderr.on('data', (c: Buffer) => {
      stderr += c.toString();
      log(c);
    });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const lock = await ctx.sql.connect();
    try {
      const url = await waitUntil(() => /listening on (http:\/\/\S+)/.exec(stderr)?.[1], 'the API listening', 20_000);
      // The revoke's kill waits for this row lock: a request held in flight.
      await lock.query('BEGIN');
      await lock.query('SELECT 1 FROM token WHERE id = $1 FOR UPDATE', [tokenId]);
      const inFlight = call(url, 'POST', `/v1/tokens/${tokenId}/revoke`, { key, json: { reason: 'shutdown test' } });
      await waitUntil(
        async () =>
          (
            await ctx.sql.query(
              `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%kill_token%'`,
            )
          ).rowCount! > 0,
        'the revoke waiting on the lock',
      );
      child.kill('SIGTERM');
      // Closing: new connections are refused while the request in flight is still held.
      await waitUntil(
        async () =>
          await fetch(`${url}/healthz`).then(
            () => false,
            () => true,
          ),
        'new connections refused',
      );
      await lock.query('COMMIT');
      const answer = await inFlight;
      assert.equal(answer.status, 200, answer.text);
      assert.equal(answer.body.status, 'revoked');
      // Promptly: the answered connection is closed, not left to its keep-alive timeout.
      const answeredAt = Date.now();
      assert.equal(await exited, 0, stderr);
      assert.ok(Date.now() - answeredAt < 10_000, `exited ${Date.now() - answeredAt} ms after the answer`);
    } finally {
      lock.release();
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});
