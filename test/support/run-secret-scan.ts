/**
 * The run-wide secret scan: searches workflow histories (raw, and decoded with every payload key the
 * run recorded) and log files for secrets the run issued. Candidates are found by shape and matched
 * by SHA-256 against the run's records (test/support/run-record.ts), so nothing secret is kept to
 * search for, and a secret-shaped string that was never issued (a test's deliberate fake) is no hit.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type { ConnectionLike } from '@temporalio/client';
import type { Payload } from '@temporalio/common';
import proto from '@temporalio/proto';
import type pg from 'pg';
import { quoteIdent } from '../../common/db.js';
import { ENCRYPTED_ENCODING, EncryptionCodec } from '../../common/payload-codec.js';
import { isWellFormedToken } from '../../common/secrets.js';
import { historyText } from './history.js';
import { sha256Hex, type RunSecrets } from './run-record.js';

const { NamespaceState } = proto.temporal.api.enums.v1;
const TOKEN_SHAPE = /tw_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}/g;
/** Base64 of 32 bytes: a signing secret's key (also inside `whsec_…`), a master or payload key. */
const KEY_SHAPE = /([0-9A-Za-z+/]{43}=)/g;
const KEY_SHAPE_ANYWHERE = /(?=([0-9A-Za-z+/]{43}=))/g;
/** A bytea value as a row prints it (`\\x…`, its backslash doubled inside a row's text). */
const BYTEA_HEX = /\\+x((?:[0-9a-f]{2})+)/g;
/** Histories fetched at once: enough to hide the round trips, few enough for a shared 2-core machine. */
const HISTORY_CONCURRENCY = 4;

type History = proto.temporal.api.history.v1.IHistory;

export class RunSecretScan {
  private readonly tokenHashes: Set<string>;
  private readonly signingKeyHashes: Set<string>;
  private readonly keyHashes: Set<string>;
  private readonly codec: EncryptionCodec | undefined;
  private readonly found = new Set<string>();
  /** Bytes searched per log file, relative to the logs' directory. */
  readonly logFiles = new Map<string, number>();
  readonly searched = {
    namespaces: 0,
    histories: 0,
    events: 0,
    logFiles: 0,
    logBytes: 0,
    /** Well-formed token strings that no recorded credential matches (test fixtures, fakes). */
    unissuedTokens: 0,
    /** Encrypted payloads no recorded key opens (tests of foreign or broken ciphertext). */
    undecodedPayloads: 0,
    tables: 0,
    rows: 0,
  };

  constructor(private readonly secrets: RunSecrets) {
    this.tokenHashes = new Set(secrets.tokenHashes);
    this.signingKeyHashes = new Set(secrets.signingKeyHashes);
    this.keyHashes = new Set(secrets.keyHashes);
    const payloadKeys = [...new Set(secrets.payloadKeys)].map((k) => Buffer.from(k, 'base64'));
    this.codec = payloadKeys.length ? new EncryptionCodec(payloadKeys) : undefined;
  }

  /**
   * Records a hit for each issued secret in `text`; `where` names the place, never the secret.
   * `overlapping` also tries keys that start inside a longer run of base64 characters (for bytes
   * that are not text; too slow for whole histories).
   */
  search(where: string, text: string, opts: { overlapping?: boolean } = {}): void {
    for (const [match] of text.matchAll(TOKEN_SHAPE)) {
      if (!isWellFormedToken(match)) continue;
      if (this.tokenHashes.has(sha256Hex(match))) this.found.add(`an issued token in ${where}`);
      else this.searched.unissuedTokens++;
    }
    for (const [, match] of text.matchAll(opts.overlapping ? KEY_SHAPE_ANYWHERE : KEY_SHAPE)) {
      this.matchKey(where, match!);
    }
  }

  /** A hit when `base64` is an issued signing key or a master or payload key of the run. */
  private matchKey(where: string, base64: string): void {
    const hash = sha256Hex(base64);
    if (this.signingKeyHashes.has(hash)) this.found.add(`an issued signing secret in ${where}`);
    else if (this.keyHashes.has(hash)) this.found.add(`a master or payload key in ${where}`);
  }

  /** Every line of every file under `dir` (the run's logs), line numbers in the hits. */
  searchLogs(dir: string): void {
    const files = readdirSync(dir, { withFileTypes: true, recursive: true }).filter((f) => f.isFile());
    for (const file of files) {
      const name = path.join(file.parentPath, file.name);
      const text = readFileSync(name, 'utf8');
      this.searched.logFiles++;
      this.searched.logBytes += Buffer.byteLength(text);
      this.logFiles.set(path.relative(dir, name), Buffer.byteLength(text));
      // Whole file first (fast); lines only to say where a hit is.
      const before = { hits: this.found.size, unissued: this.searched.unissuedTokens };
      this.search(path.relative(dir, name), text);
      if (this.found.size === before.hits) continue;
      for (const hit of [...this.found].slice(before.hits)) this.found.delete(hit);
      this.searched.unissuedTokens = before.unissued;
      text.split('\n').forEach((line, i) => this.search(`${path.relative(dir, name)} line ${i + 1}`, line));
    }
  }

  /**
   * Every row of every table of `schema`, as PostgreSQL prints it, and every bytea value in it
   * decoded: searched as text (a secret stored as bytes), and every 32-byte window of it as a key
   * (a signing, master or payload key stored raw).
   */
  async searchTables(sql: pg.Pool | pg.Client, schema: string, where: string): Promise<void> {
    const { rows: tables } = await sql.query<{ name: string }>(
      `SELECT table_name AS name FROM information_schema.tables
        WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY table_name`,
      [schema],
    );
    for (const { name } of tables) {
      const { rows } = await sql.query<{ row: string }>(
        `SELECT t::text AS row FROM ${quoteIdent(schema)}.${quoteIdent(name)} t`,
      );
      this.searched.tables++;
      this.searched.rows += rows.length;
      const at = `${where}, table ${name}`;
      const text = rows.map((r) => r.row).join('\n');
      this.search(at, text);
      for (const [, hex] of text.matchAll(BYTEA_HEX)) {
        const bytes = Buffer.from(hex!, 'hex');
        this.search(at, bytes.toString('latin1'), { overlapping: true });
        for (let i = 0; i + 32 <= bytes.length; i++) {
          this.matchKey(at, bytes.subarray(i, i + 32).toString('base64'));
        }
      }
    }
  }

  /** Every run of every workflow in every namespace of the server, raw and decoded. */
  async searchHistories(connection: ConnectionLike): Promise<void> {
    const service = connection.workflowService;
    const namespaces: string[] = [];
    let page: Uint8Array | null | undefined;
    do {
      const answer = await service.listNamespaces({ pageSize: 100, nextPageToken: page });
      for (const ns of answer.namespaces ?? []) {
        if (ns.namespaceInfo?.state !== NamespaceState.NAMESPACE_STATE_DELETED && ns.namespaceInfo?.name) {
          namespaces.push(ns.namespaceInfo.name);
        }
      }
      page = answer.nextPageToken?.length ? answer.nextPageToken : undefined;
    } while (page);

    for (const namespace of namespaces) {
      this.searched.namespaces++;
      const runs: Array<{ workflowId: string; runId: string }> = [];
      page = undefined;
      do {
        const answer: proto.temporal.api.workflowservice.v1.IListWorkflowExecutionsResponse =
          await service.listWorkflowExecutions({ namespace, pageSize: 1000, nextPageToken: page });
        for (const e of answer.executions ?? []) {
          if (e.execution?.workflowId && e.execution.runId) {
            runs.push({ workflowId: e.execution.workflowId, runId: e.execution.runId });
          }
        }
        page = answer.nextPageToken?.length ? answer.nextPageToken : undefined;
      } while (page);
      let next = 0;
      const fetcher = async () => {
        while (next < runs.length) {
          const run = runs[next++]!;
          const history = await this.fetchHistory(connection, namespace, run);
          await this.searchHistory(`${namespace}/${run.workflowId} run ${run.runId}`, history);
        }
      };
      await Promise.all(Array.from({ length: HISTORY_CONCURRENCY }, fetcher));
    }
  }

  /** One history, raw (as Temporal stores it), then with its payloads decoded in place. */
  async searchHistory(where: string, history: History): Promise<void> {
    this.searched.histories++;
    this.searched.events += history.events?.length ?? 0;
    this.search(`the raw history of ${where}`, historyText(history).join('\n'));
    await this.decodeIn(history.events);
    this.search(`the decoded history of ${where}`, historyText(history).join('\n'));
  }

  /** Where an issued secret was found; empty when none was. */
  hits(): string[] {
    return [...this.found];
  }

  summary(): string {
    const s = this.searched;
    const r = this.secrets;
    return (
      `${this.tokenHashes.size} issued tokens, ${this.signingKeyHashes.size} signing secrets and ` +
      `${this.keyHashes.size} master/payload keys searched in ${s.histories} histories ` +
      `(${s.events} events, ${s.namespaces} namespaces, raw and decoded with ${new Set(r.payloadKeys).size} payload keys) ` +
      `and ${s.logFiles} log files (${s.logBytes} bytes): ${this.found.size} hit(s); ` +
      `not counted: ${s.unissuedTokens} well-formed token strings never issued, ${s.undecodedPayloads} payloads ` +
      `no recorded key opens, ${r.unreadableSigningSecrets} receiver secrets no recorded master key opens`
    );
  }

  private async fetchHistory(
    connection: ConnectionLike,
    namespace: string,
    execution: { workflowId: string; runId: string },
  ): Promise<History> {
    const events: NonNullable<History['events']> = [];
    let page: Uint8Array | undefined;
    do {
      const answer: proto.temporal.api.workflowservice.v1.IGetWorkflowExecutionHistoryResponse =
        await connection.workflowService.getWorkflowExecutionHistory({
          namespace,
          execution,
          nextPageToken: page,
        });
      events.push(...(answer.history?.events ?? []));
      page = answer.nextPageToken?.length ? answer.nextPageToken : undefined;
    } while (page);
    return { events };
  }

  private async decodeIn(value: unknown): Promise<void> {
    if (Array.isArray(value)) {
      for (const v of value) await this.decodeIn(v);
      return;
    }
    if (!value || typeof value !== 'object' || value instanceof Uint8Array) return;
    const o = value as Record<string, unknown>;
    const metadata = o.metadata as Record<string, Uint8Array> | null | undefined;
    if (metadata && typeof metadata === 'object' && 'encoding' in metadata) {
      if (Buffer.from(metadata.encoding!).toString() !== ENCRYPTED_ENCODING) return;
      const [decoded] = this.codec ? await this.codec.decode([o as Payload]) : [o as Payload];
      if (Buffer.from(decoded!.metadata?.encoding ?? []).toString() === ENCRYPTED_ENCODING) {
        this.searched.undecodedPayloads++;
      }
      o.metadata = decoded!.metadata;
      o.data = decoded!.data;
      return;
    }
    for (const v of Object.values(o)) await this.decodeIn(v);
  }
}
