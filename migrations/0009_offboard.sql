-- Up Migration
-- Bulk kills: many tokens dead in the store in one statement and one transaction, each by the one
-- kill (kill_token), so "nothing of theirs verifies after the call returns" holds for any count.
-- Offboarding a subject calls it with the subject's active tokens; a revoke by filter can call it
-- with a filter's. Called with one parameterised statement and pinned to this schema, like 0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Kills every listed token still active, in one transaction; returns the facts of those it killed
-- (status revoked, or expired when already past its expiry, as every kill records it). The rows are
-- locked first, in id order: two bulk kills over overlapping sets queue instead of deadlocking, a
-- single kill holds one row only, and the expiry sweeper skips locked rows. A row killed by another
-- transaction meanwhile is re-checked after its lock is released and left out (it is dead already).
CREATE FUNCTION kill_tokens(
  schema_name text, token_ids text[], actor text, reason text, initiating_entity text,
  request_id text, correlation_id text, channel text)
RETURNS SETOF token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  due text[];
  due_id text;
  killed token;
BEGIN
  SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}') INTO due
    FROM (SELECT t.id FROM token t
           WHERE t.id = ANY(kill_tokens.token_ids) AND t.status = 'active'
           ORDER BY t.id
           FOR UPDATE) AS d;
  FOREACH due_id IN ARRAY due LOOP
    SELECT (k.facts).* INTO killed
      FROM kill_token(kill_tokens.schema_name, due_id, kill_tokens.actor, kill_tokens.reason,
                      kill_tokens.initiating_entity, false, false, kill_tokens.request_id,
                      kill_tokens.correlation_id, revocation_event_id(due_id), kill_tokens.channel) AS k
     WHERE k.changed;
    IF FOUND THEN
      RETURN NEXT killed;
    END IF;
  END LOOP;
END;
$$;
