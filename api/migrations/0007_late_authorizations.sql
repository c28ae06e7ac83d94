-- A payment failed at the processor's cut-off may still be authorized late (a request stuck in
-- the processor's queue). The worker keeps asking about such an attempt until
-- `late_check_until` and reverses what it finds: a void, or a refund if it was captured.
ALTER TABLE payment_attempts ADD COLUMN late_check_until timestamptz;
ALTER TABLE payment_attempts ADD COLUMN late_reversal text
    CHECK (late_reversal IN ('voided', 'refunded'));
CREATE INDEX payment_attempts_late_checks ON payment_attempts (next_inquiry_at)
    WHERE late_check_until IS NOT NULL;
