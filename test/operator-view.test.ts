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
import proto from '@temporalio/proto';
import { ConfigError, InvalidInputError, NotPropagatingError } from '../common/errors.js';
import { checkSearchAttributes } from '../worker/worker.js';
import { runCli } from './support/cli.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { decodedHistory } from './support/history.js';
import { patchedUpserts } from './support/patches.js';
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
    // Patched once, before the first upsert; then one upsert per change of the pending set: both
    // (unless billing confirmed while the kill committed), crm alone, none. Never a repeat.
    const trail = patchedUpserts(
      await handle.fetchHistory(),
      'pending-receivers',
      SEARCH_ATTRIBUTE.pendingReceivers.name,
    );
    assert.equal(trail.markers, 1, JSON.stringify(trail));
    assert.ok(trail.markerFirst, JSON.stringify(trail));
    const expected = [['view-billing', 'view-crm'], ['view-crm'], null];
    assert.deepEqual(trail.upserts, expected.slice(expected.length - trail.upserts.length), JSON.stringify(trail));
    assert.ok(trail.upserts.length >= 2, JSON.stringify(trail));
    const after = ((await decodedHistory(handle)).events ?? []).flatMap((e) =>
      e.userMetadata?.summary?.data ? [JSON.parse(Buffer.from(e.userMetadata.summary.data).toString()) as string] : [],
    );
    assert.ok(after.includes('forced complete by ops:bob: crm decommissioned'), after.join(' | '));
  });

  it("should report a workflow's refusal of an operator Update by the token's state as a conflict, exit 4", async () => {
    const issued = await ctx.warden.issue({ subject: 'usr_operator_refusal', ttl: '1h' });
    // The store says a revocation propagates (a stale read, as in a race with completion); the
    // living token's workflow knows better and refuses: the request was fine, the state was not.
    await ctx.sql.query(`UPDATE token SET propagation = 'pending' WHERE id = $1`, [issued.tokenId]);
    const err = await ctx.warden.retryPropagation(issued.tokenId, { reason: 'crm back up' }).then(
      () => assert.fail('the workflow accepted a retry of a living token'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof NotPropagatingError, String(err));
    assert.ok(!(err instanceof InvalidInputError));
    assert.equal(err.tokenId, issued.tokenId);
    assert.match(err.message, /not propagating a revocation \(phase active\)/);
    const run = await runCli(['force', issued.tokenId, '--reason', 'crm gone'], ctx.childEnv());
    assert.equal(run.code, 4, run.stderr);
    assert.match(
      run.stderr,
      new RegExp(`^tokenwarden: token ${issued.tokenId} is not propagating a revocation \\(phase active\\)`),
    );
  });

  it('should refuse to start a worker on a namespace missing a search attribute or holding one mistyped, naming the command', async () => {
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

    // Registered under another type, the workflow's upsert of a list would fail its task on every retry.
    await ctx.client.connection.operatorService.addSearchAttributes({
      namespace,
      searchAttributes: {
        TokenPendingReceivers: proto.temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
      },
    });
    await waitUntil(
      async () =>
        'TokenPendingReceivers' in
        ((await ctx.client.connection.operatorService.listSearchAttributes({ namespace })).customAttributes ?? {}),
      'the mistyped search attribute registered',
    );
    const mistyped = await checkSearchAttributes(ctx.client, namespace).then(
      () => assert.fail('a search attribute of the wrong type was accepted'),
      (e: unknown) => e,
    );
    assert.ok(mistyped instanceof ConfigError, String(mistyped));
    assert.match(
      mistyped.message,
      /has TokenPendingReceivers registered as KEYWORD where tokenwarden writes KeywordList/,
    );
    assert.match(mistyped.message, /--name TokenPendingReceivers --type KeywordList/);

    // Only "may not list" is trusted; a namespace the server does not know is an error, not a warning.
    const unknown = await checkSearchAttributes(ctx.client, `${namespace}-unknown`).then(
      () => assert.fail('an unknown namespace passed the check'),
      (e: unknown) => e,
    );
    assert.ok(!(unknown instanceof ConfigError), String(unknown));

    await checkSearchAttributes(ctx.client, ctx.settings.temporal.namespace);
    await ctx.client.connection.operatorService.deleteNamespace({ namespace });
  });
});
