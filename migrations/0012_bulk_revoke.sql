-- Up Migration
-- Revocation by filter: an operation record (the checkpoint a resume starts from) and its kill in
-- chunks, each chunk one statement and one transaction through kill_tokens (migrations/0009), so
-- every kill is the one kill and every event and audit record carries the operation id.
-- Called with one parameterised statement and pinned to this schema, like migrations/0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- One row per revocation by filter. The filter's criteria are columns (NULL: not filtered on), and
-- cutoff is the database clock when the operation began: a token issued later never matches, so a
-- resume days later never kills a token nobody meant. killed and told are running totals across
-- runs; the tokens themselves (revoke_request_id = id) are the truth, these are for reports.
CREATE TABLE bulk_revoke (
  id                uuid PRIMARY KEY,
  subject           text,
  receiver          text,
  issued_before     timestamptz,
  name_prefix       text,
  reason            text NOT NULL,
  actor             text NOT NULL,
  initiating_entity text NOT NULL CHECK (initiating_entity IN ('admin', 'user', 'policy', 'system')),
  created_at        timestamptz NOT NULL DEFAULT now(),
  cutoff            timestamptz NOT NULL,
  state             text NOT NULL DEFAULT 'killing' CHECK (state IN ('killing', 'telling', 'complete', 'incomplete')),
  killed            integer NOT NULL DEFAULT 0,
  told              integer NOT NULL DEFAULT 0,
  updated_at        timestamptz NOT NULL DEFAULT now(),
  -- Never "every token": at least one criterion besides the cutoff.
  CHECK (subject IS NOT NULL OR receiver IS NOT NULL OR issued_before IS NOT NULL OR name_prefix IS NOT NULL)
);

-- Whether a token matches an operation's filter (the cutoff included). One definition, used by the
-- preview count, the kill and the report, so they can never disagree. No SET search_path (it calls
-- built-ins only, which pg_catalog resolves first): PostgreSQL then inlines it, and the subject's
-- index serves a filter by subject.
CREATE FUNCTION bulk_revoke_matches(
  t token, cutoff timestamptz, subject text, receiver text, issued_before timestamptz, name_prefix text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT t.issued_at <= bulk_revoke_matches.cutoff
     AND (bulk_revoke_matches.subject IS NULL OR t.subject = bulk_revoke_matches.subject)
     AND (bulk_revoke_matches.receiver IS NULL OR t.receivers @> ARRAY[bulk_revoke_matches.receiver])
     AND (bulk_revoke_matches.issued_before IS NULL OR t.issued_at < bulk_revoke_matches.issued_before)
     AND (bulk_revoke_matches.name_prefix IS NULL
          OR coalesce(starts_with(t.name, bulk_revoke_matches.name_prefix), false))
$$;

-- The ids of up to max_count active tokens matching the operation's filter after after_id (NULL: from
-- the first), lowest first. Dynamic SQL so each call is planned with the filter's values: a NULL
-- criterion folds away and the subject's index (or the receivers' GIN index) serves the rest.
CREATE FUNCTION bulk_revoke_due(operation_id uuid, after_id text, max_count integer)
RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
  op bulk_revoke;
  due text[];
BEGIN
  SELECT * INTO op FROM bulk_revoke o WHERE o.id = bulk_revoke_due.operation_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'bulk revoke operation % not found', bulk_revoke_due.operation_id USING ERRCODE = 'P0002';
  END IF;
  EXECUTE 'SELECT coalesce(array_agg(d.id ORDER BY d.id), ''{}'') FROM (SELECT t.id FROM token t
            WHERE t.status = ''active'' AND ($6::text IS NULL OR t.id > $6)
              AND bulk_revoke_matches(t, $1, $2, $3, $4, $5)
            ORDER BY t.id LIMIT $7) d'
    INTO due
    USING op.cutoff, op.subject, op.receiver, op.issued_before, op.name_prefix, bulk_revoke_due.after_id,
          bulk_revoke_due.max_count;
  RETURN due;
END;
$$;

-- Kills the listed tokens (bulk_revoke_due's, or a part of them when a chunk is split) that are
-- still active and match the operation's filter, in one transaction, each by the one kill with the
-- operation id as request id and correlation id, and adds them to the operation's count. Returns the
-- facts of those it killed. Idempotent: a token dead already is left out.
CREATE FUNCTION bulk_revoke_kill_chunk(schema_name text, operation_id uuid, token_ids text[], channel text)
RETURNS SETOF token
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  op bulk_revoke;
  n integer;
BEGIN
  SELECT * INTO op FROM bulk_revoke o WHERE o.id = bulk_revoke_kill_chunk.operation_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'bulk revoke operation % not found', bulk_revoke_kill_chunk.operation_id USING ERRCODE = 'P0002';
  END IF;
  RETURN QUERY SELECT * FROM kill_tokens(
    bulk_revoke_kill_chunk.schema_name,
    ARRAY(SELECT t.id FROM token t
           WHERE t.id = ANY (bulk_revoke_kill_chunk.token_ids) AND t.status = 'active'
             AND bulk_revoke_matches(t, op.cutoff, op.subject, op.receiver, op.issued_before, op.name_prefix)),
    op.actor, op.reason, op.initiating_entity, op.id::text, op.id::text, bulk_revoke_kill_chunk.channel);
  GET DIAGNOSTICS n = ROW_COUNT;
  UPDATE bulk_revoke o SET killed = o.killed + n, updated_at = now() WHERE o.id = op.id;
END;
$$;

-- Active tokens still matching the operation's filter (0 when its kill phase is done). Dynamic SQL
-- for the reason bulk_revoke_due gives: planned with the values, the subject's index serves it.
CREATE FUNCTION bulk_revoke_remaining(operation_id uuid) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
  op bulk_revoke;
  n bigint;
BEGIN
  SELECT * INTO op FROM bulk_revoke o WHERE o.id = bulk_revoke_remaining.operation_id;
  IF NOT FOUND THEN
    RETURN 0;
  END IF;
  EXECUTE 'SELECT count(*) FROM token t WHERE t.status = ''active'' AND bulk_revoke_matches(t, $1, $2, $3, $4, $5)'
    INTO n USING op.cutoff, op.subject, op.receiver, op.issued_before, op.name_prefix;
  RETURN n;
END;
$$;

-- A filter by receiver reads this (the array containment of bulk_revoke_matches), active tokens only.
CREATE INDEX token_active_receivers ON token USING gin (receivers) WHERE status = 'active';

-- The untold set: tokens this operation killed whose workflow has not taken over propagation.
CREATE INDEX token_revoke_request_untold ON token (revoke_request_id, id)
  WHERE status <> 'active' AND propagation_started_at IS NULL;
