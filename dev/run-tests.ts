/**
 * `npm test`: one Temporal dev server, one Postgres and one workflow bundle for the whole run
 * (dev/services.ts), shared by every test file through TOKENWARDEN_TEST_* variables, then `node --test`.
 * Arguments filter the test files by path: `npm test -- store` runs the files whose path contains "store".
 * Every line the tests, their processes and the services print is kept in the run's directory
 * (TOKENWARDEN_TEST_RUN_DIR, `logs/`) for the closing secret scan, test/zz-secret-hygiene.test.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { chmod, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../common/config.js';
import { WORKFLOW_BUNDLE_OPTIONS } from '../worker/worker.js';
import { startThrowawayServices } from './services.js';

const TEST_DIR = path.join(PACKAGE_ROOT, 'dist', 'test');
/** One test may take this long (the fault-injection scenarios take about a minute each). */
const TEST_TIMEOUT_MS = 5 * 60_000;
/** The whole run (about 6 minutes on 2 cores) may take this long before it is stopped as failed. */
const RUN_TIMEOUT_MS = Number(process.env.TOKENWARDEN_TEST_RUN_TIMEOUT_MS ?? 45 * 60_000);
let logsDir: string | undefined;
/**
 * Appends to one of the run's log files, synchronously: what a process prints before dying is kept.
 * Quiet once the run's directory is gone (messages of the cleanup itself).
 */
function keep(name: string, text: string): void {
  try {
    if (logsDir) appendFileSync(path.join(logsDir, name), text, { mode: 0o600 });
  } catch {
    // The run's directory was removed: nothing left to scan.
  }
}
const say = (msg: string) => {
  process.stderr.write(`[run-tests] ${msg}\n`);
  keep('run-tests.log', `${msg}\n`);
};

async function main(): Promise<number> {
  const filters = process.argv.slice(2);
  const files = (await findTestFiles(TEST_DIR)).filter(
    (f) => filters.length === 0 || filters.some((word) => path.relative(TEST_DIR, f).includes(word)),
  );
  if (files.length === 0) {
    say(`no test file under ${TEST_DIR} matches ${filters.length ? filters.join(', ') : '*.test.js'}`);
    return 1;
  }

  const tmp = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-test-'));
  // mkdtemp makes it 0700; as root, Postgres runs as the postgres user and must traverse it.
  await chmod(tmp, 0o711);
  logsDir = path.join(tmp, 'logs');
  mkdirSync(logsDir, { mode: 0o700 });
  const cleanups: Array<() => Promise<void>> = [() => rm(tmp, { recursive: true, force: true })];
  // Ctrl-C or SIGTERM: stop the tests (node --test also gets the terminal's Ctrl-C by itself),
  // then clean up as usual; the servers are detached, so the signal never reaches them.
  let testProcess: ChildProcess | undefined;
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (signal: NodeJS.Signals) => {
    interrupted = signal;
    testProcess?.kill(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const started = Date.now();
    const services = await startThrowawayServices({
      tmpDir: tmp,
      workflows: { token: WORKFLOW_BUNDLE_OPTIONS },
      ...(process.env.DATABASE_URL ? { databaseUrl: process.env.DATABASE_URL } : {}),
      log: say,
      serverLog: (service, line) => keep(`${service}.log`, `${line}\n`),
    });
    cleanups.push(services.stop);
    const bundlePath = path.join(tmp, 'workflow-bundle.js');
    await writeFile(bundlePath, services.bundles.token.code);
    say(
      `Temporal on ${services.temporalAddress}, PostgreSQL and the workflow bundle ready in ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );

    if (interrupted) return 130;
    // No --test-force-exit: with one process per file it drops verdicts that were still on their
    // way to the parent (fewer tests reported, exit 0; nodejs/node#64833). Instead a test that hangs
    // fails after --test-timeout, and a run held open by a leaked handle is ended by the watchdog
    // below and reported as a failure, never as a pass.
    const args = [
      '--test',
      '--test-reporter=spec',
      '--test-concurrency=1',
      `--test-timeout=${TEST_TIMEOUT_MS}`,
      ...files,
    ];
    const child = spawn(process.execPath, args, {
      // stdout and stderr pass through here to be kept as well (children of the tests inherit them).
      stdio: ['inherit', 'pipe', 'pipe'],
      env: {
        ...process.env,
        TOKENWARDEN_TEST_RUN_DIR: tmp,
        TOKENWARDEN_TEST_TEMPORAL_ADDRESS: services.temporalAddress,
        TOKENWARDEN_TEST_NAMESPACE: services.namespace,
        TOKENWARDEN_TEST_DATABASE_URL: services.databaseUrl,
        TOKENWARDEN_TEST_WORKFLOW_BUNDLE: bundlePath,
        TEMPORAL_CLI: services.cliPath,
      },
    });
    testProcess = child;
    const outputFile = openSync(path.join(logsDir, 'test-output.log'), 'a', 0o600);
    const outputDone = [child.stdout, child.stderr].map((stream, i) => {
      const terminal = i === 0 ? process.stdout : process.stderr;
      stream.on('data', (chunk: Buffer) => {
        writeSync(outputFile, chunk);
        terminal.write(chunk);
      });
      return new Promise<void>((resolve) => stream.once('close', resolve));
    });
    const watchdog = setTimeout(() => {
      say(
        `the tests have run for ${RUN_TIMEOUT_MS / 60_000} min: stopping them (a leaked handle or a hung test); this run FAILED`,
      );
      child.kill('SIGKILL');
    }, RUN_TIMEOUT_MS);
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', reject);
      child.once('exit', (c, s) => resolve([c, s]));
    }).finally(() => clearTimeout(watchdog));
    // The last of the output, unless a leaked grandchild holds the pipes open.
    await Promise.race([Promise.all(outputDone), new Promise((resolve) => setTimeout(resolve, 2_000).unref())]);
    return code ?? (signal ? 1 : 0);
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup().catch((err: Error) => say(`cleanup: ${err.message}`));
  }
}

/** Node 20's --test takes no glob, so the files are listed here. */
async function findTestFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  return entries
    .filter((e) => e.isFile() && e.name.endsWith('.test.js'))
    .map((e) => path.join(e.parentPath, e.name))
    .sort();
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
