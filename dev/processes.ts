/** Ports and child processes of the dev stack and the test runner (Temporal dev server, Postgres). */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import net from 'node:net';

/** Fails with `message` when something already listens on 127.0.0.1:port. */
export async function assertPortFree(port: number, message: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', (err: NodeJS.ErrnoException) => reject(err.code === 'EADDRINUSE' ? new Error(message) : err));
    server.listen({ port, host: '127.0.0.1', exclusive: true }, () => server.close(() => resolve()));
  });
}

/** A port that was free a moment ago (the OS picks it). */
export async function freePort(): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ port: 0, host: '127.0.0.1' }, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once 127.0.0.1:port accepts a TCP connection; rejects at once (ECONNREFUSED) otherwise. */
export async function tcpAccepts(port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1' }, () => {
      socket.destroy();
      resolve();
    });
    socket.once('error', reject);
  });
}

/**
 * A long-running child in its own process group: Ctrl-C in the terminal reaches only us, so we can
 * stop the worker before the servers it uses. The flip side is that a detached child outlives a
 * crashed parent, hence the kill on `exit` (which covers process.exit and uncaught exceptions).
 */
export class ManagedChild {
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly child: ChildProcess;
  private readonly tail: string[] = [];
  private readonly killOnExit = () => this.child.kill('SIGKILL');
  private stopping = false;

  constructor(
    readonly name: string,
    command: string,
    args: string[],
    options: SpawnOptions & {
      onLine?: (line: string) => void;
      /** Every line of both streams, including those printed while stopping (tests scan them). */
      onOutput?: (line: string, stream: 'stdout' | 'stderr') => void;
    } = {},
  ) {
    const { onLine, onOutput, ...spawnOptions } = options;
    this.child = spawn(command, args, { ...spawnOptions, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    this.exited = new Promise((resolve) => {
      this.child.once('error', (err) => {
        this.record(`spawn failed: ${err.message}`);
        resolve({ code: null, signal: null });
      });
      this.child.once('exit', (code, signal) => resolve({ code, signal }));
    });
    void this.exited.then(() => process.removeListener('exit', this.killOnExit));
    process.on('exit', this.killOnExit);
    // Both streams feed the tail for error messages; only stderr (where servers log) reaches onLine,
    // stdout being the CLI's banner.
    for (const stream of [this.child.stdout, this.child.stderr]) {
      const name = stream === this.child.stderr ? 'stderr' : 'stdout';
      let partial = '';
      const emit = (line: string) => {
        this.record(line);
        onOutput?.(line, name);
        if (name === 'stderr' && !this.stopping && line.trim()) onLine?.(line);
      };
      stream?.setEncoding('utf8');
      stream?.on('data', (chunk: string) => {
        const lines = (partial + chunk).split('\n');
        partial = lines.pop() ?? '';
        for (const line of lines) emit(line);
      });
      stream?.on('end', () => partial && emit(partial));
    }
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The last lines the child printed, for error messages. */
  output(): string {
    return this.tail.join('\n');
  }

  /** Sends `signal`, then SIGKILL if the child has not exited after `graceMs`. */
  async stop(signal: NodeJS.Signals, graceMs = 10_000): Promise<void> {
    this.stopping = true;
    if (!this.running) return;
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  /** An error carrying the child's recent output, for "it exited before it was ready". */
  exitError(what: string, exit: { code: number | null; signal: NodeJS.Signals | null }): Error {
    const how = exit.signal
      ? `exited with signal ${exit.signal}`
      : exit.code === null
        ? 'did not start'
        : `exited with code ${exit.code}`;
    return new Error(`${this.name} ${what} (${how}):\n${this.output() || '(no output)'}`);
  }

  private record(line: string): void {
    if (!line.trim()) return;
    this.tail.push(line);
    if (this.tail.length > 40) this.tail.shift();
  }
}

/** Polls `probe` until it succeeds, the child exits, or `timeoutMs` passes. */
export async function waitUntilReady<T>(child: ManagedChild, probe: () => Promise<T>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  void child.exited.then((e) => (exit = e));
  for (;;) {
    if (exit) throw child.exitError('exited before it was ready', exit);
    try {
      return await probe();
    } catch (err) {
      if (exit) throw child.exitError('exited before it was ready', exit);
      if (Date.now() > deadline) {
        await child.stop('SIGKILL');
        throw new Error(
          `${child.name} did not become ready within ${timeoutMs / 1000} s (last error: ${(err as Error).message}):\n${child.output()}`,
        );
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * This process's environment without any setting that would point a throwaway stack or its clients
 * elsewhere (a developer's DATABASE_URL, TEMPORAL_ADDRESS, TOKENWARDEN_*): the stack is used as it
 * comes (benchmarks, screenshots). BENCH_KEEP_ENV names variables to keep (comma-separated), to measure a worker setting, e.g.
 * `BENCH_KEEP_ENV=TOKENWARDEN_STICKY_TIMEOUT TOKENWARDEN_STICKY_TIMEOUT=30s npm run bench:scale`.
 */
export function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  const keep = new Set((process.env.BENCH_KEEP_ENV ?? '').split(',').filter(Boolean));
  for (const [name, value] of Object.entries(process.env)) {
    if (keep.has(name)) {
      env[name] = value;
      continue;
    }
    if (name === 'DATABASE_URL' || name.startsWith('TOKENWARDEN_') || name.startsWith('TEMPORAL_')) continue;
    env[name] = value;
  }
  return env;
}
