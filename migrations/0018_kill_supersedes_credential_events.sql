-- Up Migration
-- A token's kill settles the credential.revoked deliveries of that token still unsettled, as
-- cancelled (audited): its own revocation event supersedes them, and propagation completes when that
-- event is delivered. migrations/0002's kill_token with that one statement added.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE OR REPLACE FUNCTION kill_token(
  schema_name text, token_id text, actor text, reason text, initiating_entity text,
  by_workflow boolean, only_if_expired boolean, request_id text, correlation_id text,
  event_id text, channel text)
RETURNS TABLE (changed boolean, remaining_ms bigint, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  killed token;
  credential_ids text[];
  event_kind text;
  event_body text;
BEGIN
  UPDATE token t
     SET status = CASE WHEN t.expires_at <= now() THEN 'expired' ELSE 'revoked' END,
         revoked_at = CASE WHEN t.expires_at <= now() THEN t.expires_at ELSE now() END,
         revoked_by = CASE WHEN t.expires_at <= now() THEN 'system' ELSE kill_token.actor END,
         revoke_reason = CASE WHEN t.expires_at <= now() THEN 'expired' ELSE kill_token.reason END,
         initiating_entity = CASE WHEN t.expires_at <= now() THEN 'system' ELSE kill_token.initiating_entity END,
         propagation = CASE WHEN cardinality(t.receivers) = 0 THEN 'complete' ELSE 'pending' END,
         propagation_completed_at = CASE WHEN cardinality(t.receivers) = 0 THEN now() END,
         propagation_started_at = CASE WHEN kill_token.by_workflow THEN now() END,
         revoke_request_id = kill_token.request_id
   WHERE t.id = kill_token.token_id AND t.status = 'active'
     AND (NOT kill_token.only_if_expired OR t.expires_at <= now())
  RETURNING t.* INTO killed;

  IF NOT FOUND THEN
    -- Already dead (the first kill's facts stand), not yet expired, or unknown.
    IF kill_token.by_workflow THEN
      UPDATE token t SET propagation_started_at = now()
       WHERE t.id = kill_token.token_id AND t.status <> 'active' AND t.propagation_started_at IS NULL;
    END IF;
    SELECT * INTO killed FROM token t WHERE t.id = kill_token.token_id;
    IF NOT FOUND THEN
      RETURN;
    END IF;
    RETURN QUERY SELECT false,
      CASE WHEN killed.status = 'active'
           THEN greatest(1, ceil(extract(epoch FROM killed.expires_at - now()) * 1000))::bigint END,
      killed;
    RETURN;
  END IF;

  WITH revoked AS (
    UPDATE credential c SET state = 'revoked', revoked_at = killed.revoked_at
     WHERE c.token_id = killed.id AND c.state <> 'revoked'
    RETURNING c.id)
  SELECT coalesce(array_agg(revoked.id ORDER BY revoked.id), '{}') INTO credential_ids FROM revoked;

  -- The token's own event tells every receiver that all its credentials are dead: a credential.revoked
  -- event still unsettled adds nothing, and must not hold the propagation's completion back.
  PERFORM record_delivery_attempt(d.event_id, d.receiver_id, 'cancelled', NULL,
                                  'superseded by the token''s revocation ' || kill_token.event_id)
     FROM delivery d
    WHERE d.token_id = killed.id AND d.status IN ('pending', 'failed') AND d.event_id <> kill_token.event_id;

  event_kind := CASE WHEN killed.status = 'expired' THEN 'token.expired' ELSE 'token.revoked' END;
  event_body := canonical_json(jsonb_build_object(
      'id', kill_token.event_id,
      'type', event_kind,
      -- CAEP credential-change vocabulary, so receivers that speak SSF/CAEP can map it directly.
      'change_type', 'revoke',
      'credential_type', 'api-token',
      'token_id', killed.id,
      'credential_ids', to_jsonb(credential_ids),
      'sub_id', jsonb_build_object('format', 'opaque', 'id', killed.subject),
      'reason', killed.revoke_reason,
      'initiating_entity', killed.initiating_entity,
      'actor', killed.revoked_by,
      'event_timestamp', floor(extract(epoch FROM killed.revoked_at))::bigint,
      'occurred_at', iso_time(killed.revoked_at),
      'txn', kill_token.correlation_id));
  -- The body is stored with each outbox row, so every attempt sends the same bytes.
  INSERT INTO delivery (event_id, receiver_id, token_id, body)
  SELECT kill_token.event_id, r, killed.id, event_body FROM unnest(killed.receivers) AS r
  ON CONFLICT DO NOTHING;

  PERFORM append_audit(killed.id, 'killed', event_kind, jsonb_build_object(
    'reason', killed.revoke_reason,
    'actor', killed.revoked_by,
    'initiatingEntity', killed.initiating_entity,
    'occurredAt', iso_time(killed.revoked_at),
    'credentialIds', to_jsonb(credential_ids),
    'eventId', kill_token.event_id,
    'receivers', to_jsonb(killed.receivers),
    'correlationId', kill_token.correlation_id));

  PERFORM pg_notify(kill_token.channel, kill_token.schema_name || ':' || killed.id);
  RETURN QUERY SELECT true, NULL::bigint, killed;
END;
$$;
