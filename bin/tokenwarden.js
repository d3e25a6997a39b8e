#!/usr/bin/env node
// The `tokenwarden` command; the TypeScript is compiled into dist/ by `npm install` (prepare).
import { existsSync } from 'node:fs';
import module from 'node:module';

// Node ≥ 22.1 keeps the compiled code of the modules a command loads (in the OS temp folder), so the
// next command starts without compiling them again; older Node has no such cache.
module.enableCompileCache?.();

const cli = new URL('../dist/client/cli.js', import.meta.url);
if (!existsSync(cli)) {
  process.stderr.write('tokenwarden: not built yet: run `npm install` (or `npm run build`) in the package\n');
  process.exit(1);
}
const { main } = await import(cli.href);
await main(process.argv);
