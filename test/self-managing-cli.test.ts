/**
 * The self-managing commands as a user runs them (a child process): policy set/show/apply, issue
 * under a policy, and the refusals of rotate, report, suspend, revoke --at, extend and shorten —
 * exit 2, the field named, nothing written.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { newCredentialId } from '../common/ids.js';
import { SIGNAL, tokenWorkflowId } from '../common/names.js';
import { hashToken } from '../common/secrets.js';
import { rotateCredential } from '../common/store/credentials.js';
import { setScheduledRevoke, setSuspended } from '../common/store/suspension.js';
import { runCli, type CliRun } from './support/cli.js';
import { TestContext } from './support/context.js';
import { decodedHistory } from './support/history.js';

let ctx: TestContext;

before(async () => {
  ctx = await TestContext.create('smcli');
});
after(async () => {
  await ctx?.close();
});

const cli = (...args: string[]) => runCli(args, ctx.childEnv());

const json = (run: CliRun) => {
  assert.equal(run.code, 0, run.stderr);
  return JSON.parse(run.stdout);
};

/** Exit 2, the field named on stderr, nothing on stdout. */
function refused(run: CliRun, field: RegExp): void {
  assert.equal(run.code, 2, `${run.args.join(' ')}: ${run.stderr}`);
  assert.match(run.stderr, field, run.args.join(' '));
  assert.equal(run.stdout, '');
}

async function rowCounts(): Promise<unknown> {
  const { rows } = await ctx.sql.query(
    `SELECT (SELECT count(*)::int FROM token) AS tokens, (SELECT count(*)::int FROM credential) AS credentials,
            (SELECT count(*)::int FROM policy) AS policies, (SELECT max(version) FROM policy) AS versions`,
  );
  return rows[0];
}

async function signals(tokenId: string, name: string): Promise<number> {
  const history = await decodedHistory(ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)));
  return (history.events ?? []).filter((e) => e.workflowExecutionSignaledEventAttributes?.signalName === name).length;
}

describe('tokenwarden policy', () => {
  it('should set and show a policy as JSON, and refuse bad options naming the option, writing nothing', async () => {
    const set = json(
      await cli(
        'policy',
        'set',
        'ops',
        '--max-ttl',
        '1h',
        '--scopes',
        'read,write',
        '--warn',
        '30m,10m',
        '--owner-dir',
        '/tmp/tw-owner',
        '--json',
      ),
    );
    assert.equal(set.name, 'ops');
    assert.equal(set.version, 1);
    assert.equal(set.maxLifetimeMs, 3_600_000);
    assert.deepEqual(set.allowedScopes, ['read', 'write']);
    assert.deepEqual(set.warnBeforeMs, [1_800_000, 600_000]);
    assert.equal(set.ownerDir, '/tmp/tw-owner');
    assert.deepEqual(json(await cli('policy', 'show', 'ops', '--json')), set);
    const human = await cli('policy', 'show', 'ops');
    assert.match(human.stdout, /max lifetime +1h/);
    assert.match(human.stdout, /scopes +read, write/);

    const before = await rowCounts();
    refused(await cli('policy', 'set', 'ops', '--max-ttl', 'forever'), /--max-ttl: expected a duration/);
    refused(
      await cli('policy', 'set', 'ops', '--rotate-every', '1d'),
      /--rotate-every: automatic rotation sends the new secret/,
    );
    refused(
      await cli('policy', 'set', 'ops', '--warn', '1d,soon', '--owner-dir', '/tmp/x'),
      /--warn\.1: expected a duration/,
    );
    refused(await cli('policy', 'set', 'ops', '--scopes', 'a b'), /--scopes\.0: expected a scope without spaces/);
    refused(await cli('policy', 'set', 'ops', '--owner-receiver', 'nobody'), /--owner-receiver: no receiver nobody/);
    refused(await cli('policy', 'set', 'Ops!', '--max-ttl', '1h'), /name: expected a lowercase name/);
    refused(await cli('policy', 'set', 'ops', '--on-suspicious', 'ignore'), /--on-suspicious/);
    assert.deepEqual(await rowCounts(), before, 'nothing written');
    const missing = await cli('policy', 'show', 'absent');
    assert.equal(missing.code, 3, missing.stderr);
    assert.match(missing.stderr, /policy "absent" not found/);
  });

  it('should refuse `issue --policy` above the max lifetime or with a scope not allowed: exit 2, the field named, nothing written', async () => {
    const before = await rowCounts();
    refused(
      await cli('issue', '--subject', 'usr_cli_pol', '--ttl', '2h', '--policy', 'ops', '--scope', 'read'),
      /ttl: at most 1h \(policy ops's max lifetime\)/,
    );
    refused(
      await cli('issue', '--subject', 'usr_cli_pol', '--ttl', '30m', '--policy', 'ops', '--scope', 'admin'),
      /scopes: admin not allowed by policy ops/,
    );
    refused(
      await cli('issue', '--subject', 'usr_cli_pol', '--ttl', '30m', '--policy', 'nope'),
      /policy: no policy named "nope"/,
    );
    assert.deepEqual(await rowCounts(), before, 'no token, credential or policy row written');
    const issued = json(
      await cli('issue', '--subject', 'usr_cli_pol', '--ttl', '1h', '--policy', 'ops', '--scope', 'read', '--json'),
    );
    const { rows } = await ctx.sql.query(`SELECT policy FROM token WHERE id = $1`, [issued.tokenId]);
    assert.equal(rows[0].policy, 'ops');
  });

  it('should list a dry run as JSON, then apply: the listed tokens signalled, a rerun telling nobody', async () => {
    const a = json(
      await cli('issue', '--subject', 'usr_cli_a', '--ttl', '50m', '--policy', 'ops', '--scope', 'write', '--json'),
    );
    // Stricter: write no longer allowed, 20 min max lifetime.
    json(await cli('policy', 'set', 'ops', '--max-ttl', '20m', '--scopes', 'read', '--json'));
    const dry = json(await cli('policy', 'apply', 'ops', '--dry-run', '--json'));
    assert.equal(dry.dryRun, true);
    assert.equal(dry.evaluated, 2, 'the issued token of the test before, and this one');
    assert.deepEqual(
      dry.revoke.map((f: { tokenId: string; reason: string }) => [f.tokenId, f.reason]),
      [[a.tokenId, 'policy']],
    );
    assert.equal(dry.shorten.length, 1, 'the 1 h token is shortened to 20 min');
    assert.match(dry.shorten[0].why, /max lifetime/);
    assert.equal(await signals(a.tokenId, SIGNAL.policyChanged), 0, 'a dry run tells nobody');

    const applied = json(await cli('policy', 'apply', 'ops', '--json'));
    assert.equal(applied.signalled, 2);
    assert.equal(applied.remaining, 0);
    for (const f of [...dry.revoke, ...dry.shorten]) {
      assert.equal(await signals(f.tokenId, SIGNAL.policyChanged), 1, f.tokenId);
    }
    const rerun = json(await cli('policy', 'apply', 'ops', '--json'));
    assert.equal(rerun.signalled, 0);
    refused(await cli('policy', 'apply', 'ops', '--rate', '0'), /--rate: expected a positive number/);
  });
});

describe('tokenwarden rotate, report, suspend, revoke --at, extend, shorten', () => {
  let tokenId: string;
  before(async () => {
    tokenId = json(
      await cli('issue', '--subject', 'usr_cli_sm', '--ttl', '10m', '--policy', 'ops', '--scope', 'read', '--json'),
    ).tokenId;
  });

  it('should refuse bad input with exit 2 and the field named, before anything is sent', async () => {
    const before = await rowCounts();
    refused(await cli('rotate', tokenId, '--grace', 'soon'), /grace: expected 0 or a duration/);
    refused(await cli('rotate', 'tok_nope'), /tokenId: expected a token id/);
    refused(await cli('report', tokenId, '--reason', 'odd', '--evidence', '{not json'), /--evidence: expected JSON/);
    refused(await cli('report', tokenId, '--reason', '  '), /reason: a reason is required/);
    refused(await cli('suspend', tokenId, '--reason', 'a\u001bb'), /reason: must not contain control characters/);
    refused(await cli('revoke', tokenId, '--at', '2020-01-01T00:00:00Z', '--reason', 'r'), /at: must be in the future/);
    refused(await cli('revoke', tokenId, '--at', 'tomorrow', '--reason', 'r'), /at: expected an ISO 8601 date-time/);
    refused(
      await cli('revoke', '--where', 'subject=usr_x', '--at', '2099-01-01T00:00:00Z', '--reason', 'r'),
      /with a token id only/,
    );
    refused(await cli('extend', tokenId, '--ttl', '2x', '--reason', 'r'), /ttl: expected a duration/);
    refused(
      await cli('extend', tokenId, '--ttl', '1h', '--reason', 'r'),
      /ttl: now \+ ttl passes .*Z, the end of policy ops's max lifetime \(20m from issue\)/,
    );
    refused(await cli('extend', tokenId, '--ttl', '1m', '--reason', 'r'), /ttl: extend moves the expiry later/);
    refused(await cli('shorten', tokenId, '--ttl', '15m', '--reason', 'r'), /ttl: shorten moves the expiry earlier/);
    assert.deepEqual(await rowCounts(), before);
    assert.equal(await signals(tokenId, SIGNAL.reportSuspicious), 0);
  });

  it('should refuse every one of them for a dead token as a conflict (exit 4), naming the token', async () => {
    const dead = json(await cli('issue', '--subject', 'usr_cli_dead', '--ttl', '10m', '--json')).tokenId;
    json(await cli('revoke', dead, '--reason', 'gone', '--json'));
    const conflict = (run: CliRun, message: RegExp) => {
      assert.equal(run.code, 4, `${run.args.join(' ')}: ${run.stderr}`);
      assert.match(run.stderr, message, run.args.join(' '));
      assert.equal(run.stdout, '');
    };
    const isRevoked = new RegExp(`token ${dead} is revoked`);
    conflict(await cli('rotate', dead), new RegExp(`token ${dead} is revoked: it cannot be rotated`));
    conflict(await cli('suspend', dead, '--reason', 'r'), isRevoked);
    conflict(await cli('resume', dead, '--reason', 'r'), isRevoked);
    conflict(await cli('report', dead, '--reason', 'r'), isRevoked);
    conflict(await cli('revoke', dead, '--at', '2099-01-01T00:00:00Z', '--reason', 'r'), isRevoked);
    conflict(await cli('revoke', dead, '--cancel-scheduled', '--reason', 'r'), isRevoked);
    conflict(await cli('extend', dead, '--ttl', '5m', '--reason', 'r'), isRevoked);
    const missing = await cli('suspend', 'tok_0193aaaaaaaaaaaaaaaaaaaaaaaaaaaa', '--reason', 'r');
    assert.equal(missing.code, 3, missing.stderr);
  });

  it("should send a report to the token's workflow with its evidence, saying what the policy will do", async () => {
    const out = json(
      await cli('report', tokenId, '--reason', 'seen from 203.0.113.9', '--evidence', '{"ip":"203.0.113.9"}', '--json'),
    );
    assert.equal(out.tokenId, tokenId);
    assert.equal(out.action, 'revoke', "policy ops's default");
    assert.match(out.reportId, /^[0-9a-f-]{36}$/);
    assert.equal(await signals(tokenId, SIGNAL.reportSuspicious), 1);
  });
});

describe('tokenwarden show: credentials, suspension, scheduled revocation', () => {
  it('should list each credential with its state and grace deadline, the policy, the suspension and the schedule', async () => {
    const issued = json(
      await cli('issue', '--subject', 'usr_cli_show', '--ttl', '10m', '--policy', 'ops', '--scope', 'read', '--json'),
    );
    const tokenId: string = issued.tokenId;
    // Two rotations in the store (the workflow's activities call these): the first credential is
    // superseded (revoked), the second is previous in its grace, the third current.
    const rotate = (graceMs: number) =>
      rotateCredential(ctx.pool, {
        tokenId,
        credentialId: newCredentialId(),
        secretHash: hashToken(`tw_show_${graceMs}_${Math.random()}`),
        graceMs,
        actor: 'test',
        reason: 'show test',
      });
    await rotate(60_000);
    const second = await rotate(120_000);
    await setSuspended(ctx.pool, { tokenId, suspended: true, actor: 'test', reason: 'investigating' });
    await setScheduledRevoke(ctx.pool, { tokenId, at: '2099-01-01T00:00:00.000Z', reason: 'contract ends' });

    const shown = json(await cli('show', tokenId, '--json'));
    assert.deepEqual(
      shown.credentials.map((c: { state: string }) => c.state),
      ['revoked', 'previous', 'current'],
    );
    const previous = shown.credentials[1];
    assert.equal(previous.validUntil, second.previousValidUntil);
    assert.equal(shown.policy, 'ops');
    assert.equal(shown.suspendReason, 'investigating');
    assert.equal(shown.valid, false, 'a suspended token is not valid');
    assert.equal(shown.revokeScheduledAt, '2099-01-01T00:00:00.000Z');

    const human = (await cli('show', tokenId)).stdout;
    assert.match(human, new RegExp(`credential +${previous.id}: previous, valid until ${previous.validUntil}`));
    assert.match(human, /credential +cred_\w+: current/);
    assert.match(human, /credential +cred_\w+: revoked, revoked \S+Z/);
    assert.match(human, /policy +ops/);
    assert.match(human, /suspended +\S+Z by test: investigating/);
    assert.match(human, /revoke at +2099-01-01T00:00:00.000Z: contract ends/);
  });
});
