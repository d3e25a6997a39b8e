/** What the bulk tests share: a CLI run that can be killed, workflow executions counted per token. */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import type { Client } from '@temporalio/client';
import type pg from 'pg';
import { PACKAGE_ROOT } from '../../common/config.js';
import { runOutput } from './run-record.js';
import { waitUntil } from './wait.js';

/** A `tokenwarden` process whose output is kept, to be killed or awaited. */
export function spawnCli(
  args: string[],
  env: Record<string, string>,
): { child: ChildProcess; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>; output(): string } {
  const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args], { env });
  let output = '';
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()));
  // stderr is the command's log; stdout carries issued tokens by design.
  const log = runOutput('cli');
  child.stderr!.on('data', (c: Buffer) => {
    output += c.toString();
    log(c);
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  return { child, exited, output: () => output };
}

/** Workflow executions (runs) per workflow id on the task queue, as visibility lists them. */
export async function executionsPerWorkflow(client: Client, taskQueue: string): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for await (const wf of client.workflow.list({ query: `TaskQueue = '${taskQueue}'` })) {
    counts.set(wf.workflowId, (counts.get(wf.workflowId) ?? 0) + 1);
  }
  return counts;
}

/**
 * Waits until visibility lists every one of `workflowIds` and the runs per id stay the same across
 * two listings 500 ms apart (a second run not yet indexed would otherwise pass), then returns them.
 */
export async function executionsOnceListed(
  client: Client,
  taskQueue: string,
  workflowIds: string[],
): Promise<Map<string, number>> {
  let previous: Map<string, number> | undefined;
  return waitUntil(
    async () => {
      const counts = await executionsPerWorkflow(client, taskQueue);
      const all = workflowIds.every((id) => counts.has(id));
      const stable = previous !== undefined && workflowIds.every((id) => previous!.get(id) === counts.get(id));
      previous = counts;
      return all && stable ? counts : undefined;
    },
    `${workflowIds.length} workflows listed, their runs unchanged across two listings`,
    60_000,
    500,
  );
}

/** `token.issued` audit events per token id (every token has exactly one). */
export async function issuedEventsPerToken(sql: pg.Pool, tokenIds: string[]): Promise<Map<string, number>> {
  const { rows } = await sql.query(
    `SELECT token_id, count(*)::int AS n FROM audit_event WHERE kind = 'token.issued' AND token_id = ANY($1) GROUP BY token_id`,
    [tokenIds],
  );
  return new Map((rows as Array<{ token_id: string; n: number }>).map((r) => [r.token_id, r.n]));
}

/** The id of the live token a secret verifies as, by the verifier's own condition (hash, active, unexpired, current). */
export async function lookup(sql: pg.Pool, secretHash: Buffer): Promise<string | undefined> {
  const { rows } = await sql.query(
    `SELECT t.id FROM credential c JOIN token t ON t.id = c.token_id
      WHERE c.secret_hash = $1 AND t.status = 'active' AND t.expires_at > now() AND c.state = 'current'`,
    [secretHash],
  );
  return (rows[0] as { id: string } | undefined)?.id;
}
