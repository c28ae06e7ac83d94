"""SQL for recovering declined renewals: the card's attempt history, the recovery's state on the
payment, retry attempts, and the worker's queue."""

from __future__ import annotations

from datetime import datetime
from typing import Any


class RecoveryRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def lock(self, merchant_id: str, payment_id: str) -> Any:
        """The payment, locked until the transaction ends: a retry's decision and its new
        attempt are made under this lock, so two deciders never make the same retry."""
        return await self.conn.fetchrow(
            "SELECT * FROM payments WHERE merchant_id = $1 AND id = $2 FOR UPDATE",
            merchant_id,
            payment_id,
        )

    async def lock_card(self, merchant_id: str, token: str) -> None:
        """Until the transaction ends, no other decider reads this card's history: the caps
        count every retry of the card, so two of its payments are decided one after the other."""
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))",
            merchant_id,
            token,
        )

    async def in_flight(self, merchant_id: str, payment_id: str) -> bool:
        """An attempt of the payment whose answer is not recorded yet (a retry on its way)."""
        found = await self.conn.fetchval(
            "SELECT 1 FROM payment_attempts WHERE merchant_id = $1 AND payment_id = $2 "
            "AND outcome IN ('pending', 'unknown') LIMIT 1",
            merchant_id,
            payment_id,
        )
        return found is not None

    async def card_attempts(
        self, merchant_id: str, token: str, since: datetime, payment_id: str
    ) -> list[Any]:
        """Every answered attempt on the card (the vault token) within the merchant since
        `since`, and every one of `payment_id`'s, oldest first: what the caps, the recovery
        window and the hard-decline rule judge on."""
        rows: list[Any] = await self.conn.fetch(
            "SELECT a.payment_id, a.started_at, a.retry_by, a.outcome, a.decline_code, "
            "a.decline_advice_code, a.decline_visa_category "
            "FROM payments p JOIN payment_attempts a "
            "ON a.merchant_id = p.merchant_id AND a.payment_id = p.id "
            "WHERE p.merchant_id = $1 AND p.token = $2 AND (a.started_at >= $3 OR p.id = $4) "
            "AND a.outcome <> 'failed' ORDER BY a.started_at, a.attempt",
            merchant_id,
            token,
            since,
            payment_id,
        )
        return rows

    async def card_updated_at(self, merchant_id: str, payment_method: str) -> datetime | None:
        updated: datetime | None = await self.conn.fetchval(
            "SELECT card_updated_at FROM payment_methods WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_method,
        )
        return updated

    async def schedule(
        self,
        merchant_id: str,
        payment_id: str,
        *,
        next_attempt_at: datetime | None,
        due_at: datetime,
        reason: str,
        deadline: datetime | None = None,
        declined_at: datetime | None = None,
    ) -> None:
        """Under recovery: the next retry (or none yet, awaiting an update) and the worker's
        next look. `deadline` and `declined_at` are set once, when the recovery starts."""
        await self.conn.execute(
            "UPDATE payments SET recovery = 'scheduled', recovery_reason = $3, "
            "recovery_next_attempt_at = $4, recovery_due_at = $5, "
            "recovery_deadline = coalesce(recovery_deadline, $6), "
            "declined_at = coalesce(declined_at, $7), updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_id,
            reason,
            next_attempt_at,
            due_at,
            deadline,
            declined_at,
        )

    async def end(
        self,
        merchant_id: str,
        payment_id: str,
        status: str,
        reason: str,
        declined_at: datetime | None = None,
    ) -> None:
        """recovered, exhausted or canceled: nothing more is scheduled."""
        await self.conn.execute(
            "UPDATE payments SET recovery = $3, recovery_reason = $4, "
            "recovery_next_attempt_at = NULL, recovery_due_at = NULL, "
            "declined_at = coalesce(declined_at, $5), updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_id,
            status,
            reason,
            declined_at,
        )

    async def insert_retry(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        processor: str,
        *,
        retry_by: str,
        recovery_key: str,
        started_at: datetime,
        inquire_after_seconds: float,
    ) -> Any:
        """A retry's attempt, written before it is sent. If its sender dies before recording
        the answer, the reconciler asks the processor about it after `inquire_after_seconds`."""
        return await self.conn.fetchrow(
            "INSERT INTO payment_attempts (merchant_id, payment_id, attempt, processor, "
            "reference, outcome, started_at, retry_by, recovery_key, next_inquiry_at) "
            "VALUES ($1, $2, $3, $4, $9, 'pending', $5, $6, $7, "
            "now() + make_interval(secs => $8)) "
            "RETURNING attempt, processor, reference, outcome",
            merchant_id,
            payment_id,
            attempt,
            processor,
            started_at,
            retry_by,
            recovery_key,
            inquire_after_seconds,
            f"{payment_id}_{attempt}",
        )

    async def latest_attempt(self, merchant_id: str, payment_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT attempt, processor, reference, outcome, retry_by, recovery_key "
            "FROM payment_attempts WHERE merchant_id = $1 AND payment_id = $2 "
            "ORDER BY attempt DESC LIMIT 1",
            merchant_id,
            payment_id,
        )

    async def record_retry(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        *,
        outcome: str,
        processor_reference: str | None,
        decline_code: str | None,
        advice_code: str | None,
        visa_category: int | None,
    ) -> str | None:
        """The retry's answer, once. Returns the decline kind it retried (its recovery key),
        or None if another recorder (the reconciler, a resumed request) got there first."""
        key: str | None = await self.conn.fetchval(
            "UPDATE payment_attempts SET outcome = $4, processor_reference = $5, "
            "decline_code = $6, decline_advice_code = $7, decline_visa_category = $8, "
            "next_inquiry_at = NULL, finished_at = now(), "
            "latency_ms = greatest(0, (extract(epoch FROM now() - started_at) * 1000))::int "
            "WHERE merchant_id = $1 AND payment_id = $2 AND attempt = $3 "
            "AND outcome IN ('pending', 'unknown') RETURNING recovery_key",
            merchant_id,
            payment_id,
            attempt,
            outcome,
            processor_reference,
            decline_code,
            advice_code,
            visa_category,
        )
        return key

    async def set_authorized(
        self,
        merchant_id: str,
        payment_id: str,
        *,
        status: str,
        amount_authorized: int,
        amount_captured: int,
        processor_reference: str | None,
    ) -> Any:
        """A retry approved: the payment moves on from `declined` (only from there)."""
        return await self.conn.fetchrow(
            "UPDATE payments SET status = $3, amount_authorized = $4, amount_captured = $5, "
            "processor_reference = $6, decline_code = NULL, decline_advice_code = NULL, "
            "decline_visa_category = NULL, recovery = 'recovered', recovery_reason = 'approved', "
            "recovery_next_attempt_at = NULL, recovery_due_at = NULL, updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2 AND status = 'declined' RETURNING *",
            merchant_id,
            payment_id,
            status,
            amount_authorized,
            amount_captured,
            processor_reference,
        )

    async def set_decline(
        self,
        merchant_id: str,
        payment_id: str,
        decline_code: str | None,
        advice_code: str | None,
        visa_category: int | None,
    ) -> None:
        """A retry declined again: the payment shows the latest decline."""
        await self.conn.execute(
            "UPDATE payments SET decline_code = $3, decline_advice_code = $4, "
            "decline_visa_category = $5, updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2 AND status = 'declined'",
            merchant_id,
            payment_id,
            decline_code,
            advice_code,
            visa_category,
        )

    async def card_updated(self, merchant_id: str, payment_method: str) -> int:
        """A card update landed: the recoveries of its payment method are due now (a retry that
        waited for it goes out at the worker's next turn)."""
        status: str = await self.conn.execute(
            "UPDATE payments SET recovery_due_at = now() "
            "WHERE merchant_id = $1 AND payment_method = $2 AND recovery = 'scheduled'",
            merchant_id,
            payment_method,
        )
        return int(status.split()[-1])


class RecoveryQueue:
    """The worker's cross-merchant reads (listed in tests/test_merchant_keys.py)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def claim_due(self, now: datetime) -> Any:
        """The scheduled recovery due soonest by `now`, locked (SKIP LOCKED: each to one
        worker) for the caller's transaction; None when none is due."""
        return await self.conn.fetchrow(
            "SELECT merchant_id, id, token FROM payments "
            "WHERE recovery = 'scheduled' AND recovery_due_at <= $1 "
            "ORDER BY recovery_due_at LIMIT 1 FOR UPDATE SKIP LOCKED",
            now,
        )

    async def retry_outcomes(self, since: datetime) -> list[Any]:
        """Every answered retry since `since`, every merchant's: what the learned schedule
        learns from (outcomes only; no card data)."""
        rows: list[Any] = await self.conn.fetch(
            "SELECT a.recovery_key, p.declined_at, a.started_at, a.outcome = 'approved' AS ok "
            "FROM payment_attempts a JOIN payments p "
            "ON p.merchant_id = a.merchant_id AND p.id = a.payment_id "
            "WHERE a.retry_by IS NOT NULL AND a.started_at >= $1 "
            "AND a.outcome IN ('approved', 'declined') AND p.declined_at IS NOT NULL",
            since,
        )
        return rows
