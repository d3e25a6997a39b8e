/**
 * A service's process with a warmed verifier (imported as `tokenwarden/verifier`): reads
 * `{ options, token }` as its first stdin line, verifies the token in a loop and records, in order,
 * each answer, each kill notification the verifier heard and each `mark` line the parent sends; once
 * it has heard the kill and received a mark, it makes `afterKill` more verifies (or stops at its
 * deadline) and prints the record.
 * Lines out: `{"ready":…}` once warm, then `{"record":[…],"stats":…}`.
 */
import { createInterface } from 'node:readline';
import type * as VerifierModule from '../../client/verifier.js';

export type Entry =
  | { kind: 'verify'; active: boolean; count: number }
  | { kind: 'killed'; tokenId: string }
  | { kind: 'mark'; text: string };

const MODULE = 'tokenwarden/verifier' as string;

async function main(): Promise<void> {
  const { createVerifier } = (await import(MODULE)) as typeof VerifierModule;
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const first = await lines.next();
  const { options, token, afterKill, deadlineMs } = JSON.parse(first.value as string) as {
    options: VerifierModule.VerifierOptions;
    token: string;
    afterKill: number;
    deadlineMs: number;
  };
  const record: Entry[] = [];
  const add = (entry: Entry) => {
    const last = record.at(-1);
    if (entry.kind === 'verify' && last?.kind === 'verify' && last.active === entry.active) last.count++;
    else record.push(entry);
  };
  let killHeard = false;
  let markSeen = false;
  const verifier = await createVerifier({
    ...options,
    onKilled: (tokenId) => {
      add({ kind: 'killed', tokenId });
      killHeard = true;
    },
  });
  const warm = await verifier.verify(token);
  void (async () => {
    for (let line = await lines.next(); !line.done; line = await lines.next()) {
      add({ kind: 'mark', text: line.value });
      markSeen = true;
    }
  })();
  process.stdout.write(`${JSON.stringify({ ready: warm.active, listening: verifier.listening })}\n`);
  const deadline = Date.now() + deadlineMs;
  // The kill's NOTIFY usually arrives before the parent's revoke returns (it tells the workflow
  // after the kill commits), so stopping on the kill alone could end before the mark is read.
  let verifiesAfterBoth = 0;
  while (Date.now() < deadline && verifiesAfterBoth < afterKill) {
    add({ kind: 'verify', active: (await verifier.verify(token)).active, count: 1 });
    if (killHeard && markSeen) verifiesAfterBoth++;
    // A macrotask turn, so notifications and stdin are read between verifies (a cache hit never yields to I/O).
    await new Promise((resolve) => setImmediate(resolve));
  }
  const stats = verifier.stats();
  await verifier.close();
  process.stdout.write(`${JSON.stringify({ record, stats })}\n`);
  process.exit(0);
}

main().catch((err: unknown) => {
  process.stderr.write(`${String(err)}\n`);
  process.exit(1);
});
