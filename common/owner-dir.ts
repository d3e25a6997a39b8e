/**
 * Owner folders (a policy's `ownerDir`) hold raw secrets written by workers: they must lie inside
 * the one root an operator configured (TOKENWARDEN_OWNER_DIR_ROOT), so whoever may set a policy
 * cannot make a worker create folders and write files anywhere on its host.
 */
import path from 'node:path';

/** The environment variable that names the root; unset, owner folders are refused. */
export const OWNER_DIR_ROOT_ENV = 'TOKENWARDEN_OWNER_DIR_ROOT';

/** Whether `dir` is `root` or lies below it, by their absolute, normalised paths (`..` resolved). */
export function isInsideRoot(root: string, dir: string): boolean {
  const relative = path.relative(path.resolve(root), path.resolve(dir));
  return relative === '' || (!relative.startsWith('..') && !path.isAbsolute(relative));
}

/** Why `dir` is refused as an owner folder under `root`, or undefined when it is accepted. */
export function ownerDirProblem(root: string | undefined, dir: string): string | undefined {
  if (root === undefined) {
    return `owner folders are off: set ${OWNER_DIR_ROOT_ENV} to the folder they must lie in, or use an owner receiver`;
  }
  if (!isInsideRoot(root, dir)) return `must lie inside ${root} (${OWNER_DIR_ROOT_ENV})`;
  return undefined;
}
