"""Events (the outbox) and ledger postings, written with the change they describe.

Every state change a merchant can observe goes through `Publisher.publish`, inside the
transaction that makes the change: the event (and its pending webhook deliveries) and the
ledger's postings commit with it or not at all, so an event is never lost and never invented.

The catalogue (docs/events.md): `payment.processing`, `payment.authorized`, `payment.captured`,
`payment.declined`, `payment.failed`, `payment.canceled`, `payment.capture_failed`,
`payment.cancel_failed`, `refund.pending`, `refund.succeeded`, `refund.failed`,
`webhook_endpoint.disabled`, `payment_method.created`, `payment_method.updated`,
`payment_method.detached`, `payment.retry_scheduled`,
`payment.recovered`, `payment.recovery_exhausted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from api.services.paging import keyset_page
from api.storage.events import EventRepository
from api.storage.ledger import LedgerRepository
from api.storage.read_pools import ListReads
from core.errors import InvalidRequest, NotFound
from core.ids import MonotonicIds
from core.ledger import Posting

EVENT_TYPES = (
    "payment.processing",
    "payment.authorized",
    "payment.captured",
    "payment.declined",
    "payment.failed",
    "payment.canceled",
    "payment.capture_failed",
    "payment.cancel_failed",
    "refund.pending",
    "refund.succeeded",
    "refund.failed",
    "webhook_endpoint.disabled",
    "payment_method.created",
    "payment_method.updated",
    "payment_method.detached",
    "payment.retry_scheduled",
    "payment.recovered",
    "payment.recovery_exhausted",
)


#: One per process: the events it writes sort in the order it wrote them, so two events of one
#: transaction (`payment.captured`, then `payment.recovered`) list in that order.
_EVENT_IDS = MonotonicIds()


@dataclass(frozen=True)
class Cause:
    """The request that caused a change, if a request did (the worker's changes have none)."""

    request_id: str | None = None
    idempotency_key: str | None = None


class EventRequest(msgspec.Struct):
    id: str | None
    idempotency_key: str | None


class EventData(msgspec.Struct, omit_defaults=True):
    object: dict[str, Any]
    #: `*.updated` events only: the changed fields' values before the change.
    previous_attributes: dict[str, Any] | None = None


class EventView(msgspec.Struct):
    id: str
    type: str
    created: int
    data: EventData
    request: EventRequest | None
    object: str = "event"


class EventList(msgspec.Struct):
    data: list[EventView]
    has_more: bool
    object: str = "list"


class DeliveryView(msgspec.Struct):
    endpoint: str
    url: str
    status: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt: int | None
    created: int
    finished: int | None
    object: str = "webhook_delivery"


class DeliveryList(msgspec.Struct):
    data: list[DeliveryView]
    object: str = "list"


@dataclass
class Publisher:
    #: How long captured money waits before it is available to the merchant.
    settlement_delay_seconds: float = 2 * 24 * 3600

    async def publish(
        self,
        conn: Any,
        merchant_id: str,
        event_type: str,
        object_id: str,
        obj: msgspec.Struct,
        cause: Cause | None = None,
        *,
        payment_id: str | None = None,
        postings: list[Posting] | None = None,
        previous_attributes: msgspec.Struct | dict[str, Any] | None = None,
    ) -> str:
        """Call inside the transaction of the change; returns the event id."""
        assert event_type in EVENT_TYPES, event_type
        cause = cause or Cause()
        event_id = _EVENT_IDS.new("evt")
        await EventRepository(conn).insert(
            merchant_id,
            event_id,
            event_type,
            object_id,
            msgspec.json.encode(obj).decode(),
            cause.request_id,
            cause.idempotency_key,
            None
            if previous_attributes is None
            else msgspec.json.encode(previous_attributes).decode(),
        )
        if postings:
            assert payment_id is not None
            await LedgerRepository(conn).post(
                merchant_id, payment_id, postings, self.settlement_delay_seconds
            )
        return event_id


def event_view(row: Any) -> EventView:
    request = None
    if row["request_id"] is not None or row["idempotency_key"] is not None:
        request = EventRequest(row["request_id"], row["idempotency_key"])
    data = row["data"]
    if isinstance(data, str):
        data = msgspec.json.decode(data)
    previous = row["previous_attributes"]
    if isinstance(previous, str):
        previous = msgspec.json.decode(previous)
    return EventView(
        id=row["id"],
        type=row["type"],
        created=int(row["created_at"].timestamp()),
        data=EventData(data, previous),
        request=request,
    )


def _epoch(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


@dataclass
class EventService:
    pool: Any
    #: Where the two lists read (a replica, if configured); `get` reads `pool`, the primary.
    lists: ListReads | None = None

    def _lists(self) -> ListReads:
        return self.lists if self.lists is not None else ListReads(self.pool)

    async def get(self, merchant_id: str, event_id: str) -> EventView:
        async with self.pool.acquire() as conn:
            row = await EventRepository(conn).get(merchant_id, event_id)
        if row is None:
            raise NotFound("No such event.", param="id")
        return event_view(row)

    async def page(
        self,
        merchant_id: str,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
        event_type: str | None,
        object_id: str | None,
    ) -> EventList:
        if event_type is not None and event_type not in EVENT_TYPES:
            raise InvalidRequest(
                f"type must be one of {', '.join(EVENT_TYPES)}.",
                code="event_type_invalid",
                param="type",
            )
        async with self._lists().acquire() as conn:
            rows = await EventRepository(conn).page(
                merchant_id,
                limit=limit,
                starting_after=starting_after,
                ending_before=ending_before,
                event_type=event_type,
                object_id=object_id,
            )
        rows, has_more = keyset_page(rows, limit, ending_before is not None)
        return EventList([event_view(r) for r in rows], has_more)

    async def deliveries(self, merchant_id: str, event_id: str) -> DeliveryList:
        lists = self._lists()
        rows = await self._deliveries(lists.acquire(), merchant_id, event_id)
        if rows is None and lists.confirm_on_primary():
            rows = await self._deliveries(self.pool.acquire(), merchant_id, event_id)
        if rows is None:
            raise NotFound("No such event.", param="id")
        return DeliveryList(
            [
                DeliveryView(
                    endpoint=r["endpoint_id"],
                    url=r["url"],
                    status=r["status"],
                    attempts=r["attempts"],
                    last_status=r["last_status"],
                    last_error=r["last_error"],
                    next_attempt=_epoch(r["next_attempt_at"]) if r["status"] == "pending" else None,
                    created=int(r["created_at"].timestamp()),
                    finished=_epoch(r["finished_at"]),
                )
                for r in rows
            ]
        )

    async def _deliveries(
        self, acquiring: Any, merchant_id: str, event_id: str
    ) -> list[Any] | None:
        """The event's deliveries, or None when the event is not there."""
        async with acquiring as conn:
            events = EventRepository(conn)
            if await events.get(merchant_id, event_id) is None:
                return None
            return await events.deliveries(merchant_id, event_id)
