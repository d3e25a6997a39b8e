/**
 * A rolling deploy stops a worker process with SIGTERM: a delivery in flight finishes first, is
 * recorded once, and the process exits cleanly.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { PACKAGE_ROOT } from '../common/config.js';
import { tokenWorkflowId } from '../common/names.js';
import * as store from '../common/store/index.js';
import type { TokenLifecycleResult } from '../common/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';
import { runOutput } from './support/run-record.js';

let ctx: TestContext;
let receiver: TestReceiver;
let child: ChildProcess | undefined;
let worker: RunningWorker | undefined;

before(async () => {
  ctx = await TestContext.create('shutdown');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
});
after(async () => {
  child?.kill('SIGKILL');
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

describe('worker shutdown', () => {
  it('should let a delivery in flight finish when its worker process gets SIGTERM', async () => {
    // The receiver holds each POST for 2 s: long enough to stop the worker in the middle of one.
    receiver.behaviour = () => ({ status: 204, delayMs: 2_000 });
    const output: string[] = [];
    child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'worker', '--no-schedule'], {
      env: ctx.childEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const log = runOutput('worker');
    const keep = (chunk: Buffer) => {
      output.push(chunk.toString());
      log(chunk);
    };
    child.stdout!.on('data', keep);
    child.stderr!.on('data', keep);
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child!.once('exit', (code, signal) => resolve({ code, signal })),
    );

    const issued = await ctx.warden.issue({ subject: 'usr_deploy', receivers: ['billing'], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'deploy drill' });
    await waitUntil(() => receiver.requests.length >= 1, 'the POST to be in flight on the worker process', 90_000);
    child.kill('SIGTERM');
    const exit = await exited;

    assert.deepEqual(exit, { code: 0, signal: null }, output.join(''));
    const [delivery, ...others] = await store.listDeliveries(ctx.pool, issued.tokenId);
    assert.equal(others.length, 0);
    assert.equal(delivery!.status, 'delivered', `the attempt finished: ${JSON.stringify(delivery)}`);
    assert.equal(delivery!.attempts, 1, 'recorded once');
    assert.equal(receiver.requests.length, 1);

    // The next worker finishes the workflow from the recorded outcome, sending nothing again.
    worker = await ctx.startWorker();
    const done = (await ctx.client.workflow
      .getHandle(tokenWorkflowId(issued.tokenId))
      .result()) as TokenLifecycleResult;
    assert.equal(done.propagation, 'complete');
    assert.equal(receiver.requests.length, 1);
    assert.ok(receiver.requests[0]!.verified);
  });
});
