/** A dedicated connection LISTENing on the kill channel, as a verifier would: the payloads it heard. */
import pg from 'pg';
import { KILL_CHANNEL } from '../../common/names.js';

export async function listenForKills(databaseUrl: string): Promise<{ payloads: string[]; end(): Promise<void> }> {
  const listener = new pg.Client({ connectionString: databaseUrl });
  await listener.connect();
  const payloads: string[] = [];
  listener.on('notification', (n) => {
    if (n.channel === KILL_CHANNEL && n.payload) payloads.push(n.payload);
  });
  await listener.query(`LISTEN ${KILL_CHANNEL}`);
  return { payloads, end: () => listener.end() };
}
