-- Up Migration
-- The store's part of a mass expiry in batches: many expired tokens recorded dead in one statement
-- and one transaction, each by the one kill (kill_token), so none waits for its workflow to run.
-- Called with one parameterised statement and pinned to this schema, like migrations/0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- The revocation event id of a token: the derivation of common/ids.ts revocationEventId, which
-- every other path passes to kill_token (test/sweep.test.ts holds the two equal).
CREATE FUNCTION revocation_event_id(token_id text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path FROM CURRENT
AS $$ SELECT 'evt_' || left(encode(sha256(convert_to(token_id || ':token-revoked', 'UTF8')), 'hex'), 32) $$;

-- Kills up to max_count active tokens whose expiry is at least grace_ms past on the database clock,
-- oldest expiry first, each exactly as the workflow's expiry kill would (kill_token with
-- only_if_expired): status expired at its expiry, credentials, outbox rows, audit event, NOTIFY.
-- Returns the facts of the tokens it killed. Rows another transaction holds (a revoke, another
-- sweeper) are skipped, not waited for: they are dead or being killed. propagation_started_at stays
-- NULL: the token's workflow marks it when its own kill finds the token dead.
CREATE FUNCTION kill_expired_tokens(schema_name text, max_count integer, grace_ms bigint, channel text)
RETURNS SETOF token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  due text[];
  due_id text;
  killed token;
BEGIN
  SELECT coalesce(array_agg(d.id ORDER BY d.expires_at, d.id), '{}') INTO due
    FROM (SELECT t.id, t.expires_at FROM token t
           WHERE t.status = 'active' AND t.expires_at <= now() - kill_expired_tokens.grace_ms * interval '1 millisecond'
           ORDER BY t.expires_at, t.id
           LIMIT kill_expired_tokens.max_count
           FOR UPDATE SKIP LOCKED) AS d;
  FOREACH due_id IN ARRAY due LOOP
    SELECT (k.facts).* INTO killed
      FROM kill_token(kill_expired_tokens.schema_name, due_id, 'system', 'expired', 'system', false, true,
                      NULL, NULL, revocation_event_id(due_id), kill_expired_tokens.channel) AS k
     WHERE k.changed;
    IF FOUND THEN
      RETURN NEXT killed;
    END IF;
  END LOOP;
END;
$$;
