/** The library as an app uses it: bounded waits when Temporal is down, refused input, no output of its own. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { InvalidInputError, TokenWarden } from '../client/index.js';
import { StartedMarks } from '../client/started-marks.js';
import { PACKAGE_ROOT, type Settings } from '../common/config.js';
import { createPool } from '../common/db.js';
import { tokenWorkflowId } from '../common/names.js';
import { freePort } from '../dev/processes.js';
import { TestContext } from './support/context.js';
import { recordingModulesTo, temporalSdkFiles } from './support/loaded-modules.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;

before(async () => {
  ctx = await TestContext.create('library');
});
after(async () => {
  await ctx?.close();
});

/** This file's settings with Temporal at a port nothing listens on. */
async function temporalDownSettings(): Promise<Settings> {
  const address = `127.0.0.1:${await freePort()}`;
  return { ...ctx.settings, temporal: { ...ctx.settings.temporal, connectionOptions: { address } } };
}

async function rowsOf(subject: string) {
  const { rows } = await ctx.sql.query(
    `SELECT id, status, revoke_reason, revoked_by, initiating_entity, (status = 'active' AND expires_at > now()) AS valid
       FROM token WHERE subject = $1`,
    [subject],
  );
  return rows;
}

const execFileAsync = promisify(execFile);

const refusedWith = (field: string, message: RegExp) => (err: unknown) =>
  err instanceof InvalidInputError && err.fields.some((f) => f.path === field && message.test(f.message));

/** Fault injection in the store: every started mark is refused until allowStartedMarks(). */
async function refuseStartedMarks(): Promise<void> {
  await ctx.sql.query(`CREATE FUNCTION refuse_started_mark() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'injected fault on %', OLD.id; END $$`);
  await ctx.sql.query(`CREATE TRIGGER refuse_started_mark BEFORE UPDATE ON token FOR EACH ROW
    WHEN (NEW.workflow_started_at IS DISTINCT FROM OLD.workflow_started_at) EXECUTE FUNCTION refuse_started_mark()`);
}

async function allowStartedMarks(): Promise<void> {
  await ctx.sql.query('DROP TRIGGER refuse_started_mark ON token');
  await ctx.sql.query('DROP FUNCTION refuse_started_mark()');
}

describe('the library while Temporal is unreachable', () => {
  it('should fail an issue within the deadline, say so, and leave no valid token behind', async () => {
    const warden = await TokenWarden.connect(await temporalDownSettings());
    try {
      const started = Date.now();
      let failure: Error | undefined;
      await warden.issue({ subject: 'usr_orphan', ttl: '1h' }).catch((err: Error) => (failure = err));
      const elapsed = Date.now() - started;
      assert.ok(failure, 'the issue failed');
      assert.ok(elapsed < 5_200, `failed within the 5 s deadline (${elapsed} ms)`);
      assert.match(
        failure.message,
        /^issue failed: the token's workflow could not be started \(.*UNAVAILABLE.*ECONNREFUSED/,
      );
      assert.doesNotMatch(failure.message, /deadline exceeded/i);
      assert.match(failure.message, /tok_[0-9a-f]{32} was revoked in the store, no valid token is left behind/);
    } finally {
      await warden.close();
    }
    const rows = await rowsOf('usr_orphan');
    assert.equal(rows.length, 1, 'the row is kept, as evidence');
    assert.equal(rows[0].valid, false);
    assert.equal(rows[0].status, 'revoked');
    assert.equal(rows[0].revoke_reason, 'issue failed: its workflow could not be started');
    assert.equal(rows[0].revoked_by, 'system');
    assert.equal(rows[0].initiating_entity, 'system');
  });

  it('should revoke in the store within the documented 5 s and warn that the workflow was not told', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_down', ttl: '1h' });
    const warden = await TokenWarden.connect(await temporalDownSettings());
    try {
      const started = Date.now();
      const outcome = await warden.revoke({ tokenId, reason: 'leaked' });
      const elapsed = Date.now() - started;
      assert.ok(elapsed < 5_200, `answered within the 5 s deadline (${elapsed} ms)`);
      assert.equal(outcome.status, 'revoked');
      assert.equal(outcome.workflowSignalled, false);
      assert.match(outcome.warning ?? '', /revoked in the store, but its workflow could not be signalled/);
      // The reason, not the deadline: no retry was left to run into it.
      assert.match(outcome.warning ?? '', /UNAVAILABLE.*ECONNREFUSED/);
      assert.doesNotMatch(outcome.warning ?? '', /deadline exceeded/i);
    } finally {
      await warden.close();
    }
    assert.equal((await ctx.warden.show(tokenId)).valid, false);
  });
});

describe('issuing', () => {
  const startedAt = async (tokenId: string) => (await ctx.warden.show(tokenId)).workflowStartedAt;

  it('should refuse an unknown receiver, naming the field, and write nothing', async () => {
    await assert.rejects(
      ctx.warden.issue({ subject: 'usr_unknown_receiver', receivers: ['nobody'], ttl: '1h' }),
      refusedWith('receivers', /^unknown or removed receiver nobody$/),
    );
    assert.deepEqual(await rowsOf('usr_unknown_receiver'), []);
  });

  it('should record that the workflow started soon after the issue returns, and pending marks on close', async () => {
    const issued = await Promise.all(
      Array.from({ length: 10 }, () => ctx.warden.issue({ subject: 'usr_marked', ttl: '1h' })),
    );
    for (const { tokenId } of issued) {
      await waitUntil(() => startedAt(tokenId), `the started mark of ${tokenId}`, 5_000);
    }

    const warden = await TokenWarden.connect(ctx.settings);
    const { tokenId } = await warden.issue({ subject: 'usr_marked', ttl: '1h' });
    await warden.close();
    assert.ok(await startedAt(tokenId), 'close() wrote the mark still pending');
  });

  it('should not wait for the started mark: a failed mark fails no issue and kills no token', async () => {
    // The store refuses every started mark: the issue must still succeed, its token stay valid.
    await refuseStartedMarks();
    const heard: Error[] = [];
    const warden = await TokenWarden.connect(ctx.settings, { onError: (err) => heard.push(err) });
    let tokenId: string;
    try {
      ({ tokenId } = await warden.issue({ subject: 'usr_unmarked', ttl: '1h' }));
      await waitUntil(() => heard.length > 0, 'the failed mark to be reported');
    } finally {
      await warden.close();
      await allowStartedMarks();
    }
    assert.match(heard[0]!.message, /^recording that 1 issued token\(s\) have their workflow failed \(injected fault/);
    const token = await ctx.warden.show(tokenId);
    assert.equal(token.valid, true);
    assert.equal(token.workflowStartedAt, null, 'left to the reconciler');
    const described = await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).describe();
    assert.equal(described.status.name, 'RUNNING');
  });

  it("should keep recording marks, and close, when the app's onError throws", async () => {
    // The first mark is refused and the handler throws on it: later marks must still be written.
    await refuseStartedMarks();
    const heard: Error[] = [];
    const warden = await TokenWarden.connect(ctx.settings, {
      onError: (err) => {
        heard.push(err);
        throw new Error('the app handler failed');
      },
    });
    try {
      await warden.issue({ subject: 'usr_throwing_handler', ttl: '1h' });
      await waitUntil(() => heard.length > 0, 'the failed mark to be reported');
    } finally {
      await allowStartedMarks();
    }
    const later = await warden.issue({ subject: 'usr_throwing_handler', ttl: '1h' });
    await waitUntil(() => startedAt(later.tokenId), 'the mark of a token issued after the handler threw', 5_000);
    const last = await warden.issue({ subject: 'usr_throwing_handler', ttl: '1h' });
    await warden.close();
    assert.ok(await startedAt(last.tokenId), 'close() wrote the mark still pending');
    assert.equal(heard.length, 1);
  });

  it('should take no mark after close: the pool it would write on is ended', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_late_mark', ttl: '1h' });
    const heard: Error[] = [];
    const pool = createPool(ctx.settings.databaseUrl, ctx.settings.databaseSchema, 1);
    const marks = new StartedMarks(pool, (err) => heard.push(err));
    await marks.close();
    await pool.end();
    marks.add(tokenId);
    await marks.flush();
    assert.deepEqual(
      heard.map((err) => err.message),
      [],
    );
  });
});

describe('lifetime bounds', () => {
  it('should refuse a lifetime beyond TOKENWARDEN_MAX_TTL before writing anything', async () => {
    for (const ttl of ['99999999d', '3000000d', '300000d', '366d', 365 * 86_400_000 + 1]) {
      await assert.rejects(
        ctx.warden.issue({ subject: 'usr_forever', ttl }),
        refusedWith('ttl', /^at most 365d \(TOKENWARDEN_MAX_TTL\)$/),
        String(ttl),
      );
    }
    assert.deepEqual(await rowsOf('usr_forever'), []);
    const { expiresAt } = await ctx.warden.issue({ subject: 'usr_forever', ttl: '365d' });
    const lifetime = Date.parse(expiresAt) - Date.now();
    assert.ok(
      lifetime > 364 * 86_400_000 && lifetime <= 365 * 86_400_000,
      `the maximum itself is allowed (${lifetime} ms)`,
    );
  });

  it('should apply the configured maximum', async () => {
    const warden = await TokenWarden.connect({ ...ctx.settings, maxTtlMs: 3_600_000 });
    try {
      await assert.rejects(
        warden.issue({ subject: 'usr_short', ttl: '61m' }),
        refusedWith('ttl', /^at most 1h \(TOKENWARDEN_MAX_TTL\)$/),
      );
    } finally {
      await warden.close();
    }
    assert.deepEqual(await rowsOf('usr_short'), []);
  });
});

describe('free text that would steer a terminal', () => {
  const controls = ['\u001b[2J', '\u0007', 'a\rb', 'a\nb', 'a\tb', '\u009b31m', '\u007f', '\u202egnp.exe', 'a\u2028b'];

  it('should refuse control characters in a name, reason or actor, naming the field', async () => {
    for (const bad of controls) {
      await assert.rejects(
        ctx.warden.issue({ subject: 'usr_ctrl', ttl: '1h', name: `laptop ${bad} key` }),
        refusedWith('name', /must not contain control characters \(found U\+[0-9A-F]{4}\)/),
        JSON.stringify(bad),
      );
    }
    assert.deepEqual(await rowsOf('usr_ctrl'), []);

    const { tokenId } = await ctx.warden.issue({ subject: 'usr_ctrl', ttl: '1h', name: 'Zoë’s 🧑‍💻 key' });
    for (const bad of controls) {
      await assert.rejects(
        ctx.warden.revoke({ tokenId, reason: `left ${bad}` }),
        refusedWith('reason', /must not contain control characters/),
      );
      await assert.rejects(
        ctx.warden.revoke({ tokenId, reason: 'left', actor: `hr${bad}` }),
        refusedWith('actor', /must not contain control characters/),
      );
    }
    const token = await ctx.warden.show(tokenId);
    assert.equal(token.status, 'active', 'no refused revoke changed anything');
    assert.equal(token.name, 'Zoë’s 🧑‍💻 key', 'printable Unicode is kept as written');
  });
});

describe('the library prints nothing', () => {
  it("should hand a dropped idle connection to the app's onError, and print nothing itself", async () => {
    const heard: Error[] = [];
    const printed: string[] = [];
    const warden = await TokenWarden.connect(ctx.settings, { onError: (err) => heard.push(err) });
    const restore = capturePrinting((text) => printed.push(text));
    try {
      const { rows } = await warden.pool.query('SELECT pg_backend_pid() AS pid');
      await ctx.sql.query('SELECT pg_terminate_backend($1)', [rows[0].pid]);
      await waitUntil(() => heard.length > 0, 'the onError handler to hear of the dropped connection');
      assert.match(heard[0]!.message, /terminat/);
      assert.equal((await warden.list({ subject: 'usr_nobody' })).length, 0, 'the pool carries on');
    } finally {
      restore();
      await warden.close();
    }
    assert.deepEqual(printed, []);
  });
});

describe('the store entry point', () => {
  /** An app's process importing `entry`: what it printed and the Temporal SDK files it loaded. */
  async function appImporting(entry: string, calls: string): Promise<{ stdout: string; sdk: string[] }> {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-modules-'));
    try {
      const file = path.join(dir, 'modules.json');
      const script = `const tw = await import('${entry}'); ${calls}`;
      const { stdout } = await execFileAsync(process.execPath, ['--input-type=module', '-e', script], {
        cwd: PACKAGE_ROOT,
        env: { ...ctx.childEnv(), ...recordingModulesTo(file) },
      });
      return { stdout, sdk: await temporalSdkFiles(file) };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  it('should read the store through tokenwarden/store without loading the Temporal SDK', async () => {
    const { tokenId } = await ctx.warden.issue({ subject: 'usr_store_entry', ttl: '1h' });
    const read = await appImporting(
      'tokenwarden/store',
      `const store = await tw.TokenWardenStore.connect();
       try {
         const [token] = await store.list({ subject: 'usr_store_entry' });
         console.log(JSON.stringify({ listed: token.id, shown: (await store.show(token.id)).status }));
       } finally { await store.close(); }`,
    );
    assert.deepEqual(JSON.parse(read.stdout), { listed: tokenId, shown: 'active' });
    assert.deepEqual(read.sdk, []);
    // The recorder sees the SDK where it is loaded: the main entry point is TokenWarden's.
    const full = await appImporting('tokenwarden', '');
    assert.ok(full.sdk.some((f) => f.includes(`${path.sep}@temporalio${path.sep}client${path.sep}`)));
  });
});

/** Routes console output and stderr to `sink` until the returned function is called. */
function capturePrinting(sink: (text: string) => void): () => void {
  const methods = ['log', 'info', 'warn', 'error', 'debug'] as const;
  const saved = methods.map((m) => console[m]);
  const savedWrite = process.stderr.write;
  for (const m of methods) console[m] = (...args: unknown[]) => sink(args.map(String).join(' '));
  process.stderr.write = ((chunk: string | Uint8Array) => {
    sink(String(chunk));
    return true;
  }) as typeof process.stderr.write;
  return () => {
    methods.forEach((m, i) => (console[m] = saved[i]!));
    process.stderr.write = savedWrite;
  };
}
