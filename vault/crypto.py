"""Envelope encryption: card records under data keys (DEKs), DEKs under the KMS key (KEK).

- `EnvelopeCipher` seals and opens one record with AES-256-GCM, a fresh 96-bit nonce and
  associated data that binds the ciphertext to where it belongs (token id, merchant, key id).
- `DataKeyRing` owns the DEKs: it makes a new one when the current one has encrypted its quota
  of records or grown old, and keeps unwrapped keys in memory only, in a cache bounded by size,
  age and number of uses, so the KMS is called once per cache miss, not once per request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.ids import new_id
from vault.kms.base import KeyManagementService, WrappedKey

NONCE_BYTES = 12
KEY_BYTES = 32


class DecryptionError(Exception):
    """The ciphertext, its nonce or its associated data is not what was sealed."""


@dataclass(frozen=True)
class Sealed:
    data_key_id: str
    nonce: bytes
    ciphertext: bytes


def card_aad(token_id: str, merchant_id: str, data_key_id: str) -> bytes:
    return f"tessera/card/v1|{token_id}|{merchant_id}|{data_key_id}".encode()


def cvc_aad(token_id: str, merchant_id: str, data_key_id: str) -> bytes:
    return f"tessera/cvc/v1|{token_id}|{merchant_id}|{data_key_id}".encode()


def dek_aad(data_key_id: str, purpose: str, merchant_id: str | None) -> bytes:
    """What the KMS binds a wrapped key to: a wrapped key copied to another row won't unwrap."""
    return f"tessera/dek/v1|{data_key_id}|{purpose}|{merchant_id or '-'}".encode()


class EnvelopeCipher:
    """AES-256-GCM with a random 96-bit nonce per record (each DEK is used far below 2^32)."""

    @staticmethod
    def seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)

    @staticmethod
    def open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("the record does not decrypt under its key and binding") from None


@dataclass(frozen=True)
class DataKeyPolicy:
    #: Records one DEK may encrypt: 2^24, far below the 2^32 random-nonce bound for GCM.
    max_records: int = 1 << 24
    #: How long one DEK may be used for new records (its cryptoperiod for encryption).
    max_age_seconds: float = 24 * 3600
    #: Unwrapped keys kept in memory, at most, and for how long / how many uses each.
    cache_size: int = 1024
    cache_ttl_seconds: float = 3600
    cache_max_uses: int = 1 << 20


@dataclass
class _CurrentKey:
    id: str
    key: bytes
    created: float
    records: int = 0


@dataclass
class _Cached:
    key: bytes
    uses: int = 0


# Callbacks into storage, so this module holds no SQL: store(id, wrapped, purpose, merchant)
# and load(id) -> (wrapped, purpose, merchant).
StoreKey = Callable[[str, WrappedKey, str, str | None], Awaitable[None]]
LoadKey = Callable[[str], Awaitable[tuple[WrappedKey, str, str | None]]]


class DataKeyRing:
    def __init__(
        self,
        kms: KeyManagementService,
        store: StoreKey,
        load: LoadKey,
        policy: DataKeyPolicy | None = None,
    ) -> None:
        self.kms = kms
        self._store = store
        self._load = load
        self.policy = policy or DataKeyPolicy()
        self._current: _CurrentKey | None = None
        self._current_lock = asyncio.Lock()
        self._cache: TTLCache[str, _Cached] = TTLCache(
            maxsize=self.policy.cache_size, ttl=self.policy.cache_ttl_seconds
        )
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    async def encryption_key(self) -> tuple[str, bytes]:
        """The DEK new card records go under, making a new one when the current one is spent."""
        current = self._current
        if current is None or self._spent(current):
            async with self._current_lock:
                current = self._current
                if current is None or self._spent(current):
                    current = await self._new_card_key()
                    self._current = current
        current.records += 1
        return current.id, current.key

    def retire_current(self) -> None:
        """Forget the current DEK so the next record gets a new one (after a KEK rotation)."""
        self._current = None

    async def key(self, data_key_id: str) -> bytes:
        """An unwrapped DEK by id: from memory, or one KMS call shared by concurrent callers."""
        cached = self._cache.get(data_key_id)
        if cached is not None and cached.uses < self.policy.cache_max_uses:
            cached.uses += 1
            return cached.key
        pending = self._inflight.get(data_key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[data_key_id] = future
        try:
            wrapped, purpose, merchant_id = await self._load(data_key_id)
            key = await self.kms.unwrap(wrapped, aad=dek_aad(data_key_id, purpose, merchant_id))
            self._cache[data_key_id] = _Cached(key)
            future.set_result(key)
            return key
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waits
            raise
        finally:
            del self._inflight[data_key_id]

    async def new_key(self, purpose: str, merchant_id: str | None = None) -> tuple[str, bytes]:
        """Generate a key locally, wrap it at the KMS, store it wrapped; return it unwrapped."""
        data_key_id = new_id("dek")
        key = AESGCM.generate_key(bit_length=256)
        wrapped = await self.kms.wrap(key, aad=dek_aad(data_key_id, purpose, merchant_id))
        await self._store(data_key_id, wrapped, purpose, merchant_id)
        self._cache[data_key_id] = _Cached(key)
        return data_key_id, key

    def remember(self, data_key_id: str, key: bytes) -> None:
        self._cache[data_key_id] = _Cached(key)

    def _spent(self, current: _CurrentKey) -> bool:
        return (
            current.records >= self.policy.max_records
            or time.monotonic() - current.created >= self.policy.max_age_seconds
        )

    async def _new_card_key(self) -> _CurrentKey:
        data_key_id, key = await self.new_key("card")
        return _CurrentKey(data_key_id, key, time.monotonic())
