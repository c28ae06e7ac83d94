-- Card updates (issue 13): an account updater announced that a stored card has a new expiry or
-- a new number; the vault replaces the card record under the same token. The new card is sealed
-- under the current data key with a new nonce, and the old ciphertext is overwritten in the
-- same row (crypto-shredded: no copy is kept, in this table or any other).

-- The update last applied to the card: "<forward destination>:<the PSP's update id>", so the
-- same update asked for again is answered without a second write. NULL: never updated.
ALTER TABLE tokens ADD COLUMN card_update text
    CHECK (card_update ~ '^[a-z0-9_]{1,40}:[A-Za-z0-9_-]{1,64}$');
-- When the card was last replaced (set by the trigger below, never by the caller).
ALTER TABLE tokens ADD COLUMN card_updated_at timestamptz;
GRANT UPDATE (brand, bin, last4, exp_month, exp_year, fingerprint, cvc_provided, card_update,
              card_updated_at) ON tokens TO tessera_vault;

-- The runtime role may, on a live token, do exactly one of three things:
--   1. shred it (deleted_at set; the CHECK of 0002 nulls the ciphertext, nonce and key link);
--   2. move last_used_at forward, up to now, and change nothing else (0005);
--   3. replace its card: a new ciphertext and nonce (both must differ), sealed under a card
--      key that is not retired, the card's clear metadata, cvc_provided false (the old card's
--      CVC is not the new card's) and a new card_update name; card_updated_at is set here to
--      now(). id, merchant, created_at, last_used_at and deleted_at stay.
-- Anything else, a no-op rewrite included, is refused. A tombstone never changes.
CREATE OR REPLACE FUNCTION tokens_only_shred() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unchanged tokens;
BEGIN
    IF OLD.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'token % is deleted and cannot change', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.deleted_at IS NOT NULL THEN
        RETURN NEW;
    END IF;
    unchanged := NEW;
    unchanged.last_used_at := OLD.last_used_at;
    IF unchanged IS NOT DISTINCT FROM OLD THEN
        -- Only last_used_at differs from the row, or nothing does.
        IF NEW.last_used_at IS NOT DISTINCT FROM OLD.last_used_at THEN
            RAISE EXCEPTION 'a live token''s card data cannot be rewritten'
                USING ERRCODE = 'check_violation';
        END IF;
        IF (NEW.last_used_at < OLD.last_used_at OR NEW.last_used_at > now())
           AND current_user <> (SELECT relowner::regrole::text FROM pg_class
                                WHERE oid = TG_RELID) THEN
            RAISE EXCEPTION 'a token''s last use only moves forward, up to now'
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    -- A card replacement, or nothing allowed.
    unchanged := NEW;
    unchanged.data_key_id := OLD.data_key_id;
    unchanged.nonce := OLD.nonce;
    unchanged.ciphertext := OLD.ciphertext;
    unchanged.brand := OLD.brand;
    unchanged.bin := OLD.bin;
    unchanged.last4 := OLD.last4;
    unchanged.exp_month := OLD.exp_month;
    unchanged.exp_year := OLD.exp_year;
    unchanged.fingerprint := OLD.fingerprint;
    unchanged.cvc_provided := OLD.cvc_provided;
    unchanged.card_update := OLD.card_update;
    unchanged.card_updated_at := OLD.card_updated_at;
    IF unchanged IS DISTINCT FROM OLD
       OR NEW.nonce IS NOT DISTINCT FROM OLD.nonce
       OR NEW.ciphertext IS NOT DISTINCT FROM OLD.ciphertext
       OR NEW.card_update IS NULL
       OR NEW.card_update IS NOT DISTINCT FROM OLD.card_update
       OR NEW.cvc_provided THEN
        RAISE EXCEPTION 'a live token''s card data cannot be rewritten'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM data_keys WHERE id = NEW.data_key_id AND purpose = 'card'
                   AND retired_at IS NULL) THEN
        RAISE EXCEPTION 'a replaced card is sealed under a card key that is not retired'
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.card_updated_at := now();
    RETURN NEW;
END;
$$;
