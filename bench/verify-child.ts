/**
 * The other process of `npm run bench:verify`: a warmed verifier and a raw LISTENing client. Reads
 * JSON lines on stdin, writes JSON lines on stdout; instants are wall-clock milliseconds
 * (performance.timeOrigin + performance.now()), comparable across processes on one machine.
 *  {"options":…,"rawChannel":…}      → {"ready":true}
 *  {"arm":i,"token":…}               → {"armed":i,"active":…,"fromCache":…} (verified twice: warm, then cached)
 *  (kill NOTIFY of the armed token)  → {"rejected":i,"at":…,"heardAt":…,"active":…} (its next verify, at once)
 *  (NOTIFY on rawChannel, payload i) → {"heard":i,"at":…}
 */
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import pg from 'pg';
import { createVerifier, type Verifier, type VerifierOptions } from '../client/verifier.js';
import { quoteIdent } from '../common/identifiers.js';

const now = () => performance.timeOrigin + performance.now();
const send = (message: object) => process.stdout.write(`${JSON.stringify(message)}\n`);

let verifier: Verifier | undefined;
let raw: pg.Client | undefined;
const armed = new Map<string, { i: number; token: string }>();

async function handle(message: Record<string, unknown>): Promise<void> {
  if (message.options) {
    verifier = await createVerifier({
      ...(message.options as VerifierOptions),
      onKilled: (tokenId) => {
        const target = armed.get(tokenId);
        if (!target) return;
        armed.delete(tokenId);
        const heardAt = now();
        void verifier!
          .verify(target.token)
          .then((answer) => send({ rejected: target.i, at: now(), heardAt, active: answer.active }));
      },
    });
    raw = new pg.Client({ connectionString: (message.options as VerifierOptions).databaseUrl });
    await raw.connect();
    raw.on('notification', (n) => send({ heard: Number(n.payload), at: now() }));
    await raw.query(`LISTEN ${quoteIdent(message.rawChannel as string)}`);
    send({ ready: verifier.listening });
  } else if (typeof message.arm === 'number') {
    const token = message.token as string;
    const first = await verifier!.verify(token);
    const hits = verifier!.stats().cacheHits;
    const second = await verifier!.verify(token);
    if (first.active) armed.set(first.tokenId, { i: message.arm, token });
    send({ armed: message.arm, active: second.active, fromCache: verifier!.stats().cacheHits === hits + 1 });
  }
}

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  handle(JSON.parse(line) as Record<string, unknown>).catch((err: unknown) => {
    process.stderr.write(`${String(err)}\n`);
    process.exit(1);
  });
});
lines.on('close', () => {
  void Promise.all([verifier?.close(), raw?.end()]).then(() => process.exit(0));
});
