-- Up Migration
-- API keys may hold the `codec` scope: decoding payloads for the Web UI and the temporal CLI
-- (POST /codec/encode and /codec/decode) without the rest of admin.
ALTER TABLE api_key DROP CONSTRAINT api_key_scopes_check;
ALTER TABLE api_key ADD CONSTRAINT api_key_scopes_check
  CHECK (cardinality(scopes) >= 1 AND scopes <@ ARRAY['admin', 'codec', 'introspect', 'revoke']);
