import proto from '@temporalio/proto';

type History = proto.temporal.api.history.v1.IHistory;
const { EventType } = proto.temporal.api.enums.v1;

/** Whether any payload among a marker's details names `patchId` (core writes it as JSON `{"id": …}`). */
const markerNames = (event: proto.temporal.api.history.v1.IHistoryEvent, patchId: string): boolean =>
  Object.values(event.markerRecordedEventAttributes?.details ?? {}).some((payloads) =>
    (payloads.payloads ?? []).some((p) =>
      Buffer.from(p.data ?? [])
        .toString('utf8')
        .includes(`"${patchId}"`),
    ),
  );

/**
 * A patch's markers and the values one search attribute was upserted to, in history order: what a
 * patched upsert must look like (one marker, before the first upsert; each upsert a change).
 */
export function patchedUpserts(
  history: History,
  patchId: string,
  attribute: string,
): { markers: number; markerFirst: boolean; upserts: unknown[] } {
  let markers = 0;
  let markerFirst = false;
  const upserts: unknown[] = [];
  for (const event of history.events ?? []) {
    if (event.eventType === EventType.EVENT_TYPE_MARKER_RECORDED && markerNames(event, patchId)) {
      markers++;
      if (upserts.length === 0) markerFirst = true;
    }
    const fields = event.upsertWorkflowSearchAttributesEventAttributes?.searchAttributes?.indexedFields;
    const field = fields?.[attribute];
    if (event.eventType === EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES && field) {
      const data = Buffer.from(field.data ?? []).toString('utf8');
      upserts.push(data.length > 0 ? JSON.parse(data) : null);
    }
  }
  return { markers, markerFirst, upserts };
}
