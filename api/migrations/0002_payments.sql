-- Payments, their processor attempts, refunds and idempotency keys. Every table is keyed with
-- the merchant first, so the schema can later be distributed by merchant without a rewrite.
CREATE TABLE payments (
    merchant_id          text NOT NULL REFERENCES merchants (id),
    id                   text NOT NULL CHECK (id ~ '^pay_[0-9a-z]{26}$'),
    amount               bigint NOT NULL CHECK (amount > 0),
    currency             text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status               text NOT NULL CHECK (status IN ('processing', 'authorized', 'captured',
                             'partially_refunded', 'refunded', 'canceled', 'declined', 'failed')),
    amount_authorized    bigint NOT NULL DEFAULT 0,
    amount_captured      bigint NOT NULL DEFAULT 0,
    amount_refunded      bigint NOT NULL DEFAULT 0,
    capture              boolean NOT NULL,
    token                text NOT NULL,
    card_brand           text NOT NULL,
    card_last4           text NOT NULL CHECK (card_last4 ~ '^[0-9]{4}$'),
    card_exp_month       smallint NOT NULL,
    card_exp_year        smallint NOT NULL,
    processor            text,
    processor_reference  text,
    decline_code         text,
    failure_code         text,
    description          text,
    reference            text,
    metadata             jsonb NOT NULL DEFAULT '{}',
    -- Operations on one payment take turns: a capture, cancel or refund holds this lease while
    -- it talks to the processor; the next one waits (bounded) and then sees the new state.
    operation_lock_until timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, id),
    CHECK (0 <= amount_authorized AND amount_authorized <= amount),
    CHECK (0 <= amount_captured AND amount_captured <= amount_authorized),
    CHECK (0 <= amount_refunded AND amount_refunded <= amount_captured)
);

-- One row per request to a processor for the authorization, with our own deterministic
-- reference (payment id + attempt number), so that after a crash or a time-out we can ask the
-- processor what happened to *that* request instead of authorizing again.
CREATE TABLE payment_attempts (
    merchant_id          text NOT NULL,
    payment_id           text NOT NULL,
    attempt              smallint NOT NULL CHECK (attempt > 0),
    processor            text NOT NULL,
    reference            text NOT NULL,
    outcome              text NOT NULL CHECK (outcome IN ('pending', 'approved', 'declined',
                             'failed', 'unknown')),
    processor_reference  text,
    decline_code         text,
    started_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    latency_ms           integer,
    PRIMARY KEY (merchant_id, payment_id, attempt),
    UNIQUE (processor, reference),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, id)
);

CREATE TABLE refunds (
    merchant_id          text NOT NULL,
    id                   text NOT NULL CHECK (id ~ '^re_[0-9a-z]{26}$'),
    payment_id           text NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    reason               text,
    status               text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    processor_reference  text,
    failure_code         text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, id),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, id)
);
CREATE INDEX refunds_by_payment ON refunds (merchant_id, payment_id, created_at);

-- Idempotency keys (Stripe's semantics, Brandur Leach's design): claimed in the same
-- transaction that creates the payment; `recovery_point` says which atomic phase finished;
-- `locked_until` is a lease longer than the processor time-out, so a crashed request's key
-- frees itself and a retry resumes from the recovery point.
CREATE TABLE idempotency_keys (
    merchant_id      text NOT NULL REFERENCES merchants (id),
    key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_method   text NOT NULL,
    request_path     text NOT NULL,
    request_hash     bytea NOT NULL,
    recovery_point   text NOT NULL CHECK (recovery_point IN ('started', 'payment_created',
                         'operation_started', 'finished')),
    locked_until     timestamptz,
    payment_id       text,
    refund_id        text,
    operation        text CHECK (operation IN ('capture', 'cancel', 'refund')),
    operation_amount bigint,
    response_status  smallint,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, key),
    CHECK ((recovery_point = 'finished') = (response_status IS NOT NULL))
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

GRANT SELECT, INSERT, UPDATE ON payments, payment_attempts, refunds, idempotency_keys
    TO tessera_api;
GRANT DELETE ON idempotency_keys TO tessera_api;
