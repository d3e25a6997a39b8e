/**
 * `node dist/bench/bulk-tell.js [--tokens N] [--rate R] [--batch-rps B]`: the tell phase of a
 * revocation by filter, two ways, on the stack a user gets. Each section issues N tokens (one receiver
 * on loopback each), kills them all in the store with revokeMany's kill phase (an AbortSignal already
 * aborted: nothing told), then tells their workflows:
 * - loop: revokeMany's paced client loop (a resume of the same operation), at R signals/s;
 * - batch (executions): Temporal's batch operation, a signal to the listed workflow ids, B ops/s asked;
 * - batch (query): the same by visibility query (TokenSubject = … AND ExecutionStatus = 'Running').
 * Measured from the start of telling: until every workflow took over (propagation_started_at set,
 * polled in the store), until the receiver acknowledged every token, and the batch's own completion.
 * Human lines on stderr, a final JSON line on stdout.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import proto from '@temporalio/proto';
import { encodeToPayloads, loadDataConverter } from '@temporalio/common/lib/internal-non-workflow/index.js';
import { REVOKE_MANY_DEFAULTS } from '../client/index.js';
import type { RevokeRequest } from '../common/messages.js';
import { SIGNAL, tokenWorkflowId } from '../common/names.js';
import { waitUntilQuiet } from './proc.js';
import type { ArrivalReceiver } from './receiver.js';
import { watchedPids } from './scale-memory.js';
import { addReceiver, issueTokens, poll, round, section, type Rig, type Teardown } from './scale-rig.js';
import { closeRig, haltOnSignals, machineFacts, openUserRig } from './user-rig.js';

const say = (msg: string) => process.stderr.write(`[bench:bulk-tell] ${msg}\n`);
const BatchState = proto.temporal.api.enums.v1.BatchOperationState;

function parseOptions(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    options: {
      tokens: { type: 'string', default: '500' },
      rate: { type: 'string', default: String(REVOKE_MANY_DEFAULTS.rate) },
      'batch-rps': { type: 'string', default: '1000' },
      timeout: { type: 'string', default: '300' },
    },
  });
  const opts = {
    tokens: Number(values.tokens),
    rate: Number(values.rate),
    batchRps: Number(values['batch-rps']),
    concurrency: REVOKE_MANY_DEFAULTS.concurrency,
    timeoutMs: Number(values.timeout) * 1000,
  };
  if (!Number.isInteger(opts.tokens) || opts.tokens < 1) throw new Error('--tokens: expected a positive integer');
  if (!(opts.rate > 0)) throw new Error('--rate: expected a positive number');
  if (!(opts.batchRps > 0)) throw new Error('--batch-rps: expected a positive number');
  if (!(opts.timeoutMs > 0)) throw new Error('--timeout: expected seconds');
  return opts;
}
type Options = ReturnType<typeof parseOptions>;

/** Issues N tokens of a fresh subject and kills them all in the store, telling no workflow. */
async function prepareKilled(rig: Rig, name: string, opts: Options, settle: () => Promise<unknown>) {
  const { id, receiver } = await addReceiver(rig, name);
  const subject = `usr_${name}_${rig.tag}`;
  rig.say(`  issuing ${opts.tokens} tokens of ${subject}`);
  const issued = await issueTokens(rig, opts.tokens, 32, () => ({ subject, receivers: [id], ttl: '30d' }));
  await settle();
  const aborted = new AbortController();
  aborted.abort();
  const kill = await rig.warden.revokeMany({ subject }, { reason: `bench: ${name}`, signal: aborted.signal });
  if (kill.killed !== opts.tokens || kill.signalled !== 0) throw new Error(`unexpected kill: ${JSON.stringify(kill)}`);
  rig.say(`  ${kill.killed} dead in the store in ${kill.durationsMs.kill} ms (operation ${kill.operationId})`);
  await settle();
  return { subject, receiver, tokenIds: issued.tokenIds, operationId: kill.operationId, killMs: kill.durationsMs.kill };
}

/** ms after `t0` (performance.now()) until none of the operation's kills is untold. */
async function watchTakenOver(rig: Rig, operationId: string, t0: number, timeoutMs: number) {
  const t = rig.warden.pool.tables;
  const seen = await poll(
    rig,
    async () => {
      const { rows } = await rig.warden.pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM ${t.token} WHERE revoke_request_id = $1 AND propagation_started_at IS NULL`,
        [operationId],
      );
      return rows[0]!.n === 0 ? performance.now() - t0 : undefined;
    },
    { timeoutMs, intervalMs: 20 },
  );
  return seen === undefined ? null : round(seen);
}

/** ms after `t0` until the receiver acknowledged every token's event. */
async function watchDelivered(rig: Rig, receiver: ArrivalReceiver, tokenIds: string[], t0: number, timeoutMs: number) {
  const last = await poll(
    rig,
    () => {
      let latest = 0;
      for (const id of tokenIds) {
        const arrival = receiver.acknowledgedOf(id);
        if (!arrival) return undefined;
        latest = Math.max(latest, arrival.ackedAt);
      }
      return latest;
    },
    { timeoutMs, intervalMs: 100 },
  );
  return last === undefined ? null : round(last - t0);
}

async function loopSection(rig: Rig, opts: Options, settle: () => Promise<unknown>) {
  const p = await prepareKilled(rig, 'loop', opts, settle);
  rig.say(`  telling by the client loop (rate ${opts.rate}/s, concurrency ${opts.concurrency})`);
  const t0 = performance.now();
  const takenOver = watchTakenOver(rig, p.operationId, t0, opts.timeoutMs);
  const report = await rig.warden.revokeMany(null, { resume: p.operationId, rate: opts.rate });
  const toldMs = round(performance.now() - t0);
  return {
    tokens: opts.tokens,
    killMs: p.killMs,
    signalled: report.signalled,
    notSignalled: report.notSignalled.length,
    allSignalsSentMs: toldMs,
    allTakenOverMs: await takenOver,
    allDeliveredMs: await watchDelivered(rig, p.receiver, p.tokenIds, t0, opts.timeoutMs),
    duplicateDeliveries: p.receiver.repeats,
  };
}

async function batchSection(rig: Rig, opts: Options, settle: () => Promise<unknown>, by: 'executions' | 'query') {
  const p = await prepareKilled(rig, `batch-${by}`, opts, settle);
  const namespace = rig.stack.settings.temporal.namespace;
  const service = rig.client.workflowService;
  const request: RevokeRequest = {
    reason: `bench: batch-${by}`,
    actor: 'bench',
    initiatingEntity: 'admin',
    requestId: p.operationId,
    correlationId: p.operationId,
  };
  const input = { payloads: await encodeToPayloads(loadDataConverter(), request) };
  const jobId = `bulk-tell-${randomUUID()}`;
  rig.say(`  telling by a batch operation (${by}, ${opts.batchRps} ops/s asked)`);
  const t0 = performance.now();
  const takenOver = watchTakenOver(rig, p.operationId, t0, opts.timeoutMs);
  await service.startBatchOperation({
    namespace,
    jobId,
    reason: request.reason,
    maxOperationsPerSecond: opts.batchRps,
    ...(by === 'executions'
      ? { executions: p.tokenIds.map((id) => ({ workflowId: tokenWorkflowId(id) })) }
      : { visibilityQuery: `TokenSubject = '${p.subject}' AND ExecutionStatus = 'Running'` }),
    signalOperation: { signal: SIGNAL.revoke, input, identity: 'bench:bulk-tell' },
  });
  const startedMs = round(performance.now() - t0);
  // A second batch while this one runs: the namespace's limit of concurrent batch operations.
  const second = await service
    .startBatchOperation({
      namespace,
      jobId: `${jobId}-second`,
      reason: 'bench: a second concurrent batch',
      executions: [{ workflowId: tokenWorkflowId(p.tokenIds[0]!) }],
      signalOperation: { signal: SIGNAL.revoke, input, identity: 'bench:bulk-tell' },
    })
    .then(
      () => 'accepted',
      (err: Error) => `refused: ${err.message}`,
    );
  const done = await poll(
    rig,
    async () => {
      const d = await service.describeBatchOperation({ namespace, jobId });
      return d.state === BatchState.BATCH_OPERATION_STATE_RUNNING ||
        d.state === BatchState.BATCH_OPERATION_STATE_UNSPECIFIED
        ? undefined
        : {
            ms: round(performance.now() - t0),
            state: BatchState[d.state!] ?? String(d.state),
            total: Number(d.totalOperationCount ?? 0),
            completed: Number(d.completeOperationCount ?? 0),
            failed: Number(d.failureOperationCount ?? 0),
          };
    },
    { timeoutMs: opts.timeoutMs, intervalMs: 100 },
  );
  const takenOverMs = await takenOver;
  // What a client loop would still have to tell (workflows the batch missed or failed on).
  const leftUntold = (
    await rig.warden.pool.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM ${rig.warden.pool.tables.token} WHERE revoke_request_id = $1 AND propagation_started_at IS NULL`,
      [p.operationId],
    )
  ).rows[0]!.n;
  return {
    tokens: opts.tokens,
    killMs: p.killMs,
    batchAcceptedMs: startedMs,
    batchCompletedMs: done?.ms ?? null,
    batch: done ?? null,
    secondConcurrentBatch: second,
    allTakenOverMs: takenOverMs,
    allDeliveredMs: await watchDelivered(rig, p.receiver, p.tokenIds, t0, opts.timeoutMs),
    leftUntold,
    duplicateDeliveries: p.receiver.repeats,
  };
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const halt = haltOnSignals(say);
  const teardown: Teardown = [];
  let results: Record<string, unknown> = {};
  let failure: unknown;
  try {
    const rig = await openUserRig(halt.signal, say, teardown);
    const settle = () => waitUntilQuiet(() => watchedPids(rig), { timeoutMs: opts.timeoutMs, signal: halt.signal });
    const loop = await section(rig, 'client loop', () => loopSection(rig, opts, settle));
    await settle();
    const executions = await section(rig, 'batch by executions', () => batchSection(rig, opts, settle, 'executions'));
    await settle();
    const query = await section(rig, 'batch by query', () => batchSection(rig, opts, settle, 'query'));
    results = {
      loop,
      batchByExecutions: executions,
      batchByQuery: query,
      ratios: {
        takenOverBatchExecutionsVsLoop: ratio(executions.allTakenOverMs, loop.allTakenOverMs),
        takenOverBatchQueryVsLoop: ratio(query.allTakenOverMs, loop.allTakenOverMs),
      },
    };
  } catch (err) {
    failure = err;
  } finally {
    await closeRig(teardown, say);
  }
  const final = {
    bench: 'bulk-tell',
    date: new Date().toISOString(),
    options: opts,
    machine: machineFacts(),
    stack: 'tokenwarden start (Temporal dev server on SQLite, embedded PostgreSQL, in-process worker)',
    ...results,
    ...(failure ? { failed: failure instanceof Error ? failure.message : String(failure) } : {}),
  };
  printSummary(final);
  process.stdout.write(`${JSON.stringify(final)}\n`);
  if (failure) throw failure;
}

function ratio(value: number | null, baseline: number | null): number | null {
  return value === null || baseline === null || baseline === 0 ? null : round(value / baseline, 2);
}

function printSummary(final: Record<string, unknown>): void {
  const l = final.loop as Awaited<ReturnType<typeof loopSection>> | undefined;
  const e = final.batchByExecutions as Awaited<ReturnType<typeof batchSection>> | undefined;
  const q = final.batchByQuery as Awaited<ReturnType<typeof batchSection>> | undefined;
  if (!l || !e || !q) return;
  const line = (text: string) => process.stderr.write(`${text}\n`);
  const ms = (v: number | null) => `${String(v).padStart(8)} ms`;
  line(`telling ${l.tokens} killed tokens' workflows (from the start of telling):`);
  line(`                       client loop   batch (executions)   batch (query)`);
  line(`  all taken over     ${ms(l.allTakenOverMs)}   ${ms(e.allTakenOverMs)}          ${ms(q.allTakenOverMs)}`);
  line(`  all delivered      ${ms(l.allDeliveredMs)}   ${ms(e.allDeliveredMs)}          ${ms(q.allDeliveredMs)}`);
  line(`  calls done         ${ms(l.allSignalsSentMs)}   ${ms(e.batchCompletedMs)}          ${ms(q.batchCompletedMs)}`);
  line(`  second batch: ${e.secondConcurrentBatch}`);
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  },
);
