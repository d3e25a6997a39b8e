/**
 * Many new tokens issued from records, their raw tokens written to one out file (mode 0600) and
 * nowhere else. Crash-safe: each batch's {line, tokenId, digest, token} is written to the out file
 * and fsynced BEFORE the batch is issued with those ids and secrets, so the out file always holds
 * every token that may be valid. A rerun with the same out file reuses the entries it finds (the
 * store reports them existing) and issues only the lines it lacks; an entry whose record changed
 * (another record at its line) refuses the rerun. One run at a time per out file (`<out>.lock`,
 * see lockOutFile).
 */
import { createHash } from 'node:crypto';
import { constants, open, readFile, rm, type FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { InvalidInputError } from '../../common/errors.js';
import { newCredentialId, newTokenId } from '../../common/ids.js';
import { TOKEN_ID_PREFIX } from '../../common/names.js';
import { generateTokenString, hashToken } from '../../common/secrets.js';
import type { ImportedToken } from '../../common/store/index.js';
import { runBulk, type BulkDeps, type BulkOptions, type BulkReport } from './pipeline.js';
import { issueRecordSchema, lineOf, problemOf, type IssueRecord, type Prepared } from './records.js';
import type { SourceLine } from './reader.js';

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
  /** recordDigest of the record the token was issued for: a rerun checks its line still holds it. */
  digest: string;
  token: string;
}

const refuse = (file: string, why: string) =>
  new InvalidInputError(`invalid --out ${file}: ${why}`, [{ path: 'out', message: why }]);

const changed = (file: string, line: number, why: string) =>
  new InvalidInputError(
    `the input changed since ${file} was written: line ${line} ${why}; nothing was issued for it, use a new --out`,
    [{ path: 'from', message: `line ${line} ${why}` }],
  );

/** A record's facts as a digest (128 bits of SHA-256): equal for records a store write cannot tell apart. */
export function recordDigest(r: IssueRecord): string {
  const facts = [r.subject, r.name ?? null, r.scopes, [...new Set(r.receivers)].sort(), r.ttl];
  return createHash('sha256').update(JSON.stringify(facts)).digest('hex').slice(0, 32);
}

const TOKEN_ID_HEX = /^tok_([0-9a-f]{32})$/;
const DIGEST_HEX = /^[0-9a-f]{32}$/;

/** What a rerun needs of one earlier entry. */
interface Journaled {
  tokenId: string;
  secretHash: Buffer;
  digest: string;
}

/**
 * The earlier run's entries, by input line, without their raw tokens: 64 bytes a line in one buffer
 * (token id 16, secret hash 32, digest 16) plus a Map entry from line to slot.
 */
class Journal {
  static readonly SLOT = 64;
  #slots = new Map<number, number>();
  #packed = Buffer.alloc(Journal.SLOT * 1024);
  #used = 0;
  /** The highest line that has an entry. */
  lastLine = 0;

  get size(): number {
    return this.#slots.size;
  }

  /** Keeps the first entry of a line (a line is journaled once; a duplicate is never reused). */
  add(line: number, tokenIdHex: string, secretHash: Buffer, digestHex: string): void {
    if (this.#slots.has(line)) return;
    if ((this.#used + 1) * Journal.SLOT > this.#packed.length) {
      const grown = Buffer.alloc(this.#packed.length * 2);
      this.#packed.copy(grown);
      this.#packed = grown;
    }
    const at = this.#used * Journal.SLOT;
    this.#packed.write(tokenIdHex, at, 'hex');
    secretHash.copy(this.#packed, at + 16);
    this.#packed.write(digestHex, at + 48, 'hex');
    this.#slots.set(line, this.#used++);
    this.lastLine = Math.max(this.lastLine, line);
  }

  /** The line's entry, removed: each is matched against its record once. */
  take(line: number): Journaled | undefined {
    const slot = this.#slots.get(line);
    if (slot === undefined) return undefined;
    this.#slots.delete(line);
    const at = slot * Journal.SLOT;
    return {
      tokenId: TOKEN_ID_PREFIX + this.#packed.toString('hex', at, at + 16),
      secretHash: Buffer.from(this.#packed.subarray(at + 16, at + 48)),
      digest: this.#packed.toString('hex', at + 48, at + 64),
    };
  }

  /** The lowest line whose entry was never taken. */
  firstLeft(): number | undefined {
    let first: number | undefined;
    for (const line of this.#slots.keys()) if (first === undefined || line < first) first = line;
    return first;
  }
}

/** Reads an entry's line; the raw token is hashed here and not kept. */
function journalEntry(text: string, journal: Journal): boolean {
  let e: Partial<IssuedEntry>;
  try {
    e = JSON.parse(text) as Partial<IssuedEntry>;
  } catch {
    return false;
  }
  const id = typeof e.tokenId === 'string' ? TOKEN_ID_HEX.exec(e.tokenId) : null;
  if (!Number.isSafeInteger(e.line) || !id || typeof e.token !== 'string' || !DIGEST_HEX.test(e.digest ?? '')) {
    return false;
  }
  journal.add(e.line!, id[1]!, hashToken(e.token), e.digest!);
  return true;
}

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
  static async open(file: string): Promise<{ out: OutFile; journal: Journal }> {
    try {
      const handle = await open(file, 'wx', 0o600);
      await handle.chmod(0o600); // the umask may only narrow the mode: made exact either way
      await syncDirectory(path.dirname(path.resolve(file)));
      return { out: new OutFile(file, handle, 0), journal: new Journal() };
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
      const { journal, end } = await readJournal(file, handle);
      // A last line without its newline was being written when a run died: its batch was not issued.
      if (end < stat.size) await handle.truncate(end);
      return { out: new OutFile(file, handle, end), journal };
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

/** Streams the out file's complete lines into a Journal; `end` is the byte after the last newline. */
async function readJournal(file: string, handle: FileHandle): Promise<{ journal: Journal; end: number }> {
  const journal = new Journal();
  const chunk = Buffer.alloc(64 * 1024);
  let pending = Buffer.alloc(0);
  let position = 0;
  let end = 0;
  let lineNo = 0;
  for (;;) {
    const { bytesRead } = await handle.read(chunk, 0, chunk.length, position);
    if (bytesRead === 0) break;
    position += bytesRead;
    let data = pending.length ? Buffer.concat([pending, chunk.subarray(0, bytesRead)]) : chunk.subarray(0, bytesRead);
    let from = 0;
    for (let nl = data.indexOf(0x0a, from); nl !== -1; nl = data.indexOf(0x0a, from)) {
      lineNo++;
      if (!journalEntry(data.toString('utf8', from, nl), journal)) {
        throw refuse(file, `line ${lineNo} is not an entry of a bulk issue's out file (refusing to touch it)`);
      }
      end += nl + 1 - from;
      from = nl + 1;
    }
    data = data.subarray(from);
    // Copied: the chunk buffer is read into again.
    pending = Buffer.from(data);
    data.fill(0);
  }
  pending.fill(0);
  chunk.fill(0);
  return { journal, end };
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

/**
 * One run per out file: `<out>.lock`, created exclusively, holding this process's pid and host (no
 * session state in the store: behind a transaction-mode pooler a session lock would not exclude).
 * A lock left by a killed run of this host (its pid no longer runs) is taken over; one of another
 * host, or of a live process, refuses the run.
 */
async function lockOutFile(file: string): Promise<() => Promise<void>> {
  const lockFile = `${path.resolve(file)}.lock`;
  const me = JSON.stringify({ pid: process.pid, host: os.hostname() });
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const handle = await open(
        lockFile,
        constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
        0o600,
      );
      await handle.writeFile(me);
      await handle.close();
      return async () => {
        await rm(lockFile, { force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let holder: { pid?: unknown; host?: unknown } = {};
    try {
      holder = JSON.parse(await readFile(lockFile, 'utf8')) as typeof holder;
    } catch {
      // Unreadable or half-written: treated as held (a run creating it right now).
    }
    const alive = (pid: number) => {
      try {
        process.kill(pid, 0);
        return true;
      } catch (err) {
        return (err as NodeJS.ErrnoException).code === 'EPERM';
      }
    };
    const stale = holder.host === os.hostname() && typeof holder.pid === 'number' && !alive(holder.pid);
    if (!stale) {
      throw refuse(
        file,
        `another bulk issue is writing to it now (${path.basename(lockFile)}: ${typeof holder.pid === 'number' ? `pid ${holder.pid}` : 'being created'}${typeof holder.host === 'string' && holder.host !== os.hostname() ? ` on ${holder.host}` : ''}); let it end, or remove the lock file if no run is going`,
      );
    }
    await rm(lockFile, { force: true });
  }
  throw refuse(file, 'its lock file could not be taken over; remove it if no run is going');
}

/** Issues a token for each record; see the module's comment for the out file and resuming. */
export async function issueMany(
  deps: BulkDeps,
  records: AsyncIterable<unknown> | Iterable<unknown>,
  options: IssueManyOptions,
): Promise<IssueManyReport> {
  const { out: file, ...bulk } = options;
  const unlock = await lockOutFile(file);
  try {
    const { out, journal } = await OutFile.open(file);
    try {
      return await issueJournaled(deps, records, bulk, out, journal);
    } finally {
      await out.close();
    }
  } finally {
    await unlock();
  }
}

async function issueJournaled(
  deps: BulkDeps,
  records: AsyncIterable<unknown> | Iterable<unknown>,
  bulk: BulkOptions,
  out: OutFile,
  journal: Journal,
): Promise<IssueManyReport> {
  const resumed = journal.size;
  const schema = issueRecordSchema(deps.settings.maxTtlMs);
  // Entries generated but not yet journaled: at most the batches read ahead, and the lines held back below.
  const unjournaled = new Map<string, IssuedEntry>();
  const prepare = (item: SourceLine): Prepared & { fresh?: boolean } => {
    const earlier = journal.take(item.line);
    const parsed = item.problem ? undefined : schema.safeParse(item.record);
    if (!parsed?.success) {
      if (earlier) throw changed(out.file, item.line, 'is no longer a valid record');
      return { line: item.line, problem: item.problem ?? problemOf(parsed!.error!) };
    }
    const r = parsed.data;
    const digest = recordDigest(r);
    if (earlier && earlier.digest !== digest) {
      throw changed(out.file, item.line, `is not the record that token ${earlier.tokenId} was issued for`);
    }
    let tokenId: string;
    let secretHash: Buffer;
    if (earlier) {
      ({ tokenId, secretHash } = earlier);
    } else {
      const entry: IssuedEntry = {
        line: item.line,
        tokenId: newTokenId(),
        subject: r.subject,
        ...(r.name !== undefined ? { name: r.name } : {}),
        digest,
        token: generateTokenString(),
      };
      unjournaled.set(entry.tokenId, entry);
      ({ tokenId } = entry);
      secretHash = hashToken(entry.token);
    }
    const token: ImportedToken = {
      tokenId,
      credentialId: newCredentialId(),
      idGiven: true,
      secretHash,
      subject: r.subject,
      name: r.name ?? null,
      scopes: r.scopes,
      receivers: [...new Set(r.receivers)].sort(),
      expiresAt: null,
      ttlMs: r.ttl,
    };
    return { line: item.line, token, fresh: !earlier };
  };
  const report = await runBulk(deps, checkedAgainst(journal, out.file, records, prepare), {
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
  return { ...report, outFile: out.file, resumed };
}

/**
 * The prepared records, new tokens held back until every earlier entry has met its record: a
 * changed input then stops the run before any new token is journaled or issued. Entries that match
 * go on at once (the store answers existing). Held back: the lines without an entry up to the
 * journal's last line (the lines invalid in the earlier run), a prepared record each.
 */
async function* checkedAgainst(
  journal: Journal,
  file: string,
  records: AsyncIterable<unknown> | Iterable<unknown>,
  prepare: (item: SourceLine) => Prepared & { fresh?: boolean },
): AsyncGenerator<Prepared> {
  let held: Prepared[] = [];
  let position = 0;
  for await (const record of records) {
    const { fresh, ...item } = prepare(lineOf(record, ++position));
    if (fresh && journal.size > 0) {
      held.push(item);
      continue;
    }
    yield item;
    if (journal.size === 0 && held.length > 0) {
      yield* held;
      held = [];
    }
  }
  const missing = journal.firstLeft();
  if (missing !== undefined) throw changed(file, missing, 'is missing from the input');
  yield* held;
}
