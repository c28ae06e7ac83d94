"""The payment API's app factory: the one place its clients, services and handlers are wired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from api.auth import MerchantKeys
from api.openapi import DOCUMENT
from api.routes.events import BalanceController, EventController, WebhookEndpointController
from api.routes.notifications import NotificationController
from api.routes.payments import PaymentController, RefundController
from api.settings import MAX_BODY_BYTES, ApiSettings
from api.wiring import open_services
from tessera.runtime.commands import app_in_worker
from tessera.runtime.service import build_app

#: Handler parameters the services are injected as; each is the `Services` field of that name.
SERVICES = ("payments", "operations", "notifications", "events", "webhooks", "ledger")


def _service(name: str) -> Provide:
    def dependency(state: State) -> Any:
        return getattr(state.services, name)

    return Provide(dependency, sync_to_thread=False)


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
        dependencies={name: _service(name) for name in SERVICES},
        max_body_bytes=MAX_BODY_BYTES,
        service_lifespan=api_lifespan,
        document=DOCUMENT,
    )


def app_from_environment() -> Litestar:
    """One worker process's app when `TESSERA_API_WORKERS` > 1 (uvicorn's factory)."""
    app: Litestar = app_in_worker(ApiSettings, create_app, "api")
    return app
