/** Human durations (`30s`, `15m`, `2h`, `90d`, `500ms`) to milliseconds. Pure: used by workflows too. */
const UNIT_MS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 604_800_000,
};

const DURATION_RE = /^(\d+)(ms|s|m|h|d|w)$/;

/** Returns the duration in ms, or undefined when the text is not a duration like `30s`, `15m`, `90d`. */
export function parseDuration(text: string): number | undefined {
  const match = DURATION_RE.exec(text.trim());
  if (!match) return undefined;
  const [, amount, unit] = match;
  const ms = Number(amount) * (UNIT_MS[unit as string] ?? NaN);
  return Number.isSafeInteger(ms) && ms > 0 ? ms : undefined;
}

export const DURATION_HINT = 'a duration such as 500ms, 30s, 15m, 2h or 90d';

/** The inverse of parseDuration, in the largest unit that divides it (`365d`, `2w`, `90s`). */
export function formatDuration(ms: number): string {
  for (const unit of ['w', 'd', 'h', 'm', 's'] as const) {
    const size = UNIT_MS[unit]!;
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}
