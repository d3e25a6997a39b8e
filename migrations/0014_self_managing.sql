-- Up Migration
-- Tokens that manage themselves (rotation with grace, reuse detection, inactivity, warnings,
-- suspicious activity, policies, suspend, scheduled revoke, extend): the tables and columns. The
-- functions that write them come in the migrations after this one.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- A named policy. Durations in milliseconds; NULL where the policy sets no such limit.
CREATE TABLE policy (
  name              text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
  max_lifetime_ms   bigint CHECK (max_lifetime_ms > 0),
  idle_timeout_ms   bigint CHECK (idle_timeout_ms > 0),
  rotate_every_ms   bigint CHECK (rotate_every_ms > 0),
  -- How long the immediately previous credential stays valid after a rotation.
  grace_ms          bigint NOT NULL DEFAULT 600000 CHECK (grace_ms >= 0),
  -- Warnings before expiry or idle revocation, e.g. {2592000000, 604800000, 86400000}.
  warn_before_ms    bigint[] NOT NULL DEFAULT '{}' CHECK (0 < ALL (warn_before_ms)),
  -- NULL: any scope.
  allowed_scopes    text[],
  on_suspicious     text NOT NULL DEFAULT 'revoke' CHECK (on_suspicious IN ('rotate', 'revoke')),
  -- Where the token owner hears from the workflow (warnings, automatically rotated secrets): a
  -- receiver (signed webhook, its key encrypted at rest) or, for the dev stack, a folder.
  owner_receiver_id text REFERENCES receiver (id),
  owner_dir         text,
  CHECK (owner_receiver_id IS NULL OR owner_dir IS NULL),
  version           integer NOT NULL DEFAULT 1,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE token
  ADD COLUMN policy text REFERENCES policy (name),
  -- A suspended token fails verification but is not dead (status stays active).
  ADD COLUMN suspended_at timestamptz,
  ADD COLUMN suspended_by text,
  ADD COLUMN suspend_reason text,
  -- A revocation the workflow will carry out at this instant (shown by `show`; the workflow owns it).
  ADD COLUMN revoke_scheduled_at timestamptz,
  ADD COLUMN revoke_scheduled_reason text;
CREATE INDEX token_policy_active ON token (policy, id) WHERE status = 'active' AND policy IS NOT NULL;

-- `pending`: an automatically rotated credential stored before its secret reached the owner; it is
-- never valid, and becomes `current` only once delivered (or is discarded).
ALTER TABLE credential DROP CONSTRAINT credential_state_check;
ALTER TABLE credential ADD CONSTRAINT credential_state_check
  CHECK (state IN ('pending', 'current', 'previous', 'revoked'));
-- The workflow's rotation that made this credential (automatic rotation retries find it by this).
ALTER TABLE credential ADD COLUMN rotation_id text UNIQUE;
-- At most one current and one previous credential per token.
CREATE UNIQUE INDEX credential_one_current ON credential (token_id) WHERE state = 'current';
CREATE UNIQUE INDEX credential_one_previous ON credential (token_id) WHERE state = 'previous';

-- Notices to a token's owner (warnings before death, rotated secrets): each sent once. The key is
-- deterministic (e.g. `expiring:expiry:<deadline>:<before_ms>`); the webhook-id derives from it.
CREATE TABLE notice (
  token_id   text NOT NULL REFERENCES token (id),
  key        text NOT NULL,
  kind       text NOT NULL,
  sent_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (token_id, key)
);
