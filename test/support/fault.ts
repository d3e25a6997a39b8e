/** Small tools of fault-injection tests: sizes from the environment, a replayable random source, lanes. */
import type { Client } from '@temporalio/client';
import { parseDuration } from '../../common/durations.js';
import { tokenWorkflowId } from '../../common/names.js';
import type { TokenLifecycleResult } from '../../common/messages.js';

export function envInt(name: string, fallback: number): number {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  if (!/^\d+$/.test(text)) throw new Error(`${name} must be a whole number, got ${JSON.stringify(text)}`);
  return Number(text);
}

export function envDuration(name: string, fallback: string): number {
  const text = process.env[name] || fallback;
  const ms = parseDuration(text);
  if (ms === undefined) throw new Error(`${name} must be a duration such as 5s, got ${JSON.stringify(text)}`);
  return ms;
}

/** mulberry32: the same seed gives the same kill points, so a failing run can be replayed. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** fn over every item with at most `lanes` calls in flight; results in item order. */
export async function inLanes<T, R>(
  items: T[],
  lanes: number,
  fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(lanes, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        results[i] = await fn(items[i]!, i);
      }
    }),
  );
  return results;
}

/** The result of every token's workflow, or an error naming those still running after `timeoutMs`. */
export async function workflowResults(
  client: Client,
  tokenIds: string[],
  timeoutMs: number,
): Promise<TokenLifecycleResult[]> {
  const finished = new Set<string>();
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const running = tokenIds.filter((id) => !finished.has(id));
      reject(new Error(`after ${timeoutMs} ms, ${running.length} workflow(s) still running: ${running.join(', ')}`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([
      Promise.all(
        tokenIds.map(async (id) => {
          const result = (await client.workflow.getHandle(tokenWorkflowId(id)).result()) as TokenLifecycleResult;
          finished.add(id);
          return result;
        }),
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}
