"""The merchant registry: id, publishable-key hash, allowed origins. Written by admins only."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from litestar import Controller, post

from core.errors import InvalidRequest, StateConflict
from vault.auth import ADMIN, require


class RegisterMerchant(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^mer_[0-9A-Za-z]{16,40}$")]
    publishable_key: Annotated[str, msgspec.Meta(pattern=r"^pk_[0-9A-Za-z_]{24,100}$")]
    allowed_origins: Annotated[list[str], msgspec.Meta(max_length=20)] = []


class MerchantView(msgspec.Struct):
    id: str
    allowed_origins: list[str]
    created: int
    object: str = "merchant"


def normalize_origin(origin: str) -> str:
    """An origin is scheme://host[:port], nothing more; compared exactly, lower-cased."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidRequest(
            "Each origin must look like https://shop.example[:port].",
            code="invalid_origin",
            param="allowed_origins",
        )
    if parts.query or parts.fragment or parts.username:
        raise InvalidRequest(
            "An origin has no path, query or credentials.",
            code="invalid_origin",
            param="allowed_origins",
        )
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname.lower()}{port}"


def key_hash(key: str) -> bytes:
    # Publishable keys are 128+ random bits: a fast hash is enough and never reveals the key.
    return hashlib.sha256(key.encode()).digest()


class MerchantRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def insert(self, merchant_id: str, pk_hash: bytes, origins: list[str]) -> datetime:
        try:
            created: datetime = await self.pool.fetchval(
                "INSERT INTO merchants (id, publishable_key_sha256, allowed_origins) "
                "VALUES ($1, $2, $3) RETURNING created_at",
                merchant_id,
                pk_hash,
                origins,
            )
        except asyncpg.UniqueViolationError:
            raise StateConflict(
                "A merchant with this id or publishable key is already registered.",
                code="merchant_exists",
                param="id",
            ) from None
        return created


class MerchantController(Controller):
    path = "/v1/merchants"
    guards = [require(ADMIN)]

    @post(operation_id="registerMerchant", status_code=201)
    async def register(self, data: RegisterMerchant, merchants: MerchantRepository) -> MerchantView:
        origins = sorted({normalize_origin(o) for o in data.allowed_origins})
        created = await merchants.insert(data.id, key_hash(data.publishable_key), origins)
        return MerchantView(id=data.id, allowed_origins=origins, created=int(created.timestamp()))
