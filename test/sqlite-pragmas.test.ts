/**
 * The dev server's SQLite pragmas: TOKENWARDEN_SQLITE_PRAGMAS is checked (SQLite itself ignores a
 * pragma it does not know), and a pragma given reaches the server's file over the defaults.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { freePort } from '../dev/processes.js';
import { resolveTemporalCli } from '../dev/temporal-cli.js';
import { parseSqlitePragmas, SQLITE_PRAGMA_DEFAULTS, startDevServer } from '../dev/temporal-server.js';

describe('SQLite pragmas of the dev server', () => {
  it('parses name=value pairs and refuses what SQLite would silently ignore', () => {
    assert.deepEqual(parseSqlitePragmas(undefined), {});
    assert.deepEqual(parseSqlitePragmas(' synchronous=FULL, cache_size=-65536 '), {
      synchronous: 'FULL',
      cache_size: '-65536',
    });
    for (const bad of ['synchronus=full', 'synchronous', 'synchronous=full;DROP', 'cache_size=1 2']) {
      assert.throws(() => parseSqlitePragmas(bad), /TOKENWARDEN_SQLITE_PRAGMAS must be name=value pairs/, bad);
    }
  });

  it('gives the server its pragmas over the defaults (journal_mode=delete: no WAL file)', async () => {
    assert.equal(SQLITE_PRAGMA_DEFAULTS.journal_mode, 'wal');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-pragmas-'));
    const cliPath = await resolveTemporalCli(() => {});
    try {
      for (const [journalMode, walFile] of [
        [undefined, true],
        ['delete', false],
      ] as const) {
        const dbFile = path.join(dir, `${journalMode ?? 'default'}.db`);
        const server = await startDevServer({
          cliPath,
          port: await freePort(),
          namespace: 'pragmas',
          dbFile,
          ...(journalMode ? { sqlitePragmas: { journal_mode: journalMode } } : {}),
        });
        try {
          // The server has written to its file by the time it answers (its namespaces are rows).
          assert.equal(existsSync(`${dbFile}-wal`), walFile, `journal_mode ${journalMode ?? 'default'}`);
        } finally {
          await server.stop();
        }
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
