/**
 * Searches for raw secrets where none may ever be: workflow histories, the output of processes, the
 * rows of every table. Known secrets are searched verbatim and hex-encoded (bytea columns print hex);
 * any well-formed token string counts too, known or not.
 */
import type { Client } from '@temporalio/client';
import proto from '@temporalio/proto';
import type pg from 'pg';
import { quoteIdent } from '../../common/db.js';
import { isWellFormedToken } from '../../common/secrets.js';
import { decodedHistory, historyText } from './history.js';

const { History } = proto.temporal.api.history.v1;
const TOKEN_SHAPE = /tw_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}/g;

export class SecretScan {
  private readonly needles: Array<{ label: string; text: string }> = [];
  private readonly found: string[] = [];
  readonly counts = { tokens: 0, signingSecrets: 0, masterKeys: 0 };
  readonly searched = { histories: 0, outputs: 0, outputBytes: 0, tables: 0, rows: 0 };

  addToken(label: string, token: string): void {
    this.counts.tokens++;
    this.add(`raw token of ${label}`, token);
  }

  /** A whsec_ secret, and its key part alone (base64 of the HMAC key). */
  addSigningSecret(label: string, secret: string): void {
    this.counts.signingSecrets++;
    this.add(`signing secret of ${label}`, secret);
    this.add(`signing key of ${label}`, secret.replace(/^whsec_/, ''));
  }

  addMasterKey(label: string, key: Buffer): void {
    this.counts.masterKeys++;
    this.add(`master key of ${label} (base64)`, key.toString('base64'));
    this.add(`master key of ${label} (hex)`, key.toString('hex'));
  }

  search(where: string, text: string): void {
    for (const needle of this.needles) {
      if (text.includes(needle.text)) this.found.push(`${needle.label} in ${where}`);
    }
    for (const match of text.matchAll(TOKEN_SHAPE)) {
      if (isWellFormedToken(match[0]) && !this.needles.some((n) => n.text === match[0])) {
        this.found.push(`an unknown well-formed token string in ${where}`);
      }
    }
  }

  /** Process output (logs, error output) of one process or command. */
  searchOutput(where: string, text: string): void {
    this.searched.outputs++;
    this.searched.outputBytes += Buffer.byteLength(text);
    this.search(where, text);
  }

  /** Every string and payload of each history, raw (as Temporal stores it) and decoded, and their protobuf JSON. */
  async searchHistories(client: Client, workflowIds: Iterable<string>): Promise<void> {
    for (const workflowId of workflowIds) {
      const handle = client.workflow.getHandle(workflowId);
      this.searched.histories++;
      for (const [form, history] of [
        ['raw', await handle.fetchHistory()],
        ['decoded', await decodedHistory(handle)],
      ] as const) {
        const json = JSON.stringify(History.fromObject(history).toJSON());
        this.search(`the ${form} history of ${workflowId}`, `${historyText(history).join('\n')}\n${json}`);
      }
    }
  }

  /** Every row of every table in the schema on the pool's search_path, as PostgreSQL prints it. */
  async searchTables(pool: pg.Pool, where: string): Promise<void> {
    const { rows: tables } = await pool.query(
      `SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'`,
    );
    for (const { table_name: table } of tables as Array<{ table_name: string }>) {
      const { rows } = await pool.query(`SELECT t::text AS row FROM ${quoteIdent(table)} t`);
      this.searched.tables++;
      this.searched.rows += rows.length;
      this.search(`${where}, table ${table}`, rows.map((r) => r.row as string).join('\n'));
    }
  }

  /** Where a secret was found; empty when none was. */
  hits(): string[] {
    return [...new Set(this.found)];
  }

  summary(): string {
    const s = this.searched;
    return (
      `${this.counts.tokens} raw tokens, ${this.counts.signingSecrets} signing secrets and ${this.counts.masterKeys} master key(s) ` +
      `searched in ${s.histories} histories, ${s.outputs} process outputs (${s.outputBytes} bytes) and ` +
      `${s.rows} rows of ${s.tables} tables: ${this.hits().length} hit(s)`
    );
  }

  private add(label: string, text: string): void {
    this.needles.push({ label, text }, { label: `${label}, hex-encoded`, text: Buffer.from(text).toString('hex') });
  }
}
