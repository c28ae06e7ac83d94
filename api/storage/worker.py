"""SQL for the worker's claims: each row goes to one worker at a time (SKIP LOCKED), and a
claim pushes the row's next turn forward, so a crashed worker's rows come back by themselves."""

from __future__ import annotations

from typing import Any


class WorkerRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def claim_unknown_attempts(self, limit: int) -> list[Any]:
        """`processing` payments whose attempt's outcome is unknown and due for an inquiry:
        first within seconds of the time-out, then backing off to a minute."""
        rows: list[Any] = await self.pool.fetch(
            "WITH due AS ("
            "  SELECT a.merchant_id, a.payment_id, a.attempt FROM payment_attempts a "
            "  JOIN payments p ON p.merchant_id = a.merchant_id AND p.id = a.payment_id "
            "  WHERE a.outcome IN ('pending', 'unknown') AND a.next_inquiry_at <= now() "
            "  AND (p.status = 'processing' OR a.retry_by IS NOT NULL) "
            "  ORDER BY a.next_inquiry_at LIMIT $1 FOR UPDATE OF a SKIP LOCKED) "
            "UPDATE payment_attempts a SET inquiries = a.inquiries + 1, "
            "next_inquiry_at = now() + make_interval(secs => least(60, 2 ^ a.inquiries)) "
            "FROM due WHERE (a.merchant_id, a.payment_id, a.attempt) = "
            "(due.merchant_id, due.payment_id, due.attempt) "
            "RETURNING a.merchant_id, a.payment_id, a.attempt, a.reference, a.retry_by, "
            "extract(epoch FROM now() - a.started_at)::float8 AS age_seconds",
            limit,
        )
        return rows

    async def claim_late_checks(self, limit: int) -> list[Any]:
        """Attempts failed at the processor's cut-off, due for another look: every few
        seconds at first, then every ten minutes until their window closes."""
        rows: list[Any] = await self.pool.fetch(
            "WITH due AS ("
            "  SELECT merchant_id, payment_id, attempt FROM payment_attempts "
            "  WHERE late_check_until IS NOT NULL AND next_inquiry_at <= now() "
            "  ORDER BY next_inquiry_at LIMIT $1 FOR UPDATE SKIP LOCKED) "
            "UPDATE payment_attempts a SET inquiries = a.inquiries + 1, "
            "next_inquiry_at = now() + make_interval(secs => least(600, 2 ^ a.inquiries)) "
            "FROM due WHERE (a.merchant_id, a.payment_id, a.attempt) = "
            "(due.merchant_id, due.payment_id, due.attempt) "
            "RETURNING a.merchant_id, a.payment_id, a.attempt, a.processor, a.reference, "
            "a.late_check_until < now() AS window_closed",
            limit,
        )
        return rows

    async def claim_abandoned_keys(self, limit: int, lease_seconds: float) -> list[Any]:
        """Requests that died after their first phase: the worker takes the lease a retry
        would take, and finishes them."""
        rows: list[Any] = await self.pool.fetch(
            "WITH abandoned AS ("
            "  SELECT merchant_id, key FROM idempotency_keys "
            "  WHERE recovery_point IN ('payment_created', 'operation_started', 'retry_started') "
            "  AND locked_until < now() "
            "  ORDER BY locked_until LIMIT $1 FOR UPDATE SKIP LOCKED) "
            "UPDATE idempotency_keys k SET locked_until = now() + make_interval(secs => $2) "
            "FROM abandoned WHERE (k.merchant_id, k.key) = (abandoned.merchant_id, abandoned.key) "
            "RETURNING k.merchant_id, k.key, k.recovery_point, k.locked_until",
            limit,
            lease_seconds,
        )
        return rows

    async def expired_authorizations(self, older_than_seconds: float, limit: int) -> list[Any]:
        rows: list[Any] = await self.pool.fetch(
            "SELECT merchant_id, id FROM payments WHERE status = 'authorized' "
            "AND created_at < now() - make_interval(secs => $1) "
            "AND (operation_lock_until IS NULL OR operation_lock_until < now()) "
            "ORDER BY created_at LIMIT $2",
            older_than_seconds,
            limit,
        )
        return rows

    async def purge_expired_keys(self, limit: int) -> int:
        status: str = await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
            "  SELECT ctid FROM idempotency_keys WHERE expires_at < now() "
            "  AND recovery_point = 'finished' LIMIT $1))",
            limit,
        )
        return int(status.split()[-1])
