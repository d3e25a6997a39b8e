-- Up Migration
-- tokenwarden central store. Runs with search_path set to the target schema (one schema per
-- deployment or test file). Forward-only: there is no down migration.

CREATE TABLE receiver (
  id              text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  kind            text NOT NULL DEFAULT 'webhook' CHECK (kind IN ('webhook')),
  url             text NOT NULL,
  -- AES-256-GCM(iv ‖ tag ‖ ciphertext) of the whsec_ signing secret; key_id names the master key.
  secret_ciphertext bytea NOT NULL,
  secret_key_id   text NOT NULL,
  enabled         boolean NOT NULL DEFAULT true,
  created_at      timestamptz NOT NULL DEFAULT now(),
  removed_at      timestamptz
);

CREATE TABLE token (
  id                 text PRIMARY KEY CHECK (id ~ '^tok_[0-9a-f]{32}$'),
  subject            text NOT NULL,
  name               text,
  scopes             text[] NOT NULL DEFAULT '{}',
  receivers          text[] NOT NULL DEFAULT '{}',
  status             text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'expired')),
  propagation        text NOT NULL DEFAULT 'none' CHECK (propagation IN ('none', 'pending', 'complete', 'stuck')),
  issued_at          timestamptz NOT NULL DEFAULT now(),
  expires_at         timestamptz NOT NULL,
  revoked_at         timestamptz,
  revoked_by         text,
  revoke_reason      text,
  initiating_entity  text CHECK (initiating_entity IN ('admin', 'user', 'policy', 'system')),
  -- Id of the revoke request whose kill committed: tells a caller racing the workflow's own kill
  -- (both carry the same request) that the revocation is its own.
  revoke_request_id  text,
  last_used_at       timestamptz,
  -- Set once the token's workflow is known to exist / to have taken over propagation; the
  -- reconciler looks for rows where these stayed NULL (a crash between two steps).
  workflow_started_at     timestamptz,
  propagation_started_at  timestamptz,
  propagation_completed_at timestamptz,
  CHECK ((status = 'active') = (revoked_at IS NULL)),
  CHECK (expires_at > issued_at)
);
CREATE INDEX token_subject_status ON token (subject, status);
CREATE INDEX token_active_expiry ON token (expires_at) WHERE status = 'active';
CREATE INDEX token_unstarted ON token (issued_at) WHERE workflow_started_at IS NULL AND status = 'active';
CREATE INDEX token_untold ON token (revoked_at) WHERE status <> 'active' AND propagation_started_at IS NULL;
CREATE INDEX token_propagating ON token (propagation_started_at) WHERE propagation IN ('pending', 'stuck');

CREATE TABLE credential (
  id           text PRIMARY KEY,
  token_id     text NOT NULL REFERENCES token (id),
  secret_hash  bytea NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
  state        text NOT NULL CHECK (state IN ('current', 'previous', 'revoked')),
  created_at   timestamptz NOT NULL DEFAULT now(),
  valid_until  timestamptz,
  revoked_at   timestamptz
);
CREATE INDEX credential_token ON credential (token_id);

-- The transactional outbox: one row per (event, receiver), written in the kill's transaction.
CREATE TABLE delivery (
  event_id         text NOT NULL,
  receiver_id      text NOT NULL REFERENCES receiver (id),
  token_id         text NOT NULL REFERENCES token (id),
  -- The event body, stored verbatim so every attempt sends the same bytes.
  body             text NOT NULL,
  status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed', 'forced', 'cancelled')),
  attempts         integer NOT NULL DEFAULT 0,
  last_status_code integer,
  last_error       text,
  last_attempt_at  timestamptz,
  acked_at         timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (event_id, receiver_id)
);
CREATE INDEX delivery_token ON delivery (token_id);

-- Append-only, per-token hash chain. `canonical` is the RFC 8785 text that was hashed, verbatim.
CREATE TABLE audit_event (
  token_id        text NOT NULL REFERENCES token (id),
  seq             integer NOT NULL CHECK (seq >= 1),
  idempotency_key text NOT NULL,
  kind            text NOT NULL,
  canonical       text NOT NULL,
  prev_hash       bytea,
  hash            bytea NOT NULL CHECK (length(hash) = 32),
  recorded_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (token_id, seq),
  UNIQUE (token_id, idempotency_key),
  CHECK ((seq = 1) = (prev_hash IS NULL))
);

CREATE FUNCTION audit_event_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP;
END;
$$;
CREATE TRIGGER audit_event_no_update BEFORE UPDATE OR DELETE ON audit_event
  FOR EACH ROW EXECUTE FUNCTION audit_event_is_append_only();
CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
  FOR EACH STATEMENT EXECUTE FUNCTION audit_event_is_append_only();
