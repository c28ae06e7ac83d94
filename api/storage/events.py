"""SQL for events (the outbox) and the webhook deliveries each event fans out to."""

from __future__ import annotations

from typing import Any


class EventRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def insert(
        self,
        merchant_id: str,
        event_id: str,
        event_type: str,
        object_id: str,
        data: str,
        request_id: str | None,
        idempotency_key: str | None,
        previous_attributes: str | None = None,
    ) -> None:
        """The event, and one pending delivery per live endpoint that wants it: one statement,
        in the caller's transaction."""
        await self.conn.execute(
            "WITH e AS (INSERT INTO events (merchant_id, id, type, object_id, data, request_id, "
            "idempotency_key, previous_attributes) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8::jsonb) "
            "RETURNING merchant_id, id, type) "
            "INSERT INTO webhook_deliveries (merchant_id, event_id, endpoint_id) "
            "SELECT e.merchant_id, e.id, w.id FROM e JOIN webhook_endpoints w "
            "ON w.merchant_id = e.merchant_id AND w.deleted_at IS NULL AND w.status = 'enabled' "
            "AND (e.type = ANY(w.events) OR '*' = ANY(w.events))",
            merchant_id,
            event_id,
            event_type,
            object_id,
            data,
            request_id,
            idempotency_key,
            previous_attributes,
        )

    async def get(self, merchant_id: str, event_id: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT * FROM events WHERE merchant_id = $1 AND id = $2", merchant_id, event_id
        )

    async def page(
        self,
        merchant_id: str,
        *,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
        event_type: str | None,
        object_id: str | None,
    ) -> list[Any]:
        """Newest first; event ids sort by creation time, so the id is the cursor."""
        if ending_before is not None:
            rows = await self.conn.fetch(
                "SELECT * FROM events WHERE merchant_id = $1 AND id > $2 "
                "AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR object_id = $4) "
                "ORDER BY id ASC LIMIT $5",
                merchant_id,
                ending_before,
                event_type,
                object_id,
                limit + 1,
            )
            return list(rows)
        rows = await self.conn.fetch(
            "SELECT * FROM events WHERE merchant_id = $1 AND ($2::text IS NULL OR id < $2) "
            "AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR object_id = $4) "
            "ORDER BY id DESC LIMIT $5",
            merchant_id,
            starting_after,
            event_type,
            object_id,
            limit + 1,
        )
        return list(rows)

    async def deliveries(self, merchant_id: str, event_id: str) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT d.*, w.url FROM webhook_deliveries d JOIN webhook_endpoints w "
            "ON w.merchant_id = d.merchant_id AND w.id = d.endpoint_id "
            "WHERE d.merchant_id = $1 AND d.event_id = $2 ORDER BY d.endpoint_id",
            merchant_id,
            event_id,
        )
        return list(rows)
