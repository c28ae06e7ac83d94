"""The payment API's app factory: the one place its plugins, pools and handlers are wired."""

from __future__ import annotations

from litestar import Litestar

from api.settings import MAX_BODY_BYTES, ApiSettings
from tessera.runtime.service import build_app


def create_app(settings: ApiSettings) -> Litestar:
    return build_app(
        service="api",
        title="Tessera payment API",
        settings=settings,
        migrations_package="api.migrations",
        route_handlers=[],
        dependencies={},
        max_body_bytes=MAX_BODY_BYTES,
    )
