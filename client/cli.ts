/** The `tokenwarden` command. Human output by default, `--json` for scripts; one-line errors. */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Command, CommanderError, Option } from 'commander';
import { loadApiSettings, loadSettings, loadStoreSettings, PACKAGE_ROOT, readStackFile } from '../common/config.js';
import { migrate } from '../common/db.js';
import {
  ConfigError,
  InvalidInputError,
  NotFoundError,
  PolicyApplyInProgressError,
  TokenStateConflictError,
} from '../common/errors.js';
import { UNPRINTABLE } from '../common/validation.js';
import type { PolicyRecord, TokenWarden } from './index.js';
import { formatDuration } from '../common/durations.js';
import type { BulkCommandOptions } from './bulk/command.js';
import { TokenWardenStore, type DeathRecord, type TokenView } from './store.js';
import { DEATH_EXPORT_FORMATS, deathCsvHeader, deathCsvRow, type DeathExportFormat } from './audit-export.js';

const EXIT = { failure: 1, invalidInput: 2, notFound: 3, conflict: 4 } as const;

const UNPRINTABLE_ALL = new RegExp(UNPRINTABLE.source, 'gu');
// The backslash too: the escapes must be told from the same text typed literally.
const UNPRINTABLE_OR_BACKSLASH = new RegExp(`\\\\|${UNPRINTABLE.source}`, 'gu');
const hex = (char: string, digits: number) => char.codePointAt(0)!.toString(16).padStart(digits, '0');

/**
 * Text as a terminal should show it, never obey it: ESC becomes `\x1b`, U+202E `\u202e`, and a
 * backslash `\\`, so each shown text stands for one text only. Stored values are validated, but
 * rows written before that (or by hand) reach terminals too.
 */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE_OR_BACKSLASH, (c) =>
    c === '\\' ? '\\\\' : c.length === 1 && c < '\u0100' ? `\\x${hex(c, 2)}` : `\\u${hex(c, 4)}`,
  );
}

/**
 * The library names its fields (`since`, `tokenId`); the user typed options (`--since`, `--token`):
 * an InvalidInputError renamed to those, anything else unchanged. Unlisted fields become `--<field>`.
 */
function asOptionError(err: unknown, command: string, options: Record<string, string>): unknown {
  if (!(err instanceof InvalidInputError)) return err;
  const fields = err.fields.map((f) => ({
    ...f,
    path: f.path === '(input)' ? f.path : (options[f.path] ?? `--${f.path}`),
  }));
  return new InvalidInputError(
    `invalid ${command}: ${fields.map((f) => `${f.path}: ${f.message}`).join('; ')}`,
    fields,
  );
}

/** A template whose interpolated values are made printable (the template's own text is ours). */
function tty(strings: TemplateStringsArray, ...values: unknown[]): string {
  return strings.reduce((out, text, i) => out + printable(String(values[i - 1])) + text);
}

/** JSON that stays valid and parses to the same value, with nothing a terminal would obey. */
function printableJson(value: unknown): string {
  return JSON.stringify(value).replace(UNPRINTABLE_ALL, (c) => `\\u${hex(c, 4)}`);
}

/**
 * Rows as aligned columns under a header, each cell made printable and cut to `max` characters
 * (an ellipsis marks the cut), widths by character count.
 */
export function columns(header: string[], rows: string[][], max = 40): string {
  const cell = (v: string) => {
    const text = printable(v);
    return [...text].length > max ? `${[...text].slice(0, max - 1).join('')}…` : text;
  };
  const all = [header, ...rows].map((r) => r.map(cell));
  const widths = header.map((_, i) => Math.max(...all.map((r) => [...(r[i] ?? '')].length)));
  return all
    .map((r) =>
      r
        .map((c, i) => (i === r.length - 1 ? c : c + ' '.repeat(widths[i]! - [...c].length)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

function print(json: boolean, value: unknown, human: () => string): void {
  process.stdout.write(json ? `${printableJson(value)}\n` : `${human()}\n`);
}

const warn = (message: string) => process.stderr.write(`tokenwarden: warning: ${printable(message)}\n`);

const onIdleError = (err: Error) => warn(`an idle database connection was closed: ${err.message}`);

/** For commands that tell a token's workflow: only they load the Temporal client. */
async function withWarden<T>(fn: (tw: TokenWarden) => Promise<T>): Promise<T> {
  const { TokenWarden } = await import('./index.js');
  return runThenClose(await TokenWarden.connect(loadSettings(), { onError: onIdleError }), fn);
}

/** For commands that need only the store: no Temporal settings are read, no Temporal module loaded. */
async function withStore<T>(fn: (store: TokenWardenStore) => Promise<T>): Promise<T> {
  return runThenClose(await TokenWardenStore.connect(loadStoreSettings(), { onError: onIdleError }), fn);
}

async function runThenClose<S extends TokenWardenStore, T>(
  connection: S,
  fn: (connection: S) => Promise<T>,
): Promise<T> {
  try {
    return await fn(connection);
  } finally {
    await connection.close();
  }
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('paste the signing secret, then Ctrl-D: ');
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').trim();
}

/** A progress bar on stderr (a terminal only); cli-progress is loaded when one is drawn. */
async function progressBar(label: string): Promise<{ update(done: number, total: number): void; stop(): void }> {
  const { SingleBar, Presets } = await import('cli-progress');
  const bar = new SingleBar(
    {
      format: `${label} [{bar}] {value}/{total} · {percentage}% · ETA {eta_formatted}`,
      stream: process.stderr,
      hideCursor: true,
    },
    Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total) {
      if (!started) bar.start(total, 0);
      started = true;
      bar.setTotal(total);
      bar.update(done);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

const collect = (value: string, previous: string[] = []) => [...previous, value];

/** Input format of the bulk commands (default from the file name: .csv, else jsonl). */
const bulkFormat = () =>
  new Option('--format <format>', 'jsonl or csv (default: from the file name; jsonl for stdin)').choices([
    'jsonl',
    'csv',
  ]);

function describeToken(t: TokenView): string {
  const lines = [
    tty`token        ${t.id}`,
    tty`subject      ${t.subject}` + (t.name ? tty` (${t.name})` : ''),
    tty`status       ${t.status}` + (t.valid ? ' (valid)' : ''),
    tty`propagation  ${t.propagation}`,
    tty`issued       ${t.issuedAt}`,
    tty`expires      ${t.expiresAt}`,
  ];
  if (t.revokedAt) lines.push(tty`revoked      ${t.revokedAt} by ${t.revokedBy}: ${t.revokeReason}`);
  if (t.policy) lines.push(tty`policy       ${t.policy}`);
  if (t.suspendedAt) lines.push(tty`suspended    ${t.suspendedAt} by ${t.suspendedBy}: ${t.suspendReason}`);
  if (t.revokeScheduledAt) {
    lines.push(tty`revoke at    ${t.revokeScheduledAt}: ${t.revokeScheduledReason}`);
  }
  for (const c of t.credentials ?? []) {
    lines.push(
      tty`credential   ${c.id}: ${c.state}` +
        (c.state === 'previous' && c.validUntil ? tty`, valid until ${c.validUntil}` : '') +
        (c.revokedAt ? tty`, revoked ${c.revokedAt}` : ''),
    );
  }
  for (const d of t.deliveries) {
    lines.push(
      tty`receiver     ${d.receiverId}: ${d.status}, ${d.attempts} attempt(s)` +
        (d.probes ? tty`, ${d.probes} probe(s)` : '') +
        tty`; delivered ${d.delivered ?? 'not yet'}; verified ${d.verified}` +
        (d.lastError ? tty`; last error: ${d.lastError}` : ''),
    );
  }
  return lines.join('\n');
}

/** `NAME='value'` for POSIX shells: single quotes take everything literally but a single quote. */
const shellLine = (name: string, value: string) => `export ${name}='${value.replaceAll("'", "'\\''")}'`;

const packageVersion = (): string =>
  (JSON.parse(readFileSync(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string }).version;

const defaultActor = process.env.USER ? `cli:${process.env.USER}` : 'cli';

// ---------------------------------------------------------------- revoke --where / --resume

interface RevokeCommandOptions {
  at?: string;
  cancelScheduled?: boolean;
  reason?: string;
  actor: string;
  where?: string[];
  resume?: string;
  rate?: string;
  yes?: boolean;
  max?: string;
  operations?: boolean;
  json?: boolean;
}

/** Exit status after an interrupt (128 + SIGINT), as the import command uses. */
const EXIT_INTERRUPTED = 130;

/** The --where keys and the library's filter fields they set. */
const WHERE_KEYS = {
  subject: 'subject',
  receiver: 'receiver',
  'issued-before': 'issuedBefore',
  'name-prefix': 'namePrefix',
} as const;
type WhereKey = keyof typeof WHERE_KEYS;
const whereKeyOf = (field: string) =>
  (Object.keys(WHERE_KEYS) as WhereKey[]).find((k) => WHERE_KEYS[k] === field) ?? field;

/**
 * `subject=usr_1,name-prefix=ci-` (the option may repeat) to a filter. A comma splits only before a
 * known `key=`, so a name prefix may hold commas.
 */
function parseWhere(values: string[]): Record<string, string> {
  const filter: Record<string, string> = {};
  const keys = Object.keys(WHERE_KEYS).join('|');
  for (const part of values.flatMap((v) => v.split(new RegExp(`,(?=(?:${keys})=)`)))) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    const bad = (message: string) =>
      new InvalidInputError(`invalid --where: ${key}: ${message}`, [{ path: key, message }]);
    if (!(key in WHERE_KEYS)) {
      throw bad(`unknown criterion: expected ${Object.keys(WHERE_KEYS).join('=, ')}= (e.g. subject=usr_123)`);
    }
    if (eq < 0) throw bad('expected key=value');
    const field = WHERE_KEYS[key as WhereKey];
    if (field in filter) throw bad('given twice');
    filter[field] = part.slice(eq + 1);
  }
  return filter;
}

/** A filter as the user wrote it: `subject=usr_1, issued-before=…`. */
const describeFilter = (filter: object) =>
  Object.entries(filter as Record<string, string | undefined>)
    .filter(([, v]) => v !== undefined)
    .map(([field, v]) => `${whereKeyOf(field)}=${v}`)
    .join(', ');

/** Asks on the terminal; true only for an explicit yes. */
async function confirm(question: string): Promise<boolean> {
  const { createInterface } = await import('node:readline/promises');
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    return /^y(es)?$/i.test((await rl.question(question)).trim());
  } finally {
    rl.close();
  }
}

/** Progress without a terminal: one plain line on stderr at most every `intervalMs`, and the last. */
function progressLines(label: string, intervalMs = 2_000) {
  let last = 0;
  let pending: string | undefined;
  return {
    update(done: number, total: number) {
      pending = `tokenwarden: ${label} ${done}/${total}`;
      if (Date.now() - last >= intervalMs) {
        process.stderr.write(`${pending}\n`);
        last = Date.now();
        pending = undefined;
      }
    },
    stop() {
      if (pending) process.stderr.write(`${pending}\n`);
      pending = undefined;
    },
  };
}

async function revokeWhere(opts: RevokeCommandOptions, actorGiven: boolean): Promise<void> {
  const { revokeFilterSchema } = await import('./revoke-many.js');
  const { parseInput } = await import('../common/validation.js');
  const rate = opts.rate === undefined ? undefined : Number(opts.rate);
  if (rate !== undefined && (!Number.isFinite(rate) || rate <= 0)) {
    throw new InvalidInputError(`invalid --rate: expected a positive number, got ${opts.rate}`, [
      { path: 'rate', message: 'expected a positive number' },
    ]);
  }
  const max = opts.max === undefined ? undefined : Number(opts.max);
  if (max !== undefined && !(Number.isInteger(max) && max >= 0)) {
    throw new InvalidInputError(`invalid --max: expected a whole number, got ${opts.max}`, [
      { path: 'max', message: 'expected a whole number' },
    ]);
  }
  let filter: Record<string, string> | null = null;
  if (opts.where !== undefined) {
    try {
      // The filter as parsed (an issued-before date becomes its instant) is what the question shows.
      filter = parseInput(revokeFilterSchema, parseWhere(opts.where), '--where') as Record<string, string>;
    } catch (err) {
      if (!(err instanceof InvalidInputError)) throw err;
      const fields = err.fields.map((f) => ({ ...f, path: f.path === '(input)' ? '--where' : whereKeyOf(f.path) }));
      throw new InvalidInputError(
        `invalid --where: ${fields.map((f) => `${f.path}: ${f.message}`).join('; ')}`,
        fields,
      );
    }
  }
  const json = !!opts.json;
  const report = await withWarden(async (tw) => {
    let asOf: string | undefined;
    if (filter !== null) {
      const count = await tw.countMatching(filter);
      asOf = count.asOf;
      if (max !== undefined && count.active > max) {
        throw new InvalidInputError(
          `refusing: ${count.active} active token(s) match ${describeFilter(filter)}, more than --max ${max} (nothing was changed)`,
          [{ path: 'max', message: `${count.active} match, more than ${max}` }],
        );
      }
      const what =
        `${count.active} active token(s) match ${describeFilter(filter)}` +
        (count.dead ? ` (${count.dead} more already dead)` : '');
      if (!opts.yes) {
        if (!process.stdin.isTTY || !process.stderr.isTTY) {
          throw new InvalidInputError(
            `refusing to revoke without confirmation: ${what}; not a terminal, so pass --yes to revoke them (nothing was changed)`,
            [{ path: 'yes', message: 'required without a terminal' }],
          );
        }
        if (!(await confirm(tty`${what}. Revoke them all (reason: ${opts.reason})? [y/N] `))) {
          process.stderr.write('tokenwarden: nothing was revoked\n');
          process.exitCode = EXIT.failure;
          return undefined;
        }
      } else if (!json) {
        process.stderr.write(tty`tokenwarden: ${what}\n`);
      }
    }
    const onTerminal = process.stderr.isTTY && !json;
    const bars = {
      kill: onTerminal ? await progressBar('killing in the store') : progressLines('killed in the store'),
      tell: onTerminal ? await progressBar('telling workflows  ') : progressLines('workflows told'),
    };
    const stop = new AbortController();
    let phase: 'kill' | 'tell' = 'kill';
    const onSignal = () => {
      // The kill phase completes (stopping in it would leave matches valid); telling stops.
      if (phase === 'kill') process.stderr.write('\ntokenwarden: stopping after the kill phase…\n');
      stop.abort();
    };
    process.once('SIGINT', onSignal);
    try {
      const common = {
        ...(rate === undefined ? {} : { rate }),
        signal: stop.signal,
        onOperation: (op: { id: string }) =>
          process.stderr.write(
            `tokenwarden: operation ${op.id}; if interrupted, resume with: tokenwarden revoke --resume ${op.id}\n`,
          ),
        onProgress: (p: { phase: 'kill' | 'tell'; done: number; failed: number; total: number }) => {
          phase = p.phase;
          if (p.phase === 'tell') bars.kill.stop();
          bars[p.phase].update(p.done + p.failed, p.total);
        },
      };
      return opts.resume !== undefined
        ? await tw.revokeMany(null, {
            resume: opts.resume,
            ...(opts.reason !== undefined ? { reason: opts.reason } : {}),
            ...(actorGiven ? { actor: opts.actor } : {}),
            ...common,
          })
        : await tw.revokeMany(filter, {
            reason: opts.reason!,
            actor: opts.actor,
            ...(asOf ? { asOf } : {}),
            ...(max !== undefined ? { max } : {}),
            ...common,
          });
    } finally {
      process.off('SIGINT', onSignal);
      bars.kill.stop();
      bars.tell.stop();
    }
  });
  if (!report) return;
  for (const warning of report.warnings) warn(warning);
  print(json, report, () =>
    [
      tty`operation ${report.operationId} (${describeFilter(report.filter)}; issued up to ${report.cutoff})` +
        (report.resumed ? ' resumed' : ''),
      `${report.killed} token(s) revoked now (${report.killedTotal} by this operation), ${report.alreadyDead} already dead`,
      `${report.signalled} workflow(s) told to propagate` +
        (report.notSignalled.length ? `, ${report.notSignalled.length} not told` : ''),
    ].join('\n'),
  );
  if (report.aborted) {
    process.stderr.write(
      `tokenwarden: interrupted; every matching token is dead in the store. Resume with: tokenwarden revoke --resume ${report.operationId}\n`,
    );
  }
  if (report.notSignalled.length > 0 || report.failed.length > 0 || report.state !== 'complete') {
    process.exitCode = EXIT.failure;
  }
  if (report.aborted) process.exitCode = EXIT_INTERRUPTED;
}

/** `revoke --operations`: the operations not complete, with what a resume needs. */
async function listUnfinishedOperations(json: boolean): Promise<void> {
  const { unfinishedBulkRevokes } = await import('../common/store/bulk-revoke.js');
  const ops = await withStore((s) => unfinishedBulkRevokes(s.pool));
  print(json, ops, () =>
    ops.length === 0
      ? 'no unfinished revoke operations'
      : ops
          .map(
            (op) =>
              tty`${op.id} ${op.state} (${describeFilter(op.filter)}) created ${op.createdAt}, killed ${op.killed}, told ${op.told}; resume: tokenwarden revoke --resume ${op.id}`,
          )
          .join('\n'),
  );
}

// ---------------------------------------------------------------- self-managing tokens

interface PolicySetOptions {
  maxTtl?: string;
  idleTimeout?: string;
  rotateEvery?: string;
  grace?: string;
  warn?: string;
  scopes?: string;
  onSuspicious?: 'rotate' | 'revoke';
  ownerReceiver?: string;
  ownerDir?: string;
  json?: boolean;
}

/** The library's field names as the options a user typed (`maxTtl` → `--max-ttl`). */
async function withPolicyFlags<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (!(err instanceof InvalidInputError) || err.fields.length === 0) throw err;
    const flag = (path: string) => {
      const [head, ...rest] = path.split('.');
      const name = `--${head!.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
      // `name` is the command's argument, `(input)` the whole request: neither is an option.
      return head === '(input)' || head === 'name' ? path : [name, ...rest].join('.');
    };
    const fields = err.fields.map((f) => ({ ...f, path: flag(f.path) }));
    throw new InvalidInputError(
      `${err.message.split(':')[0]}: ${fields.map((f) => `${f.path}: ${f.message}`).join('; ')}`,
      fields,
    );
  }
}

function describePolicy(p: PolicyRecord): string {
  const d = (ms: number | null) => (ms === null ? 'none' : formatDuration(ms));
  return [
    tty`policy         ${p.name} (version ${p.version}, updated ${p.updatedAt})`,
    `max lifetime   ${d(p.maxLifetimeMs)}`,
    `idle timeout   ${d(p.idleTimeoutMs)}`,
    `rotate every   ${d(p.rotateEveryMs)}`,
    `grace          ${p.graceMs === 0 ? '0' : formatDuration(p.graceMs)}`,
    `warn before    ${p.warnBeforeMs.length ? p.warnBeforeMs.map(formatDuration).join(', ') : 'none'}`,
    tty`scopes         ${p.allowedScopes ? p.allowedScopes.join(', ') : 'any'}`,
    `on suspicious  ${p.onSuspicious}`,
    tty`owner          ${p.ownerReceiverId ? `receiver ${p.ownerReceiverId}` : p.ownerDir ? `folder ${p.ownerDir}` : 'none'}`,
  ].join('\n');
}

/** `revoke <tokenId> --at <time>` and `--cancel-scheduled`: the token's workflow owns the instant. */
async function scheduledRevokeCommand(tokenId: string, opts: RevokeCommandOptions): Promise<void> {
  const outcome = await withWarden((tw) =>
    opts.at !== undefined
      ? tw.scheduleRevoke(tokenId, { at: opts.at, reason: opts.reason!, actor: opts.actor })
      : tw.cancelScheduledRevoke(tokenId, { reason: opts.reason!, actor: opts.actor }),
  );
  print(!!opts.json, outcome, () =>
    outcome.revokeAt
      ? tty`${outcome.tokenId} will be revoked at ${outcome.revokeAt}`
      : tty`${outcome.tokenId}: no revocation scheduled`,
  );
}

export function buildProgram(): Command {
  // Subcommands inherit these settings: usage errors throw (exit 2 in main) instead of exiting 1.
  const program = new Command('tokenwarden')
    .description('Token lifecycle orchestrator: every token a defined life and a defined death.')
    .version(packageVersion(), '-V, --version', 'print the version')
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({
      outputError: (text, write) => write(`tokenwarden: ${printable(text.replace(/^error: /, '').trimEnd())}\n`),
    });
  const json = new Option('--json', 'machine-readable output');
  const dataDirOption = () =>
    new Option('--data-dir <dir>', 'where the dev stack keeps its data (default: .data in the package)');

  program
    .command('start')
    .description('run the dev stack: Temporal dev server + Web UI, PostgreSQL, migrations, reconciler, worker')
    .addOption(dataDirOption())
    .option('--no-worker', 'without its in-process worker (run `tokenwarden worker` processes instead)')
    .action(async (opts: { dataDir?: string; worker: boolean }) => {
      const { runStack } = await import('../dev/stack.js');
      const dataDir = opts.dataDir ?? process.env.TOKENWARDEN_DATA_DIR;
      await runStack({ ...(dataDir ? { dataDir } : {}), worker: opts.worker });
    });

  program
    .command('env')
    .description('print the running dev stack\'s connection settings as shell lines: eval "$(tokenwarden env)"')
    .addOption(dataDirOption())
    .action((opts: { dataDir?: string }) => {
      const dataDir = path.resolve(
        opts.dataDir ?? process.env.TOKENWARDEN_DATA_DIR ?? path.join(PACKAGE_ROOT, '.data'),
      );
      const stack = readStackFile(dataDir);
      if (!stack)
        throw new ConfigError(`no dev stack is running from ${dataDir}: start one with \`tokenwarden start\``);
      const lines = [
        shellLine('DATABASE_URL', stack.databaseUrl),
        shellLine('TOKENWARDEN_DB_SCHEMA', stack.databaseSchema),
        shellLine('TEMPORAL_ADDRESS', stack.temporalAddress),
        shellLine('TEMPORAL_NAMESPACE', stack.namespace),
        shellLine('TOKENWARDEN_TASK_QUEUE', stack.taskQueue),
        // Without it a separate worker would refuse the stack's loopback receivers.
        ...(stack.receiverAllow?.length
          ? [shellLine('TOKENWARDEN_RECEIVER_ALLOW', stack.receiverAllow.join(','))]
          : []),
        // Without it a separate worker would refuse the policies' owner folders.
        ...(stack.ownerDirRoot ? [shellLine('TOKENWARDEN_OWNER_DIR_ROOT', stack.ownerDirRoot)] : []),
        // The key stays in its file: a path in the environment, never the key itself.
        stack.masterKeyFile
          ? shellLine('TOKENWARDEN_MASTER_KEY_FILE', stack.masterKeyFile)
          : '# the stack took TOKENWARDEN_MASTER_KEY from its environment: set the same value here',
        stack.payloadKeysFile
          ? shellLine('TOKENWARDEN_PAYLOAD_KEYS_FILE', stack.payloadKeysFile)
          : '# the stack took TOKENWARDEN_PAYLOAD_KEYS from its environment: set the same value here',
        // A separate worker's reconciler signs the audit checkpoints with it.
        stack.auditKeyFile
          ? shellLine('TOKENWARDEN_AUDIT_KEY_FILE', stack.auditKeyFile)
          : '# the stack took TOKENWARDEN_AUDIT_KEY from its environment: set the same value here',
      ];
      process.stdout.write(`${lines.join('\n')}\n`);
    });

  program
    .command('worker')
    .description('run a worker (any number may run on the same task queue)')
    .option('--no-schedule', 'do not create the reconciler schedule')
    .action(async (opts: { schedule: boolean }) => {
      const { runWorkerProcess } = await import('../worker/worker.js');
      const { done } = await runWorkerProcess(loadSettings(), { ensureSchedule: opts.schedule });
      await done;
    });

  program
    .command('migrate')
    .description('apply the store migrations to DATABASE_URL (schema TOKENWARDEN_DB_SCHEMA)')
    .action(async () => {
      const settings = loadStoreSettings();
      const applied = await migrate(settings.databaseUrl, settings.databaseSchema);
      console.log(applied.length ? `applied ${applied.join(', ')}` : 'schema is up to date');
    });

  program
    .command('issue')
    .description(
      'issue a token; the raw token is printed once, here only (or many: --from <file> --out <file>, the raw tokens to the out file only)',
    )
    .option('--subject <id>', 'opaque user or account id (not an email); required without --from')
    .option('--ttl <duration>', 'lifetime, e.g. 30s, 15m, 90d; required without --from')
    .option('--receiver <id>', 'a receiver to notify on revocation (repeatable)', collect)
    .option('--scope <scope>', 'a scope (repeatable)', collect)
    .option('--name <name>', 'a label for people')
    .option('--policy <name>', 'a named policy: a ttl above its max lifetime or a scope it does not allow is refused')
    // Bulk issue (client/bulk): one token per record of the file.
    .option('--from <file>', 'issue one token per record of this file (jsonl or csv; - for stdin)')
    .option('--out <file>', 'with --from: the file the raw tokens are written to (mode 0600; resumed on a rerun)')
    .addOption(bulkFormat())
    .option('--concurrency <n>', 'with --from: workflow starts at once (default 64)')
    .option('--errors <file>', 'with --from: errors file (default <file>.errors.jsonl)')
    .option('--dry-run', 'with --from: validate the records only; nothing is issued')
    .option(
      '--progress-every <duration>',
      'with --from: progress line interval when stderr is no terminal (default 5s)',
    )
    .addOption(json)
    .action(
      async (
        opts: {
          subject?: string;
          ttl?: string;
          receiver?: string[];
          scope?: string[];
          name?: string;
          policy?: string;
          json?: boolean;
          from?: string;
          out?: string;
        } & BulkCommandOptions,
      ) => {
        if (opts.from !== undefined) {
          const single = (['subject', 'ttl', 'receiver', 'scope', 'name', 'policy'] as const).find(
            (o) => opts[o] !== undefined,
          );
          if (single) {
            throw new InvalidInputError(
              `invalid issue: --${single} does not go with --from (each record has its own)`,
              [{ path: single, message: 'not with --from' }],
            );
          }
          const { issueFromCommand } = await import('./bulk/command.js');
          process.exitCode = await issueFromCommand(opts.from, opts.out, opts, withWarden);
          return;
        }
        for (const [option, flag] of [
          ['subject', '--subject <id>'],
          ['ttl', '--ttl <duration>'],
        ] as const) {
          if (opts[option] === undefined) {
            throw new InvalidInputError(`required option '${flag}' not specified (or --from <file> --out <file>)`, [
              { path: option, message: 'required' },
            ]);
          }
        }
        const bulkOnly = (['out', 'concurrency', 'errors', 'dryRun', 'progressEvery', 'format'] as const).find(
          (o) => opts[o] !== undefined,
        );
        if (bulkOnly) {
          throw new InvalidInputError(
            `invalid issue: --${bulkOnly.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} goes with --from only`,
            [{ path: bulkOnly, message: 'with --from only' }],
          );
        }
        const { subject, ttl } = opts as { subject: string; ttl: string };
        const issued = await withWarden((tw) =>
          tw.issue({
            subject,
            ttl,
            receivers: opts.receiver ?? [],
            scopes: opts.scope ?? [],
            ...(opts.name !== undefined ? { name: opts.name } : {}),
            ...(opts.policy !== undefined ? { policy: opts.policy } : {}),
          }),
        );
        print(!!opts.json, issued, () =>
          [
            tty`token id  ${issued.tokenId}`,
            tty`expires   ${issued.expiresAt}`,
            tty`token     ${issued.token}`,
            '(the token is shown once; store it now)',
          ].join('\n'),
        );
      },
    );

  program
    .command('revoke')
    .description(
      'revoke a token, or every token matching --where (all dead in the store first, then each workflow is told); returns once they are dead in the store, then propagation runs',
    )
    .argument('[tokenId]')
    .option('--reason <text>', 'why (audited, sent to receivers); required')
    .option('--actor <who>', 'who revokes (audited)', defaultActor)
    .option(
      '--where <criteria>',
      'revoke every token matching all of subject=<id>,receiver=<id>,issued-before=<ISO date/time, a date alone is midnight UTC>,name-prefix=<text>',
      collect,
    )
    .option('--resume <operationId>', 'carry on an interrupted revoke --where: kill what still matches, tell the rest')
    .option('--rate <n>', 'with --where/--resume: workflows told per second at most (default 200)')
    .option('--yes', 'with --where: revoke without asking (required without a terminal)')
    .option(
      '--max <n>',
      'with --where: refuse, before any kill, when more than n active tokens match (scripts: pass it)',
    )
    .option('--operations', 'list the revoke --where operations not complete (id, filter, created, killed, told)')
    .option(
      '--at <time>',
      "with a token id: revoke at this instant (ISO 8601, e.g. 2026-12-31T18:00:00Z); the token's workflow carries it out",
    )
    .option('--cancel-scheduled', 'with a token id: cancel its scheduled revocation')
    .addOption(json)
    .action(async function (this: Command, tokenId: string | undefined, opts: RevokeCommandOptions) {
      const usage = (message: string) => this.error(`error: ${message}`, { exitCode: EXIT.invalidInput });
      if (opts.operations) {
        if (tokenId !== undefined || opts.where !== undefined || opts.resume !== undefined)
          usage('--operations lists operations: drop the token id, --where and --resume');
        await listUnfinishedOperations(!!opts.json);
        return;
      }
      if (opts.where === undefined && opts.resume === undefined) {
        const bulkOnly = (['rate', 'yes', 'max'] as const).filter((o) => opts[o] !== undefined);
        if (bulkOnly.length > 0)
          usage(`--${bulkOnly.join(', --')}: only with --where or --resume, not with a token id`);
        if (tokenId === undefined) usage('missing a token id, --where <criteria> or --resume <operationId>');
        if (opts.reason === undefined) usage("required option '--reason <text>' not specified");
        if (opts.at !== undefined || opts.cancelScheduled) {
          if (opts.at !== undefined && opts.cancelScheduled)
            usage('--at schedules, --cancel-scheduled cancels: not both');
          await scheduledRevokeCommand(tokenId!, opts);
          return;
        }
        const outcome = await withWarden((tw) =>
          tw.revoke({ tokenId: tokenId!, reason: opts.reason!, actor: opts.actor }),
        );
        if (outcome.warning) warn(outcome.warning);
        print(!!opts.json, outcome, () =>
          outcome.changed
            ? tty`${outcome.tokenId} ${outcome.status} at ${outcome.revokedAt}; propagating to receivers`
            : tty`${outcome.tokenId} was already ${outcome.status} at ${outcome.revokedAt} (by ${outcome.revokedBy}: ${outcome.reason})`,
        );
        return;
      }
      if (tokenId !== undefined) usage('give a token id, or --where/--resume, not both');
      if (opts.at !== undefined || opts.cancelScheduled) usage('--at and --cancel-scheduled: with a token id only');
      if (opts.where !== undefined && opts.resume !== undefined)
        usage('--resume carries on its own filter: drop --where');
      if (opts.resume === undefined && opts.reason === undefined) {
        usage("required option '--reason <text>' not specified");
      }
      await revokeWhere(opts, this.getOptionValueSource('actor') === 'cli');
    });

  program
    .command('offboard')
    .description(
      "revoke every active token of a subject: all dead in the store in one transaction, then each token's workflow is told",
    )
    .argument('<subject>')
    .requiredOption('--reason <text>', 'why (audited, sent to receivers)')
    .option('--actor <who>', 'who offboards (audited)', defaultActor)
    .option('--rate <n>', 'workflows told per second at most (default 200)')
    .addOption(json)
    .action(async (subject: string, opts: { reason: string; actor: string; rate?: string; json?: boolean }) => {
      const rate = opts.rate === undefined ? undefined : Number(opts.rate);
      if (rate !== undefined && (!Number.isFinite(rate) || rate <= 0)) {
        throw new InvalidInputError(`invalid --rate: expected a positive number, got ${opts.rate}`, [
          { path: 'rate', message: 'expected a positive number' },
        ]);
      }
      const report = await withWarden(async (tw) => {
        const bar = process.stderr.isTTY && !opts.json ? await progressBar('telling workflows') : undefined;
        const stop = new AbortController();
        const onSignal = () => stop.abort();
        process.once('SIGINT', onSignal);
        try {
          return await tw.offboard({
            subject,
            reason: opts.reason,
            actor: opts.actor,
            ...(rate === undefined ? {} : { rate }),
            signal: stop.signal,
            onProgress: bar && (({ done, failed, total }) => bar.update(done + failed, total)),
          });
        } finally {
          process.off('SIGINT', onSignal);
          bar?.stop();
        }
      });
      for (const warning of report.warnings) warn(warning);
      print(!!opts.json, report, () => {
        const pending = Object.entries(report.receiversPending).map(([r, n]) => tty`${r} ${n}`);
        return [
          tty`${report.subject}: ${report.revoked.length} token(s) revoked now, ${report.alreadyDead.length} already dead (operation ${report.operationId})`,
          `${report.signalled} workflow(s) told to propagate` +
            (report.notSignalled.length ? `, ${report.notSignalled.length} not told (the reconciler will)` : ''),
          pending.length ? `deliveries not yet confirmed: ${pending.join(', ')}` : 'no delivery pending',
        ].join('\n');
      });
      if (report.notSignalled.length > 0) process.exitCode = EXIT.failure;
    });

  // Bulk import (client/bulk): existing tokens brought under management.
  program
    .command('import')
    .description(
      "bring existing tokens under management: each record's token stored by its hash, its workflow started; resumable (a rerun skips what is done)",
    )
    .argument('<file>', 'records, one per line: jsonl, or csv with a header row (- for stdin)')
    .addOption(bulkFormat())
    .option('--concurrency <n>', 'workflow starts at once (default 64)')
    .option('--dry-run', 'validate the records only; nothing is written or started')
    .option(
      '--errors <file>',
      'one JSON line per invalid or failed record (default <file>.errors.jsonl, for stdin ./tokenwarden-import-errors.jsonl)',
    )
    .option('--progress-every <duration>', 'progress line interval when stderr is no terminal (default 5s)')
    .addOption(json)
    .action(async (file: string, opts: BulkCommandOptions) => {
      const { importCommand } = await import('./bulk/command.js');
      process.exitCode = await importCommand(file, opts, withWarden);
    });

  program
    .command('retry')
    .description('retry every unconfirmed receiver of a revoked token now (resets its backoff); audited')
    .argument('<tokenId>')
    .requiredOption('--reason <text>', 'why (audited)')
    .option('--actor <who>', 'who asks (audited)', defaultActor)
    .addOption(json)
    .action(async (tokenId: string, opts: { reason: string; actor: string; json?: boolean }) => {
      const outcome = await withWarden((tw) =>
        tw.retryPropagation(tokenId, { reason: opts.reason, actor: opts.actor }),
      );
      print(!!opts.json, outcome, () =>
        outcome.retrying.length
          ? tty`${outcome.tokenId}: retrying ${outcome.retrying.join(', ')} now`
          : tty`${outcome.tokenId}: no receiver left to retry`,
      );
    });

  program
    .command('force')
    .description("mark a revoked token's unconfirmed receivers `forced` and complete its propagation; audited")
    .argument('<tokenId>')
    .requiredOption('--reason <text>', 'why (audited)')
    .option('--actor <who>', 'who decides (audited)', defaultActor)
    .addOption(json)
    .action(async (tokenId: string, opts: { reason: string; actor: string; json?: boolean }) => {
      const outcome = await withWarden((tw) => tw.forceComplete(tokenId, { reason: opts.reason, actor: opts.actor }));
      print(
        !!opts.json,
        outcome,
        () => tty`${outcome.tokenId}: forced ${outcome.forced.join(', ') || 'no receiver'}; propagation completes`,
      );
    });

  // ------------------------------------------------ self-managing tokens: rotate, report, suspend, extend, policy
  program
    .command('rotate')
    .description(
      'rotate a token: a new secret (printed once, here only) becomes current; the old one stays valid for the grace, then is revoked at every receiver',
    )
    .argument('<tokenId>')
    .option(
      '--grace <duration>',
      "how long the old secret stays valid, e.g. 10m or 0 (default: the policy's, else 10m)",
    )
    .option('--reason <text>', 'why (audited)')
    .option('--actor <who>', 'who rotates (audited)', defaultActor)
    .addOption(json)
    .action(async (tokenId: string, opts: { grace?: string; reason?: string; actor: string; json?: boolean }) => {
      const rotated = await withWarden((tw) =>
        tw.rotate(tokenId, {
          actor: opts.actor,
          ...(opts.grace !== undefined ? { grace: opts.grace } : {}),
          ...(opts.reason !== undefined ? { reason: opts.reason } : {}),
        }),
      );
      const out = {
        tokenId: rotated.tokenId,
        token: rotated.token,
        credentialId: rotated.credentialId,
        previousValidUntil: rotated.previousValidUntil,
      };
      print(!!opts.json, out, () =>
        [
          tty`token id    ${out.tokenId}`,
          tty`credential  ${out.credentialId}`,
          out.previousValidUntil
            ? tty`old secret  valid until ${out.previousValidUntil}`
            : 'old secret  none was valid',
          tty`token       ${out.token}`,
          '(the token is shown once; store it now)',
        ].join('\n'),
      );
    });

  program
    .command('report')
    .description(
      "report suspicious activity: the token's policy rotates it (grace 0) or revokes it; the evidence is audited",
    )
    .argument('<tokenId>')
    .requiredOption('--reason <text>', 'what was seen (audited)')
    .option('--evidence <json>', 'evidence as JSON, kept in the audit trail (at most 8 KiB)')
    .option('--actor <who>', 'who reports (audited)', defaultActor)
    .addOption(json)
    .action(async (tokenId: string, opts: { reason: string; evidence?: string; actor: string; json?: boolean }) => {
      let evidence: unknown;
      if (opts.evidence !== undefined) {
        try {
          evidence = JSON.parse(opts.evidence);
        } catch {
          throw new InvalidInputError('invalid --evidence: expected JSON, e.g. {"ip":"203.0.113.9"}', [
            { path: 'evidence', message: 'expected JSON' },
          ]);
        }
      }
      const outcome = await withWarden((tw) =>
        tw.reportSuspicious(tokenId, {
          reason: opts.reason,
          actor: opts.actor,
          ...(evidence !== undefined ? { evidence } : {}),
        }),
      );
      print(
        !!opts.json,
        outcome,
        () => tty`${outcome.tokenId}: reported (${outcome.reportId}); its policy says ${outcome.action}`,
      );
    });

  for (const [name, suspend] of [
    ['suspend', true],
    ['resume', false],
  ] as const) {
    program
      .command(name)
      .description(
        suspend
          ? 'suspend a token: it fails verification until resumed, but is not dead (expiry and revoke still run)'
          : 'resume a suspended token',
      )
      .argument('<tokenId>')
      .requiredOption('--reason <text>', 'why (audited)')
      .option('--actor <who>', 'who decides (audited)', defaultActor)
      .addOption(json)
      .action(async (tokenId: string, opts: { reason: string; actor: string; json?: boolean }) => {
        const outcome = await withWarden((tw) =>
          suspend
            ? tw.suspend(tokenId, { reason: opts.reason, actor: opts.actor })
            : tw.resume(tokenId, { reason: opts.reason, actor: opts.actor }),
        );
        print(!!opts.json, outcome, () =>
          outcome.suspended
            ? tty`${outcome.tokenId} suspended at ${outcome.suspendedAt}`
            : tty`${outcome.tokenId} resumed (not suspended)`,
        );
      });
  }

  for (const [name, mode] of [
    ['extend', 'extend'],
    ['shorten', 'shorten'],
  ] as const) {
    program
      .command(name)
      .description(
        mode === 'extend'
          ? "move a token's expiry later, to now + ttl, within its policy's max lifetime (the store first, then its workflow)"
          : "move a token's expiry earlier, to now + ttl (the store first, then its workflow)",
      )
      .argument('<tokenId>')
      .requiredOption('--ttl <duration>', 'the new expiry is now + this, e.g. 30d')
      .requiredOption('--reason <text>', 'why (audited)')
      .option('--actor <who>', 'who decides (audited)', defaultActor)
      .addOption(json)
      .action(async (tokenId: string, opts: { ttl: string; reason: string; actor: string; json?: boolean }) => {
        const input = { ttl: opts.ttl, reason: opts.reason, actor: opts.actor };
        const outcome = await withWarden((tw) =>
          mode === 'extend' ? tw.extend(tokenId, input) : tw.shorten(tokenId, input),
        );
        print(
          !!opts.json,
          outcome,
          () => tty`${outcome.tokenId} expires ${outcome.expiresAt} (was ${outcome.previousExpiresAt})`,
        );
      });
  }

  const policy = program
    .command('policy')
    .description('named policies: lifetime, inactivity, rotation, warnings, scopes');
  policy
    .command('set')
    .description(
      'create or replace a policy (every field: those not given take their defaults); tokens under it change when you apply it',
    )
    .argument('<name>')
    .option('--max-ttl <duration>', 'max lifetime of its tokens, e.g. 90d')
    .option('--idle-timeout <duration>', 'revoke a token unused this long (reason inactive)')
    .option('--rotate-every <duration>', 'rotate automatically; the new secret goes to the owner destination')
    .option('--grace <duration>', 'how long the previous secret stays valid after a rotation (default 10m)')
    .option('--warn <durations>', 'warn the owner this long before expiry or idle revocation, e.g. 30d,7d,1d')
    .option('--scopes <scopes>', 'the only scopes its tokens may have, e.g. read,write (default: any)')
    .addOption(
      new Option('--on-suspicious <action>', 'what a suspicious-activity report does (default revoke)').choices([
        'rotate',
        'revoke',
      ]),
    )
    .option('--owner-receiver <id>', "a receiver that gets the owner's notices, signed (warnings, rotated secrets)")
    .option('--owner-dir <dir>', "a folder where the owner's notices are written as 0600 files (dev stack)")
    .addOption(json)
    .action(async (name: string, opts: PolicySetOptions) => {
      const list = (text: string | undefined) => (text === undefined ? undefined : text.split(','));
      const fields = {
        ...(opts.maxTtl !== undefined ? { maxTtl: opts.maxTtl } : {}),
        ...(opts.idleTimeout !== undefined ? { idleTimeout: opts.idleTimeout } : {}),
        ...(opts.rotateEvery !== undefined ? { rotateEvery: opts.rotateEvery } : {}),
        ...(opts.grace !== undefined ? { grace: opts.grace } : {}),
        ...(opts.warn !== undefined ? { warn: list(opts.warn) } : {}),
        ...(opts.scopes !== undefined ? { scopes: list(opts.scopes) } : {}),
        ...(opts.onSuspicious !== undefined ? { onSuspicious: opts.onSuspicious } : {}),
        ...(opts.ownerReceiver !== undefined ? { ownerReceiver: opts.ownerReceiver } : {}),
        ...(opts.ownerDir !== undefined ? { ownerDir: opts.ownerDir } : {}),
      };
      const saved = await withPolicyFlags(() => withWarden((tw) => tw.setPolicy(name, fields)));
      print(
        !!opts.json,
        saved,
        () =>
          describePolicy(saved) +
          '\n(apply it to tell its tokens: tokenwarden policy apply ' +
          printable(saved.name) +
          ')',
      );
    });
  policy
    .command('show')
    .argument('<name>')
    .addOption(json)
    .action(async (name: string, opts: { json?: boolean }) => {
      // Store-only: no Temporal module is loaded to read a policy.
      const { requirePolicy } = await import('../common/store/policies.js');
      const { parsePolicyName } = await import('../common/validation.js');
      const policyName = parsePolicyName(name);
      const found = await withStore((s) => requirePolicy(s.pool, policyName));
      print(!!opts.json, found, () => describePolicy(found));
    });
  policy
    .command('apply')
    .description(
      'tell every live token of the policy (rate-limited, resumable: a rerun tells those not told yet); each workflow recomputes its deadlines, shortens or revokes (reason policy)',
    )
    .argument('<name>')
    .option('--dry-run', 'list which live tokens would be shortened or revoked, and why; nothing is changed')
    .option('--rate <n>', 'workflows told per second at most (default 200)')
    .addOption(json)
    .action(async (name: string, opts: { dryRun?: boolean; rate?: string; json?: boolean }) => {
      const rate = opts.rate === undefined ? undefined : Number(opts.rate);
      if (rate !== undefined && (!Number.isFinite(rate) || rate <= 0)) {
        throw new InvalidInputError(`invalid --rate: expected a positive number, got ${opts.rate}`, [
          { path: 'rate', message: 'expected a positive number' },
        ]);
      }
      const json = !!opts.json;
      if (opts.dryRun) {
        const report = await withWarden((tw) => tw.applyPolicy(name, { dryRun: true }));
        print(json, report, () =>
          [
            tty`policy ${report.policy} v${report.version} as of ${report.asOf}: ${report.evaluated} live token(s), ${report.unchanged} unchanged`,
            ...report.shorten.map((f) => tty`shorten  ${f.tokenId}  ${f.expiresAt} → ${f.newExpiresAt}  (${f.why})`),
            ...report.revoke.map((f) => tty`revoke   ${f.tokenId}  reason ${f.reason}  (${f.why})`),
          ].join('\n'),
        );
        return;
      }
      const report = await withWarden(async (tw) => {
        const bar = process.stderr.isTTY && !json ? await progressBar('telling workflows') : undefined;
        const stop = new AbortController();
        const onSignal = () => stop.abort();
        process.once('SIGINT', onSignal);
        try {
          return await tw.applyPolicy(name, {
            ...(rate === undefined ? {} : { rate }),
            signal: stop.signal,
            onProgress: bar && (({ done, failed, total }) => bar.update(done + failed, total)),
          });
        } finally {
          process.off('SIGINT', onSignal);
          bar?.stop();
        }
      });
      for (const warning of report.warnings) warn(warning);
      print(
        json,
        report,
        () =>
          tty`policy ${report.policy} v${report.version}: ${report.signalled} workflow(s) told (operation ${report.operationId})` +
          (report.remaining ? tty`, ${report.remaining} not told yet` : ''),
      );
      if (report.aborted) process.exitCode = EXIT_INTERRUPTED;
      else if (report.remaining > 0) process.exitCode = EXIT.failure;
    });

  program
    .command('show')
    .description("a token as the store sees it, with each receiver's delivery state")
    .argument('<tokenId>')
    .addOption(json)
    .action(async (tokenId: string, opts: { json?: boolean }) => {
      const token = await withStore((tw) => tw.show(tokenId));
      print(!!opts.json, token, () => describeToken(token));
    });

  program
    .command('list')
    .description('list tokens, newest first')
    .option('--subject <id>')
    .option('--status <status>', 'active | revoked | expired')
    .option(
      '--propagation <state>',
      'none | pending | complete | stuck (stuck: a receiver unconfirmed past the deadline)',
    )
    .option('--limit <n>', 'at most n tokens', (v) => Number(v), 100)
    .addOption(json)
    .action(
      async (opts: { subject?: string; status?: string; propagation?: string; limit: number; json?: boolean }) => {
        const tokens = await withStore((tw) =>
          tw.list({
            // An empty value is passed on (and refused): it must not silently mean "no filter".
            ...(opts.subject !== undefined ? { subject: opts.subject } : {}),
            ...(opts.status !== undefined ? { status: opts.status as 'active' } : {}),
            ...(opts.propagation !== undefined ? { propagation: opts.propagation as 'stuck' } : {}),
            limit: opts.limit,
          }),
        );
        print(!!opts.json, tokens, () =>
          tokens.length
            ? columns(
                ['TOKEN', 'SUBJECT', 'NAME', 'STATUS', 'PROPAGATION', 'EXPIRES / DIED', 'BY', 'REASON'],
                tokens.map((t) => [
                  t.id,
                  t.subject,
                  t.name ?? '',
                  t.status,
                  t.propagation,
                  t.revokedAt ?? t.expiresAt,
                  t.revokedBy ?? '',
                  t.revokeReason ?? '',
                ]),
              )
            : '(no tokens)',
        );
      },
    );

  // ------------------------------------------------ history of a token (client/history.ts)
  program
    .command('history')
    .description(
      "a token's whole life from its workflow's history (every run; the store's audit events where Temporal no longer holds it)",
    )
    .argument('<tokenId>')
    .addOption(json)
    .action(async (tokenId: string, opts: { json?: boolean }) => {
      const { formatTimeline } = await import('./history.js');
      const entries = await withWarden((tw) => tw.history(tokenId));
      print(!!opts.json, entries, () =>
        formatTimeline(tokenId, entries)
          .map((line) => printable(line))
          .join('\n'),
      );
    });

  const receiver = program.command('receiver').description('downstream services told of every revocation');
  receiver
    .command('add')
    .argument('<id>')
    .requiredOption('--url <url>', 'where signed revocation events are POSTed')
    .option(
      '--probe-url <url>',
      'its verification probe: GET <url>/<tokenId> says whether it still accepts a token; deliveries count once it says no',
    )
    .option('--secret-stdin', 'import an existing whsec_ signing secret from stdin instead of generating one')
    .addOption(json)
    .action(async (id: string, opts: { url: string; probeUrl?: string; secretStdin?: boolean; json?: boolean }) => {
      const secret = opts.secretStdin ? await readStdin() : undefined;
      const added = await withStore((tw) =>
        tw.addReceiver({
          id,
          url: opts.url,
          ...(opts.probeUrl !== undefined ? { probeUrl: opts.probeUrl } : {}),
          ...(secret !== undefined ? { secret } : {}),
        }),
      );
      const out = {
        id: added.id,
        url: added.url,
        probeUrl: added.probeUrl,
        ...(secret === undefined ? { secret: added.secret } : {}),
      };
      const probe = added.probeUrl ? tty` (probe ${added.probeUrl})` : '';
      print(!!opts.json, out, () =>
        secret === undefined
          ? tty`receiver ${added.id} → ${added.url}` +
            probe +
            tty`\nsigning secret ${added.secret}\n(the secret is shown once; give it to the receiver now)`
          : tty`receiver ${added.id} → ${added.url}` + probe + ' (imported secret)',
      );
    });
  receiver
    .command('list')
    .addOption(json)
    .action(async (opts: { json?: boolean }) => {
      const receivers = await withStore((tw) => tw.listReceivers());
      print(!!opts.json, receivers, () =>
        receivers.length
          ? receivers.map((r) => tty`${r.id}  ${r.url}` + (r.probeUrl ? tty`  probe ${r.probeUrl}` : '')).join('\n')
          : '(no receivers)',
      );
    });
  receiver
    .command('remove')
    .argument('<id>')
    .addOption(json)
    .action(async (id: string, opts: { json?: boolean }) => {
      const removed = await withStore((tw) => tw.removeReceiver(id));
      print(
        !!opts.json,
        removed,
        () => tty`receiver ${removed.id} removed (its pending deliveries are cancelled at their next attempt)`,
      );
    });

  receiver
    .command('rekey')
    .description(
      "re-encrypt every receiver's signing secret under TOKENWARDEN_MASTER_KEY (after a key change; old keys in TOKENWARDEN_PREVIOUS_MASTER_KEYS)",
    )
    .addOption(json)
    .action(async (opts: { json?: boolean }) => {
      const outcome = await withStore((tw) => tw.rekeyReceivers());
      for (const f of outcome.failed) {
        process.stderr.write(`tokenwarden: receiver ${f.receiverId} not re-encrypted: ${f.error}\n`);
      }
      print(
        !!opts.json,
        outcome,
        () => `re-encrypted ${outcome.rekeyed.length} signing secret(s) under master key ${outcome.keyId}`,
      );
      if (outcome.failed.length > 0) process.exitCode = EXIT.failure;
    });

  program
    .command('api')
    .description('run the HTTP API (admin endpoints, RFC 7009 revoke, RFC 7662 introspect) until SIGTERM')
    .option('--host <host>', 'address to listen on (TOKENWARDEN_API_HOST, default 127.0.0.1)')
    .option('--port <port>', 'port to listen on (TOKENWARDEN_API_PORT, default 8380)')
    .action(async (opts: { host?: string; port?: string }) => {
      const { runApiProcess } = await import('./api/main.js');
      const api = loadApiSettings({
        ...process.env,
        ...(opts.host !== undefined ? { TOKENWARDEN_API_HOST: opts.host } : {}),
        ...(opts.port !== undefined ? { TOKENWARDEN_API_PORT: opts.port } : {}),
      });
      await runApiProcess(loadSettings(), api);
    });

  const apikey = program.command('apikey').description("keys of the HTTP API's callers (stored hashed)");
  apikey
    .command('create')
    .description('create an API key; the key is printed once, here only')
    .argument('<name>', 'who uses it (audited as the actor of its revocations)')
    .option('--scope <scope>', 'admin | introspect | revoke (repeatable; admin implies all)', collect)
    .addOption(json)
    .action(async (name: string, opts: { scope?: string[]; json?: boolean }) => {
      const { createApiKey } = await import('../common/store/api-keys.js');
      const created = await withStore((s) => createApiKey(s.pool, { name, scopes: opts.scope ?? [] }));
      print(!!opts.json, { id: created.id, key: created.key }, () =>
        [
          tty`api key  ${created.id} (${created.name}: ${created.scopes.join(', ')})`,
          tty`key      ${created.key}`,
          '(the key is shown once; store it now)',
        ].join('\n'),
      );
    });
  apikey
    .command('list')
    .description('list API keys (never the keys themselves)')
    .addOption(json)
    .action(async (opts: { json?: boolean }) => {
      const { listApiKeys } = await import('../common/store/api-keys.js');
      const keys = await withStore((s) => listApiKeys(s.pool));
      print(!!opts.json, keys, () =>
        keys.length
          ? keys
              .map(
                (k) =>
                  tty`${k.id}  ${k.name}  ${k.scopes.join(',')}  ` +
                  (k.revokedAt ? tty`revoked ${k.revokedAt}` : tty`created ${k.createdAt}`),
              )
              .join('\n')
          : '(no API keys)',
      );
    });
  apikey
    .command('revoke')
    .description('revoke an API key (refused by running APIs within their key cache time, 1 s by default)')
    .argument('<id>')
    .addOption(json)
    .action(async (id: string, opts: { json?: boolean }) => {
      const { revokeApiKey } = await import('../common/store/api-keys.js');
      const revoked = await withStore((s) => revokeApiKey(s.pool, id));
      print(!!opts.json, revoked, () => tty`api key ${revoked.id} (${revoked.name}) revoked at ${revoked.revokedAt}`);
    });

  // ---------------------------------------------------------------- audit verify
  const audit = program
    .command('audit')
    .description('the audit trail: hash-chained events per token, verified, and evidence for auditors');
  audit
    .command('verify')
    .description(
      'recompute every chain from its stored text and check the signed checkpoints (exit 1 naming each broken chain and the seq of its first broken link)',
    )
    .option('--token <id>', "only this token's chain (its checkpoint head is still compared)")
    .option('--strict', 'fail (exit 1) when old events are not covered by the latest checkpoint, not only warn')
    .option(
      '--expect-checkpoint <seq:digest>',
      "a checkpoint recorded elsewhere (a reconciler pass's auditCheckpoint seq and digest) that must still be there",
    )
    .addOption(json)
    .action(async (opts: { token?: string; strict?: boolean; expectCheckpoint?: string; json?: boolean }) => {
      const input = {
        ...(opts.token !== undefined ? { tokenId: opts.token } : {}),
        ...(opts.strict ? { strict: true } : {}),
        ...(opts.expectCheckpoint !== undefined ? { expectCheckpoint: opts.expectCheckpoint } : {}),
      };
      const report = await withStore((s) =>
        s.verifyAudit(input).catch((err: unknown) => {
          throw asOptionError(err, 'audit verify', { tokenId: '--token', expectCheckpoint: '--expect-checkpoint' });
        }),
      );
      for (const w of report.warnings) warn(w);
      print(!!opts.json, report, () => {
        const cp = report.checkpoint;
        const lines = [
          `recomputed ${report.chains} chain(s), ${report.events} event(s)` +
            (report.tokenId ? tty` of token ${report.tokenId}` : ''),
          report.key ? tty`checkpoint key ${report.key.keyId} from ${report.key.source}` : 'no checkpoint key',
          cp
            ? tty`compared with checkpoint #${cp.seq} of ${cp.at} (${cp.keyId}: ${cp.chains} chain(s), ${cp.events} event(s)); ${report.checkpointsChecked} checkpoint signature(s) checked`
            : `no checkpoint compared (${report.checkpointsChecked} checked)`,
          ...report.broken.map((b) => tty`BROKEN token ${b.tokenId} seq ${b.seq}: ${b.problem}: ${b.detail}`),
          ...(report.brokenChains > report.broken.length
            ? [`BROKEN ${report.brokenChains - report.broken.length} more chain(s), not named`]
            : []),
          ...report.checkpointProblems.map((p) => tty`BROKEN checkpoint #${p.checkpoint}: ${p.problem}: ${p.detail}`),
          !report.ok
            ? 'audit trail BROKEN'
            : report.key && report.checkpoint
              ? 'audit trail intact'
              : 'chains intact; checkpoints NOT checked',
        ];
        return lines.join('\n');
      });
      if (!report.ok) process.exitCode = EXIT.failure;
    });

  // ------------------------------------------------ audit export: evidence of terminations
  audit
    .command('export')
    .description(
      "one record per token death (revocation or expiry): who asked, why, when it was due, when the store refused it, each receiver's acknowledgement and verification; streamed, oldest first",
    )
    .option(
      '--since <date>',
      'deaths at or after this instant (ISO 8601 date or date-time; a date alone is midnight UTC)',
    )
    .option('--until <date>', 'deaths before this instant (ISO 8601 date or date-time)')
    .option('--subject <id>', "only this subject's tokens")
    .addOption(
      new Option('--format <format>', 'jsonl (one JSON record per line) or csv (one row per death)')
        .choices(DEATH_EXPORT_FORMATS)
        .default('jsonl'),
    )
    .action(async (opts: { since?: string; until?: string; subject?: string; format: DeathExportFormat }) => {
      const filter = {
        ...(opts.since !== undefined ? { since: opts.since } : {}),
        ...(opts.until !== undefined ? { until: opts.until } : {}),
        ...(opts.subject !== undefined ? { subject: opts.subject } : {}),
      };
      await withStore(async (store) => {
        let records: AsyncGenerator<DeathRecord>;
        try {
          records = store.exportDeaths(filter);
        } catch (err) {
          throw asOptionError(err, 'audit export', {});
        }
        async function* lines() {
          if (opts.format === 'csv') yield deathCsvHeader();
          for await (const record of records) {
            yield opts.format === 'csv' ? deathCsvRow(record) : `${printableJson(record)}\n`;
          }
        }
        // pipeline waits for stdout to drain: a slow reader slows the cursor, memory stays flat.
        await pipeline(Readable.from(lines()), process.stdout).catch((err: NodeJS.ErrnoException) => {
          // The reader went away (`| head`): what it wanted was written.
          if (err.code !== 'EPIPE') throw err;
        });
      });
    });

  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Commander has printed the usage error (or the help or version that was asked for).
      process.exitCode = err.exitCode === 0 ? 0 : EXIT.invalidInput;
      return;
    }
    const code =
      err instanceof InvalidInputError
        ? EXIT.invalidInput
        : err instanceof NotFoundError
          ? EXIT.notFound
          : err instanceof TokenStateConflictError
            ? EXIT.conflict
            : EXIT.failure;
    const message = err instanceof Error ? err.message : String(err);
    const known =
      err instanceof InvalidInputError ||
      err instanceof NotFoundError ||
      err instanceof ConfigError ||
      err instanceof PolicyApplyInProgressError ||
      err instanceof TokenStateConflictError;
    process.stderr.write(`tokenwarden: ${printable(message)}\n`);
    if (!known && process.env.TOKENWARDEN_DEBUG) console.error(err);
    process.exitCode = code;
  }
}
