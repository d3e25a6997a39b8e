/**
 * Progress of a bulk run on stderr: a bar with count, rate and ETA on a terminal (cli-progress), or
 * without one (CI, a log file) a plain line every few seconds. The total is known when reading a
 * file (its records were counted first); reading stdin, the count and rate are shown without a total.
 */
import { formatDuration } from '../../common/durations.js';
import type { BulkProgress } from './pipeline.js';

export interface ProgressView {
  update(progress: BulkProgress): void;
  stop(): void;
}

/** How often the plain line is written when stderr is no terminal (TOKENWARDEN_PROGRESS_EVERY). */
export const PLAIN_PROGRESS_EVERY_MS = 5_000;

/** Time left at the run's average rate so far (steadier than the last few updates' rate). */
const eta = (total: number | undefined, done: number, rate: number) =>
  total === undefined || rate <= 0 ? '…' : formatDuration(Math.max(1, Math.ceil((total - done) / rate)) * 1000);

const perSecond = (done: number, startedAt: number) => done / Math.max(0.001, (Date.now() - startedAt) / 1000);

export async function progressView(
  label: string,
  total: number | undefined,
  stream: NodeJS.WriteStream = process.stderr,
  plainEveryMs = PLAIN_PROGRESS_EVERY_MS,
): Promise<ProgressView> {
  const startedAt = Date.now();
  let last: BulkProgress = { done: 0, started: 0, existing: 0, invalid: 0, failed: 0 };
  const problems = () => (last.invalid || last.failed ? ` · ${last.invalid} invalid, ${last.failed} failed` : '');

  if (!stream.isTTY) {
    const line = () => {
      const rate = perSecond(last.done, startedAt);
      const left = total !== undefined && last.done < total ? ` · ETA ${eta(total, last.done, rate)}` : '';
      const of = total !== undefined ? `/${total} (${Math.floor((100 * last.done) / Math.max(1, total))}%)` : '';
      stream.write(`tokenwarden: ${label}: ${last.done}${of} records · ${Math.round(rate)}/s${left}${problems()}\n`);
    };
    const timer = setInterval(line, plainEveryMs);
    timer.unref();
    return {
      update: (progress) => void (last = progress),
      stop: () => clearInterval(timer),
    };
  }

  const { SingleBar, Presets } = await import('cli-progress');
  const format =
    total !== undefined
      ? `${label} [{bar}] {value}/{total} · {percentage}% · {rate}/s · ETA {etaText}{problems}`
      : `${label} {value} records · {rate}/s{problems}`;
  const bar = new SingleBar({ format, stream, hideCursor: true, etaBuffer: 200, fps: 5 }, Presets.shades_classic);
  bar.start(total ?? 0, 0, { rate: 0, problems: '', etaText: '…' });
  return {
    update(progress) {
      last = progress;
      const rate = perSecond(progress.done, startedAt);
      bar.update(progress.done, {
        rate: Math.round(rate),
        problems: problems(),
        etaText: eta(total, progress.done, rate),
      });
    },
    stop: () => bar.stop(),
  };
}
