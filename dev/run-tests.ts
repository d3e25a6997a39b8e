/**
 * `npm test`: one Temporal dev server, one Postgres and one workflow bundle for the whole run,
 * shared by every test file through TOKENWARDEN_TEST_* variables, then `node --test`.
 * Arguments filter the test files by path: `npm test -- store` runs the files whose path contains "store".
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { bundleWorkflowCode, DefaultLogger } from '@temporalio/worker';
import { PACKAGE_ROOT } from '../common/config.js';
import { DEFAULT_NAMESPACE } from '../common/names.js';
import { startEmbeddedPostgres } from './postgres.js';
import { freePort } from './processes.js';
import { resolveTemporalCli } from './temporal-cli.js';
import { ensureNamespaceReady, startDevServer } from './temporal-server.js';
import { WORKFLOW_BUNDLE_OPTIONS } from '../worker/worker.js';

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
    const cliPath = await resolveTemporalCli(say);
    const started = Date.now();
    // The three are independent; starting them together saves a few seconds per run.
    const [temporalResult, databaseResult, bundleResult] = await Promise.allSettled([
      (async () => {
        const server = await startDevServer({ cliPath, port: await freePort(), namespace: DEFAULT_NAMESPACE });
        cleanups.push(server.stop);
        const connection = await Connection.connect({ address: server.address });
        try {
          await ensureNamespaceReady(connection, DEFAULT_NAMESPACE, 1);
        } finally {
          await connection.close();
        }
        return server;
      })(),
      (async () => {
        if (process.env.DATABASE_URL) return process.env.DATABASE_URL;
        const postgres = await startEmbeddedPostgres({
          dataDir: path.join(tmp, 'postgres'),
          port: await freePort(),
          log: say,
          // A throwaway cluster: durability only costs time here.
          settings: { fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' },
        });
        cleanups.push(postgres.stop);
        return postgres.databaseUrl;
      })(),
      (async () => {
        const { code } = await bundleWorkflowCode({ ...WORKFLOW_BUNDLE_OPTIONS, logger: new DefaultLogger('WARN') });
        const file = path.join(tmp, 'workflow-bundle.js');
        await writeFile(file, code);
        return file;
      })(),
    ]);
    const temporal = valueOf(temporalResult);
    const databaseUrl = valueOf(databaseResult);
    const bundlePath = valueOf(bundleResult);
    say(
      `Temporal on ${temporal.address}, PostgreSQL and the workflow bundle ready in ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );

    if (interrupted) return 130;
    const args = ['--test', '--test-reporter=spec', '--test-concurrency=1', ...files];
    const child = spawn(process.execPath, args, {
      stdio: 'inherit',
      env: {
        ...process.env,
        TOKENWARDEN_TEST_TEMPORAL_ADDRESS: temporal.address,
        TOKENWARDEN_TEST_NAMESPACE: DEFAULT_NAMESPACE,
        TOKENWARDEN_TEST_DATABASE_URL: databaseUrl,
        TOKENWARDEN_TEST_WORKFLOW_BUNDLE: bundlePath,
        TEMPORAL_CLI: cliPath,
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

/** Every start is awaited (allSettled) so that those that succeeded are cleaned up when one fails. */
function valueOf<T>(result: PromiseSettledResult<T>): T {
  if (result.status === 'rejected') throw result.reason;
  return result.value;
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
