-- Up Migration
-- Credentials that rotate (grace of the previous one, pending credentials of automatic rotation),
-- reuse detection, suspension, expiry changes, owner notices: the store's functions, each called
-- with one parameterised statement and pinned to this schema like migrations/0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- THE validity of a token row (DESIGN §2 plus suspension). No table is read, no search_path is set:
-- the planner inlines it, so the verifier's lookup and `show` cost what the bare expression costs.
CREATE FUNCTION token_valid(status text, expires_at timestamptz, suspended_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT token_valid.status = 'active' AND token_valid.expires_at > now() AND token_valid.suspended_at IS NULL
$$;

-- Which credentials of a valid token are accepted: the current one, and the previous one in its grace.
CREATE FUNCTION credential_accepted(state text, valid_until timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT credential_accepted.state = 'current'
      OR (credential_accepted.state = 'previous' AND credential_accepted.valid_until > now())
$$;

-- Reuse: a credential that must no longer be presented (revoked, or previous past its grace) shown
-- while its token is still active. A pending credential was never handed out: not reuse.
CREATE FUNCTION credential_reused(token_status text, state text, valid_until timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT credential_reused.token_status = 'active'
     AND (credential_reused.state = 'revoked'
          OR (credential_reused.state = 'previous' AND credential_reused.valid_until <= now()))
$$;

-- The event id of a credential's revocation: common/ids.ts credentialRevocationEventId.
CREATE FUNCTION credential_revocation_event_id(credential_id text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path FROM CURRENT
AS $$ SELECT 'evt_' || left(encode(sha256(convert_to(credential_id || ':credential-revoked', 'UTF8')), 'hex'), 32) $$;

-- Revokes one credential of a live token (not a kill: the token stays active): state revoked, one
-- outbox row per receiver of its `credential.revoked` event, the audit event, the NOTIFY so cached
-- answers go. The caller holds the token row's lock. False when it was revoked already.
CREATE FUNCTION revoke_credential(
  schema_name text, credential_id text, reason text, initiating_entity text, actor text, channel text)
RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  revoked credential;
  owner token;
  event_id text := credential_revocation_event_id(revoke_credential.credential_id);
  event_body text;
BEGIN
  UPDATE credential c SET state = 'revoked', revoked_at = now()
   WHERE c.id = revoke_credential.credential_id AND c.state <> 'revoked'
  RETURNING c.* INTO revoked;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  SELECT * INTO owner FROM token t WHERE t.id = revoked.token_id;
  event_body := canonical_json(jsonb_build_object(
      'id', event_id,
      'type', 'credential.revoked',
      -- CAEP credential-change: this credential is revoked, the token lives on with its current one.
      'change_type', 'revoke',
      'credential_type', 'api-token',
      'token_id', owner.id,
      'credential_id', revoked.id,
      'sub_id', jsonb_build_object('format', 'opaque', 'id', owner.subject),
      'reason', revoke_credential.reason,
      'initiating_entity', revoke_credential.initiating_entity,
      'actor', revoke_credential.actor,
      'event_timestamp', floor(extract(epoch FROM revoked.revoked_at))::bigint,
      'occurred_at', iso_time(revoked.revoked_at)));
  INSERT INTO delivery (event_id, receiver_id, token_id, body)
  SELECT event_id, r, owner.id, event_body FROM unnest(owner.receivers) AS r
  ON CONFLICT DO NOTHING;
  PERFORM append_audit(owner.id, 'credential-revoked:' || revoked.id, 'credential.revoked', jsonb_build_object(
    'credentialId', revoked.id,
    'reason', revoke_credential.reason,
    'actor', revoke_credential.actor,
    'initiatingEntity', revoke_credential.initiating_entity,
    'occurredAt', iso_time(revoked.revoked_at),
    'eventId', event_id,
    'receivers', to_jsonb(owner.receivers)));
  PERFORM pg_notify(revoke_credential.channel, revoke_credential.schema_name || ':' || owner.id);
  RETURN true;
END;
$$;

-- Stores a credential that is not yet valid (automatic rotation: its secret has not reached the
-- owner). Idempotent by credential id. Raises 55000 (`token_not_active`) when the token is dead or
-- past its expiry; returns no row for an unknown token.
CREATE FUNCTION insert_pending_credential(
  token_id text, credential_id text, secret_hash bytea, rotation_id text)
RETURNS SETOF credential
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
  stored credential;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = insert_pending_credential.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT * INTO stored FROM credential c WHERE c.id = insert_pending_credential.credential_id;
  IF FOUND THEN
    IF stored.token_id <> owner.id THEN
      RAISE EXCEPTION 'credential % belongs to another token', stored.id
        USING ERRCODE = '23505', CONSTRAINT = 'credential_pkey';
    END IF;
    RETURN NEXT stored;
    RETURN;
  END IF;
  IF owner.status <> 'active' OR owner.expires_at <= now() THEN
    RAISE EXCEPTION 'token % is not active (%)', owner.id,
      CASE WHEN owner.status = 'active' THEN 'expired' ELSE owner.status END
      USING ERRCODE = '55000', CONSTRAINT = 'token_not_active';
  END IF;
  INSERT INTO credential (id, token_id, secret_hash, state, rotation_id)
  VALUES (insert_pending_credential.credential_id, owner.id, insert_pending_credential.secret_hash, 'pending',
          insert_pending_credential.rotation_id)
  RETURNING * INTO stored;
  PERFORM append_audit(owner.id, 'credential-pending:' || stored.id, 'credential.pending', jsonb_build_object(
    'credentialId', stored.id, 'rotationId', stored.rotation_id));
  RETURN NEXT stored;
END;
$$;

-- Drops the pending credential of an automatic rotation whose secret was lost (a crash before it
-- reached the owner). Returns the rotation's credential as it was found: pending (now deleted), or
-- already promoted (the rotation completed: nothing changes); no row when the rotation stored none.
CREATE FUNCTION discard_pending_credential(token_id text, rotation_id text)
RETURNS SETOF credential
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  found_credential credential;
BEGIN
  PERFORM 1 FROM token t WHERE t.id = discard_pending_credential.token_id FOR UPDATE;
  SELECT * INTO found_credential FROM credential c
   WHERE c.rotation_id = discard_pending_credential.rotation_id AND c.token_id = discard_pending_credential.token_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF found_credential.state = 'pending' THEN
    -- Never valid and never handed out: nothing refers to it but its audit line, so it goes.
    DELETE FROM credential c WHERE c.id = found_credential.id;
    PERFORM append_audit(found_credential.token_id, 'credential-discarded:' || found_credential.id,
      'credential.discarded', jsonb_build_object(
        'credentialId', found_credential.id, 'rotationId', found_credential.rotation_id));
  END IF;
  RETURN NEXT found_credential;
END;
$$;

-- Makes a pending credential current: the current one becomes previous, valid for grace_ms more on
-- the database clock; a credential still previous from an earlier rotation is revoked at once (its
-- own credential.revoked event). Idempotent: a credential already promoted (current, previous or
-- revoked since) returns the facts of its promotion with changed = false. Raises 55000
-- (`token_not_active`) when the token is dead or expired, 23514 (`credential_not_pending`) when
-- the credential is unknown.
CREATE FUNCTION promote_credential(
  schema_name text, token_id text, credential_id text, grace_ms bigint, actor text, reason text,
  initiating_entity text, channel text)
RETURNS TABLE (changed boolean, current_credential_id text, previous_credential_id text, previous_valid_until timestamptz,
               superseded_credential_id text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
  promoted credential;
  old_current credential;
  old_previous credential;
  done jsonb;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = promote_credential.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT * INTO promoted FROM credential c
   WHERE c.id = promote_credential.credential_id AND c.token_id = owner.id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'credential % is not a pending credential of token %', promote_credential.credential_id, owner.id
      USING ERRCODE = '23514', CONSTRAINT = 'credential_not_pending';
  END IF;
  IF promoted.state <> 'pending' THEN
    -- Promoted before (a retry): the facts recorded with that promotion.
    SELECT a.canonical::jsonb -> 'data' INTO done
      FROM audit_event a WHERE a.token_id = owner.id AND a.idempotency_key = 'credential-rotated:' || promoted.id;
    RETURN QUERY SELECT false, promoted.id, done ->> 'previousCredentialId',
      (done ->> 'previousValidUntil')::timestamptz, done ->> 'supersededCredentialId';
    RETURN;
  END IF;
  IF owner.status <> 'active' OR owner.expires_at <= now() THEN
    RAISE EXCEPTION 'token % is not active (%)', owner.id,
      CASE WHEN owner.status = 'active' THEN 'expired' ELSE owner.status END
      USING ERRCODE = '55000', CONSTRAINT = 'token_not_active';
  END IF;
  -- A credential made current after this one was set pending (a manual rotation meanwhile) wins:
  -- promoting this one would demote the newer secret to a grace that ends unannounced to its holder.
  IF EXISTS (SELECT 1 FROM credential c
              WHERE c.token_id = owner.id AND c.state = 'current' AND c.created_at > promoted.created_at) THEN
    RAISE EXCEPTION 'credential % was superseded while pending: a newer credential is current', promoted.id
      USING ERRCODE = '23514', CONSTRAINT = 'credential_superseded_while_pending';
  END IF;

  SELECT * INTO old_previous FROM credential c WHERE c.token_id = owner.id AND c.state = 'previous';
  IF FOUND THEN
    PERFORM revoke_credential(promote_credential.schema_name, old_previous.id, 'superseded',
                              promote_credential.initiating_entity, promote_credential.actor, promote_credential.channel);
  END IF;
  UPDATE credential c SET state = 'previous',
         valid_until = now() + promote_credential.grace_ms * interval '1 millisecond'
   WHERE c.token_id = owner.id AND c.state = 'current'
  RETURNING c.* INTO old_current;
  UPDATE credential c SET state = 'current' WHERE c.id = promoted.id;

  PERFORM append_audit(owner.id, 'credential-rotated:' || promoted.id, 'credential.rotated', jsonb_build_object(
    'credentialId', promoted.id,
    'rotationId', promoted.rotation_id,
    'previousCredentialId', old_current.id,
    'previousValidUntil', iso_time(old_current.valid_until),
    'supersededCredentialId', old_previous.id,
    'graceMs', promote_credential.grace_ms,
    'actor', promote_credential.actor,
    'reason', promote_credential.reason));
  -- A verifier's cached answer for the old current credential must not outlive its grace.
  PERFORM pg_notify(promote_credential.channel, promote_credential.schema_name || ':' || owner.id);
  RETURN QUERY SELECT true, promoted.id, old_current.id, old_current.valid_until, old_previous.id;
END;
$$;

-- A manual rotation: the caller's credential (its hash) stored and promoted in one transaction.
CREATE FUNCTION rotate_credential(
  schema_name text, token_id text, credential_id text, secret_hash bytea, grace_ms bigint, actor text,
  reason text, initiating_entity text, channel text)
RETURNS TABLE (changed boolean, current_credential_id text, previous_credential_id text, previous_valid_until timestamptz,
               superseded_credential_id text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM insert_pending_credential(rotate_credential.token_id, rotate_credential.credential_id,
                                                         rotate_credential.secret_hash, NULL)) THEN
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM promote_credential(
    rotate_credential.schema_name, rotate_credential.token_id, rotate_credential.credential_id,
    rotate_credential.grace_ms, rotate_credential.actor, rotate_credential.reason,
    rotate_credential.initiating_entity, rotate_credential.channel);
END;
$$;

-- The end of a previous credential's grace: revoked with its credential.revoked event (unless a
-- later rotation or the token's kill revoked it first). Idempotent. Returns the event id and the
-- receivers holding an outbox row for it (none when the token's own kill revoked the credential).
CREATE FUNCTION end_grace(schema_name text, token_id text, credential_id text, actor text, channel text)
RETURNS TABLE (changed boolean, event_id text, receivers text[])
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  did_revoke boolean := false;
  revocation_event text := credential_revocation_event_id(end_grace.credential_id);
BEGIN
  PERFORM 1 FROM token t WHERE t.id = end_grace.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM credential c
              WHERE c.id = end_grace.credential_id AND c.token_id = end_grace.token_id AND c.state = 'previous') THEN
    did_revoke := revoke_credential(end_grace.schema_name, end_grace.credential_id, 'grace_ended', 'system',
                                    end_grace.actor, end_grace.channel);
  END IF;
  RETURN QUERY SELECT did_revoke, revocation_event,
    (SELECT coalesce(array_agg(d.receiver_id ORDER BY d.receiver_id), '{}') FROM delivery d
      WHERE d.event_id = revocation_event);
END;
$$;

-- Reuse detection's kill: when the credential is still a reuse (re-checked under the token's lock),
-- the whole token dies by the one kill, reason reuse_detected, and the audit names the credential.
-- Idempotent: a token already dead is left as it is. Returns the token id and whether this killed it.
CREATE FUNCTION kill_reused_credential(schema_name text, credential_id text, channel text)
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
  IF credential_reused(owner.status, presented.state, presented.valid_until) THEN
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

-- Suspends or resumes a token: suspended_at set (or cleared), audited, NOTIFY so verifier caches
-- drop it. Suspending a dead or expired token raises 55000 (`token_not_active`); a repeated suspend
-- or resume changes nothing. Returns no row for an unknown token.
CREATE FUNCTION set_suspended(
  schema_name text, token_id text, suspend boolean, actor text, reason text, channel text)
RETURNS TABLE (changed boolean, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = set_suspended.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
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
    PERFORM append_audit(owner.id, 'suspended:' || iso_time(owner.suspended_at), 'token.suspended',
      jsonb_build_object('actor', set_suspended.actor, 'reason', set_suspended.reason,
                         'suspendedAt', iso_time(owner.suspended_at)));
  ELSE
    PERFORM append_audit(owner.id, 'resumed:' || iso_time(owner.suspended_at), 'token.resumed',
      jsonb_build_object('actor', set_suspended.actor, 'reason', set_suspended.reason,
                         'suspendedAt', iso_time(owner.suspended_at)));
    UPDATE token t SET suspended_at = NULL, suspended_by = NULL, suspend_reason = NULL
     WHERE t.id = owner.id RETURNING t.* INTO owner;
  END IF;
  PERFORM pg_notify(set_suspended.channel, set_suspended.schema_name || ':' || owner.id);
  RETURN QUERY SELECT true, owner;
END;
$$;

-- extend / shorten: expires_at = now() + ttl_ms on the database clock, bounded by the token's
-- policy's max lifetime and by the global maximum (both counted from issued_at). Refusals raise
-- 22023 with CONSTRAINT naming the rule and DETAIL the limit (an ISO instant); nothing is written.
-- Idempotent by request_id: a retry returns the first call's facts.
CREATE FUNCTION change_expiry(
  schema_name text, token_id text, ttl_ms bigint, mode text, max_lifetime_ms bigint, actor text, reason text,
  request_id text, channel text)
RETURNS TABLE (changed boolean, previous_expires_at timestamptz, facts token)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
  owner token;
  old_expiry timestamptz;
  new_expiry timestamptz := now() + change_expiry.ttl_ms * interval '1 millisecond';
  policy_limit timestamptz;
  done jsonb;
BEGIN
  SELECT * INTO owner FROM token t WHERE t.id = change_expiry.token_id FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT a.canonical::jsonb -> 'data' INTO done FROM audit_event a
   WHERE a.token_id = owner.id AND a.idempotency_key = 'expiry-changed:' || change_expiry.request_id;
  IF FOUND THEN
    RETURN QUERY SELECT false, (done ->> 'previousExpiresAt')::timestamptz, owner;
    RETURN;
  END IF;
  IF owner.status <> 'active' OR owner.expires_at <= now() THEN
    RAISE EXCEPTION 'token % is not active (%)', owner.id,
      CASE WHEN owner.status = 'active' THEN 'expired' ELSE owner.status END
      USING ERRCODE = '55000', CONSTRAINT = 'token_not_active';
  END IF;
  SELECT owner.issued_at + p.max_lifetime_ms * interval '1 millisecond' INTO policy_limit
    FROM policy p WHERE p.name = owner.policy AND p.max_lifetime_ms IS NOT NULL;
  IF policy_limit IS NOT NULL AND new_expiry > policy_limit THEN
    RAISE EXCEPTION 'the expiry would pass the max lifetime of policy %', owner.policy
      USING ERRCODE = '22023', CONSTRAINT = 'expiry_policy_max_lifetime', DETAIL = iso_time(policy_limit);
  END IF;
  IF new_expiry > owner.issued_at + change_expiry.max_lifetime_ms * interval '1 millisecond' THEN
    RAISE EXCEPTION 'the expiry would pass the maximum lifetime'
      USING ERRCODE = '22023', CONSTRAINT = 'expiry_global_max_lifetime',
            DETAIL = iso_time(owner.issued_at + change_expiry.max_lifetime_ms * interval '1 millisecond');
  END IF;
  IF change_expiry.mode = 'extend' AND new_expiry < owner.expires_at THEN
    RAISE EXCEPTION 'extend would move the expiry earlier'
      USING ERRCODE = '22023', CONSTRAINT = 'expiry_extend_earlier', DETAIL = iso_time(owner.expires_at);
  END IF;
  IF change_expiry.mode = 'shorten' AND new_expiry > owner.expires_at THEN
    RAISE EXCEPTION 'shorten would move the expiry later'
      USING ERRCODE = '22023', CONSTRAINT = 'expiry_shorten_later', DETAIL = iso_time(owner.expires_at);
  END IF;
  old_expiry := owner.expires_at;
  UPDATE token t SET expires_at = new_expiry WHERE t.id = owner.id RETURNING t.* INTO owner;
  PERFORM append_audit(owner.id, 'expiry-changed:' || change_expiry.request_id, 'token.expiry_changed',
    jsonb_build_object('mode', change_expiry.mode, 'ttlMs', change_expiry.ttl_ms,
                       'previousExpiresAt', iso_time(old_expiry), 'expiresAt', iso_time(owner.expires_at),
                       'actor', change_expiry.actor, 'reason', change_expiry.reason));
  -- Cached answers are bounded by the old expiry: a shortened token must not outlive its new one there.
  PERFORM pg_notify(change_expiry.channel, change_expiry.schema_name || ':' || owner.id);
  RETURN QUERY SELECT true, old_expiry, owner;
END;
$$;

-- Records a notice to the token's owner as sent (once per key) with its `notice.sent` audit event.
-- True when this call recorded it; false when it was recorded before.
CREATE FUNCTION record_notice(token_id text, key text, kind text, data jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
  PERFORM 1 FROM token t WHERE t.id = record_notice.token_id FOR UPDATE;
  INSERT INTO notice (token_id, key, kind) VALUES (record_notice.token_id, record_notice.key, record_notice.kind)
  ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM append_audit(record_notice.token_id, 'notice:' || record_notice.key, 'notice.sent',
    jsonb_build_object('key', record_notice.key, 'kind', record_notice.kind) || coalesce(record_notice.data, '{}'));
  RETURN true;
END;
$$;

-- migrations/0007's last use, its interval capped at a tenth of the token's policy's idle timeout:
-- an idle deadline must see a token's uses, whatever interval the verifier asks for.
CREATE OR REPLACE FUNCTION record_token_use(token_id text, min_interval_ms bigint) RETURNS boolean
LANGUAGE sql SET search_path FROM CURRENT AS $$
  WITH used AS (
    UPDATE token t SET last_used_at = now()
     WHERE t.id = record_token_use.token_id
       AND t.status = 'active'
       AND (t.last_used_at IS NULL
            OR t.last_used_at <= now() - least(record_token_use.min_interval_ms,
                                               (SELECT p.idle_timeout_ms / 10 FROM policy p WHERE p.name = t.policy))
                                         * interval '1 millisecond')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM used)
$$;
