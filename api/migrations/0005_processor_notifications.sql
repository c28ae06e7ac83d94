-- Operations a processor accepted and will confirm later (PSP B's captures, cancels and
-- refunds), and the notifications already applied, so a replayed one has no second effect.
CREATE TABLE processor_operations (
    processor            text NOT NULL,
    processor_reference  text NOT NULL,
    merchant_id          text NOT NULL,
    payment_id           text NOT NULL,
    operation            text NOT NULL CHECK (operation IN ('capture', 'cancel', 'refund')),
    amount               bigint NOT NULL,
    refund_id            text,
    status               text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    settled_at           timestamptz,
    PRIMARY KEY (processor, processor_reference),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, id)
);

CREATE TABLE processed_notifications (
    processor      text NOT NULL,
    psp_reference  text NOT NULL,
    event_code     text NOT NULL,
    success        boolean NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (processor, psp_reference, event_code)
);

GRANT SELECT, INSERT, UPDATE ON processor_operations TO tessera_api;
GRANT SELECT, INSERT ON processed_notifications TO tessera_api;
