-- Up Migration
-- The store's part of issuing a token as one function, called with one parameterised statement: one
-- round trip and one transaction of its own, no session state (works behind PgBouncer in
-- transaction mode). Its search_path is pinned as in 0002, so its table names resolve whatever the
-- calling session's search_path is.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Writes an active token and its current credential (the secret's hash only), with its expiry from
-- the database clock, and appends `token.issued` to its audit chain. Every receiver must exist and
-- be enabled: they are locked FOR SHARE until commit, so a concurrent removal waits for the token
-- and then sees it. Otherwise it raises foreign_key_violation on the constraint name
-- `token_receivers_known`, its message naming the unknown receivers, and writes nothing.
CREATE FUNCTION issue_token(
  token_id text, credential_id text, subject text, name text, scopes text[], receivers text[],
  ttl_ms bigint, secret_hash bytea)
RETURNS token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  known text[];
  unknown text;
  issued token;
BEGIN
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

  INSERT INTO token (id, subject, name, scopes, receivers, expires_at)
  VALUES (issue_token.token_id, issue_token.subject, issue_token.name, issue_token.scopes, issue_token.receivers,
          now() + issue_token.ttl_ms * interval '1 millisecond')
  RETURNING * INTO issued;
  INSERT INTO credential (id, token_id, secret_hash, state)
  VALUES (issue_token.credential_id, issued.id, issue_token.secret_hash, 'current');

  PERFORM append_audit(issued.id, 'issued', 'token.issued', jsonb_build_object(
    'subject', issued.subject,
    'credentialId', issue_token.credential_id,
    'receivers', to_jsonb(issued.receivers),
    'scopes', to_jsonb(issued.scopes),
    'expiresAt', iso_time(issued.expires_at)));
  RETURN issued;
END;
$$;
