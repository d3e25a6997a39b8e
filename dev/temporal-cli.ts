/**
 * Finds (or provisions, once) the `temporal` CLI that runs the dev server. No npm package ships it,
 * so the order is: TEMPORAL_CLI → `temporal` on PATH → a cached `go install` build → the SDK's own
 * download. Everything cached lives under the user cache dir, never inside the repository.
 */
import { spawn } from 'node:child_process';
import { constants, existsSync, statSync } from 'node:fs';
import { access, mkdir, readdir, rename, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

/** v1.5.1 is the last tag without `replace` directives in go.mod, so later tags cannot be `go install`ed. */
const CLI_VERSION = 'v1.5.1';
const CLI_MODULE = `github.com/temporalio/cli/cmd/temporal@${CLI_VERSION}`;
const EXE = process.platform === 'win32' ? 'temporal.exe' : 'temporal';

type Log = (msg: string) => void;
const stderrLog: Log = (msg) => process.stderr.write(`${msg}\n`);

function cacheRoot(): string {
  return path.join(process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'tokenwarden');
}

async function isExecutableFile(file: string): Promise<boolean> {
  try {
    await access(file, constants.X_OK);
    return statSync(file).isFile();
  } catch {
    return false;
  }
}

async function findOnPath(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.resolve(dir, name);
    if (await isExecutableFile(candidate)) return candidate;
  }
  return undefined;
}

export async function resolveTemporalCli(log: Log = stderrLog): Promise<string> {
  const fromEnv = process.env.TEMPORAL_CLI;
  if (fromEnv) {
    const file = path.resolve(fromEnv);
    if (!(await isExecutableFile(file))) {
      throw new Error(
        `TEMPORAL_CLI=${fromEnv} is not an executable file: point it at a Temporal CLI binary or unset it`,
      );
    }
    return file;
  }

  const onPath = await findOnPath(EXE);
  if (onPath) return onPath;

  const buildDir = path.join(cacheRoot(), `temporal-cli-${CLI_VERSION}`);
  const built = path.join(buildDir, EXE);
  if (await isExecutableFile(built)) return built;

  const downloadDir = path.join(cacheRoot(), 'temporal-cli-sdk-download');
  const downloaded = await findDownloaded(downloadDir);
  if (downloaded) return downloaded;

  const problems: string[] = [];
  const go = await findOnPath(process.platform === 'win32' ? 'go.exe' : 'go');
  if (go) {
    try {
      await goInstall(go, buildDir, log);
      return built;
    } catch (err) {
      problems.push((err as Error).message);
    }
  } else {
    problems.push('go is not on PATH');
  }

  try {
    return await sdkDownload(downloadDir, log);
  } catch (err) {
    problems.push(`SDK download failed: ${(err as Error).message.split('\n')[0]}`);
  }

  throw new Error(
    'no Temporal CLI available. Either set TEMPORAL_CLI=/path/to/temporal, put `temporal` on PATH, ' +
      `or install Go >= 1.25 so that ${CLI_MODULE} can be built once into ${buildDir} ` +
      `(${problems.join('; ')})`,
  );
}

/** Builds into a scratch GOBIN then renames, so an interrupted build never leaves a half-written binary. */
async function goInstall(go: string, buildDir: string, log: Log): Promise<void> {
  const scratch = path.join(buildDir, `.build-${process.pid}`);
  await mkdir(scratch, { recursive: true });
  log(`Building the Temporal CLI ${CLI_VERSION} with \`go install\` into ${buildDir}: this takes a few minutes, once.`);
  try {
    const code = await new Promise<number | null>((resolve, reject) => {
      const child = spawn(go, ['install', CLI_MODULE], {
        // Go >= 1.21 fetches the 1.25 toolchain that go.mod asks for through the module proxy by itself.
        env: { ...process.env, GOBIN: scratch, CGO_ENABLED: '0' },
        stdio: ['ignore', 'inherit', 'inherit'],
      });
      child.once('error', reject);
      child.once('exit', resolve);
    });
    if (code !== 0) throw new Error(`\`go install ${CLI_MODULE}\` exited with code ${String(code)}`);
    await rename(path.join(scratch, EXE), path.join(buildDir, EXE));
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/**
 * The SDK downloads the CLI matching its version from temporal.download; this needs internet, so
 * it cannot be exercised offline. A long ttl stops the SDK from deleting the binary after a day.
 */
async function sdkDownload(downloadDir: string, log: Log): Promise<string> {
  await mkdir(downloadDir, { recursive: true });
  log(`Downloading the Temporal CLI through the Temporal SDK into ${downloadDir}…`);
  const { TestWorkflowEnvironment } = await import('@temporalio/testing');
  const env = await TestWorkflowEnvironment.createLocal({
    server: { executable: { type: 'cached-download', downloadDir, ttl: '3650d' } },
  });
  await env.teardown();
  const found = await findDownloaded(downloadDir);
  if (!found) throw new Error(`the SDK started a server but left no binary in ${downloadDir}`);
  return found;
}

/** The SDK names its download `temporal-sdk-typescript-<sdk version>` and writes `*.downloading` first. */
async function findDownloaded(downloadDir: string): Promise<string | undefined> {
  if (!existsSync(downloadDir)) return undefined;
  for (const name of (await readdir(downloadDir)).sort().reverse()) {
    if (!name.startsWith('temporal-') || name.startsWith('temporal-test-server') || name.endsWith('.downloading'))
      continue;
    const file = path.join(downloadDir, name);
    if (await isExecutableFile(file)) return file;
  }
  return undefined;
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  resolveTemporalCli().then(
    (cli) => console.log(cli),
    (err: unknown) => {
      console.error((err as Error).message);
      process.exit(1);
    },
  );
}
