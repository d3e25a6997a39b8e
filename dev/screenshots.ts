/**
 * Takes the README's Web UI screenshots (docs/screenshots/*.png): a throwaway dev stack (`tokenwarden
 * start` in a temporary data folder) with a few tokens, one stuck on a failing receiver, one revoked,
 * one forced by an operator, one adopted by a reconciler pass, photographed by headless Chromium
 * driven over the DevTools protocol.
 * Not part of the test suite: `npm run build && node dist/dev/screenshots.js` (needs `chromium`).
 */
import { spawn, execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { promisify } from 'node:util';
import { TokenWarden } from '../client/index.js';
import { loadSettings, PACKAGE_ROOT } from '../common/config.js';
import { newCredentialId, newTokenId } from '../common/ids.js';
import type { ReconcileInput } from '../common/messages.js';
import { DEFAULT_NAMESPACE, RECONCILER_WORKFLOW_ID, tokenWorkflowId, WORKFLOW_TYPE } from '../common/names.js';
import * as store from '../common/store/index.js';
import { connectTemporal } from '../common/temporal.js';
import { cleanEnv, freePort, ManagedChild, waitUntilReady } from './processes.js';

const OUT_DIR = path.join(PACKAGE_ROOT, 'docs', 'screenshots');
const CLI = path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
/** The list columns the README recommends, as the Web UI stores them (per namespace, in localStorage). */
export const OPERATOR_COLUMNS = [
  'Status',
  'Workflow ID',
  'TokenName',
  'TokenSubject',
  'TokenStatus',
  'TokenPropagation',
  'TokenPendingReceivers',
  'Start',
];

const say = (msg: string) => console.error(`screenshots: ${msg}`);

/** Set by Ctrl-C: waits stop and the script cleans up (stack stopped, data folder removed) before exiting. */
let interrupted = false;

/** Polls `probe` until it returns something truthy; a dev script's wait, bounded and named. */
async function until<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value) return value;
    if (interrupted) throw new Error(`interrupted while waiting for ${what}`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

/** A loopback receiver answering every delivery with one status. */
async function receiver(status: number): Promise<{ url: string; close: () => Promise<void> }> {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => res.writeHead(status).end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/revocations`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** A DevTools call not answered in this long fails (the script then stops its stack and cleans up). */
const DEVTOOLS_CALL_TIMEOUT_MS = 60_000;

/** Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON). */
class DevTools {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private buffer = '';

  constructor(
    private readonly input: Writable,
    output: Readable,
  ) {
    output.setEncoding('utf8');
    output.on('data', (chunk: string) => {
      this.buffer += chunk;
      let end: number;
      while ((end = this.buffer.indexOf('\0')) >= 0) {
        let message: { id?: number; result?: unknown; error?: { message: string } };
        try {
          message = JSON.parse(this.buffer.slice(0, end)) as typeof message;
        } catch {
          message = {};
        }
        this.buffer = this.buffer.slice(end + 1);
        const waiter = message.id !== undefined ? this.pending.get(message.id) : undefined;
        if (!waiter) continue;
        this.pending.delete(message.id!);
        if (message.error) waiter.reject(new Error(message.error.message));
        else waiter.resolve(message.result);
      }
    });
    // Chromium gone: every call still waiting fails now instead of hanging the script.
    output.on('close', () => {
      for (const waiter of this.pending.values()) waiter.reject(new Error('Chromium closed its DevTools pipe'));
      this.pending.clear();
    });
  }

  send<T = Record<string, unknown>>(method: string, params: object = {}, sessionId?: string): Promise<T> {
    const id = this.nextId++;
    this.input.write(`${JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) })}\0`);
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`Chromium did not answer ${method} within ${DEVTOOLS_CALL_TIMEOUT_MS / 1000} s`));
      }, DEVTOOLS_CALL_TIMEOUT_MS);
      this.pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
    });
  }
}

/** One browser tab of a fixed size. */
class Page {
  private constructor(
    private readonly tools: DevTools,
    private readonly session: string,
  ) {}

  static async open(tools: DevTools, width: number, height: number): Promise<Page> {
    const { targetId } = await tools.send<{ targetId: string }>('Target.createTarget', { url: 'about:blank' });
    const { sessionId } = await tools.send<{ sessionId: string }>('Target.attachToTarget', { targetId, flatten: true });
    const page = new Page(tools, sessionId);
    await tools.send(
      'Emulation.setDeviceMetricsOverride',
      { width, height, deviceScaleFactor: 1, mobile: false },
      sessionId,
    );
    return page;
  }

  async goto(url: string): Promise<void> {
    await this.tools.send('Page.navigate', { url }, this.session);
  }

  async evaluate<T>(expression: string): Promise<T> {
    const { result, exceptionDetails } = await this.tools.send<{
      result: { value?: T };
      exceptionDetails?: { text: string };
    }>('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true }, this.session);
    if (exceptionDetails) throw new Error(`in the page: ${exceptionDetails.text}`);
    return result.value as T;
  }

  /** Waits until every one of `texts` shows on the page, and none of `absent`. */
  async waitForText(texts: string[], absent: string[] = [], timeoutMs = 60_000): Promise<void> {
    // Markdown (current details) renders in an iframe of the page's origin: its text counts too.
    const check = `(() => {
      const t = [document, ...[...document.querySelectorAll('iframe')].map((f) => f.contentDocument)]
        .map((d) => (d && d.body ? d.body.innerText : '')).join('\\n');
      return ${JSON.stringify(texts)}.every((s) => t.includes(s)) && !${JSON.stringify(absent)}.some((s) => t.includes(s));
    })()`;
    try {
      await until(
        `the page to show ${texts.join(', ')}${absent.length ? ` and not ${absent.join(', ')}` : ''}`,
        () => this.evaluate<boolean>(check),
        timeoutMs,
      );
    } catch (err) {
      const shown = await this.evaluate<string>(`(document.body ? document.body.innerText : '').slice(0, 3000)`);
      throw new Error(`${(err as Error).message}; the page shows:\n${shown}`);
    }
  }

  async screenshot(file: string): Promise<number> {
    const { data } = await this.tools.send<{ data: string }>('Page.captureScreenshot', { format: 'png' }, this.session);
    const bytes = Buffer.from(data, 'base64');
    await writeFile(file, bytes);
    return bytes.length;
  }
}

async function main(): Promise<void> {
  if (!existsSync(CHROMIUM))
    throw new Error(`no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM)`);
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-screenshots-'));
  const [temporalPort, uiPort, pgPort, apiPort] = [
    await freePort(),
    await freePort(),
    await freePort(),
    await freePort(),
  ];
  // Never the caller's DATABASE_URL, TEMPORAL_* or TOKENWARDEN_*: fake receivers and tokens stay in the throwaway stack.
  const env = {
    ...cleanEnv(),
    TOKENWARDEN_DATA_DIR: dataDir,
    TOKENWARDEN_TEMPORAL_PORT: String(temporalPort),
    TOKENWARDEN_UI_PORT: String(uiPort),
    TOKENWARDEN_PG_PORT: String(pgPort),
    TOKENWARDEN_API_PORT: String(apiPort),
    // A failing receiver is escalated (the token shows as stuck) within the script's run.
    TOKENWARDEN_ESCALATE_AFTER: '10s',
  };
  const receivers = { billing: await receiver(204), crm: await receiver(503), ldap: await receiver(400) };
  const stack = new ManagedChild('the dev stack', process.execPath, [CLI, 'start'], { env });
  let browser: ReturnType<typeof spawn> | undefined;
  process.once('SIGINT', () => {
    interrupted = true;
    say('interrupted: cleaning up');
    browser?.kill('SIGKILL');
  });
  try {
    say(`starting a dev stack in ${dataDir}`);
    const stackFile = path.join(dataDir, 'stack.json');
    await waitUntilReady(stack, () => readFile(stackFile, 'utf8'), 180_000);

    // Operators' commands, as a person types them; outputs (secrets, raw tokens) are parsed, never printed.
    const cli = async (...args: string[]): Promise<unknown> => {
      const { stdout } = await promisify(execFile)(process.execPath, [CLI, ...args, '--json'], { env });
      return stdout.trim() ? JSON.parse(stdout) : undefined;
    };
    for (const [id, r] of Object.entries(receivers)) await cli('receiver', 'add', id, '--url', r.url);
    const issue = async (subject: string, name: string, ...receiverIds: string[]) =>
      (
        (await cli(
          'issue',
          '--subject',
          subject,
          '--name',
          name,
          '--ttl',
          '30d',
          ...receiverIds.flatMap((r) => ['--receiver', r]),
        )) as { tokenId: string }
      ).tokenId;
    await issue('usr_8f3a21', 'ci deploy key', 'billing');
    const stolen = await issue('usr_8f3a21', 'laptop session', 'billing', 'crm');
    const exported = await issue('usr_41c9d0', 'reporting export', 'billing', 'ldap');
    const rotated = await issue('usr_41c9d0', 'ci runner', 'billing');
    await cli('revoke', stolen, '--reason', 'laptop stolen', '--actor', 'ops:alice');
    await cli('revoke', exported, '--reason', 'left the company', '--actor', 'ops:alice');
    await cli('revoke', rotated, '--reason', 'key rotated out', '--actor', 'ops:bob');

    const settings = loadSettings(env);
    const warden = await TokenWarden.connect(settings);
    const client = await connectTemporal(settings);
    try {
      const propagation = async (tokenId: string) =>
        (await client.workflow.getHandle(tokenWorkflowId(tokenId)).describe()).searchAttributes.TokenPropagation?.[0];
      await until(
        'the rejected delivery to wait for an operator',
        async () => (await propagation(exported)) === 'stuck',
      );
      await cli('force', exported, '--reason', 'ldap decommissioned', '--actor', 'ops:bob');
      await until('the failing receiver to be escalated', async () => (await propagation(stolen)) === 'stuck');
      await until('the forced token to complete', async () => (await propagation(exported)) === 'complete');
      const stolenRun = (await client.workflow.getHandle(tokenWorkflowId(stolen)).describe()).runId;
      // A crash for the reconciler to heal: an issuer that wrote its token and died before starting
      // the workflow (the first step of issuing alone; no raw token exists for it). A pass run now,
      // with no grace for recent rows, adopts it.
      await store.insertToken(warden.pool, {
        tokenId: newTokenId(),
        credentialId: newCredentialId(),
        subject: 'usr_5d2e77',
        name: 'issuer crashed',
        scopes: [],
        receivers: ['billing'],
        ttlMs: 30 * 86_400_000,
        secretHash: randomBytes(32),
      });
      const reconcileRun = await client.workflow.start(WORKFLOW_TYPE.reconcile, {
        workflowId: `${RECONCILER_WORKFLOW_ID}-now`,
        taskQueue: settings.temporal.taskQueue,
        args: [{ version: 1, graceMs: 0 } satisfies ReconcileInput],
      });
      await reconcileRun.result();

      browser = spawn(
        CHROMIUM,
        [
          '--headless=new',
          '--no-sandbox',
          '--disable-gpu',
          '--hide-scrollbars',
          '--remote-debugging-pipe',
          `--user-data-dir=${path.join(dataDir, 'chromium')}`,
          'about:blank',
        ],
        { stdio: ['ignore', 'ignore', 'ignore', 'pipe', 'pipe'] },
      );
      const tools = new DevTools(browser.stdio[3] as Writable, browser.stdio[4] as Readable);
      const ui = `http://localhost:${uiPort}/namespaces/${DEFAULT_NAMESPACE}`;

      const list = await Page.open(tools, 1900, 560);
      // The UI keeps its list columns per namespace in the browser: set them as the README says.
      await list.goto(`${ui}/workflows`);
      await list.waitForText(['Workflows']);
      await list.evaluate(
        `localStorage.setItem('namespace-workflow-table-columns', ${JSON.stringify(JSON.stringify({ [DEFAULT_NAMESPACE]: OPERATOR_COLUMNS.map((label) => ({ label })) }))})`,
      );
      await list.goto(`${ui}/workflows?query=${encodeURIComponent(`WorkflowType = 'tokenLifecycle'`)}`);
      await list.waitForText(['laptop session', 'crm', 'stuck', 'TokenPendingReceivers']);
      say(`list.png: ${await list.screenshot(path.join(OUT_DIR, 'list.png'))} bytes`);

      const token = await Page.open(tools, 1400, 1100);
      const tokenPage = `${ui}/workflows/${encodeURIComponent(tokenWorkflowId(stolen))}/${stolenRun}`;
      await token.goto(`${tokenPage}/history`);
      // The revoke's reason is in an encrypted payload: shown only once the codec endpoint decoded it.
      await token.waitForText(
        ['usr_8f3a21', 'revoke by ops:alice: laptop stolen', 'deliver revocation to 2 receivers', 'HTTP 503'],
        ['encryption-key-id'],
      );
      say(`token.png: ${await token.screenshot(path.join(OUT_DIR, 'token.png'))} bytes`);
      await token.goto(`${tokenPage}/user-metadata`);
      await token.waitForText(['Current Details', 'receivers confirmed', 'Timing (from the']);
      say(`token-details.png: ${await token.screenshot(path.join(OUT_DIR, 'token-details.png'))} bytes`);

      const pass = await Page.open(tools, 1400, 900);
      await pass.goto(
        `${ui}/workflows/${encodeURIComponent(reconcileRun.workflowId)}/${reconcileRun.firstExecutionRunId}/history`,
      );
      await pass.waitForText(['summary', 'Healed 1 token(s)', 'graceMs'], ['encryption-key-id']);
      say(`reconcile.png: ${await pass.screenshot(path.join(OUT_DIR, 'reconcile.png'))} bytes`);
    } finally {
      await warden.close();
      await client.connection.close();
    }
  } finally {
    browser?.kill('SIGKILL');
    await stack.stop('SIGINT', 30_000);
    for (const r of Object.values(receivers)) await r.close();
    await rm(dataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  }
}

main().catch((err: unknown) => {
  console.error((err as Error).stack ?? String(err));
  process.exit(1);
});
