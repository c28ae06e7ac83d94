"""SQL for payments and their processor attempts."""

from __future__ import annotations

from typing import Any

import msgspec


class PaymentRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def insert(self, merchant_id: str, values: dict[str, Any]) -> Any:
        """The new payment's row (as `get` would read it, without a second round trip)."""
        return await self.conn.fetchrow(
            "INSERT INTO payments (merchant_id, id, amount, currency, status, capture, token, "
            "card_brand, card_last4, card_exp_month, card_exp_year, processor, description, "
            "reference, metadata, card_country, setup_future_usage, payment_method, mit_reason, "
            "recovery_allowed) "
            "VALUES ($1, $2, $3, $4, 'processing', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, "
            "$15, $16, $17, $18, $19) RETURNING *",
            merchant_id,
            values["id"],
            values["amount"],
            values["currency"],
            values["capture"],
            values["token"],
            values["card_brand"],
            values["card_last4"],
            values["card_exp_month"],
            values["card_exp_year"],
            values["processor"],
            values["description"],
            values["reference"],
            msgspec.json.encode(values["metadata"]).decode(),
            values.get("card_country"),
            values.get("setup_future_usage"),
            values.get("payment_method"),
            values.get("mit_reason"),
            values.get("recovery_allowed", True),
        )

    async def insert_attempt(
        self, merchant_id: str, payment_id: str, attempt: int, processor: str, reference: str
    ) -> Any:
        """The new attempt, with the columns `latest_attempt` reads."""
        return await self.conn.fetchrow(
            "INSERT INTO payment_attempts (merchant_id, payment_id, attempt, processor, "
            "reference, outcome) VALUES ($1, $2, $3, $4, $5, 'pending') "
            "RETURNING attempt, processor, reference, outcome",
            merchant_id,
            payment_id,
            attempt,
            processor,
            reference,
        )

    async def get(self, merchant_id: str, payment_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT * FROM payments WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_id,
        )

    async def latest_attempt(self, merchant_id: str, payment_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT attempt, processor, reference, outcome FROM payment_attempts "
            "WHERE merchant_id = $1 AND payment_id = $2 ORDER BY attempt DESC LIMIT 1",
            merchant_id,
            payment_id,
        )

    async def record_authorization(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        *,
        status: str,
        amount_authorized: int,
        amount_captured: int,
        outcome: str,
        processor_reference: str | None,
        decline_code: str | None,
        failure_code: str | None,
        advice_code: str | None = None,
        visa_category: int | None = None,
    ) -> Any:
        """Apply the processor's answer, only if the payment still waits for one. Returns the
        payment's new row, or None if it no longer waited (nothing changed)."""
        return await self.conn.fetchrow(
            "WITH p AS (UPDATE payments SET status = $3, amount_authorized = $4, "
            "amount_captured = $5, processor_reference = $6, decline_code = $7, "
            "failure_code = $8, decline_advice_code = $11, decline_visa_category = $12, "
            "updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2 AND status = 'processing' RETURNING *), "
            "a AS (UPDATE payment_attempts SET outcome = $9, processor_reference = $6, "
            "decline_code = $7, decline_advice_code = $11, decline_visa_category = $12, "
            "finished_at = now(), "
            "latency_ms = (extract(epoch FROM now() - started_at) * 1000)::int "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $10 "
            "AND EXISTS (SELECT 1 FROM p) RETURNING 1) "
            "SELECT p.* FROM p WHERE EXISTS (SELECT 1 FROM a)",
            merchant_id,
            payment_id,
            status,
            amount_authorized,
            amount_captured,
            processor_reference,
            decline_code,
            failure_code,
            outcome,
            attempt,
            advice_code,
            visa_category,
        )

    async def close_attempt(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        *,
        outcome: str,
        processor_reference: str | None,
        decline_code: str | None,
        advice_code: str | None = None,
        visa_category: int | None = None,
    ) -> None:
        """An attempt that failed over to another processor: closed, the payment untouched."""
        await self.conn.execute(
            "UPDATE payment_attempts SET outcome = $4, processor_reference = $5, "
            "decline_code = $6, decline_advice_code = $7, decline_visa_category = $8, "
            "finished_at = now(), "
            "latency_ms = (extract(epoch FROM now() - started_at) * 1000)::int "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3",
            merchant_id,
            payment_id,
            attempt,
            outcome,
            processor_reference,
            decline_code,
            advice_code,
            visa_category,
        )

    async def switch_processor(self, merchant_id: str, payment_id: str, processor: str) -> None:
        await self.conn.execute(
            "UPDATE payments SET processor = $3, updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2 AND status = 'processing'",
            merchant_id,
            payment_id,
            processor,
        )

    async def attempts(self, merchant_id: str, payment_ids: list[str]) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT payment_id, attempt, processor, reference, outcome, processor_reference, "
            "decline_code, decline_advice_code, decline_visa_category, latency_ms, "
            "late_reversal, retry_by FROM payment_attempts "
            "WHERE merchant_id = $1 AND payment_id = ANY($2) ORDER BY payment_id, attempt",
            merchant_id,
            payment_ids,
        )
        return list(rows)

    async def mark_unknown(self, merchant_id: str, payment_id: str, attempt: int) -> bool:
        """No answer we can trust: the reconciler asks the processor about it in a second.
        False if the attempt was already unknown (a retry that learned nothing new)."""
        status: str = await self.conn.execute(
            "UPDATE payment_attempts SET outcome = 'unknown', "
            "next_inquiry_at = now() + interval '1 second' "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3 AND outcome = 'pending'",
            merchant_id,
            payment_id,
            attempt,
        )
        return status.endswith(" 1")

    async def watch_for_late_authorization(
        self, merchant_id: str, payment_id: str, attempt: int, window_seconds: float
    ) -> None:
        """A failed-at-cut-off attempt: the worker keeps asking about it for `window_seconds`
        and reverses a late authorization it finds."""
        await self.conn.execute(
            "UPDATE payment_attempts SET late_check_until = now() + make_interval(secs => $4), "
            "inquiries = 0, next_inquiry_at = now() + interval '1 second' "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3",
            merchant_id,
            payment_id,
            attempt,
            window_seconds,
        )

    async def end_late_check(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        *,
        reversal: str | None,
        processor_reference: str | None,
    ) -> None:
        await self.conn.execute(
            "UPDATE payment_attempts SET late_check_until = NULL, next_inquiry_at = NULL, "
            "late_reversal = $4, processor_reference = coalesce($5, processor_reference) "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3",
            merchant_id,
            payment_id,
            attempt,
            reversal,
            processor_reference,
        )

    async def reopen_attempt(self, merchant_id: str, payment_id: str, attempt: int) -> None:
        """An unknown attempt about to be settled goes back to pending, so the recording
        update (which only moves pending attempts of processing payments) applies."""
        await self.conn.execute(
            "UPDATE payment_attempts SET outcome = 'pending' "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3 AND outcome = 'unknown'",
            merchant_id,
            payment_id,
            attempt,
        )

    async def page(
        self,
        merchant_id: str,
        *,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
    ) -> list[Any]:
        """Newest first; ids sort by creation time, so the id is the cursor."""
        if ending_before is not None:
            rows = await self.conn.fetch(
                "SELECT * FROM payments WHERE merchant_id = $1 AND id > $2 "
                "ORDER BY id ASC LIMIT $3",
                merchant_id,
                ending_before,
                limit + 1,
            )
            return list(rows)
        rows = await self.conn.fetch(
            "SELECT * FROM payments WHERE merchant_id = $1 "
            "AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            merchant_id,
            starting_after,
            limit + 1,
        )
        return list(rows)

    async def refunds(self, merchant_id: str, payment_ids: list[str]) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT id, payment_id, amount, status, reason, created_at FROM refunds "
            "WHERE merchant_id = $1 AND payment_id = ANY($2) ORDER BY created_at, id",
            merchant_id,
            payment_ids,
        )
        return list(rows)


class OperationRepository:
    """SQL for captures, cancels and refunds: turn-taking on the payment row and refund rows."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def lock(self, merchant_id: str, payment_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT *, coalesce(operation_lock_until > now(), false) AS busy "
            "FROM payments WHERE merchant_id = $1 AND id = $2 FOR UPDATE",
            merchant_id,
            payment_id,
        )

    async def set_state(
        self,
        merchant_id: str,
        payment_id: str,
        *,
        status: str,
        amount_captured: int,
        amount_refunded: int,
        lease_seconds: float | None,
    ) -> None:
        """Write the amounts; hold the operation lease while the processor is asked, or free it."""
        await self.conn.execute(
            "UPDATE payments SET status = $3, amount_captured = $4, amount_refunded = $5, "
            "operation_lock_until = CASE WHEN $6::float8 IS NULL THEN NULL "
            "ELSE now() + make_interval(secs => $6::float8) END, updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_id,
            status,
            amount_captured,
            amount_refunded,
            lease_seconds,
        )

    async def insert_refund(
        self, merchant_id: str, refund_id: str, payment_id: str, amount: int, reason: str | None
    ) -> None:
        await self.conn.execute(
            "INSERT INTO refunds (merchant_id, id, payment_id, amount, reason, status) "
            "VALUES ($1, $2, $3, $4, $5, 'pending')",
            merchant_id,
            refund_id,
            payment_id,
            amount,
            reason,
        )

    async def settle_refund(
        self,
        merchant_id: str,
        refund_id: str,
        status: str,
        processor_reference: str | None,
        failure_code: str | None,
    ) -> None:
        await self.conn.execute(
            "UPDATE refunds SET status = $3, processor_reference = $4, failure_code = $5, "
            "updated_at = now() WHERE merchant_id = $1 AND id = $2 AND status = 'pending'",
            merchant_id,
            refund_id,
            status,
            processor_reference,
            failure_code,
        )

    async def refund(self, merchant_id: str, refund_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT id, payment_id, amount, status, reason, created_at FROM refunds "
            "WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            refund_id,
        )

    async def expect_notification(
        self,
        processor: str,
        processor_reference: str,
        merchant_id: str,
        operation: str,
        payment_id: str,
        amount: int,
        refund_id: str | None,
        *,
        lease_seconds: float,
    ) -> None:
        await self.conn.execute(
            "INSERT INTO processor_operations (processor, processor_reference, merchant_id, "
            "payment_id, operation, amount, refund_id, status) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending') ON CONFLICT DO NOTHING",
            processor,
            processor_reference,
            merchant_id,
            payment_id,
            operation,
            amount,
            refund_id,
        )
        await self.conn.execute(
            "UPDATE payments SET operation_lock_until = now() + make_interval(secs => $3) "
            "WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_id,
            lease_seconds,
        )
        if refund_id is not None:
            await self.conn.execute(
                "UPDATE refunds SET processor_reference = $3 WHERE merchant_id = $1 AND id = $2",
                merchant_id,
                refund_id,
                processor_reference,
            )

    async def pending_operation(self, processor: str, processor_reference: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT merchant_id, payment_id, operation, amount, refund_id, status "
            "FROM processor_operations WHERE processor = $1 AND processor_reference = $2 "
            "FOR UPDATE",
            processor,
            processor_reference,
        )

    async def settle_operation(self, processor: str, processor_reference: str, status: str) -> None:
        await self.conn.execute(
            "UPDATE processor_operations SET status = $3, settled_at = now() "
            "WHERE processor = $1 AND processor_reference = $2",
            processor,
            processor_reference,
            status,
        )

    async def first_notification(
        self, processor: str, psp_reference: str, event_code: str, success: bool
    ) -> bool:
        """Record a notification; False if it was applied before (a replay)."""
        inserted = await self.conn.fetchval(
            "INSERT INTO processed_notifications (processor, psp_reference, event_code, success) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
            processor,
            psp_reference,
            event_code,
            success,
        )
        return bool(inserted)
