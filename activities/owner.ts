/**
 * The token owner's destination (a policy's `owner_receiver_id` or `owner_dir`): warnings and
 * automatically rotated secrets go there. A receiver gets a signed Standard Webhooks POST (the
 * receivers' signer and address checks); a folder gets one 0600 file per message, written
 * atomically. The message id is deterministic, so a retried send is one message for the owner.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, realpath, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { ApplicationFailure } from '@temporalio/activity';
import { checkReceiverUrl, resolveReceiver, type ReceiverAllowance } from '../common/addresses.js';
import type { StorePool } from '../common/db.js';
import { isInsideRoot, ownerDirProblem } from '../common/owner-dir.js';
import { signWebhook, type MasterKeyring } from '../common/secrets.js';
import { loadReceiverSecret } from '../common/store/index.js';
import { isRetryableStatus, networkErrorCode, send, type ReceiverAgents } from './propagation.js';

/** Where a policy sends the owner's messages; undefined when it names none. */
export type OwnerDestination = { kind: 'receiver'; receiverId: string } | { kind: 'dir'; dir: string };

export interface OwnerDeps {
  pool: StorePool;
  keyring: MasterKeyring;
  receiverAllow: readonly ReceiverAllowance[];
  agents: ReceiverAgents;
  /** TOKENWARDEN_OWNER_DIR_ROOT: owner folders outside it (or any, when unset) are refused. */
  ownerDirRoot?: string;
}

/** The failure type when a policy names no owner destination (the workflow does not retry it). */
export const NO_OWNER_DESTINATION = 'NoOwnerDestination';

const HTTP_TIMEOUT_MS = 10_000;

/** File names and webhook ids: only what is safe in a file name. */
const safeName = (text: string): string => text.replace(/[^A-Za-z0-9._-]/g, '_');

/**
 * Sends `body` (JSON) to the owner as message `messageId`. Network failures and 408/429/5xx are
 * retryable; other answers and refused addresses are not (an operator fixes the policy). The
 * error never quotes the body: it may carry a secret.
 */
export async function sendToOwner(
  deps: OwnerDeps,
  destination: OwnerDestination,
  message: { tokenId: string; messageId: string; body: string },
): Promise<{ delivered: string }> {
  if (destination.kind === 'dir') {
    // Checked here too: a policy row may predate the root or come from another process's settings.
    const problem = ownerDirProblem(deps.ownerDirRoot, destination.dir);
    if (problem !== undefined) throw ApplicationFailure.nonRetryable(`owner_dir ${problem}`, 'OwnerRefused');
    // A symbolic link inside the root must not lead the secret, nor the folders made for it, out of
    // it: the deepest existing ancestor is checked before mkdir, the folder itself after.
    const root = await realpath(deps.ownerDirRoot!);
    const outside = async (dir: string) => !isInsideRoot(root, await realpath(dir));
    if (await outside(await deepestExisting(destination.dir))) {
      throw ApplicationFailure.nonRetryable(`owner_dir leads outside ${deps.ownerDirRoot}`, 'OwnerRefused');
    }
    await mkdir(destination.dir, { recursive: true, mode: 0o700 });
    if (await outside(destination.dir)) {
      throw ApplicationFailure.nonRetryable(`owner_dir leads outside ${deps.ownerDirRoot}`, 'OwnerRefused');
    }
    const file = await writeOwnerFile(
      destination.dir,
      `${safeName(message.tokenId)}.${safeName(message.messageId)}.json`,
      message.body,
    );
    return { delivered: file };
  }
  const { receiverId } = destination;
  const stored = await loadReceiverSecret(deps.pool, receiverId);
  if (!stored || stored.receiver.removedAt) {
    throw ApplicationFailure.nonRetryable(`owner receiver ${receiverId} does not exist`, NO_OWNER_DESTINATION);
  }
  const secret = deps.keyring.decrypt(stored.keyId, stored.ciphertext, receiverId);
  if (secret === undefined) {
    throw ApplicationFailure.retryable(
      `cannot decrypt the signing secret of owner receiver ${receiverId}`,
      'SigningKeyUnavailable',
    );
  }
  const checked = checkReceiverUrl(stored.receiver.url, deps.receiverAllow);
  if (!checked.url)
    throw ApplicationFailure.nonRetryable(`owner receiver ${receiverId} refused: ${checked.problem}`, 'OwnerRefused');
  const signal = AbortSignal.timeout(HTTP_TIMEOUT_MS);
  let addresses;
  try {
    const resolved = await resolveReceiver(checked.url, deps.receiverAllow, signal);
    if (!resolved.addresses) {
      throw ApplicationFailure.nonRetryable(
        `owner receiver ${receiverId} refused: ${resolved.problem}`,
        'OwnerRefused',
      );
    }
    addresses = resolved.addresses;
  } catch (err) {
    if (err instanceof ApplicationFailure) throw err;
    throw ApplicationFailure.retryable(
      `owner receiver ${receiverId} unreachable: ${networkErrorCode(err)}`,
      'OwnerUnavailable',
    );
  }
  const timestamp = Math.floor(Date.now() / 1000);
  let status: number;
  try {
    ({ status } = await send(
      deps.agents,
      checked.url,
      addresses,
      {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'user-agent': 'tokenwarden',
          'webhook-id': message.messageId,
          'webhook-timestamp': String(timestamp),
          'webhook-signature': signWebhook(secret, message.messageId, timestamp, message.body),
        },
        body: message.body,
      },
      signal,
    ));
  } catch (err) {
    throw ApplicationFailure.retryable(
      `owner receiver ${receiverId} unreachable: ${networkErrorCode(err)}`,
      'OwnerUnavailable',
    );
  }
  if (status >= 200 && status < 300) return { delivered: receiverId };
  const error = `owner receiver ${receiverId} answered HTTP ${status}`;
  if (isRetryableStatus(status)) throw ApplicationFailure.retryable(error, 'OwnerUnavailable');
  throw ApplicationFailure.nonRetryable(error, 'OwnerRefused');
}

/** `dir` itself when it exists, else its nearest ancestor that does. */
async function deepestExisting(dir: string): Promise<string> {
  for (let at = path.resolve(dir); ; at = path.dirname(at)) {
    try {
      await stat(at);
      return at;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || path.dirname(at) === at) throw err;
    }
  }
}

/**
 * Writes `<dir>/<name>` with mode 0600 in a 0700 folder, atomically (a temporary file renamed into
 * place): a reader never sees half a secret. A folder open to others is refused.
 */
export async function writeOwnerFile(dir: string, name: string, body: string): Promise<string> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const info = await stat(dir);
  if ((info.mode & 0o077) !== 0) {
    throw ApplicationFailure.nonRetryable(
      `owner_dir ${dir}: mode ${(info.mode & 0o777).toString(8)} lets others in; expected 0700`,
      'OwnerRefused',
    );
  }
  const file = path.join(dir, name);
  const temporary = path.join(dir, `.${name}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temporary, 'wx', 0o600);
  try {
    await handle.writeFile(body);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await chmod(temporary, 0o600);
    await rename(temporary, file);
  } catch (err) {
    await unlink(temporary).catch(() => {});
    throw err;
  }
  return file;
}
