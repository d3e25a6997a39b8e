/** Which modules a child process loads, recorded by loaded-modules-preload.ts. */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { PACKAGE_ROOT } from '../../common/config.js';

const PRELOAD = pathToFileURL(path.join(PACKAGE_ROOT, 'dist', 'test', 'support', 'loaded-modules-preload.js')).href;
const TEMPORAL_SDK = /[\\/]node_modules[\\/](@temporalio|@grpc|protobufjs)[\\/]/;

/** Environment for a child process that writes the modules it loaded to `file` when it exits. */
export const recordingModulesTo = (file: string): Record<string, string> => ({
  NODE_OPTIONS: `--import=${PRELOAD}`,
  TOKENWARDEN_TEST_LOADED_MODULES: file,
});

/** As recordingModulesTo, plus the ES modules (in `${file}.esm`): every file the process loaded. */
export const recordingAllModulesTo = (file: string): Record<string, string> => ({
  ...recordingModulesTo(file),
  TOKENWARDEN_TEST_LOADED_ESM: `${file}.esm`,
});

/** The Temporal SDK, gRPC and protobufjs files among those recorded in `file`. */
export async function temporalSdkFiles(file: string): Promise<string[]> {
  const loaded = JSON.parse(await readFile(file, 'utf8')) as string[];
  return loaded.filter((f) => TEMPORAL_SDK.test(f));
}

/** Every file recorded by recordingAllModulesTo(file): CommonJS and ES modules, as paths. */
export async function allLoadedFiles(file: string): Promise<string[]> {
  const cjs = JSON.parse(await readFile(file, 'utf8')) as string[];
  const esm = (await readFile(`${file}.esm`, 'utf8'))
    .split('\n')
    .filter((url) => url.startsWith('file:'))
    .map((url) => fileURLToPath(url));
  return [...new Set([...cjs, ...esm])];
}
