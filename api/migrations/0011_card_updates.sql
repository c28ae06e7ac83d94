-- Card updates (issue 13, the API half; docs/subscriptions/card-updates.md). The worker pages
-- each PSP's account-updater list from a durable cursor, one worker at a time per PSP: a row
-- per processor holds the cursor (PSP A `after`, PSP B `cursor`: the last update handled) and
-- the lease (`locked_until`, also the fencing token: the cursor moves only under the lease
-- that read it). A payment method remembers the last update applied to its card.
CREATE TABLE card_update_cursors (
    processor     text PRIMARY KEY CHECK (processor ~ '^[a-z0-9_]{1,40}$'),
    cursor        text CHECK (length(cursor) BETWEEN 1 AND 100),
    locked_until  timestamptz NOT NULL DEFAULT '-infinity',
    updated_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE payment_methods
    ADD COLUMN card_update text CHECK (card_update ~ '^[a-z0-9_]{1,40}:[A-Za-z0-9_-]{1,64}$'),
    ADD COLUMN card_updated_at timestamptz;
-- An update names the old card by last four (and BIN, which the vault's token metadata holds).
CREATE INDEX payment_methods_by_processor_last4 ON payment_methods (processor, card_last4)
    WHERE detached_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON card_update_cursors TO tessera_api;
