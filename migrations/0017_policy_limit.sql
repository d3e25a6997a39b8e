-- Up Migration
-- `policy apply` shortens a token to an instant, not by a ttl: its expiry becomes the policy's limit
-- (issued_at + max lifetime) read under the token's lock, so no clock moving between the verdict and
-- the write can land it past the limit (change_expiry's now() + ttl would, and be refused).
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- expires_at := least(expires_at, issued_at + the token's policy's max lifetime): never later, and a
-- repeat (or a token already within the limit, dead, or without a limit) changes nothing. A limit
-- already past makes the token expired in the store at once, which is what the policy says.
-- Audited and NOTIFYed like change_expiry. Returns no row for an unknown token.
CREATE FUNCTION shorten_to_policy_limit(schema_name text, token_id text, actor text, reason text, channel text)
RETURNS TABLE (changed boolean, previous_expires_at timestamptz, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
  old_expiry timestamptz;
  policy_limit timestamptz;
  limit_version integer;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = shorten_to_policy_limit.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT owner.issued_at + p.max_lifetime_ms * interval '1 millisecond', p.version INTO policy_limit, limit_version
    FROM policy p WHERE p.name = owner.policy AND p.max_lifetime_ms IS NOT NULL;
  IF owner.status <> 'active' OR policy_limit IS NULL OR owner.expires_at <= policy_limit THEN
    RETURN QUERY SELECT false, owner.expires_at, owner;
    RETURN;
  END IF;
  old_expiry := owner.expires_at;
  UPDATE token t SET expires_at = policy_limit WHERE t.id = owner.id RETURNING t.* INTO owner;
  PERFORM append_audit(owner.id, 'expiry-changed:policy:' || owner.policy || ':' || limit_version,
    'token.expiry_changed',
    jsonb_build_object('mode', 'shorten', 'policy', owner.policy, 'policyVersion', limit_version,
                       'previousExpiresAt', iso_time(old_expiry), 'expiresAt', iso_time(owner.expires_at),
                       'actor', shorten_to_policy_limit.actor, 'reason', shorten_to_policy_limit.reason));
  -- Cached answers are bounded by the old expiry: none may outlive the new one.
  PERFORM pg_notify(shorten_to_policy_limit.channel, shorten_to_policy_limit.schema_name || ':' || owner.id);
  RETURN QUERY SELECT true, old_expiry, owner;
END;
$$;
