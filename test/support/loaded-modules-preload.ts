/**
 * Preloaded into a child process (`node --import`, see loaded-modules.ts): when the process exits,
 * writes the files of the CommonJS modules it loaded, as a JSON array, to
 * TOKENWARDEN_TEST_LOADED_MODULES. The Temporal SDK, gRPC and protobufjs are CommonJS: an `import`
 * of them lands in this cache too. With TOKENWARDEN_TEST_LOADED_ESM set, the URLs of the ES modules
 * loaded are appended to that file as well (zod, for one, is loaded as ES modules).
 */
import { writeFileSync } from 'node:fs';
import { createRequire, register } from 'node:module';

const file = process.env.TOKENWARDEN_TEST_LOADED_MODULES;
if (file) {
  const cache = createRequire(import.meta.url).cache;
  process.on('exit', () => writeFileSync(file, JSON.stringify(Object.keys(cache))));
}
const esmFile = process.env.TOKENWARDEN_TEST_LOADED_ESM;
if (esmFile) register('./loaded-modules-hooks.js', import.meta.url, { data: { file: esmFile } });
