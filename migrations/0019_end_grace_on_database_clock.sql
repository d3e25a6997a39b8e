-- Up Migration
-- The end of a grace waits for the database clock: the workflow's timer runs on Temporal's clock,
-- which may be ahead of PostgreSQL's. A `previous` credential still before its valid_until is left
-- valid and the call answers the milliseconds remaining (as kill_token's only_if_expired does);
-- revoked early, a legitimate client still presenting it would kill the token as a reuse.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

DROP FUNCTION end_grace(text, text, text, text, text);
CREATE FUNCTION end_grace(schema_name text, token_id text, credential_id text, actor text, channel text)
RETURNS TABLE (changed boolean, event_id text, receivers text[], remaining_ms bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  did_revoke boolean := false;
  revocation_event text := credential_revocation_event_id(end_grace.credential_id);
  still_valid_until timestamptz;
BEGIN
  PERFORM 1 FROM token t WHERE t.id = end_grace.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT c.valid_until INTO still_valid_until FROM credential c
   WHERE c.id = end_grace.credential_id AND c.token_id = end_grace.token_id AND c.state = 'previous';
  IF FOUND AND still_valid_until > now() THEN
    RETURN QUERY SELECT false, revocation_event, '{}'::text[],
      greatest(1, ceil(extract(epoch FROM still_valid_until - now()) * 1000))::bigint;
    RETURN;
  END IF;
  IF FOUND THEN
    did_revoke := revoke_credential(end_grace.schema_name, end_grace.credential_id, 'grace_ended', 'system',
                                    end_grace.actor, end_grace.channel);
  END IF;
  RETURN QUERY SELECT did_revoke, revocation_event,
    (SELECT coalesce(array_agg(d.receiver_id ORDER BY d.receiver_id), '{}') FROM delivery d
      WHERE d.event_id = revocation_event),
    NULL::bigint;
END;
$$;
