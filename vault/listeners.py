"""The vault's three listeners, told apart by the local port a request arrived on.

Browsers (through the ingress), the payment API and administrators each reach the vault on a
port of their own, so the network policy admits each caller to one listener, and a route asked
for on another listener's port answers 404 as if it did not exist. In development all three
share one port and this guard is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotFoundException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from vault.settings import Listener

PUBLIC: frozenset[Listener] = frozenset({"public"})
SERVICE: frozenset[Listener] = frozenset({"service"})
ADMIN: frozenset[Listener] = frozenset({"admin"})
#: Probes answer everywhere: the load balancer checks the public listener, the kubelet any.
PROBES: frozenset[Listener] = frozenset({"public", "service", "admin"})
#: Metrics and the OpenAPI document: for operators and the API, not for browsers.
OPERATORS: frozenset[Listener] = frozenset({"service", "admin"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def listeners_of(handler: BaseRouteHandler, path: str) -> frozenset[Listener]:
    """A route's listeners: its `opt["listeners"]`, else probes or operators' routes."""
    declared: frozenset[Listener] | None = handler.opt.get("listeners")
    if declared is not None:
        return declared
    return PROBES if path in PROBE_PATHS else OPERATORS


def listener_guard(listeners_by_port: Mapping[int, frozenset[Listener]]) -> Guard:
    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        server = connection.scope.get("server")
        port = server[1] if server else None
        served = listeners_by_port.get(port, frozenset()) if port else frozenset()
        if not served & listeners_of(handler, connection.scope["path"]):
            raise NotFoundException()

    return guard
