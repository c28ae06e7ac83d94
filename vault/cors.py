"""CORS preflight for `/v1/tokens`, answered before routing.

Litestar answers OPTIONS for every route itself, without CORS headers, and its CORS support
takes a fixed list of origins; the vault's list is every origin some merchant registered, which
changes at run time. A preflight carries no credential, so it is answered for any registered
origin; the POST that follows checks the merchant's own list.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from core.errors import InvalidRequest
from vault.merchants import normalize_origin

TOKENS_PATH = "/v1/tokens"


class TokenPreflight:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != ScopeType.HTTP
            or scope.get("method") != "OPTIONS"
            or scope["path"].rstrip("/") != TOKENS_PATH
        ):
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        allowed = False
        if origin:
            try:
                normalized = normalize_origin(origin)
            except InvalidRequest:
                normalized = ""
            directory = scope["app"].state.merchant_directory
            allowed = bool(normalized) and normalized in await directory.registered_origins()
        headers: list[tuple[bytes, bytes]] = [(b"vary", b"Origin"), (b"content-length", b"0")]
        if allowed and origin:
            headers += [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-methods", b"POST"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600"),
            ]
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 204 if allowed else 403,
            "headers": headers,
        }
        await send(start)
        body: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": b"",
            "more_body": False,
        }
        await send(body)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            decoded: Any = value.decode("latin-1")
            return str(decoded)
    return None
