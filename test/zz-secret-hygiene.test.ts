/**
 * The run's closing check (this file sorts last, and the runner runs one file at a time): no token
 * or signing secret issued during the run appears in any workflow history of the run's Temporal
 * server, raw or decoded, nor in any log line its processes and services wrote. Run alone, it issues,
 * delivers and revokes a few tokens itself first, so the scan always has secrets to look for.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Runtime } from '@temporalio/worker';
import { generateSigningSecret, generateTokenString, signingKeyBytes } from '../common/secrets.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { RunSecretScan } from './support/run-secret-scan.js';
import {
  LOGS_DIR,
  mergeSecrets,
  RUN_DIR,
  readRunSecrets,
  readStoreSecrets,
  recordMark,
  recordStoreSecrets,
  runLog,
  sha256Hex,
  type RunSecrets,
} from './support/run-record.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;
let signingSecret: string;
const issuedTokens: string[] = [];

before(async () => {
  ctx = await TestContext.create('hygiene');
  worker = await ctx.startWorker();
  receiver = await TestReceiver.start();
  const added = await ctx.warden.addReceiver({ id: 'hygiene', url: receiver.url });
  signingSecret = added.secret;
  receiver.secret = signingSecret;
  const tokenIds: string[] = [];
  for (const subject of ['usr_hygiene_a', 'usr_hygiene_b']) {
    const issued = await ctx.warden.issue({ subject, receivers: ['hygiene'], ttl: '1h' });
    issuedTokens.push(issued.token);
    tokenIds.push(issued.tokenId);
  }
  const tokenId = tokenIds[0]!;
  await ctx.warden.revoke({ tokenId, reason: 'hygiene check' });
  await waitUntil(async () => (await ctx.warden.show(tokenId)).propagation === 'complete', 'the revocation delivered');
});

after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

/** Every secret the run recorded, with those of every store still here (this file's, any a test kept). */
async function runSecrets(): Promise<RunSecrets> {
  const secrets = mergeSecrets(readRunSecrets(), {
    payloadKeys: ctx.settings.payloadKeys.map((k) => k.toString('base64')),
    keyHashes: [...ctx.settings.payloadKeys, ctx.settings.masterKey!].map((k) => sha256Hex(k.toString('base64'))),
  });
  for (const schema of await storeSchemas()) {
    mergeSecrets(secrets, await readStoreSecrets(ctx.sql, schema, [ctx.settings.masterKey!]));
  }
  return secrets;
}

/** Every store schema in the database now: this file's, and any a test kept. */
async function storeSchemas(): Promise<string[]> {
  const { rows } = await ctx.sql.query<{ schema: string }>(
    `SELECT table_schema AS schema FROM information_schema.tables WHERE table_name = 'credential' ORDER BY 1`,
  );
  return rows.map((r) => r.schema);
}

describe('secret hygiene of the whole run', () => {
  it('should find no issued token or signing secret in any workflow history or log line', async (t) => {
    const secrets = await runSecrets();
    assert.ok(secrets.tokenHashes.includes(sha256Hex(issuedTokens[0]!)), "this file's tokens are searched for");
    const scan = new RunSecretScan(secrets);
    const started = Date.now();
    await scan.searchHistories(ctx.client.connection);
    if (LOGS_DIR) scan.searchLogs(LOGS_DIR);
    // Every store still here (this file's, any a test kept); the others were searched as their test
    // contexts closed (test/support/context.ts), and every store a context made must be one or the other.
    const present = await storeSchemas();
    for (const schema of present) await scan.searchTables(ctx.sql, schema, `store schema ${schema}`);
    const searched = new Set([...secrets.storesSearched, ...present]);
    if (RUN_DIR) assert.ok(secrets.storesMade.includes(ctx.settings.databaseSchema), 'the stores made are recorded');
    assert.deepEqual(
      secrets.storesMade.filter((schema) => !searched.has(schema)),
      [],
      'stores dropped without a search',
    );
    t.diagnostic(`${scan.summary()} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    t.diagnostic(
      `stores searched as their files closed: ${secrets.storeRows} rows of ${secrets.storeTables} tables, ${secrets.storeHits.length} hit(s)`,
    );
    const groups = new Map<string, { files: number; bytes: number }>();
    for (const [file, bytes] of scan.logFiles) {
      const name = file.replace(/(-\d+)+\.log$/, '');
      const group = groups.get(name) ?? { files: 0, bytes: 0 };
      group.files++;
      group.bytes += bytes;
      groups.set(name, group);
    }
    t.diagnostic(
      `log files: ${[...groups].map(([name, g]) => `${name} (${g.files} file(s), ${g.bytes} bytes)`).join(', ')}`,
    );
    assert.ok(scan.searched.histories >= 2, 'the histories of this file at least were searched');
    assert.ok(
      present.includes(ctx.settings.databaseSchema) && scan.searched.rows > 0,
      "this file's store was searched",
    );
    if (LOGS_DIR) {
      // The runner's copy of the test output must exist, and hold the output of the files that ran
      // before this one (run alone, this file's own output arrives only when it ends).
      assert.ok(scan.logFiles.has('test-output.log'), 'the test output was kept and searched');
      if (secrets.storesSearched.length > 0) {
        assert.ok(scan.logFiles.get('test-output.log')! > 0, "the earlier files' test output was kept and searched");
      }
    }
    assert.deepEqual(scan.hits(), []);
    assert.deepEqual(secrets.storeHits, []);
  });

  it('should catch an issued token or signing secret planted in a table of the store, as text or as bytes', async (t) => {
    await ctx.sql.query('CREATE TABLE planted_notes (note text, raw bytea); CREATE TABLE planted_keys (raw bytea)');
    try {
      // The token as bytes (a bytea prints as hex), the signing secret as text; keys as raw bytes, not
      // at the start of their value.
      await ctx.sql.query('INSERT INTO planted_notes VALUES (NULL, $1), ($2, NULL)', [
        Buffer.from(`bearer ${issuedTokens[1]}`),
        `secret was ${signingSecret}`,
      ]);
      await ctx.sql.query('INSERT INTO planted_keys VALUES ($1), ($2)', [
        Buffer.concat([Buffer.from('key:'), signingKeyBytes(signingSecret)]),
        Buffer.concat([Buffer.from([0, 1, 2]), ctx.settings.payloadKeys[0]!]),
      ]);
      const scan = new RunSecretScan(await runSecrets());
      await scan.searchTables(ctx.sql, ctx.settings.databaseSchema, 'the planted store');
      assert.deepEqual(scan.hits().sort(), [
        'a master or payload key in the planted store, table planted_keys',
        'an issued signing secret in the planted store, table planted_keys',
        'an issued signing secret in the planted store, table planted_notes',
        'an issued token in the planted store, table planted_notes',
      ]);
      if (!LOGS_DIR) return t.skip('the record kept when a store closes: not a recorded run (start it with npm test)');
      // What a closing test context does before it drops its schema: the hits reach the run's record
      // (taken back afterwards: they are this test's own).
      const undo = recordMark();
      try {
        await recordStoreSecrets(ctx.sql, ctx.settings.databaseSchema, {
          master: [ctx.settings.masterKey!],
          payload: ctx.settings.payloadKeys,
        });
        const where = (table: string) => `store schema ${ctx.settings.databaseSchema}, table ${table}`;
        // This schema's hits only (the first test found none): the run's record merges every process's file.
        const own = readRunSecrets().storeHits.filter((hit) => hit.includes(`${ctx.settings.databaseSchema},`));
        assert.deepEqual(own.sort(), [
          `a master or payload key in ${where('planted_keys')}`,
          `an issued signing secret in ${where('planted_keys')}`,
          `an issued signing secret in ${where('planted_notes')}`,
          `an issued token in ${where('planted_notes')}`,
        ]);
      } finally {
        undo();
      }
    } finally {
      await ctx.sql.query('DROP TABLE planted_notes, planted_keys');
    }
  });

  it('should catch an issued token or signing secret planted in a log line, and no fake', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-planted-'));
    try {
      await writeFile(
        path.join(dir, 'worker.log'),
        [
          '{"level":30,"msg":"token issued","tokenId":"tok_0"}',
          `{"level":50,"msg":"introspect failed for ${issuedTokens[1]}"}`,
          `a fake well-formed token ${generateTokenString()} and a fake ${generateSigningSecret()}`,
          `delivering with ${signingSecret}`,
        ].join('\n'),
      );
      const scan = new RunSecretScan(await runSecrets());
      scan.searchLogs(dir);
      assert.deepEqual(scan.hits(), [
        'an issued token in worker.log line 2',
        'an issued signing secret in worker.log line 4',
      ]);
      assert.equal(scan.searched.unissuedTokens, 1);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("should catch an issued token written to one of the run's own log files", async (t) => {
    if (!LOGS_DIR) return t.skip('not a recorded run (start it with npm test)');
    const name = `planted-${process.pid}`;
    runLog(name)(`{"level":40,"msg":"retrying with ${issuedTokens[1]}"}`);
    try {
      const scan = new RunSecretScan(await runSecrets());
      scan.searchLogs(LOGS_DIR);
      // Only this file's hit: a leak elsewhere in the run is the first test's to report.
      assert.deepEqual(
        scan.hits().filter((hit) => hit.includes(name)),
        [`an issued token in ${name}.log line 1`],
      );
    } finally {
      await rm(path.join(LOGS_DIR, `${name}.log`));
    }
  });

  it("should catch an issued token logged through the in-process workers' runtime logger", async (t) => {
    if (!LOGS_DIR) return t.skip('not a recorded run (start it with npm test)');
    // Deliberate: the runtime logger writes WARN to the run's private log file only (never the console),
    // deleted with the run; the scan must find it there.
    Runtime.instance().logger.warn('planted: activity failed', { error: `bad credential ${issuedTokens[1]}` });
    const scan = new RunSecretScan(await runSecrets());
    scan.searchLogs(LOGS_DIR);
    const hits = scan.hits().filter((hit) => hit.includes(`in-process-${process.pid}.log`));
    assert.equal(hits.length, 1, hits.join('; '));
    assert.match(hits[0]!, new RegExp(`^an issued token in in-process-${process.pid}\\.log line \\d+$`));
  });

  it('should catch an issued token planted in a signal payload, which only the decoded history shows', async () => {
    const workflowId = `hygiene-planted-${Date.now()}`;
    // A workflow no worker runs: its history is just what the client sent.
    const handle = await ctx.client.workflow.start('planted', {
      workflowId,
      taskQueue: `${ctx.settings.temporal.taskQueue}-nobody`,
    });
    try {
      await handle.signal('note', { said: issuedTokens[1] });
      const scan = new RunSecretScan(await runSecrets());
      await scan.searchHistory(workflowId, await handle.fetchHistory());
      assert.deepEqual(scan.hits(), [`an issued token in the decoded history of ${workflowId}`]);

      const keyless = new RunSecretScan({ ...(await runSecrets()), payloadKeys: [] });
      await keyless.searchHistory(workflowId, await handle.fetchHistory());
      assert.deepEqual(keyless.hits(), [], 'the raw history is ciphertext');
      assert.ok(keyless.searched.undecodedPayloads >= 1);
    } finally {
      await handle.terminate();
      await ctx.client.workflowService.deleteWorkflowExecution({
        namespace: ctx.settings.temporal.namespace,
        workflowExecution: { workflowId },
      });
    }
  });
});
