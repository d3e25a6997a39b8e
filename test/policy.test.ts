/**
 * Named policies through the library, against the real store and Temporal: set/show and their
 * validation, issue under a policy (refusals write nothing), the dry run (evaluatePolicy over the
 * live tokens) and the apply that signals exactly those tokens' workflows, resumably.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { InvalidInputError, NotFoundError } from '../client/index.js';
import { SEARCH_ATTRIBUTE, SIGNAL, tokenWorkflowId } from '../common/names.js';
import { evaluatePolicy } from '../common/policy.js';
import { checkout } from '../common/db.js';
import { markPolicyTold, policySnapshot } from '../common/store/policies.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;

before(async () => {
  ctx = await TestContext.create('policy');
  await ctx.warden.addReceiver({ id: 'owner-hook', url: 'http://127.0.0.1:9/owner' });
});
after(async () => {
  await ctx?.close();
});

/** How many rows the token and credential tables hold. */
async function rowCounts(): Promise<{ tokens: number; credentials: number; audit: number }> {
  const { rows } = await ctx.sql.query(
    `SELECT (SELECT count(*)::int FROM token) AS tokens, (SELECT count(*)::int FROM credential) AS credentials,
            (SELECT count(*)::int FROM audit_event) AS audit`,
  );
  return rows[0];
}

/** The field paths an InvalidInputError names. */
async function refusedFields(call: Promise<unknown>): Promise<string[]> {
  try {
    await call;
  } catch (err) {
    assert.ok(err instanceof InvalidInputError, `expected InvalidInputError, got ${String(err)}`);
    return err.fields.map((f) => f.path);
  }
  assert.fail('expected a refusal');
}

/** The policyChanged signals in a token's workflow history (their payloads, decoded). */
async function policyChangedSignals(tokenId: string): Promise<number> {
  const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)));
  return (history.events ?? []).filter(
    (e) => e.workflowExecutionSignaledEventAttributes?.signalName === SIGNAL.policyChanged,
  ).length;
}

describe('policies: set and show', () => {
  it('should round-trip a policy, add one to its version on each set, and replace every field', async () => {
    const set = await ctx.warden.setPolicy('ci', {
      maxTtl: '30d',
      idleTimeout: '7d',
      rotateEvery: '1d',
      grace: '10m',
      warn: ['1d', '7d'],
      scopes: ['read', 'write'],
      onSuspicious: 'rotate',
      ownerReceiver: 'owner-hook',
    });
    assert.equal(set.version, 1);
    assert.equal(set.maxLifetimeMs, 30 * 86_400_000);
    assert.equal(set.idleTimeoutMs, 7 * 86_400_000);
    assert.equal(set.rotateEveryMs, 86_400_000);
    assert.equal(set.graceMs, 600_000);
    assert.deepEqual(set.warnBeforeMs, [7 * 86_400_000, 86_400_000], 'largest first');
    assert.deepEqual(set.allowedScopes, ['read', 'write']);
    assert.equal(set.onSuspicious, 'rotate');
    assert.equal(set.ownerReceiverId, 'owner-hook');
    assert.deepEqual(await ctx.warden.showPolicy('ci'), set);

    const replaced = await ctx.warden.setPolicy('ci', { maxTtl: '1h', grace: 0 });
    assert.equal(replaced.version, 2);
    assert.equal(replaced.maxLifetimeMs, 3_600_000);
    assert.equal(replaced.graceMs, 0);
    assert.equal(replaced.idleTimeoutMs, null, 'a field not given takes its default');
    assert.equal(replaced.allowedScopes, null, 'no scopes: any scope');
    assert.equal(replaced.onSuspicious, 'revoke');
    assert.deepEqual(await ctx.warden.showPolicy('ci'), replaced);
  });

  it('should refuse bad fields, naming each, and write nothing', async () => {
    const before = await ctx.sql.query(`SELECT count(*)::int AS n FROM policy`);
    const cases: [string, Parameters<typeof ctx.warden.setPolicy>[1], string[]][] = [
      ['Bad Name', {}, ['name']],
      ['ok', { maxTtl: '2 weeks' }, ['maxTtl']],
      ['ok', { maxTtl: '5000d' }, ['maxTtl']],
      ['ok', { idleTimeout: -1 }, ['idleTimeout']],
      ['ok', { grace: 'soon' }, ['grace']],
      ['ok', { warn: ['7d', 'x'] }, ['warn.1']],
      ['ok', { scopes: ['has space'] }, ['scopes.0']],
      ['ok', { onSuspicious: 'ignore' as 'revoke' }, ['onSuspicious']],
      ['ok', { ownerDir: 'relative/dir' }, ['ownerDir']],
      // Each of these would send something to an owner the policy does not name.
      ['ok', { rotateEvery: '1d' }, ['rotateEvery']],
      ['ok', { warn: ['1d'] }, ['warn']],
      ['ok', { onSuspicious: 'rotate' }, ['onSuspicious']],
      ['ok', { ownerReceiver: 'owner-hook', ownerDir: '/tmp/x' }, ['ownerDir']],
      ['ok', { rotateEvery: '1h', grace: '2h', ownerDir: '/tmp/x' }, ['grace']],
      // The default grace (10m) counts too: a 5-minute rotation would supersede credentials in grace.
      ['ok', { rotateEvery: '5m', ownerDir: '/tmp/x' }, ['grace']],
      ['ok', { maxTtl: '1d', warn: ['7d'], ownerDir: '/tmp/x' }, ['warn']],
      ['ok', { ownerReceiver: 'nobody' }, ['ownerReceiver']],
      ['ok', { unknownField: 1 } as never, ['(input)']],
    ];
    for (const [name, fields, expected] of cases) {
      const paths = await refusedFields(ctx.warden.setPolicy(name, fields));
      assert.deepEqual(paths, expected, `${name} ${JSON.stringify(fields)}`);
    }
    const afterCount = await ctx.sql.query(`SELECT count(*)::int AS n FROM policy`);
    assert.equal(afterCount.rows[0].n, before.rows[0].n, 'no policy written');
    await assert.rejects(ctx.warden.showPolicy('never-set'), NotFoundError);
  });
});

describe('policies: issue under a policy', () => {
  before(async () => {
    await ctx.warden.setPolicy('short', { maxTtl: '1h', scopes: ['read', 'write'] });
  });

  it('should refuse a ttl above the max lifetime, a scope not allowed and an unknown policy, writing nothing', async () => {
    const before = await rowCounts();
    assert.deepEqual(
      await refusedFields(ctx.warden.issue({ subject: 'usr_pol', ttl: '2h', policy: 'short', scopes: ['read'] })),
      ['ttl'],
    );
    await assert.rejects(
      ctx.warden.issue({ subject: 'usr_pol', ttl: '2h', policy: 'short' }),
      /ttl: at most 1h \(policy short's max lifetime\)/,
    );
    assert.deepEqual(
      await refusedFields(
        ctx.warden.issue({ subject: 'usr_pol', ttl: '30m', policy: 'short', scopes: ['read', 'admin'] }),
      ),
      ['scopes'],
    );
    await assert.rejects(
      ctx.warden.issue({ subject: 'usr_pol', ttl: '30m', policy: 'short', scopes: ['admin', 'read', 'root'] }),
      /scopes: admin, root not allowed by policy short/,
    );
    assert.deepEqual(await refusedFields(ctx.warden.issue({ subject: 'usr_pol', ttl: '30m', policy: 'nope' })), [
      'policy',
    ]);
    assert.deepEqual(await refusedFields(ctx.warden.issue({ subject: 'usr_pol', ttl: '30m', policy: 'Bad!' })), [
      'policy',
    ]);
    assert.deepEqual(await rowCounts(), before, 'no token, credential or audit row written');
  });

  it('should record the policy and its version on the token, and start its workflow with the policy', async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_pol', ttl: '1h', policy: 'short', scopes: ['read'] });
    const { rows } = await ctx.sql.query(`SELECT policy, policy_version FROM token WHERE id = $1`, [issued.tokenId]);
    const version = (await ctx.warden.showPolicy('short')).version;
    assert.deepEqual(rows[0], { policy: 'short', policy_version: version });
    const audit = await ctx.sql.query(
      `SELECT canonical FROM audit_event WHERE token_id = $1 AND kind = 'token.issued'`,
      [issued.tokenId],
    );
    assert.match(audit.rows[0].canonical, /"policy":"short"/);
    const description = await ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId)).describe();
    assert.equal(description.typedSearchAttributes.get(SEARCH_ATTRIBUTE.policy), 'short');

    // A token without a policy is written as before: no policy, no version.
    const plain = await ctx.warden.issue({ subject: 'usr_pol', ttl: '1h' });
    const plainRow = await ctx.sql.query(`SELECT policy, policy_version FROM token WHERE id = $1`, [plain.tokenId]);
    assert.deepEqual(plainRow.rows[0], { policy: null, policy_version: null });
  });
});

describe('policies: apply', () => {
  const ids: Record<string, string> = {};

  before(async () => {
    // Loose first: every token below is within it when issued.
    await ctx.warden.setPolicy('team', { maxTtl: '2h', scopes: ['read', 'admin'] });
    await ctx.warden.setPolicy('other', { maxTtl: '2h' });
    const issue = async (label: string, ttl: string, scopes: string[], policy = 'team') =>
      (ids[label] = (await ctx.warden.issue({ subject: `usr_${label}`, ttl, scopes, policy })).tokenId);
    await issue('long', '90m', ['read']);
    await issue('admin', '10m', ['admin']);
    await issue('idle', '10m', ['read']);
    await issue('old', '10m', ['read']);
    await issue('fine', '10m', ['read']);
    await issue('otherPolicy', '90m', ['admin'], 'other');
    await issue('dead', '90m', ['admin']);
    await ctx.warden.revoke({ tokenId: ids.dead!, reason: 'gone' });
    // The passage of time, written as the store would have it: last used 2 h ago; issued 3 h ago.
    await ctx.sql.query(`UPDATE token SET last_used_at = now() - interval '2 hours' WHERE id = $1`, [ids.idle]);
    await ctx.sql.query(`UPDATE token SET issued_at = now() - interval '3 hours', last_used_at = now() WHERE id = $1`, [
      ids.old,
    ]);
    await ctx.sql.query(`UPDATE token SET last_used_at = now() WHERE id = ANY ($1)`, [[ids.long, ids.admin, ids.fine]]);
    // Now strict: 30 min max lifetime, read only, 1 h idle timeout.
    await ctx.warden.setPolicy('team', { maxTtl: '30m', scopes: ['read'], idleTimeout: '1h' });
  });

  it('should list in a dry run which live tokens would be shortened or revoked and why, as evaluatePolicy says', async () => {
    const report = await ctx.warden.applyPolicy('team', { dryRun: true });
    assert.equal(report.dryRun, true);
    assert.equal(report.evaluated, 5, 'the live tokens of the policy only');
    assert.equal(report.unchanged, 1);
    assert.deepEqual(
      report.shorten.map((f) => f.tokenId),
      [ids.long],
    );
    const long = report.shorten[0]!;
    const { rows } = await ctx.sql.query(`SELECT issued_at FROM token WHERE id = $1`, [ids.long]);
    assert.equal(long.newExpiresAt, new Date(rows[0].issued_at.getTime() + 30 * 60_000).toISOString());
    assert.match(long.why, /max lifetime/);
    const revoked = Object.fromEntries(report.revoke.map((f) => [f.tokenId, f.reason]));
    assert.deepEqual(revoked, { [ids.admin!]: 'policy', [ids.idle!]: 'inactive', [ids.old!]: 'policy' });
    assert.match(report.revoke.find((f) => f.tokenId === ids.admin)!.why, /scope admin not allowed/);

    // The same verdicts as the shared function gives for each token at the report's clock.
    const policy = policySnapshot(await ctx.warden.showPolicy('team'));
    for (const label of ['long', 'admin', 'idle', 'old', 'fine']) {
      const t = await ctx.sql.query(`SELECT issued_at, expires_at, scopes, last_used_at FROM token WHERE id = $1`, [
        ids[label],
      ]);
      const r = t.rows[0];
      const verdict = evaluatePolicy(
        {
          issuedAt: r.issued_at.toISOString(),
          expiresAt: r.expires_at.toISOString(),
          scopes: r.scopes,
          lastUsedAt: r.last_used_at?.toISOString() ?? null,
        },
        policy,
        Date.parse(report.asOf),
      );
      const listed = [...report.shorten, ...report.revoke].find((f) => f.tokenId === ids[label]);
      assert.equal(listed?.action ?? 'ok', verdict.kind, label);
    }
    // A dry run tells nobody.
    for (const id of Object.values(ids)) assert.equal(await policyChangedSignals(id), 0, id);
  });

  it("should signal exactly the dry run's tokens' workflows, once, and tell nobody again on a rerun", async () => {
    const dry = await ctx.warden.applyPolicy('team', { dryRun: true });
    const progress: number[] = [];
    const report = await ctx.warden.applyPolicy('team', { onProgress: (p) => progress.push(p.done) });
    assert.equal(report.dryRun, false);
    assert.equal(report.total, dry.evaluated);
    assert.equal(report.signalled, dry.evaluated);
    assert.equal(report.remaining, 0);
    assert.deepEqual(report.notSignalled, []);
    assert.equal(progress.at(-1), dry.evaluated);
    for (const label of ['long', 'admin', 'idle', 'old', 'fine']) {
      assert.equal(await policyChangedSignals(ids[label]!), 1, `${label} told once`);
    }
    assert.equal(await policyChangedSignals(ids.otherPolicy!), 0, 'a token of another policy is not told');
    assert.equal(await policyChangedSignals(ids.dead!), 0, 'a dead token is not told');

    const again = await ctx.warden.applyPolicy('team');
    assert.equal(again.total, 0, 'every workflow knows this version');
    assert.equal(again.signalled, 0);
    assert.equal(await policyChangedSignals(ids.fine!), 1);
  });

  it('should resume an interrupted apply, telling only the workflows not told yet', async () => {
    const version = (await ctx.warden.setPolicy('team', { maxTtl: '30m', scopes: ['read'], idleTimeout: '2h' }))
      .version;
    const stop = new AbortController();
    const first = await ctx.warden.applyPolicy('team', {
      concurrency: 1,
      rate: 20,
      signal: stop.signal,
      onProgress: (p) => {
        if (p.done === 2) stop.abort();
      },
    });
    assert.equal(first.aborted, true);
    assert.equal(first.signalled, 2);
    assert.equal(first.remaining, 3);
    assert.match(
      first.warnings.join('\n'),
      /aborted: 3 token\(s\) not told yet; run `tokenwarden policy apply team` again/,
    );
    const told = await ctx.sql.query(
      `SELECT count(*)::int AS n FROM token WHERE policy = 'team' AND policy_version = $1`,
      [version],
    );
    assert.equal(told.rows[0].n, 2, 'the checkpoint holds the two told');

    const rest = await ctx.warden.applyPolicy('team');
    assert.equal(rest.signalled, 3);
    assert.equal(rest.remaining, 0);
    for (const label of ['long', 'admin', 'idle', 'old', 'fine']) {
      assert.equal(await policyChangedSignals(ids[label]!), 2, `${label}: told once per version`);
    }
  });

  it('should refuse bad apply options naming the field, and an unknown policy', async () => {
    assert.deepEqual(await refusedFields(ctx.warden.applyPolicy('team', { rate: 0 })), ['rate']);
    assert.deepEqual(await refusedFields(ctx.warden.applyPolicy('team', { concurrency: 1000 })), ['concurrency']);
    assert.deepEqual(await refusedFields(ctx.warden.applyPolicy('Team!')), ['name']);
    await assert.rejects(ctx.warden.applyPolicy('absent', { dryRun: true }), NotFoundError);
  });
});

describe('policies: apply past closed workflows', () => {
  it('should skip and report live tokens whose workflow is closed, tell the rest, and not stop on a rerun', async () => {
    await ctx.warden.setPolicy('closedruns', { maxTtl: '2h' });
    const ids: string[] = [];
    for (let i = 0; i < 10; i++) {
      ids.push((await ctx.warden.issue({ subject: `usr_closed_${i}`, ttl: '1h', policy: 'closedruns' })).tokenId);
    }
    ids.sort();
    // More closed runs first, in the apply's id order, than failures in a row that mean "Temporal is down".
    const closed = ids.slice(0, 9);
    const healthy = ids[9]!;
    for (const id of closed) await ctx.client.workflow.getHandle(tokenWorkflowId(id)).terminate('test: run closed');
    await ctx.warden.setPolicy('closedruns', { maxTtl: '90m' });

    const first = await ctx.warden.applyPolicy('closedruns', { concurrency: 1 });
    assert.equal(first.signalled, 1, first.warnings.join('\n'));
    assert.equal(await policyChangedSignals(healthy), 1, 'the token after the closed runs is told');
    assert.deepEqual([...first.notSignalled].sort(), closed);
    assert.equal(first.remaining, 9);
    assert.match(first.warnings.join('\n'), /9 live token\(s\) have no running workflow/);
    assert.doesNotMatch(first.warnings.join('\n'), /stopped after/);

    const rerun = await ctx.warden.applyPolicy('closedruns', { concurrency: 1 });
    assert.equal(rerun.total, 9);
    assert.equal(rerun.signalled, 0);
    assert.equal(rerun.notSignalled.length, 9, 'each closed run was asked again, none given up on');
    assert.doesNotMatch(rerun.warnings.join('\n'), /stopped after/);
  });
});

describe('policies: the told checkpoint', () => {
  it('should lock the tokens it marks in id order, whatever order the plan reads them in', async () => {
    await ctx.warden.setPolicy('lockorder', { maxTtl: '2h' });
    const [a, b] = [
      (await ctx.warden.issue({ subject: 'usr_lock_a', ttl: '1h', policy: 'lockorder' })).tokenId,
      (await ctx.warden.issue({ subject: 'usr_lock_b', ttl: '1h', policy: 'lockorder' })).tokenId,
    ].sort() as [string, string];
    const { version } = await ctx.warden.setPolicy('lockorder', { maxTtl: '90m' });
    // A new row version of `a` lands after `b` in the heap: a scan in physical order meets `b` first.
    await ctx.sql.query(`UPDATE token SET policy_version = policy_version WHERE id = $1`, [a]);
    const holder = await checkout(ctx.pool);
    const marker = await checkout(ctx.pool);
    try {
      await holder.query('BEGIN');
      await holder.query(`SELECT 1 FROM ${holder.tables.token} WHERE id = $1 FOR UPDATE`, [b]);
      const markerPid = (await marker.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
      await marker.query('BEGIN');
      // The plan a long id list gets on a big table reads rows in physical order, as this one does.
      await marker.query('SET LOCAL enable_indexscan = off');
      await marker.query('SET LOCAL enable_bitmapscan = off');
      const marking = markPolicyTold(marker, [b, a], 'lockorder', version);
      await waitUntil(
        async () =>
          (
            await ctx.sql.query(`SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'`, [
              markerPid,
            ])
          ).rowCount === 1,
        'the mark waiting for the lock on b',
      );
      const free = await ctx.sql.query(`SELECT id FROM token WHERE id = $1 FOR UPDATE SKIP LOCKED`, [a]);
      assert.equal(free.rowCount, 0, 'a (the lower id) is locked before b is waited for');
      await holder.query('COMMIT');
      await marking;
      await marker.query('COMMIT');
    } finally {
      await holder.query('ROLLBACK').catch(() => {});
      await marker.query('ROLLBACK').catch(() => {});
      holder.release();
      marker.release();
    }
    const { rows } = await ctx.sql.query(`SELECT policy_version FROM token WHERE id = ANY ($1)`, [[a, b]]);
    assert.deepEqual(
      rows.map((r) => r.policy_version),
      [version, version],
    );
  });
});

describe('extend and shorten: limits checked before the workflow is asked', () => {
  it("should refuse an expiry past the policy's max lifetime or the global one, both counted from issue, naming ttl", async () => {
    await ctx.warden.setPolicy('month', { maxTtl: '30d' });
    const underPolicy = await ctx.warden.issue({ subject: 'usr_ext', ttl: '1d', policy: 'month' });
    await ctx.sql.query(`UPDATE token SET issued_at = now() - interval '29 days' WHERE id = $1`, [underPolicy.tokenId]);
    const refusal = ctx.warden.extend(underPolicy.tokenId, { ttl: '2d', reason: 'more time' });
    await assert.rejects(
      refusal,
      /ttl: now \+ ttl passes .*Z, the end of policy month's max lifetime \(30d from issue\)/,
    );
    assert.deepEqual(await refusedFields(ctx.warden.extend(underPolicy.tokenId, { ttl: '2d', reason: 'r' })), ['ttl']);

    const plain = await ctx.warden.issue({ subject: 'usr_ext', ttl: '1d' });
    const maxDays = ctx.settings.maxTtlMs / 86_400_000;
    await ctx.sql.query(`UPDATE token SET issued_at = now() - ($2 || ' days')::interval WHERE id = $1`, [
      plain.tokenId,
      String(maxDays - 1),
    ]);
    await assert.rejects(
      ctx.warden.extend(plain.tokenId, { ttl: '2d', reason: 'more time' }),
      /ttl: now \+ ttl passes .*Z, the end of the maximum lifetime \(TOKENWARDEN_MAX_TTL/,
    );
    assert.deepEqual(await refusedFields(ctx.warden.shorten(plain.tokenId, { ttl: '2d', reason: 'r' })), ['ttl']);
    const { rows } = await ctx.sql.query(`SELECT expires_at FROM token WHERE id = ANY ($1)`, [
      [underPolicy.tokenId, plain.tokenId],
    ]);
    for (const r of rows) assert.ok(r.expires_at.getTime() < Date.now() + 86_400_000 + 60_000, 'expiry unchanged');
  });
});
