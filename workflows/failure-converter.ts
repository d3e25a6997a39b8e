/**
 * The failure converter of the worker (workflow sandbox and activities), the library, the CLI and
 * the API: Temporal's default, with failure messages and stack traces moved into an encoded
 * attribute, so the payload codec encrypts them too (a failure message may name a receiver's answer
 * or an operator's reason). Failures recorded before (a plain message) still read as they did.
 */
import { DefaultFailureConverter } from '@temporalio/common';

export const failureConverter = new DefaultFailureConverter({ encodeCommonAttributes: true });
