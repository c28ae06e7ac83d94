-- Recovering declined renewals (issue 13; docs/subscriptions.md). A declined merchant-initiated
-- payment may be retried by the worker (when the merchant switched recovery on) or at the
-- merchant's request: each retry is a new attempt on the same payment, and the payment keeps
-- its recovery's state.
--   recovery_allowed   false: the payment asked for no automatic recovery ("recovery": false).
--   recovery           null (never under recovery), scheduled, recovered, exhausted, canceled.
--   recovery_reason    why it waits or ended (the policy's rule: awaiting_update, caps, ...).
--   recovery_next_attempt_at  when the next retry goes (shown; null while awaiting an update).
--   recovery_due_at    when the worker looks at it next: the next attempt, or the deadline.
--   recovery_deadline  the first decline plus the recovery window (at most 30 days).
--   declined_at        the first decline: the schedule counts hours and days from it.
ALTER TABLE payments
    ADD COLUMN recovery_allowed boolean NOT NULL DEFAULT true,
    ADD COLUMN recovery text
        CHECK (recovery IN ('scheduled', 'recovered', 'exhausted', 'canceled')),
    ADD COLUMN recovery_reason text CHECK (length(recovery_reason) BETWEEN 1 AND 80),
    ADD COLUMN recovery_next_attempt_at timestamptz,
    ADD COLUMN recovery_due_at timestamptz,
    ADD COLUMN recovery_deadline timestamptz,
    ADD COLUMN declined_at timestamptz,
    ADD CONSTRAINT payments_recovery_due CHECK (recovery <> 'scheduled' OR recovery_due_at IS NOT NULL);

-- A retry says who asked for it and which decline kind it retried (what the learned schedule
-- counts outcomes by: core.recovery.Classification.key).
ALTER TABLE payment_attempts
    ADD COLUMN retry_by text CHECK (retry_by IN ('schedule', 'merchant')),
    ADD COLUMN recovery_key text CHECK (length(recovery_key) BETWEEN 1 AND 80),
    ADD CONSTRAINT payment_attempts_retry_key CHECK ((retry_by IS NULL) = (recovery_key IS NULL));

-- The worker's queue: scheduled recoveries by when they are due.
CREATE INDEX payments_recovery_due ON payments (recovery_due_at) WHERE recovery = 'scheduled';
-- The caps count every attempt on the card (the vault token) within the merchant.
CREATE INDEX payments_by_token ON payments (merchant_id, token);
-- The learned schedule reads the retries of the last 90 days.
CREATE INDEX payment_attempts_retries ON payment_attempts (started_at) WHERE retry_by IS NOT NULL;

-- A merchant's retry (`POST /v1/payments/{id}/retry`) keeps its idempotency key like the other
-- operations: `retry_started` once its attempt is written, so a retry with the same key (or the
-- worker's completer) finishes it by asking the processor about that attempt.
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_recovery_point_check,
    ADD CONSTRAINT idempotency_keys_recovery_point_check CHECK (recovery_point IN (
        'started', 'payment_created', 'operation_started', 'retry_started', 'finished'));
DROP INDEX idempotency_keys_abandoned;
CREATE INDEX idempotency_keys_abandoned ON idempotency_keys (locked_until)
    WHERE recovery_point IN ('payment_created', 'operation_started', 'retry_started');
