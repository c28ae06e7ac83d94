"""Merchants authenticate with their secret key; everything they touch is theirs alone."""

from __future__ import annotations

from typing import Any

from cachetools import TTLCache
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.storage.merchants import key_hash
from core.errors import AuthenticationFailed

#: A rolled key stops working on every API process within this many seconds.
KEY_CACHE_SECONDS = 5.0


class MerchantKeys:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._cache: TTLCache[bytes, str | None] = TTLCache(maxsize=100_000, ttl=KEY_CACHE_SECONDS)

    async def merchant_for(self, secret_key: str) -> str | None:
        digest = key_hash(secret_key)
        if digest in self._cache:
            return self._cache[digest]
        merchant_id: str | None = await self.pool.fetchval(
            "SELECT merchant_id FROM merchant_api_keys "
            "WHERE key_sha256 = $1 AND kind = 'secret' AND revoked_at IS NULL",
            digest,
        )
        self._cache[digest] = merchant_id
        return merchant_id


async def require_secret_key(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    header = connection.headers.get("authorization", "")
    scheme, _sep, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key.startswith("sk_"):
        raise AuthenticationFailed("Send your secret key as `Authorization: Bearer sk_...`.")
    merchant_id = await connection.app.state.merchant_keys.merchant_for(key)
    if merchant_id is None:
        raise AuthenticationFailed("The secret key is not valid.")
    connection.scope["state"]["merchant_id"] = merchant_id


def merchant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    merchant_id: str = connection.scope["state"]["merchant_id"]
    return merchant_id
