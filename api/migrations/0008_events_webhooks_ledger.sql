-- Events (the transactional outbox), webhook endpoints and their deliveries, and the
-- double-entry ledger. Events and postings are written in the same transaction as the change
-- they describe, so a rolled-back change leaves neither.

CREATE TABLE events (
    merchant_id      text NOT NULL,
    id               text NOT NULL CHECK (id ~ '^evt_[0-9a-z]{26}$'),
    type             text NOT NULL,
    object_id        text NOT NULL,
    data             jsonb NOT NULL,
    request_id       text,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, id)
);
CREATE INDEX events_by_object ON events (merchant_id, object_id, id);
CREATE INDEX events_by_type ON events (merchant_id, type, id);
CREATE INDEX events_by_age ON events (created_at);

CREATE TABLE webhook_endpoints (
    merchant_id                text NOT NULL,
    id                         text NOT NULL CHECK (id ~ '^we_[0-9a-z]{26}$'),
    url                        text NOT NULL,
    events                     text[] NOT NULL CHECK (cardinality(events) > 0),
    -- AES-256-GCM under TESSERA_API_WEBHOOK_SECRET_KEY: nonce || ciphertext.
    secret                     bytea NOT NULL,
    previous_secret            bytea,
    previous_secret_expires_at timestamptz,
    status                     text NOT NULL DEFAULT 'enabled'
                                   CHECK (status IN ('enabled', 'disabled')),
    failing_since              timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    deleted_at                 timestamptz,
    PRIMARY KEY (merchant_id, id)
);
CREATE INDEX webhook_endpoints_live ON webhook_endpoints (merchant_id)
    WHERE deleted_at IS NULL AND status = 'enabled';

CREATE TABLE webhook_deliveries (
    merchant_id      text NOT NULL,
    event_id         text NOT NULL,
    endpoint_id      text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- The lease of the worker sending it: no two sends of one delivery at a time.
    locked_until     timestamptz,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    PRIMARY KEY (merchant_id, event_id, endpoint_id),
    FOREIGN KEY (merchant_id, event_id) REFERENCES events (merchant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (merchant_id, endpoint_id) REFERENCES webhook_endpoints (merchant_id, id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (merchant_id, endpoint_id)
    WHERE status = 'pending';

-- The ledger: a posting is a set of entries whose amounts (signed, minor units; debit
-- positive) sum to zero per currency. Entries are never changed: corrections are reversals.
CREATE TABLE ledger_postings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    merchant_id  text NOT NULL,
    payment_id   text NOT NULL,
    kind         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, id)
);
CREATE INDEX ledger_postings_by_payment ON ledger_postings (merchant_id, payment_id);

CREATE TABLE ledger_entries (
    posting_id    bigint NOT NULL REFERENCES ledger_postings (id),
    merchant_id   text NOT NULL,
    account       text NOT NULL CHECK (account IN ('authorization_holds', 'merchant_authorized',
                      'psp_clearing', 'merchant_balance', 'fees', 'customer_refunds')),
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount        bigint NOT NULL CHECK (amount <> 0),
    available_on  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_by_posting ON ledger_entries (posting_id);
CREATE INDEX ledger_entries_balance ON ledger_entries (merchant_id, account, currency);

-- Refuses, at commit, any posting whose entries do not sum to zero in each currency (or that
-- has no entries at all).
CREATE FUNCTION ledger_posting_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT e.currency, sum(e.amount) AS total INTO unbalanced
    FROM ledger_entries e WHERE e.posting_id = NEW.posting_id
    GROUP BY e.currency HAVING sum(e.amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger posting % is unbalanced in %: %',
            NEW.posting_id, unbalanced.currency, unbalanced.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_entries_balanced
    AFTER INSERT ON ledger_entries DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced();

CREATE FUNCTION ledger_posting_not_empty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledger_entries WHERE posting_id = NEW.id) THEN
        RAISE EXCEPTION 'ledger posting % has no entries', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_postings_not_empty
    AFTER INSERT ON ledger_postings DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_posting_not_empty();

-- Immutable, even for a role that was granted more than it should have been.
CREATE FUNCTION ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: post a reversal instead'
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();
CREATE TRIGGER ledger_postings_immutable BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();

GRANT SELECT, INSERT, DELETE ON events TO tessera_api;
GRANT SELECT, INSERT, UPDATE ON webhook_endpoints TO tessera_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_deliveries TO tessera_api;
GRANT SELECT, INSERT ON ledger_postings, ledger_entries TO tessera_api;
-- The API numbers a change's postings itself, so one statement writes them all.
GRANT USAGE ON SEQUENCE ledger_postings_id_seq TO tessera_api;
