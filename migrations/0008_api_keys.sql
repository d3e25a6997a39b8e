-- Up Migration
-- API keys of the HTTP API (client/api): `twk_<id hex>_<secret>`; only the SHA-256 of the secret
-- part is stored, looked up by id and compared in constant time. Revocation is a timestamp, set once.

CREATE TABLE api_key (
  id          text PRIMARY KEY CHECK (id ~ '^key_[0-9a-f]{32}$'),
  name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  scopes      text[] NOT NULL CHECK (cardinality(scopes) >= 1 AND scopes <@ ARRAY['admin', 'introspect', 'revoke']),
  key_hash    bytea NOT NULL CHECK (length(key_hash) = 32),
  created_at  timestamptz NOT NULL DEFAULT now(),
  revoked_at  timestamptz
);
