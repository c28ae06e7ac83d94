"""Events, webhook endpoints and the balance: parse, authenticate, call one service, answer."""

from __future__ import annotations

import re
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from api.auth import merchant_of, require_secret_key
from api.openapi import SECRET_KEY
from api.services.events import EVENT_TYPES, DeliveryList, EventList, EventService, EventView
from api.services.ledger import BalanceView, LedgerService
from api.services.webhooks import (
    CreateWebhookEndpoint,
    DeletedWebhookEndpoint,
    RollSecret,
    WebhookEndpointList,
    WebhookEndpointView,
    WebhookEndpointWithSecret,
    WebhookService,
)
from core.errors import InvalidRequest, NotFound
from tessera.runtime.http import error_responses, strict_body
from tessera.runtime.openapi import REQUEST_BODY

_EVENT_ID = re.compile(r"evt_[0-9a-z]{26}")
EventCursor = Annotated[str | None, Parameter(pattern=r"^evt_[0-9a-z]{26}$")]
ObjectId = Annotated[
    str | None,
    Parameter(
        query="object",
        pattern=r"^[a-z]{1,8}_[0-9a-z]{26}$",
        description="Only the events of this object (a payment, refund or endpoint id).",
    ),
]


def event_id(value: str) -> str:
    if not _EVENT_ID.fullmatch(value):
        raise NotFound("No such event.", param="id")
    return value


class EventController(Controller):
    path = "/v1/events"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["events"]

    @get(operation_id="listEvents", responses=error_responses(400, 401))
    async def index(
        self,
        request: Request[Any, Any, Any],
        events: EventService,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 10,
        starting_after: EventCursor = None,
        ending_before: EventCursor = None,
        event_type: Annotated[
            str | None,
            Parameter(query="type", max_length=64, schema_extra={"enum": list(EVENT_TYPES)}),
        ] = None,
        object_id: ObjectId = None,
    ) -> EventList:
        if starting_after and ending_before:
            raise InvalidRequest(
                "Use starting_after or ending_before, not both.", param="ending_before"
            )
        return await events.page(
            merchant_of(request), limit, starting_after, ending_before, event_type, object_id
        )

    @get("/{event:str}", operation_id="getEvent", responses=error_responses(401, 404))
    async def read(
        self, request: Request[Any, Any, Any], event: str, events: EventService
    ) -> EventView:
        return await events.get(merchant_of(request), event_id(event))

    @get(
        "/{event:str}/deliveries",
        operation_id="listEventDeliveries",
        responses=error_responses(401, 404),
    )
    async def deliveries(
        self, request: Request[Any, Any, Any], event: str, events: EventService
    ) -> DeliveryList:
        return await events.deliveries(merchant_of(request), event_id(event))


class WebhookEndpointController(Controller):
    path = "/v1/webhook_endpoints"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["webhooks"]

    @post(
        operation_id="createWebhookEndpoint",
        status_code=201,
        responses={
            201: ResponseSpec(
                WebhookEndpointWithSecret, description="Created; the only time the secret is shown"
            ),
            **error_responses(400, 401, 413, 422),
        },
        opt={REQUEST_BODY: CreateWebhookEndpoint},
    )
    async def create(
        self, request: Request[Any, Any, Any], webhooks: WebhookService
    ) -> WebhookEndpointWithSecret:
        body = strict_body(await request.body(), CreateWebhookEndpoint)
        return await webhooks.create(merchant_of(request), body)

    @get(operation_id="listWebhookEndpoints", responses=error_responses(401))
    async def index(
        self, request: Request[Any, Any, Any], webhooks: WebhookService
    ) -> WebhookEndpointList:
        return await webhooks.list(merchant_of(request))

    @get("/{endpoint:str}", operation_id="getWebhookEndpoint", responses=error_responses(401, 404))
    async def read(
        self, request: Request[Any, Any, Any], endpoint: str, webhooks: WebhookService
    ) -> WebhookEndpointView:
        return await webhooks.get(merchant_of(request), endpoint)

    @delete(
        "/{endpoint:str}",
        operation_id="deleteWebhookEndpoint",
        status_code=200,
        responses=error_responses(401, 404),
    )
    async def remove(
        self, request: Request[Any, Any, Any], endpoint: str, webhooks: WebhookService
    ) -> DeletedWebhookEndpoint:
        return await webhooks.delete(merchant_of(request), endpoint)

    @post(
        "/{endpoint:str}/roll_secret",
        operation_id="rollWebhookSecret",
        status_code=200,
        responses={
            200: ResponseSpec(WebhookEndpointWithSecret, description="The new secret, shown once"),
            **error_responses(400, 401, 404, 413, 422),
        },
        opt={REQUEST_BODY: RollSecret | None},
    )
    async def roll(
        self, request: Request[Any, Any, Any], endpoint: str, webhooks: WebhookService
    ) -> WebhookEndpointWithSecret:
        raw = await request.body()
        body = strict_body(raw, RollSecret) if raw.strip() else RollSecret()
        return await webhooks.roll(merchant_of(request), endpoint, body)


class BalanceController(Controller):
    path = "/v1/balance"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["balance"]

    @get(operation_id="getBalance", responses=error_responses(401))
    async def read(self, request: Request[Any, Any, Any], ledger: LedgerService) -> BalanceView:
        return await ledger.balance(merchant_of(request))
