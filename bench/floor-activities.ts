/**
 * The floor's one activity: a bare HTTP POST of an event to the benchmark's receiver, with none of
 * tokenwarden's work around it (no outbox row to load, no signing key to decrypt, no attempt to record).
 */

export interface FloorEvent {
  eventId: string;
  /** The receiver files arrivals under `token_id`, as it does for real revocation events. */
  tokenId: string;
}

const HTTP_TIMEOUT_MS = 10_000;

export function createFloorActivities(deps: { receiverUrl: string }) {
  return {
    async postEvent(event: FloorEvent): Promise<number> {
      // The same client (global fetch) and the same kind of request as deliverRevocation.
      const response = await fetch(deps.receiverUrl, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'user-agent': 'tokenwarden-bench',
          'webhook-id': event.eventId,
          'webhook-timestamp': String(Math.floor(Date.now() / 1000)),
        },
        body: JSON.stringify({ id: event.eventId, type: 'bench.floor', token_id: event.tokenId }),
        signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
        redirect: 'error',
      });
      await response.body?.cancel();
      if (!response.ok) throw new Error(`receiver answered HTTP ${response.status}`);
      return response.status;
    },
  };
}

export type FloorActivities = ReturnType<typeof createFloorActivities>;
