/**
 * Preloaded into a child process (`node --import`, see loaded-modules.ts): when the process exits,
 * writes the files of the CommonJS modules it loaded, as a JSON array, to
 * TOKENWARDEN_TEST_LOADED_MODULES. The Temporal SDK, gRPC and protobufjs are CommonJS: an `import`
 * of them lands in this cache too.
 */
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const file = process.env.TOKENWARDEN_TEST_LOADED_MODULES;
if (file) {
  const cache = createRequire(import.meta.url).cache;
  process.on('exit', () => writeFileSync(file, JSON.stringify(Object.keys(cache))));
}
