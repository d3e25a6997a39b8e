/** The `tokenwarden` command as a child process, as a user runs it. */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../common/config.js';
import { runOutput } from './run-record.js';

export interface CliRun {
  args: string[];
  code: number | null;
  stdout: string;
  stderr: string;
}

export function runCli(args: string[], env: Record<string, string>, stdin = ''): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'tokenwarden.js'), ...args], { env });
    // The command's error output is its log (stdout carries issued tokens by design).
    const cliLog = runOutput('cli');
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => {
      stderr += c.toString();
      cliLog(c);
    });
    child.on('error', reject);
    child.on('close', (code) => resolve({ args, code, stdout, stderr }));
    child.stdin.end(stdin);
  });
}
