/**
 * What an operator sees in the Web UI and finds with visibility queries: the token's name and, while
 * its death propagates, the receivers not yet confirmed (TokenPendingReceivers), gone once complete;
 * step labels and current details that say who acted and why; a worker that refuses to start on a
 * namespace missing a search attribute, naming the command that registers it.
 * Real Temporal dev server, real PostgreSQL, real receivers on loopback.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { SEARCH_ATTRIBUTE, tokenWorkflowId } from '../common/names.js';
import { msToTs } from '@temporalio/common/lib/time.js';
import { ConfigError, InvalidInputError } from '../common/errors.js';
import { checkSearchAttributes } from '../worker/worker.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let worker: RunningWorker;
let billing: TestReceiver;
let crm: TestReceiver;

before(async () => {
  ctx = await TestContext.create('operator_view', { escalateAfterMs: 1_500 });
  billing = await TestReceiver.start();
  billing.secret = (await ctx.warden.addReceiver({ id: 'view-billing', url: billing.url })).secret;
  crm = await TestReceiver.start();
  crm.secret = (await ctx.warden.addReceiver({ id: 'view-crm', url: crm.url })).secret;
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await billing?.close();
  await crm?.close();
  await ctx?.close();
});

const searchAttribute = async (tokenId: string, key: (typeof SEARCH_ATTRIBUTE)[keyof typeof SEARCH_ATTRIBUTE]) =>
  (await ctx.client.workflow.getHandle(tokenWorkflowId(tokenId)).describe()).typedSearchAttributes.get(key);

describe('the operator view of a token', () => {
  it('should name the receivers still pending while a death propagates, findable by query, and none once complete', async () => {
    crm.behaviour = () => ({ status: 503 });
    const issued = await ctx.warden.issue({
      subject: 'usr_operator_view',
      name: 'ci deploy key',
      receivers: ['view-billing', 'view-crm'],
      ttl: '1h',
    });
    assert.equal(await searchAttribute(issued.tokenId, SEARCH_ATTRIBUTE.name), 'ci deploy key');
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'key rotated out', actor: 'ops:alice' });
    await waitUntil(
      async () =>
        JSON.stringify(await searchAttribute(issued.tokenId, SEARCH_ATTRIBUTE.pendingReceivers)) === '["view-crm"]',
      'TokenPendingReceivers to name crm alone (billing confirmed)',
    );
    await waitUntil(async () => (await ctx.warden.show(issued.tokenId)).propagation === 'stuck', 'stuck on crm');
    // "Which tokens are stuck on crm?" is one query (visibility follows within moments).
    const query = `TokenPendingReceivers = 'view-crm' AND TokenPropagation = 'stuck'`;
    await waitUntil(async () => {
      for await (const w of ctx.client.workflow.list({ query }))
        if (w.workflowId === tokenWorkflowId(issued.tokenId)) return true;
      return false;
    }, `the token listed by ${query}`);

    // The same from the CLI: aligned columns with name, who and why.
    const listed = await runCli(['list', '--propagation', 'stuck'], ctx.childEnv());
    assert.equal(listed.code, 0, listed.stderr);
    const [header, ...rows] = listed.stdout.trimEnd().split('\n');
    const row = rows.find((r) => r.startsWith(issued.tokenId));
    assert.ok(row, listed.stdout);
    assert.match(row, /ci deploy key/);
    assert.match(row, /stuck/);
    for (const [column, value] of [
      ['NAME', 'ci deploy key'],
      ['BY', 'ops:alice'],
      ['REASON', 'key rotated out'],
    ] as const) {
      assert.equal(row.indexOf(value), header!.indexOf(column), `${column} aligned: ${listed.stdout}`);
    }
    const bad = await runCli(['list', '--propagation', 'wedged'], ctx.childEnv());
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /propagation: /);

    // Step labels: who killed it and why, and the receiver it is stuck on with its last answer.
    const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
    const labels = ((await decodedHistory(handle)).events ?? []).flatMap((e) =>
      e.userMetadata?.summary?.data ? [JSON.parse(Buffer.from(e.userMetadata.summary.data).toString()) as string] : [],
    );
    assert.ok(labels.includes('revoke by ops:alice: key rotated out'), labels.join(' | '));
    assert.ok(
      labels.some((l) => /^escalate: stuck on view-crm \((HTTP 503|.*503.*)\)$/.test(l)),
      labels.join(' | '),
    );

    await ctx.warden.forceComplete(issued.tokenId, { reason: 'crm decommissioned', actor: 'ops:bob' });
    await handle.result();
    const pendingAtEnd = await searchAttribute(issued.tokenId, SEARCH_ATTRIBUTE.pendingReceivers);
    assert.equal(pendingAtEnd, undefined, `none pending once complete: ${JSON.stringify(pendingAtEnd)}`);
    const after = ((await decodedHistory(handle)).events ?? []).flatMap((e) =>
      e.userMetadata?.summary?.data ? [JSON.parse(Buffer.from(e.userMetadata.summary.data).toString()) as string] : [],
    );
    assert.ok(after.includes('forced complete by ops:bob: crm decommissioned'), after.join(' | '));
  });

  it("should report a workflow's refusal of an operator Update as a field-named error, exit 2, not retried", async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_operator_refusal', ttl: '1h' });
    // The store says a revocation propagates (a stale read, as in a race with completion); the
    // living token's workflow knows better and refuses.
    await ctx.sql.query(`UPDATE token SET propagation = 'pending' WHERE id = $1`, [issued.tokenId]);
    const err = await ctx.warden.retryPropagation(issued.tokenId, { reason: 'crm back up' }).then(
      () => assert.fail('the workflow accepted a retry of a living token'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof InvalidInputError, String(err));
    assert.deepEqual(
      err.fields.map((f) => f.path),
      ['tokenId'],
    );
    assert.match(err.message, /its workflow refused the retry: .*not propagating/);
    const run = await runCli(['force', issued.tokenId, '--reason', 'crm gone'], ctx.childEnv());
    assert.equal(run.code, 2, run.stderr);
    assert.match(run.stderr, /invalid force request: tokenId: its workflow refused the force/);
  });

  it('should refuse to start a worker on a namespace missing a search attribute, naming the command', async () => {
    const namespace = `bare-${Date.now()}`;
    await ctx.client.workflowService.registerNamespace({
      namespace,
      workflowExecutionRetentionPeriod: msToTs(86_400_000),
    });
    await waitUntil(
      async () => (await ctx.client.workflowService.describeNamespace({ namespace })).namespaceInfo?.name === namespace,
      'the namespace registered',
    );
    const err = await checkSearchAttributes(ctx.client, namespace).then(
      () => assert.fail('a namespace without the search attributes was accepted'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof ConfigError, String(err));
    assert.match(err.message, /lacks the search attribute\(s\) .*TokenPendingReceivers/);
    assert.match(
      err.message,
      new RegExp(
        `temporal operator search-attribute create --namespace ${namespace} --name TokenPendingReceivers --type KeywordList`,
      ),
    );
    await checkSearchAttributes(ctx.client, ctx.settings.temporal.namespace);
  });
});
