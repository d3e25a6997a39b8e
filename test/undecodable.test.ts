/**
 * A payload the workflow cannot decode must never wedge a token: a `revoke` Signal sent with an
 * unknown encoding (as `temporal workflow signal --input-meta encoding=binary/bogus` does) still
 * revokes, with reason `unspecified`, audited, and propagation completes.
 */
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Payload } from '@temporalio/common';
import { SIGNAL, tokenWorkflowId } from '../common/names.js';
import { EncryptionCodec, KEY_ID_METADATA } from '../common/payload-codec.js';
import { payloadKeyId } from '../common/payload-key-id.js';
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

/** A Signal whose only payload claims an encoding no converter knows, or whatever `payload` is. */
async function signalUndecodable(tokenId: string, payload: Payload): Promise<void> {
  await ctx.client.workflowService.signalWorkflowExecution({
    namespace: ctx.settings.temporal.namespace,
    workflowExecution: { workflowId: tokenWorkflowId(tokenId) },
    signalName: SIGNAL.revoke,
    input: { payloads: [payload] },
    identity: 'test: raw gRPC signal',
    requestId: randomUUID(),
  });
}

const claiming = (encoding: string, data: string): Payload => ({
  metadata: { encoding: Buffer.from(encoding) },
  data: Buffer.from(data),
});

/** What the worker's codec would open, but for one thing: the current key's id on random bytes, or a flipped tag. */
async function almostOurs(kind: 'garbage' | 'flipped tag'): Promise<Payload> {
  const key = ctx.settings.payloadKeys[0]!;
  if (kind === 'garbage') {
    return {
      metadata: { encoding: Buffer.from('binary/encrypted'), [KEY_ID_METADATA]: Buffer.from(payloadKeyId(key)) },
      data: randomBytes(64),
    };
  }
  const [sealed] = await new EncryptionCodec([key]).encode([
    claiming('json/plain', JSON.stringify({ reason: 'a forged reason', actor: 'nobody', requestId: randomUUID() })),
  ]);
  const data = Buffer.from(sealed!.data!);
  data[data.length - 1]! ^= 1;
  return { ...sealed!, data };
}

describe('undecodable payloads', () => {
  for (const [label, encoding, payload] of [
    ['an unknown encoding', 'binary/bogus', async () => claiming('binary/bogus', '"x"')],
    ['bytes that are not the JSON they claim', 'json/plain', async () => claiming('json/plain', '{not json')],
    // Forged, or encrypted under a payload key no longer configured: the codec leaves it as it is.
    [
      'a ciphertext no configured payload key opens',
      'binary/encrypted',
      async () => claiming('binary/encrypted', 'not a ciphertext of ours'),
    ],
    // The current key's id: the codec tries to decrypt, and authentication fails.
    ['random bytes under the current key id', 'binary/encrypted', () => almostOurs('garbage')],
    ['a real ciphertext whose tag was flipped', 'binary/encrypted', () => almostOurs('flipped tag')],
  ] as const) {
    it(`should still revoke on a revoke signal with ${label}`, { timeout: 60_000 }, async () => {
      const issued = await ctx.warden.issue({ subject: 'usr_undecodable', receivers: ['billing'], ttl: '1h' });
      await signalUndecodable(issued.tokenId, await payload());
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
