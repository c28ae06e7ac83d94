"""The merchant registry: id, publishable-key hash, allowed origins. Written by admins only."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from cachetools import TTLCache

from core.errors import InvalidRequest, StateConflict
from vault.settings import RETENTION_DAYS_MAX, RETENTION_DAYS_MIN


class RegisterMerchant(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^mer_[0-9A-Za-z]{16,40}$")]
    publishable_key: Annotated[str, msgspec.Meta(pattern=r"^pk_[0-9A-Za-z_]{24,100}$")]
    allowed_origins: Annotated[list[str], msgspec.Meta(max_length=20)] = []
    #: How long this merchant's cards are kept unused before the vault shreds them (PCI DSS
    #: 3.2.1); omitted: the vault's default (TESSERA_VAULT_CARD_RETENTION_DAYS).
    card_retention_days: (
        Annotated[int, msgspec.Meta(ge=RETENTION_DAYS_MIN, le=RETENTION_DAYS_MAX)] | None
    ) = None


class MerchantView(msgspec.Struct):
    id: str
    allowed_origins: list[str]
    created: int
    card_retention_days: int | None = None
    object: str = "merchant"


def normalize_origin(origin: str) -> str:
    """An origin is scheme://host[:port], nothing more; compared exactly, lower-cased."""
    malformed = InvalidRequest(
        "Each origin must look like https://shop.example[:port].",
        code="invalid_origin",
        param="allowed_origins",
    )
    try:
        # urlsplit raises ValueError for a bracketed host it cannot read, `.port` for a port
        # that is not a number from 0 to 65535.
        parts = urlsplit(origin.strip())
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise malformed from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or not parts.hostname.isprintable()
    ):
        raise malformed
    if parts.query or parts.fragment or parts.username:
        raise InvalidRequest(
            "An origin has no path, query or credentials.",
            code="invalid_origin",
            param="allowed_origins",
        )
    return f"{parts.scheme}://{parts.hostname.lower()}{port}"


def key_hash(key: str) -> bytes:
    # Publishable keys are 128+ random bits: a fast hash is enough and never reveals the key.
    return hashlib.sha256(key.encode()).digest()


class MerchantRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def insert(
        self,
        merchant_id: str,
        pk_hash: bytes,
        origins: list[str],
        card_retention_days: int | None = None,
    ) -> datetime:
        try:
            created: datetime = await self.pool.fetchval(
                "INSERT INTO merchants (id, publishable_key_sha256, allowed_origins, "
                "card_retention_days) VALUES ($1, $2, $3, $4) RETURNING created_at",
                merchant_id,
                pk_hash,
                origins,
                card_retention_days,
            )
        except asyncpg.UniqueViolationError:
            raise StateConflict(
                "A merchant with this id or publishable key is already registered.",
                code="merchant_exists",
                param="id",
            ) from None
        return created


class KnownMerchant(msgspec.Struct, frozen=True):
    id: str
    allowed_origins: tuple[str, ...]


class MerchantDirectory:
    """Publishable key → merchant, and the set of registered origins, cached briefly.

    Tokenization is the hottest public endpoint; a lookup per request would cost a round trip.
    A new merchant or origin is seen within `ttl` seconds on every vault process.
    """

    def __init__(self, pool: Any, ttl: float = 30.0) -> None:
        self.pool = pool
        self._by_key: TTLCache[bytes, KnownMerchant | None] = TTLCache(maxsize=100_000, ttl=ttl)
        self._origins: TTLCache[str, frozenset[str]] = TTLCache(maxsize=1, ttl=ttl)

    async def by_publishable_key(self, key: str) -> KnownMerchant | None:
        digest = key_hash(key)
        if digest in self._by_key:
            return self._by_key[digest]
        row = await self.pool.fetchrow(
            "SELECT id, allowed_origins FROM merchants WHERE publishable_key_sha256 = $1", digest
        )
        merchant = KnownMerchant(row["id"], tuple(row["allowed_origins"])) if row else None
        self._by_key[digest] = merchant
        return merchant

    async def registered_origins(self) -> frozenset[str]:
        origins = self._origins.get("all")
        if origins is None:
            rows = await self.pool.fetch(
                "SELECT DISTINCT unnest(allowed_origins) AS origin FROM merchants"
            )
            origins = frozenset(row["origin"] for row in rows)
            self._origins["all"] = origins
        return origins

    def forget(self) -> None:
        self._by_key.clear()
        self._origins.clear()
