-- Up Migration
-- A delivery attempt's outcome, recorded with one parameterised statement (see common/store/deliveries.ts):
-- in a fan-out, every attempt records at once, and a transaction of four round trips each held a
-- pooled connection for all of them. No session state: works behind a transaction-mode pooler.
-- The function pins its search_path to this migration's schema (SET … FROM CURRENT), as in 0002.

-- What FROM CURRENT captures: this schema, then pg_temp last (see 0002).
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Records one attempt: `outcome` is delivered | retryable | rejected | cancelled. A delivery already
-- settled (delivered, forced, cancelled) is never moved back: it is returned as the store holds it.
-- Settling it as delivered or cancelled appends the audit event, keyed so a repeat appends nothing.
-- Returns no row for an unknown delivery.
CREATE FUNCTION record_delivery_attempt(
  event_id text, receiver_id text, outcome text, status_code integer, error text)
RETURNS SETOF delivery
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  recorded delivery;
  new_status text;
BEGIN
  new_status := CASE record_delivery_attempt.outcome
    WHEN 'delivered' THEN 'delivered' WHEN 'retryable' THEN 'pending'
    WHEN 'rejected' THEN 'failed' WHEN 'cancelled' THEN 'cancelled' END;
  IF new_status IS NULL THEN
    RAISE EXCEPTION 'unknown delivery outcome %', record_delivery_attempt.outcome USING ERRCODE = '22023';
  END IF;

  UPDATE delivery d
     SET attempts = d.attempts + CASE WHEN new_status = 'cancelled' THEN 0 ELSE 1 END,
         status = new_status,
         last_status_code = record_delivery_attempt.status_code,
         last_error = record_delivery_attempt.error,
         last_attempt_at = now(),
         acked_at = CASE WHEN new_status = 'delivered' THEN now() END
   WHERE d.event_id = record_delivery_attempt.event_id AND d.receiver_id = record_delivery_attempt.receiver_id
     AND d.status IN ('pending', 'failed')
  RETURNING d.* INTO recorded;

  IF NOT FOUND THEN
    RETURN QUERY SELECT * FROM delivery d
      WHERE d.event_id = record_delivery_attempt.event_id AND d.receiver_id = record_delivery_attempt.receiver_id;
    RETURN;
  END IF;

  IF new_status IN ('delivered', 'cancelled') THEN
    PERFORM append_audit(recorded.token_id,
      'delivery:' || record_delivery_attempt.event_id || ':' || record_delivery_attempt.receiver_id || ':' || new_status,
      'delivery.' || new_status,
      jsonb_build_object(
        'eventId', record_delivery_attempt.event_id,
        'receiverId', record_delivery_attempt.receiver_id,
        'attempts', recorded.attempts)
      || CASE WHEN new_status = 'delivered'
              THEN jsonb_build_object('statusCode', record_delivery_attempt.status_code)
              ELSE jsonb_build_object('detail', record_delivery_attempt.error) END);
  END IF;
  RETURN NEXT recorded;
END;
$$;
