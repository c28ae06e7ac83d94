-- Card retention (PCI DSS v4.0.1 3.2.1): a card is kept only while it is used. The vault's
-- worker crypto-shreds every live token unused for longer than its merchant's retention period
-- (`merchants.card_retention_days`, or TESSERA_VAULT_CARD_RETENTION_DAYS when NULL).

-- When the token was last forwarded (its creation until then). A forward refreshes it at most
-- once a day, so a busy token costs one write a day, not one per payment.
-- Tokens that exist before this migration get the migration's time, not their creation: their
-- past uses were never recorded, and a card created long ago may be charged every month, so
-- each is given a full retention period from now rather than shredded by the first sweep.
ALTER TABLE tokens ADD COLUMN last_used_at timestamptz;
UPDATE tokens SET last_used_at = now() WHERE last_used_at IS NULL;
ALTER TABLE tokens ALTER COLUMN last_used_at SET DEFAULT now();
ALTER TABLE tokens ALTER COLUMN last_used_at SET NOT NULL;
-- The sweep: per merchant, the live tokens unused the longest, oldest first. Shredded tokens
-- leave the index, so it stays the size of the live set.
CREATE INDEX tokens_retention ON tokens (merchant_id, last_used_at) WHERE deleted_at IS NULL;
GRANT UPDATE (last_used_at) ON tokens TO tessera_vault;

-- The runtime role may shred a live token or move its last_used_at forward (to now at most);
-- nothing else. Only the table's owner (migrations, repairs, tests) may move it back.
CREATE OR REPLACE FUNCTION tokens_only_shred() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unchanged tokens;
BEGIN
    IF OLD.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'token % is deleted and cannot change', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.deleted_at IS NULL THEN
        unchanged := NEW;
        unchanged.last_used_at := OLD.last_used_at;
        -- Anything but a move of last_used_at (even a no-op rewrite of the card columns) is
        -- refused, as before this migration.
        IF unchanged IS DISTINCT FROM OLD
           OR NEW.last_used_at IS NOT DISTINCT FROM OLD.last_used_at THEN
            RAISE EXCEPTION 'a live token''s card data cannot be rewritten'
                USING ERRCODE = 'check_violation';
        END IF;
        IF (NEW.last_used_at < OLD.last_used_at OR NEW.last_used_at > now())
           AND current_user <> (SELECT relowner::regrole::text FROM pg_class
                                WHERE oid = TG_RELID) THEN
            RAISE EXCEPTION 'a token''s last use only moves forward, up to now'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- A merchant's own retention period in days; NULL: the vault's default. The range is
-- vault/settings.py's RETENTION_DAYS_MIN..MAX: at least a week (last_used_at is refreshed once
-- a day), at most ten years.
ALTER TABLE merchants ADD COLUMN card_retention_days integer
    CHECK (card_retention_days BETWEEN 7 AND 3650);

-- The worker's jobs: one row each, claimed with a lease, so that with several workers a job
-- runs in one at a time and once per interval across all of them.
CREATE TABLE worker_jobs (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    next_run_at       timestamptz NOT NULL,
    locked_until      timestamptz NOT NULL,
    locked_by         text NOT NULL CHECK (length(locked_by) <= 300),
    last_started_at   timestamptz,
    last_finished_at  timestamptz,
    last_outcome      text CHECK (last_outcome IN ('ok', 'failed'))
);
REVOKE ALL ON worker_jobs FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON worker_jobs TO tessera_vault;
