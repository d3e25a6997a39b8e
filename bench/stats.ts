/** Latency summaries for benchmark scripts. */

/** Field names carry the unit: they go into the benchmark's JSON line as they are. */
export interface LatencySummary {
  n: number;
  p50Ms: number;
  p99Ms: number;
  minMs: number;
  maxMs: number;
  meanMs: number;
}

/** Nearest-rank percentile (the smallest sample with at least p% of the samples at or below it). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) throw new Error('percentile of no samples');
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

export function summarize(samples: readonly number[]): LatencySummary {
  const sorted = [...samples].sort((a, b) => a - b);
  return {
    n: sorted.length,
    p50Ms: ms(percentile(sorted, 50)),
    p99Ms: ms(percentile(sorted, 99)),
    minMs: ms(sorted[0]!),
    maxMs: ms(sorted[sorted.length - 1]!),
    meanMs: ms(sorted.reduce((sum, x) => sum + x, 0) / sorted.length),
  };
}

/** Milliseconds rounded to microseconds: finer digits would be noise. */
export const ms = (value: number): number => Math.round(value * 1000) / 1000;

export const ratio = (value: number, floor: number): number => Math.round((value / floor) * 100) / 100;
