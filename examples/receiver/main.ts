/**
 * Runs the example receiver on its own:
 *
 *   RECEIVER_SECRETS='whsec_…' node dist/examples/receiver/main.js [--host 127.0.0.1] [--port 8390] [--accept tok_…]…
 *
 * RECEIVER_SECRETS holds one or more signing secrets separated by spaces or commas (the new one and
 * the old one during a roll); secrets are never taken on the command line (shell history, `ps`).
 */
import { parseArgs } from 'node:util';
import { startReceiver } from './receiver.js';

const { values } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '8390' },
    accept: { type: 'string', multiple: true, default: [] },
  },
});
const port = Number(values.port);
if (!Number.isInteger(port) || port < 0 || port > 65_535) {
  process.stderr.write(`receiver: --port: expected a port number, got ${JSON.stringify(values.port)}\n`);
  process.exit(2);
}
const secrets = (process.env.RECEIVER_SECRETS ?? '').split(/[\s,]+/).filter(Boolean);
if (secrets.length === 0) {
  process.stderr.write('receiver: RECEIVER_SECRETS is not set: the whsec_ signing secret(s) of this receiver\n');
  process.exit(2);
}

try {
  const receiver = await startReceiver({
    secrets,
    host: values.host,
    port,
    acceptedTokens: values.accept.flatMap((v) => v.split(',')).filter(Boolean),
    log: (line) => process.stdout.write(`receiver: ${line}\n`),
  });
  process.stdout.write(
    `receiver: listening; events ${receiver.eventsUrl}, probe ${receiver.probeUrl}/<tokenId>; ` +
      `${secrets.length} secret(s)\n`,
  );
  const stop = () => void receiver.close().then(() => process.exit(0));
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
} catch (err) {
  process.stderr.write(`receiver: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
}
