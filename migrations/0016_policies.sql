-- Up Migration
-- Named policies at issue and at apply: issue_token records the token's policy and refuses, writing
-- nothing, a lifetime above the policy's maximum or a scope it does not allow; each token remembers
-- the policy version its workflow was last told of, so `policy apply` resumes where it stopped.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- The policy version the token's workflow knows: set at issue, and when `policy apply` told it.
-- A live token of the policy whose version is lower is what an apply (or its rerun) still tells.
ALTER TABLE token ADD COLUMN policy_version integer;

-- migrations/0011's issue with a policy (NULL: none, exactly as before). The policy row is read
-- FOR SHARE: a concurrent `policy set` waits for this issue, or this issue sees the new policy.
DROP FUNCTION issue_token(text, text, text, text, text[], text[], bigint, bytea);
CREATE FUNCTION issue_token(
  token_id text, credential_id text, subject text, name text, scopes text[], receivers text[],
  ttl_ms bigint, secret_hash bytea, policy_name text DEFAULT NULL)
RETURNS token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  known text[];
  unknown text;
  issued token;
  issued_clock timestamptz;
  p policy;
  refused text;
BEGIN
  IF issue_token.policy_name IS NOT NULL THEN
    SELECT * INTO p FROM policy WHERE policy.name = issue_token.policy_name FOR SHARE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'no policy named %', issue_token.policy_name
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'token_policy_known';
    END IF;
    IF p.max_lifetime_ms IS NOT NULL AND issue_token.ttl_ms > p.max_lifetime_ms THEN
      RAISE EXCEPTION 'lifetime above policy %''s max lifetime', p.name
        USING ERRCODE = 'check_violation', CONSTRAINT = 'token_policy_max_lifetime', DETAIL = p.max_lifetime_ms::text;
    END IF;
    IF p.allowed_scopes IS NOT NULL THEN
      SELECT string_agg(s, ', ' ORDER BY n) INTO refused
        FROM unnest(issue_token.scopes) WITH ORDINALITY AS u(s, n) WHERE s <> ALL (p.allowed_scopes);
      IF refused IS NOT NULL THEN
        RAISE EXCEPTION 'scope not allowed by policy %', p.name
          USING ERRCODE = 'check_violation', CONSTRAINT = 'token_policy_scopes', DETAIL = refused;
      END IF;
    END IF;
  END IF;

  issued_clock := issuance_clock(issue_token.subject);
  IF cardinality(issue_token.receivers) > 0 THEN
    SELECT coalesce(array_agg(r.id), '{}') INTO known
      FROM (SELECT r.id FROM receiver r WHERE r.id = ANY (issue_token.receivers) AND r.enabled FOR SHARE) AS r;
    SELECT string_agg(u.id, ', ' ORDER BY u.n) INTO unknown
      FROM unnest(issue_token.receivers) WITH ORDINALITY AS u(id, n)
     WHERE u.id <> ALL (known);
    IF unknown IS NOT NULL THEN
      RAISE EXCEPTION 'unknown or removed receiver %', unknown
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'token_receivers_known';
    END IF;
  END IF;

  INSERT INTO token (id, subject, name, scopes, receivers, issued_at, expires_at, policy, policy_version)
  VALUES (issue_token.token_id, issue_token.subject, issue_token.name, issue_token.scopes, issue_token.receivers,
          issued_clock, issued_clock + issue_token.ttl_ms * interval '1 millisecond', p.name, p.version)
  RETURNING * INTO issued;
  INSERT INTO credential (id, token_id, secret_hash, state)
  VALUES (issue_token.credential_id, issued.id, issue_token.secret_hash, 'current');

  -- A token without a policy is audited exactly as before (the audit text is hashed into its chain).
  PERFORM append_audit(issued.id, 'issued', 'token.issued', jsonb_build_object(
    'subject', issued.subject,
    'credentialId', issue_token.credential_id,
    'receivers', to_jsonb(issued.receivers),
    'scopes', to_jsonb(issued.scopes),
    'expiresAt', iso_time(issued.expires_at))
    || CASE WHEN p.name IS NULL THEN '{}'::jsonb
            ELSE jsonb_build_object('policy', p.name, 'policyVersion', p.version) END);
  RETURN issued;
END;
$$;
