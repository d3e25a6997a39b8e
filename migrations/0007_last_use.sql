-- Up Migration
-- The one store path that records a token's last use, throttled in SQL: at most one write per token
-- per interval, whatever the number of verifiers and their in-memory throttles. Called with one
-- parameterised statement; search_path pinned as in migrations/0002.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Sets last_used_at to now() on the database clock when the token is active and its last recorded
-- use is older than min_interval_ms (or none); true when it wrote. A dead token's row is left alone.
-- When policies give tokens an idle timeout, this is where the interval will be bounded by a tenth of it.
CREATE FUNCTION record_token_use(token_id text, min_interval_ms bigint) RETURNS boolean
LANGUAGE sql SET search_path FROM CURRENT AS $$
  WITH used AS (
    UPDATE token t SET last_used_at = now()
     WHERE t.id = record_token_use.token_id
       AND t.status = 'active'
       AND (t.last_used_at IS NULL OR t.last_used_at <= now() - record_token_use.min_interval_ms * interval '1 millisecond')
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM used)
$$;
