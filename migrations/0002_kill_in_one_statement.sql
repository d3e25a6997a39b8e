-- Up Migration
-- The kill and the audit chain as functions, each called with one parameterised statement: no
-- session state (PREPARE, search_path), so they work behind a transaction-mode pooler (PgBouncer).
-- Each function pins its search_path to this migration's schema (SET … FROM CURRENT), so its table
-- names resolve whatever the calling session's search_path is.

-- What FROM CURRENT captures: this schema, then pg_temp last (a session's temporary tables must
-- never shadow the store's tables inside these functions), whatever the runner's session had.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- A string in CESU-8 (characters beyond U+FFFF as their two UTF-16 surrogates, 3 bytes each): its
-- byte order is UTF-16 code unit order, by which RFC 8785 sorts member names (JavaScript's order).
-- Plain UTF-8 byte order differs only when such a character meets one from U+E000 to U+FFFF.
CREATE FUNCTION cesu8(s text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT SET search_path FROM CURRENT AS $$
  SELECT coalesce(string_agg(
           CASE WHEN u.cp < 65536 THEN convert_to(c.ch, 'UTF8')
                ELSE decode(to_hex(((224 | (u.hi >> 12)) << 16) | ((128 | ((u.hi >> 6) & 63)) << 8) | (128 | (u.hi & 63)))
                         || to_hex(((224 | (u.lo >> 12)) << 16) | ((128 | ((u.lo >> 6) & 63)) << 8) | (128 | (u.lo & 63))),
                            'hex') END,
           ''::bytea ORDER BY c.n), ''::bytea)
    FROM regexp_split_to_table(s, '') WITH ORDINALITY AS c(ch, n),
         LATERAL (SELECT ascii(c.ch) AS cp,
                         55296 + ((ascii(c.ch) - 65536) >> 10) AS hi,
                         56320 + ((ascii(c.ch) - 65536) & 1023) AS lo) AS u
$$;

-- RFC 8785 canonical JSON of a jsonb value, as Node's `canonicalize` writes it for our events:
-- members sorted by the UTF-16 code units of their names (UTF-8 bytes, or CESU-8 for the rare name
-- with a character beyond U+FFFF), no whitespace, strings escaped as
-- JSON.stringify does (PostgreSQL's JSON escaping is the same), integers only (ECMAScript's number
-- formatting of fractions is not reproduced here, so it refuses them rather than differ).
CREATE FUNCTION canonical_json(doc jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path FROM CURRENT AS $$
BEGIN
  CASE jsonb_typeof(doc)
  WHEN 'object' THEN
    RETURN '{' || coalesce((
      SELECT string_agg(to_json(m.key)::text || ':' || canonical_json(m.value), ','
               ORDER BY CASE WHEN m.key ~ '[\U00010000-\U0010FFFF]' THEN cesu8(m.key) ELSE convert_to(m.key, 'UTF8') END)
        FROM jsonb_each(doc) AS m), '') || '}';
  WHEN 'array' THEN
    RETURN '[' || coalesce((
      SELECT string_agg(canonical_json(e.value), ',' ORDER BY e.position)
        FROM jsonb_array_elements(doc) WITH ORDINALITY AS e(value, position)), '') || ']';
  WHEN 'string' THEN
    RETURN to_json(doc #>> '{}')::text;
  WHEN 'number' THEN
    IF doc::numeric <> trunc(doc::numeric) OR abs(doc::numeric) > 9007199254740991 THEN
      RAISE EXCEPTION 'canonical JSON here holds safe integers only, not %', doc USING ERRCODE = '22023';
    END IF;
    RETURN trunc(doc::numeric)::text;
  ELSE
    RETURN doc::text; -- true, false, null
  END CASE;
END;
$$;

-- An instant as JavaScript's Date#toISOString writes it (UTC, milliseconds, truncated).
CREATE FUNCTION iso_time(instant timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path FROM CURRENT
AS $$ SELECT to_char(instant AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

-- Appends one event to the token's hash chain. The token row's lock orders the chain's writers, and
-- the head is read after it is taken (each statement here sees a fresh snapshot in READ COMMITTED),
-- so concurrent writers never take the same seq. A repeated idempotency key appends nothing.
CREATE FUNCTION append_audit(token_id text, idempotency_key text, kind text, data jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  head_seq integer;
  head_hash bytea;
  event_text text;
BEGIN
  PERFORM 1 FROM token t WHERE t.id = append_audit.token_id FOR UPDATE;
  IF EXISTS (SELECT 1 FROM audit_event a
              WHERE a.token_id = append_audit.token_id AND a.idempotency_key = append_audit.idempotency_key) THEN
    RETURN false;
  END IF;
  SELECT a.seq, a.hash INTO head_seq, head_hash
    FROM audit_event a WHERE a.token_id = append_audit.token_id ORDER BY a.seq DESC LIMIT 1;
  event_text := canonical_json(jsonb_build_object(
    'tokenId', append_audit.token_id,
    'seq', coalesce(head_seq, 0) + 1,
    'kind', append_audit.kind,
    'at', iso_time(now()),
    'prevHash', encode(head_hash, 'hex'),
    'data', append_audit.data));
  INSERT INTO audit_event (token_id, seq, idempotency_key, kind, canonical, prev_hash, hash)
  VALUES (append_audit.token_id, coalesce(head_seq, 0) + 1, append_audit.idempotency_key, append_audit.kind,
          event_text, head_hash, sha256(convert_to(event_text, 'UTF8')));
  RETURN true;
END;
$$;

-- The one kill (see common/store/kill.ts). A token found past its expiry died at its expiry, by the
-- system, whoever asks: revoked_at = expires_at, revoked_by = 'system', reason 'expired'.
-- Returns no row for an unknown token; changed = false with the first kill's facts when it is
-- already dead; changed = false with remaining_ms when only_if_expired and it has not expired yet.
CREATE FUNCTION kill_token(
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
