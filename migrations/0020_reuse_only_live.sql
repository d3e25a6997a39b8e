-- Up Migration
-- Reuse detection only on a live token; issue takes the subject's issuance lock before the policy
-- row and returns the policy it was written under; suspend and resume audited once per request.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Reuse: a credential that must no longer be presented (revoked, or previous past its grace) shown
-- while its token is live. A token past its expiry is dead even before the sweep records it: an old
-- credential of it is refused as the token is, and kills nothing.
CREATE FUNCTION credential_reused(token_status text, token_expires_at timestamptz, state text, valid_until timestamptz)
RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT credential_reused.token_status = 'active'
     AND credential_reused.token_expires_at > now()
     AND (credential_reused.state = 'revoked'
          OR (credential_reused.state = 'previous' AND credential_reused.valid_until <= now()))
$$;

-- migrations/0015's, re-checking the reuse with the token's expiry.
CREATE OR REPLACE FUNCTION kill_reused_credential(schema_name text, credential_id text, channel text)
RETURNS TABLE (token_id text, killed boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  presented credential;
  owner token;
  did_kill boolean := false;
BEGIN
  SELECT * INTO presented FROM credential c WHERE c.id = kill_reused_credential.credential_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT * INTO owner FROM token t WHERE t.id = presented.token_id FOR UPDATE;
  SELECT * INTO presented FROM credential c WHERE c.id = kill_reused_credential.credential_id;
  IF credential_reused(owner.status, owner.expires_at, presented.state, presented.valid_until) THEN
    PERFORM append_audit(owner.id, 'reuse-detected:' || presented.id, 'credential.reuse_detected', jsonb_build_object(
      'credentialId', presented.id, 'state', presented.state, 'validUntil', iso_time(presented.valid_until)));
    SELECT k.changed INTO did_kill
      FROM kill_token(kill_reused_credential.schema_name, owner.id, 'system:reuse-detection', 'reuse_detected',
                      'system', false, false, NULL, NULL, revocation_event_id(owner.id),
                      kill_reused_credential.channel) AS k;
  END IF;
  RETURN QUERY SELECT owner.id, coalesce(did_kill, false);
END;
$$;

-- Its only callers (the lookup in common/store/verification.ts, kill_reused_credential) use the one above.
DROP FUNCTION credential_reused(text, text, timestamptz);

-- migrations/0016's issue, two changes. The policy row is locked FOR SHARE after issuance_clock's
-- subject lock, not before: an issue waiting behind an offboarding of its subject holds no policy
-- row, so a `policy set` meanwhile does not wait for the offboarding. The policy is returned as the
-- row was written under it, so the workflow starts with that version. A function of its own:
-- issue_token keeps its shape for processes of the previous release during a rolling deploy.
CREATE FUNCTION issue_token_under_policy(
  token_id text, credential_id text, subject text, name text, scopes text[], receivers text[],
  ttl_ms bigint, secret_hash bytea, policy_name text DEFAULT NULL)
RETURNS TABLE (facts token, under_policy policy)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  known text[];
  unknown text;
  issued token;
  issued_clock timestamptz;
  p policy;
  refused text;
BEGIN
  issued_clock := issuance_clock(issue_token_under_policy.subject);
  IF issue_token_under_policy.policy_name IS NOT NULL THEN
    SELECT * INTO p FROM policy WHERE policy.name = issue_token_under_policy.policy_name FOR SHARE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'no policy named %', issue_token_under_policy.policy_name
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'token_policy_known';
    END IF;
    IF p.max_lifetime_ms IS NOT NULL AND issue_token_under_policy.ttl_ms > p.max_lifetime_ms THEN
      RAISE EXCEPTION 'lifetime above policy %''s max lifetime', p.name
        USING ERRCODE = 'check_violation', CONSTRAINT = 'token_policy_max_lifetime', DETAIL = p.max_lifetime_ms::text;
    END IF;
    IF p.allowed_scopes IS NOT NULL THEN
      SELECT string_agg(s, ', ' ORDER BY n) INTO refused
        FROM unnest(issue_token_under_policy.scopes) WITH ORDINALITY AS u(s, n) WHERE s <> ALL (p.allowed_scopes);
      IF refused IS NOT NULL THEN
        RAISE EXCEPTION 'scope not allowed by policy %', p.name
          USING ERRCODE = 'check_violation', CONSTRAINT = 'token_policy_scopes', DETAIL = refused;
      END IF;
    END IF;
  END IF;

  IF cardinality(issue_token_under_policy.receivers) > 0 THEN
    SELECT coalesce(array_agg(r.id), '{}') INTO known
      FROM (SELECT r.id FROM receiver r WHERE r.id = ANY (issue_token_under_policy.receivers) AND r.enabled FOR SHARE) AS r;
    SELECT string_agg(u.id, ', ' ORDER BY u.n) INTO unknown
      FROM unnest(issue_token_under_policy.receivers) WITH ORDINALITY AS u(id, n)
     WHERE u.id <> ALL (known);
    IF unknown IS NOT NULL THEN
      RAISE EXCEPTION 'unknown or removed receiver %', unknown
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'token_receivers_known';
    END IF;
  END IF;

  INSERT INTO token (id, subject, name, scopes, receivers, issued_at, expires_at, policy, policy_version)
  VALUES (issue_token_under_policy.token_id, issue_token_under_policy.subject, issue_token_under_policy.name, issue_token_under_policy.scopes, issue_token_under_policy.receivers,
          issued_clock, issued_clock + issue_token_under_policy.ttl_ms * interval '1 millisecond', p.name, p.version)
  RETURNING * INTO issued;
  INSERT INTO credential (id, token_id, secret_hash, state)
  VALUES (issue_token_under_policy.credential_id, issued.id, issue_token_under_policy.secret_hash, 'current');

  -- A token without a policy is audited exactly as before (the audit text is hashed into its chain).
  PERFORM append_audit(issued.id, 'issued', 'token.issued', jsonb_build_object(
    'subject', issued.subject,
    'credentialId', issue_token_under_policy.credential_id,
    'receivers', to_jsonb(issued.receivers),
    'scopes', to_jsonb(issued.scopes),
    'expiresAt', iso_time(issued.expires_at))
    || CASE WHEN p.name IS NULL THEN '{}'::jsonb
            ELSE jsonb_build_object('policy', p.name, 'policyVersion', p.version) END);
  RETURN QUERY SELECT issued, p;
END;
$$;

-- The previous shape, same behaviour (the new lock order included).
CREATE OR REPLACE FUNCTION issue_token(
  token_id text, credential_id text, subject text, name text, scopes text[], receivers text[],
  ttl_ms bigint, secret_hash bytea, policy_name text DEFAULT NULL)
RETURNS token
LANGUAGE sql SET search_path FROM CURRENT AS $$
  SELECT (i.facts).* FROM issue_token_under_policy($1, $2, $3, $4, $5, $6, $7, $8, $9) AS i;
$$;

-- migrations/0015's suspend and resume, each audited once per request. With request_id (the
-- workflow's update id) the audit key is the request's, and a retry of a request already carried
-- out changes nothing, even after a later resume or suspend; without one, the key is the audit
-- chain's next position, so no two changes share a key (an instant could: a suspend, resume and
-- suspend within one millisecond).
DROP FUNCTION set_suspended(text, text, boolean, text, text, text);
CREATE FUNCTION set_suspended(
  schema_name text, token_id text, suspend boolean, actor text, reason text, channel text,
  request_id text DEFAULT NULL)
RETURNS TABLE (changed boolean, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
  audit_key text;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = set_suspended.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF set_suspended.request_id IS NOT NULL THEN
    audit_key := CASE WHEN set_suspended.suspend THEN 'suspended:' ELSE 'resumed:' END || set_suspended.request_id;
    IF EXISTS (SELECT 1 FROM audit_event a WHERE a.token_id = owner.id AND a.idempotency_key = audit_key) THEN
      RETURN QUERY SELECT false, owner;
      RETURN;
    END IF;
  ELSE
    audit_key := CASE WHEN set_suspended.suspend THEN 'suspended:@' ELSE 'resumed:@' END
      || (SELECT coalesce(max(a.seq), 0) + 1 FROM audit_event a WHERE a.token_id = owner.id);
  END IF;
  IF set_suspended.suspend AND (owner.status <> 'active' OR owner.expires_at <= now()) THEN
    RAISE EXCEPTION 'token % is not active (%)', owner.id,
      CASE WHEN owner.status = 'active' THEN 'expired' ELSE owner.status END
      USING ERRCODE = '55000', CONSTRAINT = 'token_not_active';
  END IF;
  IF set_suspended.suspend = (owner.suspended_at IS NOT NULL) OR owner.status <> 'active' THEN
    RETURN QUERY SELECT false, owner;
    RETURN;
  END IF;
  IF set_suspended.suspend THEN
    UPDATE token t SET suspended_at = now(), suspended_by = set_suspended.actor, suspend_reason = set_suspended.reason
     WHERE t.id = owner.id RETURNING t.* INTO owner;
    PERFORM append_audit(owner.id, audit_key, 'token.suspended',
      jsonb_build_object('actor', set_suspended.actor, 'reason', set_suspended.reason,
                         'suspendedAt', iso_time(owner.suspended_at)));
  ELSE
    PERFORM append_audit(owner.id, audit_key, 'token.resumed',
      jsonb_build_object('actor', set_suspended.actor, 'reason', set_suspended.reason,
                         'suspendedAt', iso_time(owner.suspended_at)));
    UPDATE token t SET suspended_at = NULL, suspended_by = NULL, suspend_reason = NULL
     WHERE t.id = owner.id RETURNING t.* INTO owner;
  END IF;
  PERFORM pg_notify(set_suspended.channel, set_suspended.schema_name || ':' || owner.id);
  RETURN QUERY SELECT true, owner;
END;
$$;
