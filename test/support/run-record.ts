/**
 * What a test run keeps for its closing secret scan (test/zz-secret-hygiene.test.ts), in the run's
 * private directory that dev/run-tests names in TOKENWARDEN_TEST_RUN_DIR and deletes afterwards:
 * every process's log lines under `logs/`, and under `secrets/` the payload keys (to decode
 * histories) and the SHA-256 of every issued token and signing key (never the secrets themselves).
 * Without that variable (a test started by hand) nothing is kept.
 */
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, truncateSync } from 'node:fs';
import path from 'node:path';
import type pg from 'pg';
import { quoteIdent } from '../../common/db.js';
import { MasterKeyring, signingKeyBytes } from '../../common/secrets.js';
import { RunSecretScan } from './run-secret-scan.js';

export const RUN_DIR = process.env.TOKENWARDEN_TEST_RUN_DIR;
export const LOGS_DIR = RUN_DIR && path.join(RUN_DIR, 'logs');
const SECRETS_DIR = RUN_DIR && path.join(RUN_DIR, 'secrets');

/** SHA-256 hex: how tokens (the store's lookup key) and signing keys are recorded and matched. */
export const sha256Hex = (text: string): string => createHash('sha256').update(text, 'utf8').digest('hex');

/** What one process recorded: the lines of `secrets/<pid>.jsonl`, merged. */
export interface RunSecrets {
  /** Base64 payload keys the run's clients and workers used. */
  payloadKeys: string[];
  /** SHA-256 of every token string issued (the store's credential.secret_hash). */
  tokenHashes: string[];
  /** SHA-256 of the base64 key of every signing secret (the part after `whsec_`). */
  signingKeyHashes: string[];
  /** SHA-256 of the base64 of every master and payload key. */
  keyHashes: string[];
  /** Receivers whose secret no recorded master key opens: not searched, said in the summary. */
  unreadableSigningSecrets: number;
  /** Where a schema's own rows held one of its secrets, found before the schema was dropped (never the secret). */
  storeHits: string[];
  /** Tables and rows so searched. */
  storeTables: number;
  storeRows: number;
  /** Schemas test contexts made, and schemas searched before they were dropped. */
  storesMade: string[];
  storesSearched: string[];
}

const emptySecrets = (): RunSecrets => ({
  payloadKeys: [],
  tokenHashes: [],
  signingKeyHashes: [],
  keyHashes: [],
  unreadableSigningSecrets: 0,
  storeHits: [],
  storeTables: 0,
  storeRows: 0,
  storesMade: [],
  storesSearched: [],
});

function record(entry: Partial<RunSecrets>): void {
  if (!SECRETS_DIR) return;
  mkdirSync(SECRETS_DIR, { recursive: true, mode: 0o700 });
  appendFileSync(path.join(SECRETS_DIR, `${process.pid}.jsonl`), `${JSON.stringify(entry)}\n`, { mode: 0o600 });
}

/** The keys a context encrypts payloads and receiver secrets with, recorded when it is made. */
export function recordKeys(payloadKeys: readonly Buffer[], masterKeys: readonly Buffer[]): void {
  record({
    payloadKeys: payloadKeys.map((k) => k.toString('base64')),
    keyHashes: [...payloadKeys, ...masterKeys].map((k) => sha256Hex(k.toString('base64'))),
  });
}

/** A context's new store schema, recorded so the closing scan can tell one dropped without a search. */
export function recordStoreMade(schema: string): void {
  record({ storesMade: [schema] });
}

/**
 * The tokens and signing secrets of one store schema, before a test drops it. Receivers' secrets are
 * opened with the given master keys (those none opens are counted).
 */
export async function readStoreSecrets(
  sql: pg.Pool | pg.Client,
  schema: string,
  masterKeys: readonly Buffer[],
): Promise<Pick<RunSecrets, 'tokenHashes' | 'signingKeyHashes' | 'unreadableSigningSecrets'>> {
  const { rows: credentials } = await sql.query<{ hash: string }>(
    `SELECT encode(secret_hash, 'hex') AS hash FROM ${quoteIdent(schema)}.credential`,
  );
  const { rows: receivers } = await sql.query<{ id: string; ciphertext: Buffer; key_id: string }>(
    `SELECT id, secret_ciphertext AS ciphertext, secret_key_id AS key_id FROM ${quoteIdent(schema)}.receiver`,
  );
  const keyring = new MasterKeyring(masterKeys[0], masterKeys.slice(1));
  const signingKeyHashes: string[] = [];
  let unreadableSigningSecrets = 0;
  for (const r of receivers) {
    let secret: string | undefined;
    try {
      secret = keyring.decrypt(r.key_id, r.ciphertext, r.id);
    } catch {
      secret = undefined;
    }
    if (secret === undefined) unreadableSigningSecrets++;
    else signingKeyHashes.push(sha256Hex(signingKeyBytes(secret).toString('base64')));
  }
  return { tokenHashes: credentials.map((c) => c.hash), signingKeyHashes, unreadableSigningSecrets };
}

/**
 * Before a test drops a store schema: records its secrets (see readStoreSecrets) and searches every
 * row of its tables for them and for every secret the run recorded so far (the store keeps hashes
 * and ciphertext only). Returns whether the schema was searched: when it could not be (the database
 * is down), nothing is recorded and the caller must keep the schema, for the run's closing scan to
 * search (or, gone with its database, to report as dropped unsearched). True outside a recorded run.
 */
export async function recordStoreSecrets(
  sql: pg.Pool | pg.Client,
  schema: string,
  keys: { master: readonly Buffer[]; payload: readonly Buffer[] },
): Promise<boolean> {
  if (!SECRETS_DIR) return true;
  let secrets: Awaited<ReturnType<typeof readStoreSecrets>>;
  let scan: RunSecretScan;
  try {
    secrets = await readStoreSecrets(sql, schema, keys.master);
    scan = new RunSecretScan(
      mergeSecrets(readRunSecrets(), {
        ...secrets,
        keyHashes: [...keys.master, ...keys.payload].map((k) => sha256Hex(k.toString('base64'))),
      }),
    );
    await scan.searchTables(sql, schema, `store schema ${schema}`);
  } catch (err) {
    process.stderr.write(`run-record: store schema ${schema} not searched, so kept (${(err as Error).message})\n`);
    return false;
  }
  record({
    ...secrets,
    storeHits: scan.hits(),
    storeTables: scan.searched.tables,
    storeRows: scan.searched.rows,
    storesSearched: [schema],
  });
  return true;
}

/** Takes back what this process records after the call, when the returned function is called (a test's planted records). */
export function recordMark(): () => void {
  if (!SECRETS_DIR) return () => {};
  const file = path.join(SECRETS_DIR, `${process.pid}.jsonl`);
  const size = existsSync(file) ? statSync(file).size : 0;
  return () => {
    if (existsSync(file)) truncateSync(file, size);
  };
}

/** Everything every process of the run recorded so far. */
export function readRunSecrets(): RunSecrets {
  const merged = emptySecrets();
  if (!SECRETS_DIR) return merged;
  const files = readdirSync(SECRETS_DIR, { withFileTypes: true }).filter((f) => f.isFile());
  for (const file of files) {
    for (const line of readFileSync(path.join(SECRETS_DIR, file.name), 'utf8').split('\n')) {
      if (!line) continue;
      mergeSecrets(merged, JSON.parse(line) as Partial<RunSecrets>);
    }
  }
  return merged;
}

export function mergeSecrets(into: RunSecrets, from: Partial<RunSecrets>): RunSecrets {
  into.payloadKeys.push(...(from.payloadKeys ?? []));
  into.tokenHashes.push(...(from.tokenHashes ?? []));
  into.signingKeyHashes.push(...(from.signingKeyHashes ?? []));
  into.keyHashes.push(...(from.keyHashes ?? []));
  into.unreadableSigningSecrets += from.unreadableSigningSecrets ?? 0;
  into.storeHits.push(...(from.storeHits ?? []));
  into.storeTables += from.storeTables ?? 0;
  into.storeRows += from.storeRows ?? 0;
  into.storesMade.push(...(from.storesMade ?? []));
  into.storesSearched.push(...(from.storesSearched ?? []));
  return into;
}

/**
 * One child process's output kept verbatim in this run's logs, as `logs/<name>-<pid>-<n>.log` (a
 * file per child: two children's chunks never interleave), chunk by chunk as it arrives, with no line
 * break added (a chunk may end inside a line, and a token cut in two would escape the scan). A no-op
 * outside a recorded run.
 */
export function runOutput(name: string): (chunk: Buffer | string) => void {
  if (!LOGS_DIR) return () => {};
  const file = path.join(LOGS_DIR, `${name.replace(/[^\w.-]+/g, '-')}-${process.pid}-${++outputs}.log`);
  return appender(file, (chunk) => chunk);
}
let outputs = 0;

/**
 * A log file of this run for one process or server (`logs/<name>.log`): every line appended as it
 * comes, synchronously, so that a process killed next has lost none. A no-op outside a recorded run.
 */
export function runLog(name: string): (text: string) => void {
  if (!LOGS_DIR) return () => {};
  const file = path.join(LOGS_DIR, `${name.replace(/[^\w.-]+/g, '-')}.log`);
  return appender(file, (text: string) => (text.endsWith('\n') ? text : `${text}\n`));
}

/**
 * Appends to a run log, synchronously; never throws (it is called from stream handlers and loggers):
 * a write that fails is said once on the test's own error output, which the runner keeps.
 */
function appender<T extends Buffer | string>(file: string, form: (chunk: T) => Buffer | string): (chunk: T) => void {
  let lost = false;
  return (chunk) => {
    if (lost || chunk.length === 0) return;
    try {
      mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      appendFileSync(file, form(chunk), { mode: 0o600 });
    } catch (err) {
      lost = true;
      process.stderr.write(`run-record: output not kept in ${file} (${(err as Error).message})\n`);
    }
  };
}
