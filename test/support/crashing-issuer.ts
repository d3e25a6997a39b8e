/**
 * An app killed (SIGKILL) the moment `issue()` returns, before its library records in the background
 * that the token's workflow started. Settings come from the environment; prints the token id only.
 */
import { TokenWarden } from '../../client/index.js';

const warden = await TokenWarden.connect();
const { tokenId } = await warden.issue({ subject: process.argv[2] ?? 'usr_crashing', ttl: '1h' });
// Writes to a pipe are synchronous on Linux: the id is out before the kill.
process.stdout.write(`${tokenId}\n`);
process.kill(process.pid, 'SIGKILL');
