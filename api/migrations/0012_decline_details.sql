-- Decline details (issue 13): what the issuer passed through with a decline, kept with the
-- payment and with each attempt, so recovery classifies a decline as the processor gave it
-- (core/recovery.py, docs/subscriptions/recovery.md): Mastercard's merchant advice code and
-- Visa's decline category. Null when the issuer sent none (and on every approval).
ALTER TABLE payments
    ADD COLUMN decline_advice_code text CHECK (decline_advice_code ~ '^[0-9]{2}$'),
    ADD COLUMN decline_visa_category smallint CHECK (decline_visa_category BETWEEN 1 AND 4);

ALTER TABLE payment_attempts
    ADD COLUMN decline_advice_code text CHECK (decline_advice_code ~ '^[0-9]{2}$'),
    ADD COLUMN decline_visa_category smallint CHECK (decline_visa_category BETWEEN 1 AND 4);
