"""Who may call what: every credential is compared in constant time on every request."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from core.errors import AuthenticationFailed, PermissionDenied
from vault.settings import VaultSettings

ADMIN = "admin"
SERVICE = "service"


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Send a credential as `Authorization: Bearer ...`.")
    return token.strip()


def require(role: str) -> Any:
    """A Litestar guard admitting only the named caller."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        settings: VaultSettings = connection.app.state.settings
        token = _bearer(connection).encode()
        is_admin = hmac.compare_digest(token, settings.admin_token.encode())
        is_service = hmac.compare_digest(token, settings.service_token.encode())
        if not (is_admin or is_service):
            raise AuthenticationFailed("The credential is not valid.")
        if (role == ADMIN and not is_admin) or (role == SERVICE and not is_service):
            raise PermissionDenied("This credential may not call this endpoint.")

    return guard
