-- Stored credentials (issue 13): a payment with `setup_future_usage: off_session` that the
-- processor approves keeps the card's token with the scheme's network transaction id, as a
-- payment method; renewals (merchant-initiated) quote that id, through the processor that set
-- it up. A detached payment method is never used again (`detached_at`); its row stays, as the
-- payments that name it do. Masked card data only: the card itself stays in the vault.
CREATE TABLE payment_methods (
    merchant_id             text NOT NULL REFERENCES merchants (id),
    id                      text NOT NULL CHECK (id ~ '^pm_[0-9a-z]{26}$'),
    token                   text NOT NULL,
    card_brand              text NOT NULL,
    card_last4              text NOT NULL CHECK (card_last4 ~ '^[0-9]{4}$'),
    card_exp_month          smallint NOT NULL,
    card_exp_year           smallint NOT NULL,
    card_country            text CHECK (card_country ~ '^[A-Z]{2}$'),
    usage                   text NOT NULL DEFAULT 'off_session' CHECK (usage = 'off_session'),
    network_transaction_id  text NOT NULL CHECK (length(network_transaction_id) BETWEEN 1 AND 100),
    processor               text NOT NULL,
    setup_payment_id        text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    detached_at             timestamptz,
    PRIMARY KEY (merchant_id, id),
    UNIQUE (merchant_id, setup_payment_id),
    FOREIGN KEY (merchant_id, setup_payment_id) REFERENCES payments (merchant_id, id)
);
-- Detaching asks whether another live payment method of the merchant still uses the token.
CREATE INDEX payment_methods_by_token ON payment_methods (merchant_id, token)
    WHERE detached_at IS NULL;

-- A setup payment says so; a renewal names its payment method and why it was charged.
ALTER TABLE payments
    ADD COLUMN setup_future_usage text CHECK (setup_future_usage = 'off_session'),
    ADD COLUMN payment_method text,
    ADD COLUMN mit_reason text CHECK (mit_reason IN ('recurring', 'unscheduled', 'installment')),
    ADD FOREIGN KEY (merchant_id, payment_method) REFERENCES payment_methods (merchant_id, id);

GRANT SELECT, INSERT, UPDATE ON payment_methods TO tessera_api;
