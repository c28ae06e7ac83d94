-- The card's country of issue (from its BIN), kept so that a failover re-ranks processors with
-- the same routing rules as the first attempt.
ALTER TABLE payments ADD COLUMN card_country text CHECK (card_country ~ '^[A-Z]{2}$');
