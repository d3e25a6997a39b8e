#!/usr/bin/env node
// The `tokenwarden` command; the TypeScript is compiled into dist/ by `npm install` (prepare).
import { existsSync } from 'node:fs';

const cli = new URL('../dist/client/cli.js', import.meta.url);
if (!existsSync(cli)) {
  process.stderr.write('tokenwarden: not built yet: run `npm install` (or `npm run build`) in the package\n');
  process.exit(1);
}
const { main } = await import(cli.href);
await main(process.argv);
