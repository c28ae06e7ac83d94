"""The vault's keys below the KEK: SQL for `data_keys`, per-merchant fingerprint keys, the
audit key, KEK rotation and rewrap."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.ids import new_id
from vault.crypto import DataKeyPolicy, DataKeyRing, dek_aad
from vault.kms.base import KeyManagementService, WrappedKey

_INSERT_FINGERPRINT_KEY = (
    "INSERT INTO data_keys (id, purpose, merchant_id, wrapped_key, kek_version) "
    "VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (merchant_id) WHERE purpose = 'fingerprint' DO NOTHING RETURNING id"
)
_INSERT_AUDIT_KEY = (
    "INSERT INTO data_keys (id, purpose, merchant_id, wrapped_key, kek_version) "
    "VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (purpose) WHERE purpose = 'audit' DO NOTHING RETURNING id"
)


class KeyRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def store(
        self, data_key_id: str, wrapped: WrappedKey, purpose: str, merchant_id: str | None
    ) -> None:
        await self.pool.execute(
            "INSERT INTO data_keys (id, purpose, merchant_id, wrapped_key, kek_version) "
            "VALUES ($1, $2, $3, $4, $5)",
            data_key_id,
            purpose,
            merchant_id,
            wrapped.ciphertext,
            wrapped.key_version,
        )

    async def store_unique(
        self, data_key_id: str, wrapped: WrappedKey, purpose: str, merchant_id: str | None
    ) -> str:
        """Insert a one-per-scope key, or keep the one a concurrent process stored first."""
        stored: str | None = await self.pool.fetchval(
            _INSERT_AUDIT_KEY if purpose == "audit" else _INSERT_FINGERPRINT_KEY,
            data_key_id,
            purpose,
            merchant_id,
            wrapped.ciphertext,
            wrapped.key_version,
        )
        return stored or await self.scoped_key_id(purpose, merchant_id) or data_key_id

    async def load(self, data_key_id: str) -> tuple[WrappedKey, str, str | None]:
        row = await self.pool.fetchrow(
            "SELECT wrapped_key, kek_version, purpose, merchant_id FROM data_keys WHERE id = $1",
            data_key_id,
        )
        if row is None:
            raise LookupError(f"no data key {data_key_id}")
        return (
            WrappedKey(row["wrapped_key"], row["kek_version"]),
            row["purpose"],
            row["merchant_id"],
        )

    async def scoped_key_id(self, purpose: str, merchant_id: str | None) -> str | None:
        key_id: str | None = await self.pool.fetchval(
            "SELECT id FROM data_keys WHERE purpose = $1 AND merchant_id IS NOT DISTINCT FROM $2",
            purpose,
            merchant_id,
        )
        return key_id

    async def not_wrapped_by(self, version: str, after_id: str, limit: int) -> list[Any]:
        rows: list[Any] = await self.pool.fetch(
            "SELECT id, purpose, merchant_id, wrapped_key, kek_version FROM data_keys "
            "WHERE kek_version <> $1 AND id > $2 ORDER BY id LIMIT $3",
            version,
            after_id,
            limit,
        )
        return rows

    async def rewrite_wrapping(self, data_key_id: str, old_version: str, new: WrappedKey) -> bool:
        """Only if nobody rewrapped it meanwhile (two rewraps may run at once)."""
        status: str = await self.pool.execute(
            "UPDATE data_keys SET wrapped_key = $3, kek_version = $4 "
            "WHERE id = $1 AND kek_version = $2",
            data_key_id,
            old_version,
            new.ciphertext,
            new.key_version,
        )
        return status == "UPDATE 1"

    async def count_by_version(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT kek_version, count(*) AS n FROM data_keys GROUP BY kek_version"
        )
        return {row["kek_version"]: row["n"] for row in rows}


class KeyService:
    """What the routes need from the key hierarchy, in one place."""

    def __init__(
        self,
        kms: KeyManagementService,
        repository: KeyRepository,
        policy: DataKeyPolicy | None = None,
    ) -> None:
        self.kms = kms
        self.repository = repository
        self.ring = DataKeyRing(kms, repository.store, repository.load, policy)
        self._scoped: dict[tuple[str, str | None], str] = {}
        self._scope_locks: dict[tuple[str, str | None], asyncio.Lock] = {}

    async def fingerprint(self, merchant_id: str, pan: str) -> bytes:
        """HMAC-SHA256 of the whole PAN under the merchant's own key: equal within a merchant,
        unrelated across merchants, and not brute-forceable without the key."""
        key = await self._scoped_key("fingerprint", merchant_id)
        return hmac.new(key, pan.encode(), hashlib.sha256).digest()

    async def audit_key(self) -> bytes:
        return await self._scoped_key("audit", None)

    async def _scoped_key(self, purpose: str, merchant_id: str | None) -> bytes:
        scope = (purpose, merchant_id)
        key_id = self._scoped.get(scope)
        if key_id is not None:
            return await self.ring.key(key_id)
        # The first requests for a new merchant arrive together: one of them makes the key.
        lock = self._scope_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            key_id = self._scoped.get(scope) or await self._load_or_make(purpose, merchant_id)
            self._scoped[scope] = key_id
        self._scope_locks.pop(scope, None)
        return await self.ring.key(key_id)

    async def _load_or_make(self, purpose: str, merchant_id: str | None) -> str:
        key_id = await self.repository.scoped_key_id(purpose, merchant_id)
        if key_id is None:
            new_key_id = new_id("dek")
            key = AESGCM.generate_key(bit_length=256)
            wrapped = await self.kms.wrap(key, aad=dek_aad(new_key_id, purpose, merchant_id))
            key_id = await self.repository.store_unique(new_key_id, wrapped, purpose, merchant_id)
            if key_id == new_key_id:
                self.ring.remember(key_id, key)
        return key_id

    async def rotate(self) -> dict[str, str]:
        """A new KEK version becomes primary; new DEKs are wrapped by it from now on."""
        version = await self.kms.rotate()
        self.ring.retire_current()
        return {"primary_version": version}

    async def rewrap(self, batch_size: int = 500) -> dict[str, int | str]:
        """Re-wrap every DEK not under the primary KEK version; card ciphertexts are untouched.

        Resumable: each key is rewritten on its own, so a run stopped half-way is continued by
        the next run, which finds only the keys still under an old version.
        """
        primary = await self.kms.primary_version()
        rewrapped = skipped = 0
        after = ""
        while True:
            rows = await self.repository.not_wrapped_by(primary, after, batch_size)
            if not rows:
                break
            for row in rows:
                aad = dek_aad(row["id"], row["purpose"], row["merchant_id"])
                key = await self.kms.unwrap(
                    WrappedKey(row["wrapped_key"], row["kek_version"]), aad=aad
                )
                new = await self.kms.wrap(key, aad=aad)
                if await self.repository.rewrite_wrapping(row["id"], row["kek_version"], new):
                    rewrapped += 1
                else:
                    skipped += 1
            after = rows[-1]["id"]
        return {"primary_version": primary, "rewrapped": rewrapped, "skipped": skipped}
