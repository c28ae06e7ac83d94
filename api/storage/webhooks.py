"""SQL for webhook endpoints and the worker's delivery queue."""

from __future__ import annotations

from typing import Any


class WebhookEndpointRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def insert(
        self, merchant_id: str, endpoint_id: str, url: str, events: list[str], secret: bytes
    ) -> Any:
        return await self.conn.fetchrow(
            "INSERT INTO webhook_endpoints (merchant_id, id, url, events, secret) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING *",
            merchant_id,
            endpoint_id,
            url,
            events,
            secret,
        )

    async def get(self, merchant_id: str, endpoint_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT * FROM webhook_endpoints WHERE merchant_id = $1 AND id = $2 "
            "AND deleted_at IS NULL",
            merchant_id,
            endpoint_id,
        )

    async def list(self, merchant_id: str) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT * FROM webhook_endpoints WHERE merchant_id = $1 AND deleted_at IS NULL "
            "ORDER BY id DESC LIMIT 100",
            merchant_id,
        )
        return list(rows)

    async def delete(self, merchant_id: str, endpoint_id: str) -> Any:
        """Gone for good; what was still waiting to be sent to it is dropped as failed."""
        row = await self.conn.fetchrow(
            "UPDATE webhook_endpoints SET deleted_at = now() "
            "WHERE merchant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING *",
            merchant_id,
            endpoint_id,
        )
        if row is not None:
            await self.conn.execute(
                "UPDATE webhook_deliveries SET status = 'failed', finished_at = now(), "
                "last_error = 'endpoint_deleted' "
                "WHERE merchant_id = $1 AND endpoint_id = $2 AND status = 'pending'",
                merchant_id,
                endpoint_id,
            )
        return row

    async def roll(
        self, merchant_id: str, endpoint_id: str, secret: bytes, grace_seconds: float
    ) -> Any:
        """The new secret signs from now on; the old one keeps signing too for the grace."""
        return await self.conn.fetchrow(
            "UPDATE webhook_endpoints SET previous_secret = secret, "
            "previous_secret_expires_at = now() + make_interval(secs => $4), secret = $3 "
            "WHERE merchant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING *",
            merchant_id,
            endpoint_id,
            secret,
            grace_seconds,
        )


class DeliveryQueue:
    """The worker's side: claims with a lease, results, and disabling failing endpoints."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def claim(self, limit: int, per_endpoint: int, lease_seconds: float) -> list[Any]:
        """Due deliveries, at most `per_endpoint` in flight per endpoint. The conditional
        UPDATE is the claim: of two workers racing for one row, the second finds it leased and
        skips it, so one delivery is never sent twice at the same time."""
        rows: list[Any] = await self.pool.fetch(
            "WITH inflight AS ("
            "  SELECT merchant_id, endpoint_id, count(*) AS n FROM webhook_deliveries "
            "  WHERE status = 'pending' AND locked_until > now() "
            "  GROUP BY merchant_id, endpoint_id), "
            "ranked AS ("
            "  SELECT merchant_id, event_id, endpoint_id, next_attempt_at, row_number() OVER ("
            "    PARTITION BY merchant_id, endpoint_id ORDER BY next_attempt_at, event_id) AS rn "
            "  FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now() "
            "  AND (locked_until IS NULL OR locked_until <= now())), "
            "chosen AS ("
            "  SELECT r.merchant_id, r.event_id, r.endpoint_id FROM ranked r "
            "  LEFT JOIN inflight i ON i.merchant_id = r.merchant_id "
            "  AND i.endpoint_id = r.endpoint_id "
            "  WHERE r.rn + coalesce(i.n, 0) <= $2 ORDER BY r.next_attempt_at LIMIT $1) "
            "UPDATE webhook_deliveries d SET locked_until = now() + make_interval(secs => $3), "
            "attempts = d.attempts + 1 "
            "FROM chosen c, webhook_endpoints w, events e "
            "WHERE (d.merchant_id, d.event_id, d.endpoint_id) = "
            "(c.merchant_id, c.event_id, c.endpoint_id) "
            "AND d.status = 'pending' AND (d.locked_until IS NULL OR d.locked_until <= now()) "
            "AND w.merchant_id = d.merchant_id AND w.id = d.endpoint_id "
            "AND w.status = 'enabled' AND w.deleted_at IS NULL "
            "AND e.merchant_id = d.merchant_id AND e.id = d.event_id "
            "RETURNING d.merchant_id, d.event_id, d.endpoint_id, d.attempts, d.created_at, "
            "w.url, w.secret, w.previous_secret, "
            "coalesce(w.previous_secret_expires_at > now(), false) AS previous_valid, "
            "e.id, e.type, e.data::text AS data, e.previous_attributes::text AS previous, "
            "e.request_id, e.idempotency_key, "
            "e.created_at AS event_created_at",
            limit,
            per_endpoint,
            lease_seconds,
        )
        return rows

    async def succeeded(
        self, merchant_id: str, event_id: str, endpoint_id: str, status: int
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # Endpoint first, then delivery: the same lock order as disabling, so no deadlock.
            await conn.execute(
                "UPDATE webhook_endpoints SET failing_since = NULL "
                "WHERE merchant_id = $1 AND id = $2 AND failing_since IS NOT NULL",
                merchant_id,
                endpoint_id,
            )
            await conn.execute(
                "UPDATE webhook_deliveries SET status = 'succeeded', finished_at = now(), "
                "last_status = $4, last_error = NULL, locked_until = NULL "
                "WHERE merchant_id = $1 AND event_id = $2 AND endpoint_id = $3",
                merchant_id,
                event_id,
                endpoint_id,
                status,
            )

    async def retry_or_fail(
        self,
        merchant_id: str,
        event_id: str,
        endpoint_id: str,
        *,
        status: int | None,
        error: str,
        delay_seconds: float,
        window_seconds: float,
    ) -> str:
        """Schedule the next try, or give up when the retry window has passed or the
        endpoint was disabled or deleted while this send was in flight."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Locking the endpoint row first waits for a disabling in progress, so this
            # answer can never put a delivery of a disabled endpoint back to pending.
            live: bool | None = await conn.fetchval(
                "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()) "
                "WHERE merchant_id = $1 AND id = $2 "
                "RETURNING status = 'enabled' AND deleted_at IS NULL",
                merchant_id,
                endpoint_id,
            )
            outcome: str | None = await conn.fetchval(
                "UPDATE webhook_deliveries SET last_status = $4, last_error = $5, "
                "locked_until = NULL, "
                "status = CASE WHEN NOT $8::boolean OR created_at + make_interval(secs => $7) "
                "  < now() + make_interval(secs => $6) THEN 'failed' ELSE 'pending' END, "
                "finished_at = CASE WHEN NOT $8::boolean OR created_at + make_interval(secs => $7) "
                "  < now() + make_interval(secs => $6) THEN now() END, "
                "next_attempt_at = now() + make_interval(secs => $6) "
                "WHERE merchant_id = $1 AND event_id = $2 AND endpoint_id = $3 "
                "AND status = 'pending' RETURNING status",
                merchant_id,
                event_id,
                endpoint_id,
                status,
                error,
                delay_seconds,
                window_seconds,
                bool(live),
            )
        return outcome or "failed"

    async def failing_endpoints(self, conn: Any, older_than_seconds: float) -> list[Any]:
        """Endpoints that accepted nothing for this long, locked for disabling."""
        rows = await conn.fetch(
            "UPDATE webhook_endpoints SET status = 'disabled' WHERE (merchant_id, id) IN ("
            "  SELECT merchant_id, id FROM webhook_endpoints WHERE status = 'enabled' "
            "  AND deleted_at IS NULL "
            "  AND failing_since < now() - make_interval(secs => $1) "
            "  LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING *",
            older_than_seconds,
        )
        for row in rows:
            await conn.execute(
                "UPDATE webhook_deliveries SET status = 'failed', finished_at = now(), "
                "last_error = 'endpoint_disabled' "
                "WHERE merchant_id = $1 AND endpoint_id = $2 AND status = 'pending'",
                row["merchant_id"],
                row["id"],
            )
        return list(rows)

    async def purge_expired_events(
        self, older_than_days: int, batch: int = 5000, max_batches: int = 50
    ) -> int:
        """Delete expired events in short transactions until none is left or `max_batches`
        ran: up to 250,000 a call, so a worker calling it once a minute keeps up with about
        4,000 events/s, well above one machine's payment rate (docs/perf)."""
        total = 0
        for _ in range(max_batches):
            deleted = await self.purge_events(older_than_days, batch)
            total += deleted
            if deleted < batch:
                break
        return total

    async def purge_events(self, older_than_days: int, limit: int) -> int:
        status: str = await self.pool.execute(
            "DELETE FROM events WHERE (merchant_id, id) IN ("
            "  SELECT merchant_id, id FROM events "
            "  WHERE created_at < now() - make_interval(days => $1) LIMIT $2)",
            older_than_days,
            limit,
        )
        return int(status.split()[-1])
