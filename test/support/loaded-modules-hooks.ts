/**
 * Module hooks registered by loaded-modules-preload.ts when asked to record ES modules too: appends
 * the URL of every module Node loads through `import` to a file, one a line.
 */
import { appendFileSync } from 'node:fs';

let file: string | undefined;

export function initialize(data: { file: string }): void {
  file = data.file;
}

export async function load(
  url: string,
  context: unknown,
  nextLoad: (url: string, context: unknown) => Promise<unknown>,
): Promise<unknown> {
  if (file) appendFileSync(file, `${url}\n`);
  return nextLoad(url, context);
}
