/**
 * Many new tokens issued from records, their raw tokens written to one out file (mode 0600) and
 * nowhere else. Crash-safe: each batch's {line, tokenId, token} is written to the out file and
 * fsynced BEFORE the batch is issued with those ids and secrets, so the out file always holds every
 * token that may be valid. A rerun with the same out file reuses the entries it finds (the store
 * reports them existing) and issues only the lines it lacks.
 */
import { constants, open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { InvalidInputError } from '../../common/errors.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import { generateTokenString, hashToken } from '../../common/secrets.js';
import type { ImportedToken } from '../../common/store/index.js';
import { runBulk, type BulkDeps, type BulkOptions, type BulkReport } from './pipeline.js';
import { issueRecordSchema, problemOf, type Prepared } from './records.js';
import type { SourceLine } from './reader.js';
import { prepared } from './start-many.js';

export interface IssueManyOptions extends BulkOptions {
  /** The out file: created (mode 0600) when absent, else resumed (it must be a previous run's, mode 0600, ours). */
  out: string;
}

export interface IssueManyReport extends BulkReport {
  outFile: string;
  /** Out-file entries of an earlier run that this run found (reused, never issued twice). */
  resumed: number;
}

/** One line of the out file. */
export interface IssuedEntry {
  line: number;
  tokenId: string;
  subject: string;
  name?: string;
  token: string;
}

const refuse = (file: string, why: string) =>
  new InvalidInputError(`invalid --out ${file}: ${why}`, [{ path: 'out', message: why }]);

/** The out file: the journal of the tokens generated, written ahead of issuing them. */
class OutFile {
  private constructor(
    readonly file: string,
    private readonly handle: FileHandle,
    private offset: number,
  ) {}

  /**
   * Creates the file exclusively ('wx': O_CREAT|O_EXCL, so neither an existing file nor a symlink at
   * that path is followed or overwritten), or opens an earlier run's without following a symlink
   * (O_NOFOLLOW) and only when it is a regular file of ours that nobody else can read.
   */
  static async open(file: string): Promise<{ out: OutFile; earlier: Map<number, IssuedEntry> }> {
    try {
      const handle = await open(file, 'wx', 0o600);
      await handle.chmod(0o600); // the umask may only narrow the mode: made exact either way
      await syncDirectory(path.dirname(path.resolve(file)));
      return { out: new OutFile(file, handle, 0), earlier: new Map() };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let handle: FileHandle;
    try {
      handle = await open(file, constants.O_RDWR | constants.O_NOFOLLOW);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw refuse(file, code === 'ELOOP' ? 'is a symbolic link' : `cannot be opened (${code})`);
    }
    try {
      const stat = await handle.stat();
      if (!stat.isFile()) throw refuse(file, 'is not a regular file');
      if (process.getuid && stat.uid !== process.getuid()) throw refuse(file, 'belongs to another user');
      if ((stat.mode & 0o077) !== 0) {
        throw refuse(file, `others may read it (mode ${(stat.mode & 0o777).toString(8)}); an out file is 0600`);
      }
      const content = await handle.readFile();
      // A last line without its newline was being written when a run died: its batch was not issued.
      const end = content.lastIndexOf(0x0a) + 1;
      if (end < content.length) await handle.truncate(end);
      const earlier = new Map<number, IssuedEntry>();
      const lines = content.subarray(0, end).toString('utf8').split('\n');
      lines.pop();
      for (const [i, text] of lines.entries()) {
        const entry = parseEntry(text);
        if (!entry)
          throw refuse(file, `line ${i + 1} is not an entry of a bulk issue's out file (refusing to touch it)`);
        if (!earlier.has(entry.line)) earlier.set(entry.line, entry);
      }
      return { out: new OutFile(file, handle, end), earlier };
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Appends the entries and fsyncs: they are on disk when this resolves. */
  async append(entries: IssuedEntry[]): Promise<void> {
    if (entries.length === 0) return;
    const data = Buffer.from(entries.map((e) => `${JSON.stringify(e)}\n`).join(''), 'utf8');
    let written = 0;
    while (written < data.length) {
      const { bytesWritten } = await this.handle.write(data, written, data.length - written, this.offset + written);
      written += bytesWritten;
    }
    this.offset += data.length;
    await this.handle.sync();
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } catch {
    // Some file systems refuse fsync on a directory; the entries' own fsyncs still hold.
  } finally {
    await handle.close();
  }
}

function parseEntry(text: string): IssuedEntry | undefined {
  try {
    const e = JSON.parse(text) as Partial<IssuedEntry>;
    return Number.isSafeInteger(e.line) && typeof e.tokenId === 'string' && typeof e.token === 'string'
      ? (e as IssuedEntry)
      : undefined;
  } catch {
    return undefined;
  }
}

/** Issues a token for each record; see the module's comment for the out file and resuming. */
export async function issueMany(
  deps: BulkDeps,
  records: AsyncIterable<unknown> | Iterable<unknown>,
  options: IssueManyOptions,
): Promise<IssueManyReport> {
  const { out: file, ...bulk } = options;
  const { out, earlier } = await OutFile.open(file);
  const resumed = earlier.size;
  const schema = issueRecordSchema(deps.settings.maxTtlMs);
  // Entries generated but not yet journaled: at most the batches read ahead.
  const unjournaled = new Map<string, IssuedEntry>();
  const prepare = (item: SourceLine): Prepared => {
    if (item.problem) return { line: item.line, problem: item.problem };
    const parsed = schema.safeParse(item.record);
    if (!parsed.success) return { line: item.line, problem: problemOf(parsed.error) };
    const r = parsed.data;
    let entry = earlier.get(item.line);
    earlier.delete(item.line);
    if (!entry) {
      entry = {
        line: item.line,
        tokenId: newTokenId(),
        subject: r.subject,
        ...(r.name !== undefined ? { name: r.name } : {}),
        token: generateTokenString(),
      };
      unjournaled.set(entry.tokenId, entry);
    }
    const token: ImportedToken = {
      tokenId: entry.tokenId,
      credentialId: newCredentialId(),
      idGiven: true,
      secretHash: hashToken(entry.token),
      subject: r.subject,
      name: r.name ?? null,
      scopes: r.scopes,
      receivers: [...new Set(r.receivers)].sort(),
      expiresAt: null,
      ttlMs: r.ttl,
    };
    return { line: item.line, token };
  };
  try {
    const report = await runBulk(deps, prepared(records, prepare), {
      ...bulk,
      imported: false,
      beforeBatch: async (batch) => {
        const entries: IssuedEntry[] = [];
        for (const { token } of batch) {
          const entry = unjournaled.get(token.tokenId);
          if (entry) entries.push(entry);
          unjournaled.delete(token.tokenId);
        }
        await out.append(entries);
      },
    });
    return { ...report, outFile: file, resumed };
  } finally {
    await out.close();
  }
}
