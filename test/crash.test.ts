/**
 * A worker process killed with SIGKILL in the middle of a delivery: nothing is lost. The delivery
 * activity's start-to-close timeout (15 s) bounds how long the dead attempt blocks the retry.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { PACKAGE_ROOT } from '../common/config.js';
import { tokenWorkflowId } from '../common/names.js';
import type { TokenLifecycleResult } from '../workflows/messages.js';
import { TestContext, type RunningWorker } from './support/context.js';
import { TestReceiver } from './support/receiver.js';
import { waitUntil } from './support/wait.js';

let ctx: TestContext;
let receiver: TestReceiver;
let child: ChildProcess | undefined;
let worker: RunningWorker | undefined;

before(async () => {
  ctx = await TestContext.create('crash');
  receiver = await TestReceiver.start();
  receiver.secret = (await ctx.warden.addReceiver({ id: 'billing', url: receiver.url })).secret;
});
after(async () => {
  child?.kill('SIGKILL');
  await worker?.stop();
  await receiver?.close();
  await ctx?.close();
});

function startWorkerProcess(): ChildProcess {
  return spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), 'worker', '--no-schedule'], {
    env: ctx.childEnv(),
    stdio: 'ignore',
  });
}

describe('worker crash', () => {
  it('should complete propagation after the worker process is killed mid-delivery', async () => {
    let hold = true;
    receiver.behaviour = () => (hold ? { status: 204, delayMs: 5_000 } : { status: 204 });
    child = startWorkerProcess();
    const issued = await ctx.warden.issue({ subject: 'usr_crash', receivers: ['billing'], ttl: '1h' });
    await ctx.warden.revoke({ tokenId: issued.tokenId, reason: 'crash drill' });

    await waitUntil(() => receiver.requests.length >= 1, 'the delivery to be in flight on the child worker', 60_000);
    child.kill('SIGKILL');
    await new Promise((resolve) => child!.once('exit', resolve));
    hold = false;

    worker = await ctx.startWorker();
    const done = (await ctx.client.workflow
      .getHandle(tokenWorkflowId(issued.tokenId))
      .result()) as TokenLifecycleResult;
    assert.equal(done.propagation, 'complete');
    const shown = await ctx.warden.show(issued.tokenId);
    assert.equal(shown.deliveries[0]!.status, 'delivered');
    assert.ok(receiver.requests.length >= 2, 'the attempt was made again after the crash');
    assert.equal(new Set(receiver.requests.map((r) => r.headers['webhook-id'])).size, 1, 'the same logical event');
    assert.ok(receiver.requests.every((r) => r.verified));
  });
});
