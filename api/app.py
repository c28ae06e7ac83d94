"""The payment API's app factory: the one place its clients, services and handlers are wired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from api.auth import MerchantKeys
from api.routes.events import BalanceController, EventController, WebhookEndpointController
from api.routes.notifications import NotificationController
from api.routes.payments import PaymentController, RefundController
from api.services.events import EventService
from api.services.ledger import LedgerService
from api.services.notifications import NotificationService
from api.services.operations import OperationService
from api.services.payments import PaymentService
from api.services.webhooks import WebhookService
from api.settings import MAX_BODY_BYTES, ApiSettings
from api.wiring import open_services
from tessera.runtime.service import build_app


def _payments(state: State) -> PaymentService:
    service: PaymentService = state.services.payments
    return service


def _operations(state: State) -> OperationService:
    service: OperationService = state.services.operations
    return service


def _notifications(state: State) -> NotificationService:
    service: NotificationService = state.services.notifications
    return service


def _events(state: State) -> EventService:
    service: EventService = state.services.events
    return service


def _webhooks(state: State) -> WebhookService:
    service: WebhookService = state.services.webhooks
    return service


def _ledger(state: State) -> LedgerService:
    service: LedgerService = state.services.ledger
    return service


def create_app(settings: ApiSettings) -> Litestar:
    @asynccontextmanager
    async def api_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.merchant_keys = MerchantKeys(app.state.pool)
        async with open_services(settings, app.state.pool, app.state.redis) as services:
            app.state.services = services
            yield

    return build_app(
        service="api",
        title="Tessera payment API",
        settings=settings,
        migrations_package="api.migrations",
        route_handlers=[
            PaymentController,
            RefundController,
            NotificationController,
            EventController,
            WebhookEndpointController,
            BalanceController,
        ],
        dependencies={
            "payments": Provide(_payments, sync_to_thread=False),
            "operations": Provide(_operations, sync_to_thread=False),
            "notifications": Provide(_notifications, sync_to_thread=False),
            "events": Provide(_events, sync_to_thread=False),
            "webhooks": Provide(_webhooks, sync_to_thread=False),
            "ledger": Provide(_ledger, sync_to_thread=False),
        },
        max_body_bytes=MAX_BODY_BYTES,
        service_lifespan=api_lifespan,
    )
