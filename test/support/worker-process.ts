/**
 * `tokenwarden worker --no-schedule` as child processes, the way production runs workers: started,
 * awaited until they poll, SIGKILLed by fault-injection tests, every line they print kept for scans.
 */
import path from 'node:path';
import type { Client } from '@temporalio/client';
import proto from '@temporalio/proto';
import { PACKAGE_ROOT } from '../../common/config.js';
import { ManagedChild, waitUntilReady } from '../../dev/processes.js';
import { runLog } from './run-record.js';

const { TaskQueueType } = proto.temporal.api.enums.v1;
const BIN = path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js');
let started = 0;

export class WorkerProcess {
  /** Every line the process printed on stdout and stderr. */
  readonly output: string[] = [];
  /** Set when the test killed or stopped it: any other exit is a crash of the worker itself. */
  endedByTest = false;
  private readonly child: ManagedChild;

  private constructor(
    readonly name: string,
    env: Record<string, string>,
  ) {
    const log = runLog(`worker-${process.pid}-${name}`);
    this.child = new ManagedChild(name, process.execPath, [BIN, 'worker', '--no-schedule'], {
      env,
      onOutput: (line) => {
        this.output.push(line);
        log(line);
      },
    });
  }

  /** Starts a worker process and resolves once it polls both of the queue's task types. */
  static async start(env: Record<string, string>, client: Client): Promise<WorkerProcess> {
    const worker = new WorkerProcess(`worker process ${++started}`, env);
    await worker.untilPolling(client, env.TOKENWARDEN_TASK_QUEUE!);
    return worker;
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.child.running;
  }

  get exited(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    return this.child.exited;
  }

  /** `kill -9`: no shutdown, no cleanup, connections dropped mid-flight. */
  async kill(): Promise<void> {
    this.endedByTest = true;
    await this.child.stop('SIGKILL');
  }

  async stop(): Promise<void> {
    this.endedByTest = true;
    await this.child.stop('SIGTERM', 30_000);
  }

  /** The SDK names a worker `<pid>@<host>`; the server lists it among the queue's pollers once it polls. */
  private async untilPolling(client: Client, taskQueue: string): Promise<void> {
    const identity = `${this.pid}@`;
    const polls = async (taskQueueType: number) => {
      const { pollers } = await client.workflowService.describeTaskQueue({
        namespace: client.options.namespace,
        taskQueue: { name: taskQueue },
        taskQueueType,
      });
      return (pollers ?? []).some((p) => p.identity?.startsWith(identity));
    };
    await waitUntilReady(
      this.child,
      async () => {
        if (
          !(await polls(TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)) ||
          !(await polls(TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY))
        ) {
          await new Promise((resolve) => setTimeout(resolve, 100));
          throw new Error(`${this.name} does not poll ${taskQueue} yet`);
        }
      },
      60_000,
    );
  }
}

/** Worker processes on one task queue; every process ever started stays listed (for their logs). */
export class WorkerFleet {
  readonly processes: WorkerProcess[] = [];

  constructor(
    private readonly env: Record<string, string>,
    private readonly client: Client,
  ) {}

  async add(count = 1): Promise<void> {
    const added = await Promise.all(Array.from({ length: count }, () => WorkerProcess.start(this.env, this.client)));
    this.processes.push(...added);
  }

  running(): WorkerProcess[] {
    return this.processes.filter((p) => p.running);
  }

  /** Processes that exited without the test ending them (a worker crash). */
  crashed(): string[] {
    return this.processes.filter((p) => !p.running && !p.endedByTest).map((p) => `${p.name}:\n${p.output.join('\n')}`);
  }

  output(): string {
    return this.processes.map((p) => p.output.join('\n')).join('\n');
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.running().map((p) => p.stop()));
  }

  async killAll(): Promise<void> {
    await Promise.all(this.running().map((p) => p.kill()));
  }
}
