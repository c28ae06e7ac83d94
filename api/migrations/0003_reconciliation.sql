-- What the worker needs to settle unknown outcomes: when to ask the processor again about an
-- attempt, and how often it has asked.
ALTER TABLE payment_attempts ADD COLUMN next_inquiry_at timestamptz;
ALTER TABLE payment_attempts ADD COLUMN inquiries integer NOT NULL DEFAULT 0;
CREATE INDEX payment_attempts_to_inquire ON payment_attempts (next_inquiry_at)
    WHERE outcome IN ('pending', 'unknown') AND next_inquiry_at IS NOT NULL;
CREATE INDEX idempotency_keys_abandoned ON idempotency_keys (locked_until)
    WHERE recovery_point IN ('payment_created', 'operation_started');
CREATE INDEX payments_authorized_since ON payments (created_at)
    WHERE status = 'authorized';
