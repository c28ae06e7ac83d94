-- The account updater's lookup by (processor, last four) reads across merchants (the update names a
-- card, not a merchant). As a partial index on `detached_at IS NULL` it also matched every
-- merchant's own `... AND detached_at IS NULL` lookups, and the planner could prefer it to the
-- primary key (merchant_id, id) on small tables, so a merchant's statement would search an index
-- not led by merchant_id (tests/test_merchant_keys.py). A plain index serves the worker as well.
DROP INDEX payment_methods_by_processor_last4;
CREATE INDEX payment_methods_by_processor_last4 ON payment_methods (processor, card_last4);
