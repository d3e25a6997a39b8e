/**
 * The API as a process (`tokenwarden api`, and inside `tokenwarden start`): the library, the
 * verifier, the server; SIGTERM/SIGINT stop accepting, let requests in flight finish, then close.
 */
import type { ApiSettings, Settings } from '../../common/config.js';
import { TokenWarden } from '../index.js';
import { createVerifier, type Verifier } from '../verifier.js';
import { createApiServer, type ApiServer } from './server.js';
import { isLoopbackHost } from '../../common/addresses.js';

export interface RunningApi {
  /** e.g. http://127.0.0.1:8380 */
  url: string;
  server: ApiServer;
  /** Stops accepting, waits for requests in flight, then closes the verifier and the library. */
  close(): Promise<void>;
}

export async function startApi(settings: Settings, api: ApiSettings): Promise<RunningApi> {
  const warden = await TokenWarden.connect(settings, {
    onError: (err) => process.stderr.write(`tokenwarden api: ${err.message}\n`),
  });
  let verifier: Verifier | undefined;
  try {
    verifier = await createVerifier({
      databaseUrl: settings.databaseUrl,
      schema: settings.databaseSchema,
      foreignTokens: api.foreignTokens,
      onError: (err) => process.stderr.write(`tokenwarden api: verifier: ${err.message}\n`),
      // Introspection killed a token whose credential was reused: its workflow propagates now,
      // not at the reconciler's next pass (which stays the fallback when this call fails).
      onReuseDetected: (tokenId) =>
        void warden
          .tellKilled(tokenId)
          .catch((err: unknown) =>
            process.stderr.write(
              `tokenwarden api: telling the workflow of ${tokenId} (reuse detected) failed: ${err instanceof Error ? err.message : String(err)}\n`,
            ),
          ),
    });
    const server = await createApiServer({ warden, verifier, codec: api.codec });
    await server.listen({ host: api.host, port: api.port });
    const address = server.server.address();
    const port = typeof address === 'object' && address ? address.port : api.port;
    const host = api.host.includes(':') ? `[${api.host}]` : api.host;
    let closing: Promise<void> | undefined;
    const v = verifier;
    return {
      url: `http://${host}:${port}`,
      server,
      close: () =>
        (closing ??= (async () => {
          try {
            await server.close();
          } finally {
            await v.close();
            await warden.close();
          }
        })()),
    };
  } catch (err) {
    await verifier?.close();
    await warden.close();
    throw err;
  }
}

/** `tokenwarden api`: runs until SIGTERM or SIGINT, then shuts down gracefully. */
export async function runApiProcess(settings: Settings, api: ApiSettings): Promise<void> {
  const running = await startApi(settings, api);
  process.stderr.write(`tokenwarden api listening on ${running.url}\n`);
  if (!isLoopbackHost(api.host)) {
    // API keys and raw tokens (issue, RFC 7009/7662) cross this connection in the clear.
    process.stderr.write(
      `tokenwarden api: warning: plain HTTP on ${api.host}, not a loopback address: put a TLS-terminating proxy in front and keep the port off public networks\n`,
    );
  }
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off('SIGTERM', stop);
      process.off('SIGINT', stop);
      resolve();
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
  await running.close();
}
