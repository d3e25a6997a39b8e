-- Up Migration
-- Signed checkpoints of the audit chains' heads (common/store/audit-verify.ts). A checkpoint's
-- statement is canonical JSON naming the digest of every chain's head (token id, last seq, last
-- hash, in token id order), how many chains and events that is, the time, and the previous
-- checkpoint's digest; it is signed with ed25519 in Node (TOKENWARDEN_AUDIT_KEY, which the database
-- never sees). A chain deleted or rewritten whole no longer matches the heads a checkpoint signed.

-- Refuses every change to an append-only table (audit_event keeps its own function, whose message
-- names it).
CREATE FUNCTION refuse_change_to_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP;
END;
$$;

CREATE TABLE audit_checkpoint (
  seq         integer PRIMARY KEY CHECK (seq >= 1),
  created_at  timestamptz NOT NULL,
  -- Which key signed it: 'ed25519:' and the first 16 hex digits of SHA-256 of the raw public key.
  key_id      text NOT NULL,
  -- The signed text, verbatim; seq, created_at and key_id repeat what it says (for queries).
  statement   text NOT NULL,
  signature   bytea NOT NULL CHECK (length(signature) = 64)
);
CREATE TRIGGER audit_checkpoint_no_update BEFORE UPDATE OR DELETE ON audit_checkpoint
  FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only();
CREATE TRIGGER audit_checkpoint_no_truncate BEFORE TRUNCATE ON audit_checkpoint
  FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only();

-- The heads a checkpoint's digest covers, one row per chain. Kept for the two latest checkpoints
-- only (the writer prunes older ones): each checkpoint is written only after the previous one's
-- heads were found intact, so the latest vouches for the ones before it. No reference to token:
-- a chain deleted with its token must still be named here.
CREATE TABLE audit_checkpoint_head (
  checkpoint_seq  integer NOT NULL REFERENCES audit_checkpoint (seq) DEFERRABLE INITIALLY DEFERRED,
  token_id        text NOT NULL,
  seq             integer NOT NULL CHECK (seq >= 1),
  hash            bytea NOT NULL CHECK (length(hash) = 32),
  PRIMARY KEY (checkpoint_seq, token_id)
);
CREATE TRIGGER audit_checkpoint_head_no_update BEFORE UPDATE ON audit_checkpoint_head
  FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only();
