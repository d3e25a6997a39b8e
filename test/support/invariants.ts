/**
 * What must hold after revocations whatever the faults: read from the store and from the receivers,
 * returned as lists of problems (empty when all holds), so one assertion names every broken token.
 */
import { checkout, type StoreClient, type StorePool } from '../../common/db.js';
import { revocationEventId } from '../../common/ids.js';
import * as store from '../../common/store/index.js';
import { tokenIdOf, type TestReceiver } from './receiver.js';

const KILL_KINDS = ['token.revoked', 'token.expired'];

export interface TokenFacts {
  tokenId: string;
  status: string;
  propagation: string;
  receivers: string[];
  deliveries: Array<{ receiverId: string; eventId: string; status: string; type: string }>;
  credentialStates: string[];
  audit: Array<{ kind: string; data: Record<string, unknown> }>;
  brokenAuditLink: number | null;
}

/**
 * The store's facts about each token, read with plain SQL (plus the store's own chain check) in one
 * snapshot: workers may be killing tokens meanwhile, and facts from two moments would disagree.
 */
export async function readFacts(pool: StorePool, tokenIds: string[]): Promise<TokenFacts[]> {
  const db = await checkout(pool);
  try {
    await db.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    const facts = await readFactsIn(db, tokenIds);
    await db.query('COMMIT');
    return facts;
  } finally {
    db.release();
  }
}

async function readFactsIn(db: StoreClient, tokenIds: string[]): Promise<TokenFacts[]> {
  const tables = db.tables;
  const { rows: tokens } = await db.query(
    `SELECT id, status, propagation, receivers FROM ${tables.token} WHERE id = ANY($1) ORDER BY id`,
    [tokenIds],
  );
  const { rows: deliveries } = await db.query(
    `SELECT token_id, receiver_id, event_id, status, body FROM ${tables.delivery} WHERE token_id = ANY($1) ORDER BY receiver_id`,
    [tokenIds],
  );
  const { rows: credentials } = await db.query(
    `SELECT token_id, state FROM ${tables.credential} WHERE token_id = ANY($1)`,
    [tokenIds],
  );
  const facts: TokenFacts[] = [];
  for (const t of tokens as Array<{ id: string; status: string; propagation: string; receivers: string[] }>) {
    const audit = await store.readAudit(db, t.id);
    facts.push({
      tokenId: t.id,
      status: t.status,
      propagation: t.propagation,
      receivers: t.receivers,
      deliveries: deliveries
        .filter((d) => d.token_id === t.id)
        .map((d) => ({
          receiverId: d.receiver_id as string,
          eventId: d.event_id as string,
          status: d.status as string,
          type: (JSON.parse(d.body as string) as { type: string }).type,
        })),
      credentialStates: credentials.filter((c) => c.token_id === t.id).map((c) => c.state as string),
      audit: audit.map((a) => ({
        kind: a.kind,
        data: (JSON.parse(a.canonical) as { data: Record<string, unknown> }).data,
      })),
      brokenAuditLink: store.findBrokenAuditLink(audit),
    });
  }
  const missing = tokenIds.filter((id) => !facts.some((f) => f.tokenId === id));
  if (missing.length > 0) throw new Error(`tokens missing from the store: ${missing.join(', ')}`);
  return facts;
}

/**
 * No half-kill: a token is either active with no trace of a kill, or dead with revoked credentials,
 * one outbox row per receiver (one event id, a body matching its status) and one kill audit event.
 */
export function halfKillProblems(f: TokenFacts): string[] {
  const kills = f.audit.filter((a) => KILL_KINDS.includes(a.kind)).length;
  const problems: string[] = [];
  if (f.status === 'active') {
    if (f.deliveries.length > 0) problems.push('active with outbox rows');
    if (kills > 0) problems.push('active with a kill audit event');
    if (f.credentialStates.includes('revoked')) problems.push('active with a revoked credential');
    if (f.propagation !== 'none') problems.push(`active with propagation ${f.propagation}`);
  } else {
    if (kills !== 1) problems.push(`${kills} kill audit events`);
    const receivers = f.deliveries.map((d) => d.receiverId).sort();
    if (receivers.join() !== [...f.receivers].sort().join()) {
      problems.push(`outbox rows for [${receivers.join(', ')}], receivers [${f.receivers.join(', ')}]`);
    }
    if (f.deliveries.some((d) => d.eventId !== revocationEventId(f.tokenId))) problems.push('an unexpected event id');
    if (f.deliveries.some((d) => d.type !== `token.${f.status}`))
      problems.push(`an event body not of token.${f.status}`);
    if (f.credentialStates.some((s) => s !== 'revoked')) problems.push('dead with a live credential');
  }
  return problems.map((p) => `${f.tokenId} (${f.status}): ${p}`);
}

/** Propagation finished: dead, complete, every delivery delivered and audited once, the chain intact. */
export function propagationProblems(f: TokenFacts): string[] {
  const problems = halfKillProblems(f);
  const say = (p: string) => problems.push(`${f.tokenId} (${f.status}): ${p}`);
  if (f.status === 'active') say('still active');
  if (f.propagation !== 'complete') say(`propagation ${f.propagation}`);
  for (const d of f.deliveries) {
    if (d.status !== 'delivered') say(`delivery to ${d.receiverId} ${d.status}`);
    const audited = f.audit.filter((a) => a.kind === 'delivery.delivered' && a.data.receiverId === d.receiverId);
    if (audited.length !== 1) say(`${audited.length} delivery.delivered audit events for ${d.receiverId}`);
  }
  const completions = f.audit.filter((a) => a.kind === 'propagation.complete').length;
  if (completions !== 1) say(`${completions} propagation.complete audit events`);
  problems.push(...auditProblems(f));
  return problems;
}

export function auditProblems(f: TokenFacts): string[] {
  return f.brokenAuditLink === null ? [] : [`${f.tokenId}: audit chain broken at seq ${f.brokenAuditLink}`];
}

/**
 * Exactly one logical event per token at this receiver: one `webhook-id` (the token's event id), the
 * same body on every repeat (a repeat is a retry), every signature valid, at least one accepted; and
 * no event about any other token.
 */
export function receiverProblems(name: string, receiver: TestReceiver, tokenIds: string[]): string[] {
  const problems: string[] = [];
  const expected = new Set(tokenIds);
  for (const tokenId of tokenIds) {
    const requests = receiver.requestsFor(tokenId);
    const say = (p: string) => problems.push(`${name}, ${tokenId}: ${p}`);
    if (requests.length === 0) {
      say('no event');
      continue;
    }
    const ids = [...new Set(requests.map((r) => String(r.headers['webhook-id'])))];
    if (ids.length !== 1 || ids[0] !== revocationEventId(tokenId)) say(`webhook-ids ${ids.join(', ')}`);
    if (new Set(requests.map((r) => r.body)).size !== 1) say('repeats with different bodies');
    const unverified = requests.filter((r) => !r.verified).length;
    if (unverified > 0) say(`${unverified} signature(s) not verified`);
    if (!requests.some((r) => typeof r.answered === 'number' && r.answered < 300)) say('never accepted');
  }
  for (const [id, requests] of receiver.byWebhookId()) {
    for (const tokenId of new Set(requests.map(tokenIdOf))) {
      if (!tokenId || !expected.has(tokenId)) problems.push(`${name}: event ${id} about ${tokenId}, not expected`);
    }
  }
  return problems;
}

/** How many requests repeated an event already received (retries after a lost answer). */
export function repeats(receiver: TestReceiver): number {
  let n = 0;
  for (const requests of receiver.byWebhookId().values()) n += requests.length - 1;
  return n;
}

/** Distinct events this receiver accepted (answered 2xx at least once). */
export function acceptedEvents(receiver: TestReceiver): number {
  let n = 0;
  for (const requests of receiver.byWebhookId().values()) {
    if (requests.some((r) => typeof r.answered === 'number' && r.answered < 300)) n++;
  }
  return n;
}
