/**
 * A payload the workflow cannot decode must never wedge a token: a `revoke` Signal sent with an
 * unknown encoding (as `temporal workflow signal --input-meta encoding=binary/bogus` does) still
 * revokes, with reason `unspecified`, audited, and propagation completes.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { SIGNAL, tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('undecodable');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

/** A Signal whose only payload claims an encoding no converter knows. */
async function signalUndecodable(tokenId: string, encoding: string, data: string): Promise<void> {
  await ctx.client.workflowService.signalWorkflowExecution({
    namespace: ctx.settings.temporal.namespace,
    workflowExecution: { workflowId: tokenWorkflowId(tokenId) },
    signalName: SIGNAL.revoke,
    input: { payloads: [{ metadata: { encoding: Buffer.from(encoding) }, data: Buffer.from(data) }] },
    identity: 'test: raw gRPC signal',
    requestId: randomUUID(),
  });
}

describe('undecodable payloads', () => {
  for (const [label, encoding, data] of [
    ['an unknown encoding', 'binary/bogus', '"x"'],
    ['bytes that are not the JSON they claim', 'json/plain', '{not json'],
    // Forged, or encrypted under a payload key no longer configured: the codec leaves it as it is.
    ['a ciphertext no configured payload key opens', 'binary/encrypted', 'not a ciphertext of ours'],
  ] as const) {
    it(`should still revoke on a revoke signal with ${label}`, { timeout: 60_000 }, async () => {
      const issued = await ctx.warden.issue({ subject: 'usr_undecodable', receivers: ['billing'], ttl: '1h' });
      await signalUndecodable(issued.tokenId, encoding, data);
      const done = (await ctx.client.workflow
        .getHandle(tokenWorkflowId(issued.tokenId))
        .result()) as TokenLifecycleResult;
      assert.equal(done.propagation, 'complete');
      const token = await store.requireToken(ctx.pool, issued.tokenId);
      assert.equal(token.status, 'revoked');
      assert.equal(token.revokeReason, 'unspecified');
      const audit = await store.readAudit(ctx.pool, issued.tokenId);
      const malformed = audit.find((e) => e.kind === 'signal.malformed');
      assert.ok(malformed, `audit kinds: ${audit.map((e) => e.kind).join(', ')}`);
      const recorded = JSON.parse(malformed.canonical) as { data: Record<string, unknown> };
      assert.deepEqual(recorded.data, { reasonRecorded: 'unspecified', undecodableEncoding: encoding });
      assert.ok(receiver.acked().some((r) => JSON.parse(r.body).token_id === issued.tokenId));
    });
  }
});
