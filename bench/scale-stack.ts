/**
 * The stack a user gets: `tokenwarden start` in its own data dir (Temporal dev server on a SQLite
 * file, embedded PostgreSQL with its default durability, migrations, the reconciler and the
 * in-process worker), on free ports, used as a client the way `tokenwarden env` tells one to. With
 * `workers > 0` the stack runs without its worker and `tokenwarden worker` processes do the work.
 */
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import proto from '@temporalio/proto';
import type { Client } from '@temporalio/client';
import { loadSettings, PACKAGE_ROOT, readStackFile, type Settings } from '../common/config.js';
import { cleanEnv, freePort, ManagedChild } from '../dev/processes.js';
import { descendants } from './proc.js';

export const CLI_PATH = path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js');
const READY_LINE = 'tokenwarden is running';
const START_TIMEOUT_MS = 300_000;
const WORKER_READY_TIMEOUT_MS = 120_000;
/** The stack stops its worker (up to 25 s of grace) before the servers. */
const STOP_GRACE_MS = 90_000;

export interface UserStack {
  dataDir: string;
  /** The `tokenwarden start` process: the launcher, and the worker too when workerPids() is it. */
  stackPid: number;
  /** The variables `tokenwarden env` prints for this stack. */
  env: Record<string, string>;
  /** The process environment a client of this stack runs with (the bench's own, cleaned, plus `env`). */
  clientEnv: NodeJS.ProcessEnv;
  settings: Settings;
  /** The processes that run the token worker. */
  workerPids: number[];
  /** The Temporal dev server and PostgreSQL processes under the stack. */
  serverPids(): number[];
  /** Whether the stack process is also the worker (no `--workers`). */
  workerInStack: boolean;
  /** Throws when the stack or a worker process has exited (a crash, an out-of-memory kill). */
  assertRunning(): void;
  stop(): Promise<void>;
}

/** `export NAME='value'` lines (POSIX single quotes, `'\''` for a quote) to variables. */
export function parseEnvLines(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const match = /^export ([A-Z_][A-Z0-9_]*)='(.*)'$/.exec(line.trim());
    if (match) env[match[1]!] = match[2]!.replaceAll("'\\''", "'");
  }
  return env;
}

export async function startUserStack(opts: {
  dataDir?: string;
  workers: number;
  log: (msg: string) => void;
  signal: AbortSignal;
  /** Settings for the stack and its workers only (e.g. TOKENWARDEN_SQLITE_PRAGMAS), not for clients. */
  stackEnv?: Record<string, string>;
}): Promise<UserStack> {
  const ownsDataDir = opts.dataDir === undefined;
  const dataDir = opts.dataDir ?? (await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bench-scale-')));
  // mkdtemp makes it 0700; as root, Postgres runs as the postgres user and must traverse it.
  if (ownsDataDir) await chmod(dataDir, 0o711);
  const children: ManagedChild[] = [];
  const stop = async () => {
    // Workers first (they use the servers), then the stack, which stops its servers itself.
    for (const child of children.reverse()) await child.stop('SIGINT', STOP_GRACE_MS);
    if (ownsDataDir) await rm(dataDir, { recursive: true, force: true });
  };
  try {
    const base = cleanEnv();
    const ports = {
      TOKENWARDEN_TEMPORAL_PORT: String(await freePort()),
      TOKENWARDEN_UI_PORT: String(await freePort()),
      TOKENWARDEN_PG_PORT: String(await freePort()),
      TOKENWARDEN_API_PORT: String(await freePort()),
    };
    const withWorker = opts.workers === 0;
    let ready = false;
    const stack = new ManagedChild(
      'tokenwarden start',
      process.execPath,
      [CLI_PATH, 'start', '--data-dir', dataDir, ...(withWorker ? [] : ['--no-worker'])],
      {
        cwd: PACKAGE_ROOT,
        env: { ...base, ...opts.stackEnv, ...ports },
        onOutput: (line) => (ready ||= line.includes(READY_LINE)),
      },
    );
    children.push(stack);
    opts.log(`tokenwarden start --data-dir ${dataDir} (Temporal on ${ports.TOKENWARDEN_TEMPORAL_PORT})`);
    await waitUntilReady(stack, () => ready, START_TIMEOUT_MS, opts.signal);
    const stackFile = readStackFile(dataDir);
    if (!stackFile) throw new Error(`the stack said it was running, but ${dataDir}/stack.json is missing`);

    const env = parseEnvLines(await runCli(['env', '--data-dir', dataDir], { ...base }));
    const clientEnv = { ...base, ...env };
    const settings = loadSettings(clientEnv);
    for (let i = 0; i < opts.workers; i++) {
      // The first one keeps the reconciler Schedule, as one `tokenwarden worker` would.
      const args = [CLI_PATH, 'worker', ...(i === 0 ? [] : ['--no-schedule'])];
      children.push(
        new ManagedChild(`tokenwarden worker #${i + 1}`, process.execPath, args, {
          env: { ...clientEnv, ...opts.stackEnv },
        }),
      );
    }
    const workerPids = withWorker ? [stackFile.pid] : children.slice(1).map((child) => child.pid!);
    return {
      dataDir,
      stackPid: stackFile.pid,
      env,
      clientEnv,
      settings,
      workerPids,
      serverPids: () => descendants(stackFile.pid),
      workerInStack: withWorker,
      assertRunning() {
        const exited = children.find((child) => !child.running);
        if (exited) throw new Error(`${exited.name} exited:\n${exited.output()}`);
      },
      stop,
    };
  } catch (err) {
    await stop().catch((stopErr: Error) => opts.log(`stopping the stack failed: ${stopErr.message}`));
    throw err;
  }
}

/** Until every worker process polls the stack's task queue (the SDK's identity is `<pid>@<host>`). */
export async function waitForWorkers(stack: UserStack, client: Client, signal: AbortSignal): Promise<void> {
  const deadline = Date.now() + WORKER_READY_TIMEOUT_MS;
  for (;;) {
    const { pollers } = await client.workflowService.describeTaskQueue({
      namespace: stack.settings.temporal.namespace,
      taskQueue: {
        name: stack.settings.temporal.taskQueue,
        kind: proto.temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL,
      },
      taskQueueType: proto.temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    });
    const polling = stack.workerPids.filter((pid) => pollers?.some((p) => p.identity?.startsWith(`${pid}@`)));
    if (polling.length === stack.workerPids.length) return;
    stack.assertRunning();
    if (Date.now() > deadline) {
      throw new Error(
        `only ${polling.length} of ${stack.workerPids.length} worker process(es) poll the task queue after ${WORKER_READY_TIMEOUT_MS / 1000} s`,
      );
    }
    signal.throwIfAborted();
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

/** Runs the CLI to completion; its stdout, or an error with its stderr. */
export async function runCli(args: string[], env: NodeJS.ProcessEnv): Promise<string> {
  const { stdout } = await promisify(execFile)(process.execPath, [CLI_PATH, ...args], {
    cwd: PACKAGE_ROOT,
    env,
    maxBuffer: 64 * 1024 * 1024,
  });
  return stdout;
}

/** Until `ready()`; fails when the child exits first or time runs out. */
async function waitUntilReady(
  child: ManagedChild,
  ready: () => boolean,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (!child.running) throw new Error(`${child.name} exited before it was ready:\n${child.output()}`);
    if (Date.now() > deadline)
      throw new Error(`${child.name} not ready after ${timeoutMs / 1000} s:\n${child.output()}`);
    signal.throwIfAborted();
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}
