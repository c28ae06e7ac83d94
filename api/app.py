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
from api.routes.payment_methods import PaymentMethodController
from api.routes.payments import PaymentController, RefundController
from api.settings import MAX_BODY_BYTES, ApiSettings
from api.wiring import open_services
from tessera.runtime.commands import app_in_worker
from tessera.runtime.db import check_schema, create_pool
from tessera.runtime.http import NotReady
from tessera.runtime.migrations import latest_version
from tessera.runtime.service import build_app

#: Handler parameters the services are injected as; each is the `Services` field of that name.
SERVICES = (
    "payments",
    "operations",
    "recovery",
    "notifications",
    "events",
    "webhooks",
    "ledger",
)


def _service(name: str) -> Provide:
    def dependency(state: State) -> Any:
        return getattr(state.services, name)

    return Provide(dependency, sync_to_thread=False)


class ReadReplica:
    """The read replica's pool (`TESSERA_API_READ_DATABASE_URL`), opened lazily with the
    primary's upper bound and time-outs, and its readiness: reachable and migrated (optional:
    `degraded` when not)."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.schema_version = latest_version("api.migrations")

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Any]:
        """The pool, or None (and nothing opened) when no replica is configured."""
        if not self.settings.read_database_url:
            yield None
            return
        # No connection at start-up (min_size 0): a replica that is down must not keep the API
        # from starting, since only the lists need it.
        self.pool = await create_pool(
            self.settings.read_database_url,
            min_size=0,
            max_size=self.settings.db_pool_max,
            wait_seconds=self.settings.db_timeout_seconds,
        )
        try:
            yield self.pool
        finally:
            pool, self.pool = self.pool, None
            await pool.close()

    async def ready(self) -> None:
        if self.pool is None:
            raise NotReady("read replica not open")
        await check_schema(self.pool, self.schema_version)


def create_app(settings: ApiSettings) -> Litestar:
    replica = ReadReplica(settings)

    @asynccontextmanager
    async def api_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.merchant_keys = MerchantKeys(app.state.pool)
        async with (
            replica.opened() as read_pool,
            open_services(settings, app.state.pool, app.state.redis, read_pool) as services,
        ):
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
            PaymentMethodController,
            NotificationController,
            EventController,
            WebhookEndpointController,
            BalanceController,
        ],
        dependencies={name: _service(name) for name in SERVICES},
        max_body_bytes=MAX_BODY_BYTES,
        service_lifespan=api_lifespan,
        document=DOCUMENT,
        readiness_checks={"read_database": replica.ready} if settings.read_database_url else None,
        # Payments go on without the cache (Postgres decides idempotency) and without the read
        # replica (only lists use it): neither may take the API out of a load balancer.
        optional_dependencies=frozenset({"redis", "read_database"}),
    )


def app_from_environment() -> Litestar:
    """One worker process's app when `TESSERA_API_WORKERS` > 1 (uvicorn's factory)."""
    app: Litestar = app_in_worker(ApiSettings, create_app, "api")
    return app
