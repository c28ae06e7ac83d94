"""SQL for merchants' routing configuration (cached briefly: it changes rarely)."""

from __future__ import annotations

from typing import Any

import msgspec
from cachetools import TTLCache

from api.services.routing import RoutingConfig


class RoutingRepository:
    def __init__(self, pool: Any, ttl_seconds: float = 5.0) -> None:
        self.pool = pool
        self._cache: TTLCache[str, RoutingConfig] = TTLCache(maxsize=10_000, ttl=ttl_seconds)

    async def config(self, merchant_id: str, conn: Any = None) -> RoutingConfig:
        """`conn`: the caller's connection, when it holds one (inside a transaction). Taking a
        second connection from the pool there deadlocks once every connection is so held."""
        cached = self._cache.get(merchant_id)
        if cached is not None:
            return cached
        raw = await (conn or self.pool).fetchval(
            "SELECT config::text FROM merchant_routing WHERE merchant_id = $1", merchant_id
        )
        config = msgspec.json.decode(raw, type=RoutingConfig) if raw else RoutingConfig()
        self._cache[merchant_id] = config
        return config

    async def save(self, merchant_id: str, config: RoutingConfig) -> None:
        await self.pool.execute(
            "INSERT INTO merchant_routing (merchant_id, config) VALUES ($1, $2::jsonb) "
            "ON CONFLICT (merchant_id) DO UPDATE SET config = excluded.config, updated_at = now()",
            merchant_id,
            msgspec.json.encode(config).decode(),
        )
        self._cache.pop(merchant_id, None)
