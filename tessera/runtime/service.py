"""The parts of an app factory both services share: pools, Redis, health, errors, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, ControllerRouterHandler, Guard

from tessera.runtime.db import check_schema, create_pool
from tessera.runtime.http import (
    EXCEPTION_HANDLERS,
    Metrics,
    ReadinessCheck,
    health_handlers,
    install,
)
from tessera.runtime.migrations import latest_version
from tessera.runtime.openapi import ServiceDocument
from tessera.runtime.openapi import finish as finish_document
from tessera.runtime.redis_client import RedisClient
from tessera.runtime.redis_client import connect as connect_redis


class Resources:
    """Connections opened at start-up and closed after the last in-flight request."""

    pool: Any
    redis: RedisClient


def build_app(
    *,
    service: str,
    title: str,
    settings: Any,
    migrations_package: str,
    route_handlers: Sequence[ControllerRouterHandler],
    dependencies: dict[str, Provide],
    max_body_bytes: int,
    service_lifespan: Callable[[Litestar], AbstractAsyncContextManager[None]] | None = None,
    wrap_handler: Callable[[ASGIApp], ASGIApp] | None = None,
    document: ServiceDocument | None = None,
    guards: Sequence[Guard] = (),
    readiness_checks: dict[str, ReadinessCheck] | None = None,
    optional_dependencies: frozenset[str] = frozenset(),
) -> Litestar:
    """`service_lifespan` opens what only this service needs (clients, key rings), after the
    pool and Redis are up (they are on `app.state`), and closes it before them. `document` is
    what the service adds to its OpenAPI document (security schemes, links).
    `readiness_checks`: what `/readyz` checks beyond the database and Redis (the API's read
    replica, when one is configured); `optional_dependencies`: the checks whose failure leaves
    the service ready but `degraded`."""
    resources = Resources()
    schema_version = latest_version(migrations_package)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        resources.pool = await create_pool(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            wait_seconds=settings.db_timeout_seconds,
        )
        resources.redis = connect_redis(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        app.state.pool = resources.pool
        app.state.redis = resources.redis
        try:
            if service_lifespan is None:
                yield
            else:
                async with service_lifespan(app):
                    yield
        finally:
            await resources.pool.close()
            await resources.redis.aclose()

    async def database_ready() -> None:
        await check_schema(resources.pool, schema_version)

    async def redis_ready() -> None:
        await resources.redis.ping()

    metrics = Metrics(service)
    app = Litestar(
        route_handlers=[
            *health_handlers(
                {"database": database_ready, "redis": redis_ready, **(readiness_checks or {})},
                metrics,
                optional_dependencies,
            ),
            *route_handlers,
        ],
        dependencies=dependencies,
        guards=list(guards),
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(title=title, version="1", path="/schema"),
        debug=False,
        logging_config=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    finish_document(app, document or ServiceDocument())
    if wrap_handler is not None:  # inside the request-id layer, before routing
        app.asgi_handler = wrap_handler(app.asgi_handler)
    return install(app, metrics)
