-- Up Migration
-- An issuance barrier: a token's issued_at is read after its issuing transaction holds shared
-- advisory locks, so an operation that takes them exclusively knows every token issued before its
-- clock reading has committed. Without it a token issued in a transaction that began before a
-- revocation by filter (or an offboarding) and committed after its kill would stay active.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- The two key spaces (first key of the two-key advisory locks), one pair per schema so that stores
-- sharing a database never wait for each other: every issue (second key 0), and one subject's
-- issues (second key: the subject's hash).
CREATE FUNCTION issuance_lock_class(per_subject boolean) RETURNS integer
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
  SELECT hashtext(CASE WHEN issuance_lock_class.per_subject THEN 'tokenwarden.subject-issuance:'
                       ELSE 'tokenwarden.issuance:' END || current_schema())
$$;

-- Called first by every transaction that writes tokens (issue_token, import_tokens) with all the
-- subjects it will write: holds both barriers shared until commit and returns the clock the tokens'
-- issued_at must be. Subjects first, in key order, then the global barrier: a writer waiting on an
-- offboarding's subject lock never holds the global one, so a revocation by filter queued behind
-- it cannot stall every other issue meanwhile.
CREATE FUNCTION issuance_clock_for(subjects text[]) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
  subject_key integer;
BEGIN
  FOR subject_key IN SELECT DISTINCT hashtext(s) AS k FROM unnest(issuance_clock_for.subjects) AS s ORDER BY k LOOP
    PERFORM pg_advisory_xact_lock_shared(issuance_lock_class(true), subject_key);
  END LOOP;
  PERFORM pg_advisory_xact_lock_shared(issuance_lock_class(false), 0);
  RETURN clock_timestamp();
END;
$$;

-- One subject's issue (issue_token).
CREATE FUNCTION issuance_clock(subject text) RETURNS timestamptz
LANGUAGE sql VOLATILE SET search_path FROM CURRENT AS $$
  SELECT issuance_clock_for(ARRAY[issuance_clock.subject])
$$;

-- A revocation by filter's cutoff: waits for every issuing transaction in flight, then reads the
-- clock. Every token issued at or before it has committed; every later one is issued after it.
-- The lock is the caller's transaction's: one short statement, so it is released at once.
CREATE FUNCTION issuance_barrier() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(issuance_lock_class(false), 0);
  RETURN clock_timestamp();
END;
$$;

-- Offboarding's kill: the subject's barrier taken exclusively before its active ids are read (a
-- later statement, so a fresh snapshot): an issue for the subject committed before and is killed
-- here, or waits for this transaction and is a new token issued after the offboarding.
CREATE FUNCTION kill_subject_tokens(
  schema_name text, subject text, actor text, reason text, initiating_entity text,
  request_id text, correlation_id text, channel text)
RETURNS SETOF token
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(issuance_lock_class(true), hashtext(kill_subject_tokens.subject));
  RETURN QUERY SELECT * FROM kill_tokens(
    kill_subject_tokens.schema_name,
    ARRAY(SELECT t.id FROM token t WHERE t.subject = kill_subject_tokens.subject AND t.status = 'active'),
    kill_subject_tokens.actor, kill_subject_tokens.reason, kill_subject_tokens.initiating_entity,
    kill_subject_tokens.request_id, kill_subject_tokens.correlation_id, kill_subject_tokens.channel);
END;
$$;

-- migrations/0004's issue, with issued_at and expires_at from issuance_clock instead of now().
CREATE OR REPLACE FUNCTION issue_token(
  token_id text, credential_id text, subject text, name text, scopes text[], receivers text[],
  ttl_ms bigint, secret_hash bytea)
RETURNS token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  known text[];
  unknown text;
  issued token;
  issued_clock timestamptz;
BEGIN
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

  INSERT INTO token (id, subject, name, scopes, receivers, issued_at, expires_at)
  VALUES (issue_token.token_id, issue_token.subject, issue_token.name, issue_token.scopes, issue_token.receivers,
          issued_clock, issued_clock + issue_token.ttl_ms * interval '1 millisecond')
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
