-- Up Migration
-- Bulk writes of tokens whose secrets exist already (imported from another system, or generated and
-- journaled by a bulk issue): a batch in one function called with one parameterised statement (the
-- batch as parallel arrays), one round trip and one transaction. Pinned to this schema like 0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Writes each record of the batch as issue_token does (token row, current credential with the hash
-- only, `token.issued` audit event), in array order, and reports per record, without ever aborting
-- the batch for one record:
--   inserted  written now;
--   existing  the token id is stored with this very secret hash (a rerun), or the record named no id
--             (id_given false) and the hash is stored under another id, and the stored facts are the
--             record's (import_facts_differ): nothing written, `facts` are the stored row;
--   conflict  nothing written; `message` says why: the id is stored with another secret, the
--             secret belongs to another token, the token is stored with other facts (a rerun with
--             changed records), an unknown or removed receiver, an expiry not in the future.
--             `field` names the record's field at fault; messages name ids and fields, never values.
-- Expiry: expires_at when given, else issued_at + ttl_ms (issued_at from issuance_clock, 0011). Receivers are locked FOR SHARE until commit,
-- as in issue_token. Concurrent batches holding the same secret serialise on a lock per secret
-- (below): the later one reports existing or conflict. `imported` marks the audit event (`"imported": true`) of a token brought under
-- management; a bulk issue passes false.
-- The first of the record's facts that the stored token does not have (NULL when all match):
-- receivers and scopes as sets; the expiry only when the record gives an absolute one (a ttl moves).
CREATE FUNCTION import_facts_differ(stored token, subject text, receivers text[], scopes text[], name text,
                                    expires_at timestamptz)
RETURNS text LANGUAGE sql IMMUTABLE SET search_path FROM CURRENT AS $$
  SELECT CASE
    WHEN stored.subject <> subject THEN 'subject'
    WHEN ARRAY(SELECT DISTINCT r FROM unnest(stored.receivers) AS r ORDER BY 1)
         <> ARRAY(SELECT DISTINCT r FROM unnest(receivers) AS r ORDER BY 1) THEN 'receivers'
    WHEN ARRAY(SELECT DISTINCT x FROM unnest(stored.scopes) AS x ORDER BY 1)
         <> ARRAY(SELECT DISTINCT x FROM unnest(scopes) AS x ORDER BY 1) THEN 'scopes'
    WHEN stored.name IS DISTINCT FROM name THEN 'name'
    WHEN expires_at IS NOT NULL AND stored.expires_at <> expires_at THEN 'expiresAt'
  END
$$;

CREATE FUNCTION import_tokens(
  token_ids text[], credential_ids text[], id_given boolean[], secret_hashes bytea[], subjects text[],
  names text[], scopes_json text[], receivers_json text[], expires_ats timestamptz[], ttls_ms bigint[],
  imported boolean)
RETURNS TABLE (ord integer, outcome text, field text, message text, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  known text[];
  rec record;
  rec_receivers text[];
  rec_scopes text[];
  unknown text;
  expiry timestamptz;
  stored token;
  owner text;
  differs text;
  lock_key bigint;
  issued timestamptz;
BEGIN
  SELECT coalesce(array_agg(r.id), '{}') INTO known
    FROM (SELECT r.id FROM receiver r
           WHERE r.enabled AND r.id IN (SELECT jsonb_array_elements_text(j::jsonb) FROM unnest(receivers_json) AS j)
           ORDER BY r.id FOR SHARE) AS r;

  -- Concurrent batches holding the same secrets queue on one lock per secret, taken in hash order
  -- before anything is written: without it they waited on each other's unique-index entries in
  -- input order and deadlocked (a record without an id gets a fresh id per run, so no id orders
  -- two runs' batches alike). A hash collision of the keys only serialises two batches more.
  FOR lock_key IN
    SELECT DISTINCT hashtextextended(encode(h, 'hex'), 0) AS k FROM unnest(secret_hashes) AS h ORDER BY k
  LOOP
    PERFORM pg_advisory_xact_lock(lock_key);
  END LOOP;

  -- The issuance barrier (migrations/0011) for every subject of the batch, before any row is written.
  PERFORM issuance_clock_for(subjects);

  FOR rec IN
    SELECT u.* FROM unnest(token_ids, credential_ids, id_given, secret_hashes, subjects, names, scopes_json,
                           receivers_json, expires_ats, ttls_ms)
                    WITH ORDINALITY AS u(token_id, credential_id, given, secret_hash, subject, name, scopes,
                                         receivers, expires_at, ttl_ms, n)
     ORDER BY u.n
  LOOP
    ord := rec.n;
    field := NULL;
    message := NULL;
    facts := NULL;

    rec_receivers := ARRAY(SELECT jsonb_array_elements_text(rec.receivers::jsonb));
    rec_scopes := ARRAY(SELECT jsonb_array_elements_text(rec.scopes::jsonb));

    -- A rerun: the id is stored already. Same secret and facts: existing; another secret: conflict.
    SELECT t.* INTO stored FROM token t WHERE t.id = rec.token_id;
    IF FOUND THEN
      IF EXISTS (SELECT 1 FROM credential c WHERE c.token_id = rec.token_id AND c.secret_hash = rec.secret_hash) THEN
        outcome := 'existing';
        facts := stored;
        differs := import_facts_differ(facts, rec.subject, rec_receivers, rec_scopes, rec.name, rec.expires_at);
        IF differs IS NOT NULL THEN
          -- A rerun with a changed record: the stored token keeps its facts, and the user is told.
          outcome := 'conflict';
          field := differs;
          message := format('token %s is stored with other %s; change it through the token''s own commands (revoke and re-import)',
                            facts.id, CASE differs WHEN 'expiresAt' THEN 'expiry' ELSE differs END);
          facts := NULL;
        END IF;
      ELSE
        outcome := 'conflict';
        field := 'tokenId';
        message := format('token id %s is already stored with another secret', rec.token_id);
      END IF;
      RETURN NEXT;
      CONTINUE;
    END IF;

    SELECT c.token_id INTO owner FROM credential c WHERE c.secret_hash = rec.secret_hash;
    IF FOUND THEN
      IF rec.given THEN
        outcome := 'conflict';
        field := 'secret';
        message := format('this secret is already managed as token %s, not %s', owner, rec.token_id);
      ELSE
        outcome := 'existing';
        SELECT t.* INTO facts FROM token t WHERE t.id = owner;
        differs := import_facts_differ(facts, rec.subject, rec_receivers, rec_scopes, rec.name, rec.expires_at);
        IF differs IS NOT NULL THEN
          -- A rerun with a changed record: the stored token keeps its facts, and the user is told.
          outcome := 'conflict';
          field := differs;
          message := format('token %s is stored with other %s; change it through the token''s own commands (revoke and re-import)',
                            facts.id, CASE differs WHEN 'expiresAt' THEN 'expiry' ELSE differs END);
          facts := NULL;
        END IF;
      END IF;
      RETURN NEXT;
      CONTINUE;
    END IF;

    SELECT string_agg(r, ', ') INTO unknown FROM unnest(rec_receivers) AS r WHERE r <> ALL (known);
    IF unknown IS NOT NULL THEN
      outcome := 'conflict';
      field := 'receivers';
      message := format('unknown or removed receiver %s', unknown);
      RETURN NEXT;
      CONTINUE;
    END IF;

    -- The issuance barrier is held (taken for every subject of the batch before the loop): a revoke
    -- by filter or an offboarding that reads its clock after this one sees this row.
    issued := clock_timestamp();
    expiry := coalesce(rec.expires_at, issued + rec.ttl_ms * interval '1 millisecond');
    IF expiry IS NULL OR expiry <= issued THEN
      outcome := 'conflict';
      field := 'expiresAt';
      message := 'the expiry is not in the future (on the database clock)';
      RETURN NEXT;
      CONTINUE;
    ELSIF expiry - issued > interval '3650 days' THEN
      outcome := 'conflict';
      field := 'expiresAt';
      message := 'the expiry is more than 3650 days ahead';
      RETURN NEXT;
      CONTINUE;
    END IF;

    INSERT INTO token (id, subject, name, scopes, receivers, issued_at, expires_at)
    VALUES (rec.token_id, rec.subject, rec.name, rec_scopes, rec_receivers, issued, expiry)
    ON CONFLICT (id) DO NOTHING
    RETURNING * INTO stored;
    IF NOT FOUND THEN
      -- Another transaction wrote this id since the check above (it has committed: ON CONFLICT waited).
      SELECT t.* INTO stored FROM token t WHERE t.id = rec.token_id;
      IF EXISTS (SELECT 1 FROM credential c WHERE c.token_id = rec.token_id AND c.secret_hash = rec.secret_hash) THEN
        outcome := 'existing';
        facts := stored;
        differs := import_facts_differ(facts, rec.subject, rec_receivers, rec_scopes, rec.name, rec.expires_at);
        IF differs IS NOT NULL THEN
          -- A rerun with a changed record: the stored token keeps its facts, and the user is told.
          outcome := 'conflict';
          field := differs;
          message := format('token %s is stored with other %s; change it through the token''s own commands (revoke and re-import)',
                            facts.id, CASE differs WHEN 'expiresAt' THEN 'expiry' ELSE differs END);
          facts := NULL;
        END IF;
      ELSE
        outcome := 'conflict';
        field := 'tokenId';
        message := format('token id %s is already stored with another secret', rec.token_id);
      END IF;
      RETURN NEXT;
      CONTINUE;
    END IF;

    INSERT INTO credential (id, token_id, secret_hash, state)
    VALUES (rec.credential_id, rec.token_id, rec.secret_hash, 'current')
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
      -- The secret was stored under another id since the check above (a concurrent import of it):
      -- undo this row (nothing else refers to it yet) instead of aborting the batch, and answer as
      -- the check above would have.
      DELETE FROM token t WHERE t.id = rec.token_id;
      SELECT c.token_id INTO owner FROM credential c WHERE c.secret_hash = rec.secret_hash;
      IF rec.given OR owner IS NULL THEN
        outcome := 'conflict';
        field := 'secret';
        message := format('this secret is already managed as token %s, not %s', coalesce(owner, '(unknown)'),
                          rec.token_id);
      ELSE
        outcome := 'existing';
        SELECT t.* INTO facts FROM token t WHERE t.id = owner;
        differs := import_facts_differ(facts, rec.subject, rec_receivers, rec_scopes, rec.name, rec.expires_at);
        IF differs IS NOT NULL THEN
          -- A rerun with a changed record: the stored token keeps its facts, and the user is told.
          outcome := 'conflict';
          field := differs;
          message := format('token %s is stored with other %s; change it through the token''s own commands (revoke and re-import)',
                            facts.id, CASE differs WHEN 'expiresAt' THEN 'expiry' ELSE differs END);
          facts := NULL;
        END IF;
      END IF;
      RETURN NEXT;
      CONTINUE;
    END IF;

    PERFORM append_audit(stored.id, 'issued', 'token.issued', jsonb_build_object(
      'subject', stored.subject,
      'credentialId', rec.credential_id,
      'receivers', to_jsonb(stored.receivers),
      'scopes', to_jsonb(stored.scopes),
      'expiresAt', iso_time(stored.expires_at))
      || CASE WHEN import_tokens.imported THEN jsonb_build_object('imported', true) ELSE '{}'::jsonb END);
    outcome := 'inserted';
    facts := stored;
    RETURN NEXT;
  END LOOP;
END;
$$;
