/**
 * Summaries shown in the Web UI are limited by the server in bytes (400 by default, for the encoded
 * payload, so after encryption: measured on the raw history): a long non-ASCII reason must still
 * revoke and propagate, with every summary in bounds.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import proto from '@temporalio/proto';
import { tokenWorkflowId } from '../common/names.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';

let ctx: TestContext;
let worker: RunningWorker;
let receiver: TestReceiver;

before(async () => {
  ctx = await TestContext.create('summaries');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
  worker = await ctx.startWorker();
});
after(async () => {
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

/** A summary's size as the server counts it: the encoded Payload message (data, metadata keys and values). */
const summaryBytes = (s: { data?: Uint8Array | null; metadata?: Record<string, Uint8Array> | null }) =>
  proto.temporal.api.common.v1.Payload.encode(s).finish().length;

describe('summaries', () => {
  it(
    'should keep the summary of a reason made of quotes and backslashes within the byte limit',
    { timeout: 60_000 },
    async () => {
      const issued = await ctx.warden.issue({ subject: 'usr_quotes', receivers: ['billing'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason: '"\\'.repeat(240) });
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      await handle.result();
      const summaries = ((await handle.fetchHistory()).events ?? []).flatMap((e) =>
        e.userMetadata?.summary ? [e.userMetadata.summary] : [],
      );
      assert.ok(summaries.length >= 2);
      for (const s of summaries) assert.ok(summaryBytes(s) <= 400, `a summary of ${summaryBytes(s)} bytes`);
    },
  );

  it(
    'should revoke with a 500-character CJK reason end to end, every summary within the byte limit',
    { timeout: 60_000 },
    async () => {
      const reason = '退職のため無効化'.repeat(62).slice(0, 500);
      const issued = await ctx.warden.issue({ subject: 'usr_cjk', receivers: ['billing'], ttl: '1h' });
      await ctx.warden.revoke({ tokenId: issued.tokenId, reason });
      const handle = ctx.client.workflow.getHandle(tokenWorkflowId(issued.tokenId));
      const done = (await handle.result()) as TokenLifecycleResult;
      assert.equal(done.propagation, 'complete');
      const delivered = receiver.acked().map((r) => JSON.parse(r.body) as { token_id: string; reason: string });
      assert.equal(
        delivered.find((e) => e.token_id === issued.tokenId)?.reason,
        reason,
        'the event keeps the whole reason',
      );

      const history = await handle.fetchHistory();
      const summaries = (history.events ?? []).flatMap((e) =>
        e.userMetadata?.summary ? [e.userMetadata.summary] : [],
      );
      assert.ok(summaries.length >= 2, 'the kill and the delivery have summaries');
      for (const s of summaries) assert.ok(summaryBytes(s) <= 400, `a summary of ${summaryBytes(s)} bytes`);
      // Encrypted, as every payload is: the limit holds for the ciphertext.
      assert.ok(summaries.every((s) => Buffer.from(s.metadata!.encoding!).toString() === 'binary/encrypted'));
    },
  );
});
