/**
 * `npm test`: one Temporal dev server, one Postgres and one workflow bundle for the whole run
 * (dev/services.ts), shared by every test file through TOKENWARDEN_TEST_* variables, then `node --test`.
 * Arguments filter the test files by path: `npm test -- store` runs the files whose path contains "store".
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../common/config.js';
import { WORKFLOW_BUNDLE_OPTIONS } from '../worker/worker.js';
import { startThrowawayServices } from './services.js';

const TEST_DIR = path.join(PACKAGE_ROOT, 'dist', 'test');
const say = (msg: string) => process.stderr.write(`[run-tests] ${msg}\n`);

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
    });
    cleanups.push(services.stop);
    const bundlePath = path.join(tmp, 'workflow-bundle.js');
    await writeFile(bundlePath, services.bundles.token.code);
    say(
      `Temporal on ${services.temporalAddress}, PostgreSQL and the workflow bundle ready in ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );

    if (interrupted) return 130;
    // Force exit once every test and hook has run: a handle left open by a failed test (a pool
    // to a server a fault test crashed) would otherwise hold the run forever.
    const args = ['--test', '--test-reporter=spec', '--test-concurrency=1', '--test-force-exit', ...files];
    const child = spawn(process.execPath, args, {
      stdio: 'inherit',
      env: {
        ...process.env,
        TOKENWARDEN_TEST_TEMPORAL_ADDRESS: services.temporalAddress,
        TOKENWARDEN_TEST_NAMESPACE: services.namespace,
        TOKENWARDEN_TEST_DATABASE_URL: services.databaseUrl,
        TOKENWARDEN_TEST_WORKFLOW_BUNDLE: bundlePath,
        TEMPORAL_CLI: services.cliPath,
      },
    });
    testProcess = child;
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', reject);
      child.once('exit', (c, s) => resolve([c, s]));
    });
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
