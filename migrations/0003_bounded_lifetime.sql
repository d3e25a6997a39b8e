-- Up Migration
-- Every lifetime is bounded (DESIGN §3): the library refuses more than TOKENWARDEN_MAX_TTL (at most
-- 3650 days) before writing; the store refuses it too, so no other writer can store a token whose
-- expiry a workflow or a search attribute cannot hold. NOT VALID: rows written before this stay.
ALTER TABLE token ADD CONSTRAINT token_lifetime_bounded
  CHECK (expires_at - issued_at <= interval '3650 days') NOT VALID;
