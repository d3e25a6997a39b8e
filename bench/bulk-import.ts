/**
 * Import of N existing tokens against the engine's floor, in one run on one stack:
 *   raw       `client.workflow.start` of the token workflow (its type, its input and start options
 *             through startTokenWorkflow, fresh ids, the real task queue: the workflows run as
 *             imported ones do), nothing else; N/2 before and N/2 after the others, so drift shows
 *   library   `TokenWarden.startMany(records, { concurrency })`
 *   cli       `tokenwarden import <file> --concurrency C --json` as a child process (its peak RSS)
 * all at the same concurrency, each from a quiet stack. Only the calls are timed; each workflow's
 * first task runs on the worker meanwhile, for every series alike.
 * Memory: `tokenwarden import --dry-run` over files of growing size (the same reader and
 * validation, no store or Temporal), peak RSS of each.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { BulkReport } from '../client/bulk/pipeline.js';
import { newTokenId } from '../common/ids.js';
import * as store from '../common/store/index.js';
import type { TokenRecord } from '../common/store/index.js';
import { startTokenWorkflow } from '../common/temporal.js';
import { runCliMeasured, type ChildRun } from './bulk-child.js';
import { importRecord, writeImportFile } from './bulk-records.js';
import { addReceiver, round, type Rig } from './scale-rig.js';
import { ratio } from './stats.js';
import { mapLimited } from './workflows.js';

export const GOAL_IMPORT_RATIO = 0.8;

export interface Timed {
  calls: number;
  seconds: number;
  perSecond: number;
}

const timed = (calls: number, ms: number): Timed => ({
  calls,
  seconds: round(ms / 1000, 2),
  perSecond: round(calls / (ms / 1000), 1),
});

/** A stored token whose fields give the raw starts their input (ids and subjects replaced). */
export async function tokenTemplate(rig: Rig, receiver: string): Promise<TokenRecord> {
  const { tokenId } = await rig.warden.issue({ subject: `usr_template_${rig.tag}`, receivers: [receiver], ttl: '30d' });
  return store.requireToken(rig.warden.pool, tokenId);
}

/** `count` raw starts of the token workflow at `concurrency`, each a fresh id; ms. */
export async function rawStarts(
  rig: Rig,
  template: TokenRecord,
  count: number,
  concurrency: number,
  subjectPrefix: string,
): Promise<number> {
  const { taskQueue } = rig.stack.settings.temporal;
  const timing = rig.warden.settings.timing;
  const t0 = performance.now();
  await mapLimited(count, concurrency, async (i) => {
    rig.signal.throwIfAborted();
    const token = { ...template, id: newTokenId(), subject: `${subjectPrefix}_${Math.floor(i / 10)}` };
    await startTokenWorkflow(rig.client, token, taskQueue, timing);
  });
  return performance.now() - t0;
}

export interface ImportOptions {
  tokens: number;
  concurrency: number;
  cli: boolean;
  settle: () => Promise<unknown>;
}

export async function importSection(rig: Rig, opts: ImportOptions) {
  const { id: receiver } = await addReceiver(rig, 'import');
  const template = await tokenTemplate(rig, receiver);
  const half = Math.ceil(opts.tokens / 2);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bench-bulk-'));
  try {
    rig.say(`  raw starts, first half: ${half} at concurrency ${opts.concurrency}`);
    await opts.settle();
    let rawMs = await rawStarts(rig, template, half, opts.concurrency, `usr_raw_${rig.tag}_a`);
    const rawFirst = timed(half, rawMs);
    rig.say(`    ${rawFirst.perSecond}/s`);

    let library: Timed & { report: BulkReport };
    {
      const records = Array.from({ length: opts.tokens }, (_, i) =>
        importRecord(i, { tag: `${rig.tag}l`, receiver, subjectPrefix: 'usr_lib' }),
      );
      await opts.settle();
      rig.say(`  startMany: ${opts.tokens} records at concurrency ${opts.concurrency}`);
      const t0 = performance.now();
      const report = await rig.warden.startMany(records, { concurrency: opts.concurrency, signal: rig.signal });
      if (report.started !== opts.tokens)
        throw new Error(`startMany started ${report.started} of ${opts.tokens}: ${JSON.stringify(report)}`);
      library = { ...timed(opts.tokens, performance.now() - t0), report };
      rig.say(`    ${library.perSecond}/s (${report.started} started)`);
    }

    let cli: (Timed & { summary: unknown; child: Omit<ChildRun, 'stdout' | 'stderr'> }) | { skipped: string };
    if (opts.cli) {
      const file = path.join(dir, 'import.jsonl');
      const { bytes } = await writeImportFile(file, opts.tokens, (i) =>
        importRecord(i, { tag: `${rig.tag}c`, receiver, subjectPrefix: 'usr_cli' }),
      );
      await opts.settle();
      rig.say(
        `  tokenwarden import: ${opts.tokens} lines (${round(bytes / 2 ** 20, 1)} MiB) at concurrency ${opts.concurrency}`,
      );
      const child = await runCliMeasured(
        ['import', file, '--format', 'jsonl', '--concurrency', String(opts.concurrency), '--json'],
        rig.stack.clientEnv,
        { signal: rig.signal },
      );
      cli = cliFigures(child, opts.tokens);
      rig.say(`    ${cli.perSecond}/s, peak RSS ${child.peakRssMiB} MiB`);
    } else {
      cli = { skipped: '--no-cli' };
    }

    rig.say(`  raw starts, second half: ${opts.tokens - half}`);
    await opts.settle();
    const secondMs = await rawStarts(rig, template, opts.tokens - half, opts.concurrency, `usr_raw_${rig.tag}_b`);
    const rawSecond = timed(opts.tokens - half, secondMs);
    rawMs += secondMs;
    rig.say(`    ${rawSecond.perSecond}/s`);
    const raw = {
      ...timed(opts.tokens, rawMs),
      firstHalfPerSecond: rawFirst.perSecond,
      secondHalfPerSecond: rawSecond.perSecond,
    };

    const vsRaw = (side: typeof library | typeof cli) =>
      'perSecond' in side ? ratio(side.perSecond, raw.perSecond) : null;
    return {
      tokens: opts.tokens,
      concurrency: opts.concurrency,
      raw,
      library,
      cli,
      ratios: { libraryVsRaw: vsRaw(library), cliVsRaw: vsRaw(cli) },
      goalRatio: GOAL_IMPORT_RATIO,
      goalMet: {
        library: vsRaw(library) === null ? null : vsRaw(library)! >= GOAL_IMPORT_RATIO,
        cli: vsRaw(cli) === null ? null : vsRaw(cli)! >= GOAL_IMPORT_RATIO,
      },
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The CLI child's rate counts its whole life (start-up, reading, the summary): what a user waits. */
function cliFigures(child: ChildRun, tokens: number) {
  const summary = lastJsonLine(child.stdout);
  if (child.exitCode !== 0 || !summary) {
    throw new Error(`tokenwarden import exited with ${child.exitCode}:\n${child.stderr.slice(-4000)}`);
  }
  const { exitCode, seconds, peakRssMiB, rssAlongMiB, samples } = child;
  return {
    ...timed(tokens, seconds * 1000),
    summary,
    child: { exitCode, seconds, peakRssMiB, rssAlongMiB, samples },
  };
}

function lastJsonLine(text: string): unknown {
  const line = text.trim().split('\n').at(-1);
  try {
    return line ? JSON.parse(line) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * `tokenwarden import --dry-run` over files of each size: peak RSS should not grow with the file.
 * Each file is written, read once, and removed before the next.
 */
export async function memorySection(rig: Rig, opts: { lines: number[] }) {
  const { id: receiver } = await addReceiver(rig, 'dryrun');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tokenwarden-bench-bulk-'));
  const runs = [];
  try {
    for (const lines of opts.lines) {
      const file = path.join(dir, `dry-${lines}.jsonl`);
      const { bytes } = await writeImportFile(file, lines, (i) =>
        importRecord(i, { tag: `${rig.tag}d`, receiver, subjectPrefix: 'usr_dry' }),
      );
      rig.say(`  tokenwarden import --dry-run: ${lines} lines (${round(bytes / 2 ** 20, 1)} MiB)`);
      const child = await runCliMeasured(
        ['import', file, '--format', 'jsonl', '--dry-run', '--json'],
        rig.stack.clientEnv,
        {
          signal: rig.signal,
        },
      );
      await rm(file, { force: true });
      const summary = lastJsonLine(child.stdout);
      if (child.exitCode !== 0 || !summary) {
        throw new Error(`tokenwarden import --dry-run exited with ${child.exitCode}:\n${child.stderr.slice(-4000)}`);
      }
      rig.say(
        `    ${child.seconds} s, peak RSS ${child.peakRssMiB} MiB (along the run: ${child.rssAlongMiB.join(' / ')} MiB)`,
      );
      runs.push({
        lines,
        fileMiB: round(bytes / 2 ** 20, 1),
        seconds: child.seconds,
        linesPerSecond: round(lines / child.seconds),
        peakRssMiB: child.peakRssMiB,
        rssAlongMiB: child.rssAlongMiB,
        summary,
      });
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const first = runs[0];
  const last = runs.at(-1);
  return {
    measuredBy: `VmHWM of the child from /proc/<pid>/status, sampled every 25 ms`,
    runs,
    peakGrowth: first && last && first !== last ? ratio(last.peakRssMiB, first.peakRssMiB) : null,
  };
}
