/** The `tokenwarden` command. Human output by default, `--json` for scripts; one-line errors. */
import { Command, Option } from 'commander';
import { loadSettings } from '../common/config.js';
import { migrate } from '../common/db.js';
import { ConfigError, InvalidInputError, NotFoundError } from '../common/errors.js';
import { TokenWarden, type TokenView } from './index.js';

const EXIT = { failure: 1, invalidInput: 2, notFound: 3 } as const;

function print(json: boolean, value: unknown, human: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(value)}\n` : `${human()}\n`);
}

async function withWarden<T>(fn: (tw: TokenWarden) => Promise<T>): Promise<T> {
  const tw = await TokenWarden.connect(loadSettings());
  try {
    return await fn(tw);
  } finally {
    await tw.close();
  }
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('paste the signing secret, then Ctrl-D: ');
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').trim();
}

const collect = (value: string, previous: string[] = []) => [...previous, value];

function describeToken(t: TokenView): string {
  const lines = [
    `token        ${t.id}`,
    `subject      ${t.subject}${t.name ? ` (${t.name})` : ''}`,
    `status       ${t.status}${t.valid ? ' (valid)' : ''}`,
    `propagation  ${t.propagation}`,
    `issued       ${t.issuedAt}`,
    `expires      ${t.expiresAt}`,
  ];
  if (t.revokedAt) lines.push(`revoked      ${t.revokedAt} by ${t.revokedBy}: ${t.revokeReason}`);
  for (const d of t.deliveries) {
    lines.push(
      `receiver     ${d.receiverId}: ${d.status}, ${d.attempts} attempt(s)${d.lastError ? `, last error: ${d.lastError}` : ''}`,
    );
  }
  return lines.join('\n');
}

export function buildProgram(): Command {
  const program = new Command('tokenwarden')
    .description('Token lifecycle orchestrator: every token a defined life and a defined death.')
    .showHelpAfterError(false)
    .configureOutput({ outputError: (text, write) => write(`tokenwarden: ${text.replace(/^error: /, '')}`) });
  const json = new Option('--json', 'machine-readable output');

  program
    .command('start')
    .description('run the dev stack: Temporal dev server + Web UI, PostgreSQL, migrations, reconciler, worker')
    .option('--data-dir <dir>', 'where the dev stack keeps its data (default: .data in the package)')
    .action(async (opts: { dataDir?: string }) => {
      const { runStack } = await import('../dev/stack.js');
      const settingsDir = opts.dataDir ?? process.env.TOKENWARDEN_DATA_DIR;
      await runStack({ ...(settingsDir ? { dataDir: settingsDir } : {}) });
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
      const settings = loadSettings();
      const applied = await migrate(settings.databaseUrl, settings.databaseSchema);
      console.log(applied.length ? `applied ${applied.join(', ')}` : 'schema is up to date');
    });

  program
    .command('issue')
    .description('issue a token; the raw token is printed once, here only')
    .requiredOption('--subject <id>', 'opaque user or account id (not an email)')
    .requiredOption('--ttl <duration>', 'lifetime, e.g. 30s, 15m, 90d')
    .option('--receiver <id>', 'a receiver to notify on revocation (repeatable)', collect)
    .option('--scope <scope>', 'a scope (repeatable)', collect)
    .option('--name <name>', 'a label for people')
    .addOption(json)
    .action(
      async (opts: {
        subject: string;
        ttl: string;
        receiver?: string[];
        scope?: string[];
        name?: string;
        json?: boolean;
      }) => {
        const issued = await withWarden((tw) =>
          tw.issue({
            subject: opts.subject,
            ttl: opts.ttl,
            receivers: opts.receiver ?? [],
            scopes: opts.scope ?? [],
            ...(opts.name ? { name: opts.name } : {}),
          }),
        );
        print(!!opts.json, issued, () =>
          [
            `token id  ${issued.tokenId}`,
            `expires   ${issued.expiresAt}`,
            `token     ${issued.token}`,
            '(the token is shown once; store it now)',
          ].join('\n'),
        );
      },
    );

  program
    .command('revoke')
    .description('revoke a token: returns once it is dead in the store, then propagation runs')
    .argument('<tokenId>')
    .requiredOption('--reason <text>', 'why (audited, sent to receivers)')
    .option('--actor <who>', 'who revokes (audited)', process.env.USER ? `cli:${process.env.USER}` : 'cli')
    .addOption(json)
    .action(async (tokenId: string, opts: { reason: string; actor: string; json?: boolean }) => {
      const outcome = await withWarden((tw) => tw.revoke({ tokenId, reason: opts.reason, actor: opts.actor }));
      if (outcome.warning) process.stderr.write(`tokenwarden: warning: ${outcome.warning}\n`);
      print(!!opts.json, outcome, () =>
        outcome.changed
          ? `${outcome.tokenId} ${outcome.status} at ${outcome.revokedAt}; propagating to receivers`
          : `${outcome.tokenId} was already ${outcome.status} at ${outcome.revokedAt} (by ${outcome.revokedBy}: ${outcome.reason})`,
      );
    });

  program
    .command('show')
    .description("a token as the store sees it, with each receiver's delivery state")
    .argument('<tokenId>')
    .addOption(json)
    .action(async (tokenId: string, opts: { json?: boolean }) => {
      const token = await withWarden((tw) => tw.show(tokenId));
      print(!!opts.json, token, () => describeToken(token));
    });

  program
    .command('list')
    .description('list tokens, newest first')
    .option('--subject <id>')
    .option('--status <status>', 'active | revoked | expired')
    .option('--limit <n>', 'at most n tokens', (v) => Number(v), 100)
    .addOption(json)
    .action(async (opts: { subject?: string; status?: string; limit: number; json?: boolean }) => {
      const tokens = await withWarden((tw) =>
        tw.list({
          ...(opts.subject ? { subject: opts.subject } : {}),
          ...(opts.status ? { status: opts.status as 'active' } : {}),
          limit: opts.limit,
        }),
      );
      print(!!opts.json, tokens, () =>
        tokens.length
          ? tokens
              .map(
                (t) =>
                  `${t.id}  ${t.subject}  ${t.status.padEnd(7)}  ${t.propagation.padEnd(8)}  expires ${t.expiresAt}`,
              )
              .join('\n')
          : '(no tokens)',
      );
    });

  const receiver = program.command('receiver').description('downstream services told of every revocation');
  receiver
    .command('add')
    .argument('<id>')
    .requiredOption('--url <url>', 'where signed revocation events are POSTed')
    .option('--secret-stdin', 'import an existing whsec_ signing secret from stdin instead of generating one')
    .addOption(json)
    .action(async (id: string, opts: { url: string; secretStdin?: boolean; json?: boolean }) => {
      const secret = opts.secretStdin ? await readStdin() : undefined;
      const added = await withWarden((tw) =>
        tw.addReceiver({ id, url: opts.url, ...(secret !== undefined ? { secret } : {}) }),
      );
      const out = { id: added.id, url: added.url, ...(secret === undefined ? { secret: added.secret } : {}) };
      print(!!opts.json, out, () =>
        secret === undefined
          ? `receiver ${added.id} → ${added.url}\nsigning secret ${added.secret}\n(the secret is shown once; give it to the receiver now)`
          : `receiver ${added.id} → ${added.url} (imported secret)`,
      );
    });
  receiver
    .command('list')
    .addOption(json)
    .action(async (opts: { json?: boolean }) => {
      const receivers = await withWarden((tw) => tw.listReceivers());
      print(!!opts.json, receivers, () =>
        receivers.length ? receivers.map((r) => `${r.id}  ${r.url}`).join('\n') : '(no receivers)',
      );
    });
  receiver
    .command('remove')
    .argument('<id>')
    .addOption(json)
    .action(async (id: string, opts: { json?: boolean }) => {
      const removed = await withWarden((tw) => tw.removeReceiver(id));
      print(
        !!opts.json,
        removed,
        () => `receiver ${removed.id} removed (its pending deliveries are cancelled at their next attempt)`,
      );
    });

  receiver
    .command('rekey')
    .description(
      "re-encrypt every receiver's signing secret under TOKENWARDEN_MASTER_KEY (after a key change; old keys in TOKENWARDEN_PREVIOUS_MASTER_KEYS)",
    )
    .addOption(json)
    .action(async (opts: { json?: boolean }) => {
      const outcome = await withWarden((tw) => tw.rekeyReceivers());
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

  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    const code =
      err instanceof InvalidInputError
        ? EXIT.invalidInput
        : err instanceof NotFoundError
          ? EXIT.notFound
          : EXIT.failure;
    const message = err instanceof Error ? err.message : String(err);
    const known = err instanceof InvalidInputError || err instanceof NotFoundError || err instanceof ConfigError;
    process.stderr.write(`tokenwarden: ${message}\n`);
    if (!known && process.env.TOKENWARDEN_DEBUG) console.error(err);
    process.exitCode = code;
  }
}
