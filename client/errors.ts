/**
 * A workflow's failure of an Update, said to the caller by the failure's type: a refused field is
 * bad input (400, exit 2), a refusal by the token's state is a conflict (409, exit 4), anything else
 * is a fault of the handler, which the caller reports with the failure as its cause.
 */
import { ApplicationFailure, isGrpcServiceError, type WorkflowUpdateFailedError } from '@temporalio/client';
import {
  InvalidInputError,
  NotPropagatingError,
  TokenNotActiveError,
  TokenStateConflictError,
} from '../common/errors.js';
import {
  INVALID_LIFECYCLE_REQUEST,
  INVALID_OPERATOR_REQUEST,
  NOT_PROPAGATING,
  RUN_PREDATES_REQUEST,
  TOKEN_NOT_ACTIVE,
} from '../workflows/lifecycle-state.js';

/** Failure types that refuse the request's input; their message starts with the field (`reason: …`). */
const INPUT_REFUSALS: ReadonlySet<string> = new Set([
  INVALID_OPERATOR_REQUEST,
  INVALID_LIFECYCLE_REQUEST,
  // An activity's refusal the workflow passes on: the token or the policy's owner receiver is gone.
  'NotFoundError',
  'NoOwnerDestination',
]);

export interface UpdateRefusalContext {
  tokenId: string;
  /** What was asked, as the caller said it (`retry`, `rotate`). */
  kind: string;
  /** The message's field prefixes the caller knows, mapped to the names the caller used. */
  fields: Readonly<Record<string, string>>;
}

/** The refusal `err` stands for, or undefined when the handler failed instead (keep `err` as the cause). */
export function updateRefusal(
  err: WorkflowUpdateFailedError,
  { tokenId, kind, fields }: UpdateRefusalContext,
): InvalidInputError | TokenStateConflictError | undefined {
  const failure = err.cause instanceof ApplicationFailure ? err.cause : undefined;
  const type = failure?.type ?? undefined;
  if (failure === undefined || type === undefined) return undefined;
  const message = failure.message;
  // The workflow's refusal names the token and its phase already.
  if (type === NOT_PROPAGATING) return new NotPropagatingError(tokenId, message);
  if (type === TOKEN_NOT_ACTIVE) return new TokenNotActiveError(tokenId, message);
  // Defensive: a live run takes the self-managing patch when the first such Update arrives, so only
  // a run whose history already decided against it can refuse (none is known to exist).
  if (type === RUN_PREDATES_REQUEST) {
    return new TokenStateConflictError(
      tokenId,
      `token ${tokenId}: its workflow run was started by an earlier release and cannot take this request (${kind}); it still expires and can be revoked`,
    );
  }
  if (!INPUT_REFUSALS.has(type)) return undefined;
  const prefix = /^(\w+): /.exec(message);
  const path = prefix ? fields[prefix[1]!] : undefined;
  if (path !== undefined) {
    const detail = message.slice(prefix![0].length);
    return new InvalidInputError(`invalid ${kind} request: ${path}: ${detail}`, [{ path, message: detail }]);
  }
  const detail = `its workflow refused the ${kind}: ${message}`;
  return new InvalidInputError(`invalid ${kind} request: tokenId: ${detail}`, [{ path: 'tokenId', message: detail }]);
}

/** gRPC FAILED_PRECONDITION: how the server's WorkflowNotReady reaches a client. */
const GRPC_FAILED_PRECONDITION = 9;

/**
 * Whether the server aborted the Update because a workflow task failed (a worker lost mid-task, an
 * overloaded one): the Update was not applied, and the same Update id may be sent again.
 */
export function abortedByWorkflowTaskFailure(err: unknown): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if (
      isGrpcServiceError(e) &&
      e.code === GRPC_FAILED_PRECONDITION &&
      /unexpected workflow task failure/i.test(e.details || e.message)
    ) {
      return true;
    }
  }
  return false;
}

/** How often an aborted Update is sent, and the pause before the first resend (doubling). */
export const UPDATE_ABORT_ATTEMPTS = 3;
const UPDATE_ABORT_PAUSE_MS = 500;

/**
 * Sends an Update (`send` must reuse one Update id: the server applies an id once), again after an
 * abort on a failed workflow task, at most UPDATE_ABORT_ATTEMPTS times and never past `deadline`.
 */
export async function sendWithAbortRetries<T>(send: () => Promise<T>, deadline: number): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await send();
    } catch (err) {
      const pause = UPDATE_ABORT_PAUSE_MS * 2 ** (attempt - 1);
      if (attempt >= UPDATE_ABORT_ATTEMPTS || Date.now() + pause >= deadline || !abortedByWorkflowTaskFailure(err)) {
        throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}
