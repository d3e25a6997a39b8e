/**
 * CLI start-up: wall time of store-only commands run as a user runs them (`node bin/tokenwarden.js …`
 * with `tokenwarden env`'s variables), against `node -e 0`, interleaved in rotating order; and
 * `npx tokenwarden list --json`, the way the README's first steps run it.
 */
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { PACKAGE_ROOT } from '../common/config.js';
import { CLI_PATH } from './scale-stack.js';
import { addReceiver, round, type Rig } from './scale-rig.js';
import { summarize } from './stats.js';

export const GOAL_CLI_MS = 300;
const NPX_RUNS = 3;

interface Command {
  name: string;
  command: string;
  args: string[];
}

/** Wall time of one run, from spawn to exit; throws when it fails. */
function timeRun(cmd: Command, env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd.command, cmd.args, { cwd: PACKAGE_ROOT, env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
    child.once('error', reject);
    child.once('close', (code) => {
      const ms = performance.now() - t0;
      if (code === 0) resolve(ms);
      else reject(new Error(`\`${cmd.name}\` exited with code ${code}: ${stderr.trim()}`));
    });
  });
}

export async function cliSection(rig: Rig, opts: { runs: number }) {
  const { id } = await addReceiver(rig, 'cli');
  const { tokenId } = await rig.warden.issue({ subject: `usr_cli_${rig.tag}`, receivers: [id], ttl: '30d' });
  const node = process.execPath;
  const commands: Command[] = [
    { name: 'node -e 0', command: node, args: ['-e', '0'] },
    { name: 'list --json', command: node, args: [CLI_PATH, 'list', '--json'] },
    { name: 'show <id>', command: node, args: [CLI_PATH, 'show', tokenId] },
    { name: 'receiver list', command: node, args: [CLI_PATH, 'receiver', 'list'] },
  ];
  const env = rig.stack.clientEnv;
  const samples = new Map<string, number[]>(commands.map((c) => [c.name, []]));
  for (let i = 0; i < opts.runs; i++) {
    rig.signal.throwIfAborted();
    for (let k = 0; k < commands.length; k++) {
      const cmd = commands[(i + k) % commands.length]!;
      samples.get(cmd.name)!.push(await timeRun(cmd, env));
    }
  }
  const npx: Command = { name: 'npx tokenwarden list --json', command: 'npx', args: ['tokenwarden', 'list', '--json'] };
  const npxRuns: number[] = [];
  for (let i = 0; i < NPX_RUNS; i++) npxRuns.push(await timeRun(npx, env));

  const median = (name: string) => round(summarize(samples.get(name)!).p50Ms);
  const storeOnly = ['list --json', 'show <id>', 'receiver list'];
  return {
    runs: opts.runs,
    medianMs: Object.fromEntries(commands.map((c) => [c.name, median(c.name)])),
    maxMs: Object.fromEntries(commands.map((c) => [c.name, round(summarize(samples.get(c.name)!).maxMs)])),
    npxListJsonMedianMs: round(summarize(npxRuns).p50Ms),
    npxRuns: NPX_RUNS,
    goalMs: GOAL_CLI_MS,
    goalMet: storeOnly.every((name) => median(name) <= GOAL_CLI_MS),
  };
}
