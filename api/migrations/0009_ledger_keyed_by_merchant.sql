-- The ledger keyed by merchant first, as every other merchant table is: distributing the API's
-- database by merchant (Citus or AlloyDB, docs/deploy.md) then keeps a posting and its entries
-- on one node, and every balance query stays on it. The rows are unchanged: entries gain a
-- generated line number for their primary key (added with the column, so the immutability
-- triggers never see an UPDATE).
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_posting_id_fkey;
ALTER TABLE ledger_postings DROP CONSTRAINT ledger_postings_pkey;
ALTER TABLE ledger_postings ADD PRIMARY KEY (merchant_id, id);

ALTER TABLE ledger_entries ADD COLUMN line bigint GENERATED ALWAYS AS IDENTITY;
ALTER TABLE ledger_entries ADD PRIMARY KEY (merchant_id, posting_id, line);
ALTER TABLE ledger_entries ADD FOREIGN KEY (merchant_id, posting_id)
    REFERENCES ledger_postings (merchant_id, id);
DROP INDEX ledger_entries_by_posting;

-- The commit-time checks look a posting up by its new key.
CREATE OR REPLACE FUNCTION ledger_posting_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT e.currency, sum(e.amount) AS total INTO unbalanced
    FROM ledger_entries e
    WHERE e.merchant_id = NEW.merchant_id AND e.posting_id = NEW.posting_id
    GROUP BY e.currency HAVING sum(e.amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger posting % is unbalanced in %: %',
            NEW.posting_id, unbalanced.currency, unbalanced.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION ledger_posting_not_empty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM ledger_entries WHERE merchant_id = NEW.merchant_id AND posting_id = NEW.id
    ) THEN
        RAISE EXCEPTION 'ledger posting % has no entries', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
