/** Which Temporal SDK modules a child process loads, recorded by loaded-modules-preload.ts. */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { PACKAGE_ROOT } from '../../common/config.js';

const PRELOAD = pathToFileURL(path.join(PACKAGE_ROOT, 'dist', 'test', 'support', 'loaded-modules-preload.js')).href;
const TEMPORAL_SDK = /[\\/]node_modules[\\/](@temporalio|@grpc|protobufjs)[\\/]/;

/** Environment for a child process that writes the modules it loaded to `file` when it exits. */
export const recordingModulesTo = (file: string): Record<string, string> => ({
  NODE_OPTIONS: `--import=${PRELOAD}`,
  TOKENWARDEN_TEST_LOADED_MODULES: file,
});

/** The Temporal SDK, gRPC and protobufjs files among those recorded in `file`. */
export async function temporalSdkFiles(file: string): Promise<string[]> {
  const loaded = JSON.parse(await readFile(file, 'utf8')) as string[];
  return loaded.filter((f) => TEMPORAL_SDK.test(f));
}
