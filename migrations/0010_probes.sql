-- Up Migration
-- Verified propagation: a receiver may offer a verification probe (GET <probe_url>/<token id> →
-- {"tokenId", "accepted"}); a delivery to it is settled only once the probe says the token is
-- rejected. acked_at (the receiver's 2xx) and verified_at (the probe's confirmation) are kept apart.

-- What FROM CURRENT captures: this schema, then pg_temp last (see 0002).
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

ALTER TABLE receiver ADD COLUMN probe_url text;

ALTER TABLE delivery
  ADD COLUMN verified_at timestamptz,
  -- Probe requests made (attempts counts the event's POSTs only).
  ADD COLUMN probes integer NOT NULL DEFAULT 0,
  ADD CONSTRAINT delivery_verified_after_ack CHECK (verified_at IS NULL OR acked_at IS NOT NULL);

-- Records one attempt. `outcome`:
--   delivered     the event acknowledged (2xx) by a receiver without a probe: settled;
--   acknowledged  the event acknowledged by a receiver with a probe: still pending, acked_at set
--                 (later attempts only probe again, they never POST the event twice);
--   retryable | rejected | cancelled  as before (the event's POST);
--   verified      the probe says the token is rejected: settled, verified_at set;
--   probe-retryable  the probe failed (network, 408/429/5xx) or still accepts the token: pending;
--   probe-rejected   the probe answered 4xx or nonsense: failed, waits for an operator.
-- A delivery already settled (delivered, forced, cancelled) is never moved back. The first
-- acknowledgement and the settlement append their audit events, keyed so a repeat appends nothing.
CREATE OR REPLACE FUNCTION record_delivery_attempt(
  event_id text, receiver_id text, outcome text, status_code integer, error text)
RETURNS SETOF delivery
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  recorded delivery;
  new_status text;
  posted boolean := record_delivery_attempt.outcome IN ('delivered', 'acknowledged', 'retryable', 'rejected');
  probed boolean := record_delivery_attempt.outcome IN ('verified', 'probe-retryable', 'probe-rejected');
BEGIN
  new_status := CASE record_delivery_attempt.outcome
    WHEN 'delivered' THEN 'delivered' WHEN 'acknowledged' THEN 'pending'
    WHEN 'retryable' THEN 'pending' WHEN 'rejected' THEN 'failed' WHEN 'cancelled' THEN 'cancelled'
    WHEN 'verified' THEN 'delivered' WHEN 'probe-retryable' THEN 'pending' WHEN 'probe-rejected' THEN 'failed' END;
  IF new_status IS NULL THEN
    RAISE EXCEPTION 'unknown delivery outcome %', record_delivery_attempt.outcome USING ERRCODE = '22023';
  END IF;

  UPDATE delivery d
     SET attempts = d.attempts + CASE WHEN posted THEN 1 ELSE 0 END,
         probes = d.probes + CASE WHEN probed THEN 1 ELSE 0 END,
         status = new_status,
         last_status_code = record_delivery_attempt.status_code,
         last_error = record_delivery_attempt.error,
         last_attempt_at = now(),
         acked_at = CASE WHEN record_delivery_attempt.outcome IN ('delivered', 'acknowledged')
                         THEN coalesce(d.acked_at, now()) ELSE d.acked_at END,
         verified_at = CASE WHEN record_delivery_attempt.outcome = 'verified' THEN now() ELSE d.verified_at END
   WHERE d.event_id = record_delivery_attempt.event_id AND d.receiver_id = record_delivery_attempt.receiver_id
     AND d.status IN ('pending', 'failed')
     -- A probe's verdict about an event never acknowledged would confirm nothing.
     AND (NOT probed OR d.acked_at IS NOT NULL)
  RETURNING d.* INTO recorded;

  IF NOT FOUND THEN
    RETURN QUERY SELECT * FROM delivery d
      WHERE d.event_id = record_delivery_attempt.event_id AND d.receiver_id = record_delivery_attempt.receiver_id;
    RETURN;
  END IF;

  IF record_delivery_attempt.outcome = 'acknowledged' THEN
    PERFORM append_audit(recorded.token_id,
      'delivery:' || record_delivery_attempt.event_id || ':' || record_delivery_attempt.receiver_id || ':acknowledged',
      'delivery.acknowledged',
      jsonb_build_object(
        'eventId', record_delivery_attempt.event_id,
        'receiverId', record_delivery_attempt.receiver_id,
        'attempts', recorded.attempts,
        'statusCode', record_delivery_attempt.status_code));
  END IF;

  IF new_status IN ('delivered', 'cancelled') THEN
    PERFORM append_audit(recorded.token_id,
      'delivery:' || record_delivery_attempt.event_id || ':' || record_delivery_attempt.receiver_id || ':' || new_status,
      'delivery.' || new_status,
      jsonb_build_object(
        'eventId', record_delivery_attempt.event_id,
        'receiverId', record_delivery_attempt.receiver_id,
        'attempts', recorded.attempts)
      || CASE WHEN record_delivery_attempt.outcome = 'verified'
              THEN jsonb_build_object('verified', true, 'probes', recorded.probes)
              WHEN new_status = 'delivered'
              THEN jsonb_build_object('statusCode', record_delivery_attempt.status_code)
              ELSE jsonb_build_object('detail', record_delivery_attempt.error) END);
  END IF;
  RETURN NEXT recorded;
END;
$$;
