/**
 * A PostgreSQL and a Temporal dev server that one test file owns, so that it can crash and restart
 * them without touching the run's shared services. Both keep their data across restarts.
 */
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { DEFAULT_NAMESPACE } from '../../common/names.js';
import { startEmbeddedPostgres, type EmbeddedPostgres } from '../../dev/postgres.js';
import { freePort } from '../../dev/processes.js';
import { resolveTemporalCli } from '../../dev/temporal-cli.js';
import { ensureNamespaceReady, startDevServer, type DevServer } from '../../dev/temporal-server.js';
import { waitUntil } from './wait.js';

const quiet = () => {};

async function ownDir(label: string): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `tokenwarden-${label}-`));
  // As root, PostgreSQL runs as the postgres user and must traverse it.
  await chmod(dir, 0o711);
  return dir;
}

export class OwnPostgres {
  private constructor(
    private readonly dir: string,
    private readonly port: number,
    private server: EmbeddedPostgres | undefined,
    readonly databaseUrl: string,
  ) {}

  static async start(): Promise<OwnPostgres> {
    const dir = await ownDir('pg');
    const port = await freePort();
    const server = await startEmbeddedPostgres(OwnPostgres.options(dir, port));
    return new OwnPostgres(dir, port, server, server.databaseUrl);
  }

  /**
   * fsync off (a killed process loses nothing the kernel has), but synchronous_commit stays on: a
   * commit acknowledged to a client must survive `kill -9`, which is what the tests check.
   */
  private static options(dir: string, port: number) {
    return { dataDir: path.join(dir, 'data'), port, log: quiet, settings: { fsync: 'off', full_page_writes: 'off' } };
  }

  /** `kill -9` of the postmaster: open transactions are lost, committed ones are not. */
  async crash(): Promise<void> {
    await this.server?.crash();
    this.server = undefined;
  }

  /**
   * Starts again on the same data and port (crash recovery replays the WAL), once the old backends
   * have let go of the shared memory that a new postmaster refuses to share.
   */
  async restart(): Promise<void> {
    this.server = await waitUntil(
      () => startEmbeddedPostgres(OwnPostgres.options(this.dir, this.port)),
      'PostgreSQL to start again after the crash',
      30_000,
      200,
    );
  }

  async stop(): Promise<void> {
    await this.server?.stop();
    this.server = undefined;
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** A dev server persisting to a SQLite file, restartable on the same port and file. */
export class OwnTemporal {
  readonly namespace = DEFAULT_NAMESPACE;

  private constructor(
    private readonly dir: string,
    private readonly cliPath: string,
    private readonly port: number,
    private server: DevServer | undefined,
  ) {}

  static async start(): Promise<OwnTemporal> {
    const dir = await ownDir('temporal');
    const own = new OwnTemporal(dir, await resolveTemporalCli(quiet), await freePort(), undefined);
    await own.restart();
    return own;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Starts the server (again) on the same port and database file. */
  async restart(): Promise<void> {
    this.server = await startDevServer({
      cliPath: this.cliPath,
      port: this.port,
      namespace: this.namespace,
      dbFile: path.join(this.dir, 'temporal.db'),
    });
    const connection = await Connection.connect({ address: this.address });
    try {
      await ensureNamespaceReady(connection, this.namespace, 1);
    } finally {
      await connection.close();
    }
  }

  /** Stops the server as a deploy would (SIGTERM); its database file stays. */
  async shutDown(): Promise<void> {
    await this.server?.stop();
    this.server = undefined;
  }

  async stop(): Promise<void> {
    await this.shutDown();
    await rm(this.dir, { recursive: true, force: true });
  }
}
