"""SQL for merchants and their keys."""

from __future__ import annotations

import hashlib
from typing import Any


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class MerchantRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def create(self, merchant_id: str, name: str, secret_key: str) -> None:
        async with self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO merchants (id, name) VALUES ($1, $2)", merchant_id, name
            )
            await self._insert_key(merchant_id, secret_key)

    async def roll_secret_key(self, merchant_id: str, new_key: str) -> bool:
        """Revoke every active secret key of the merchant and add `new_key`, atomically."""
        async with self.conn.transaction():
            exists = await self.conn.fetchval("SELECT 1 FROM merchants WHERE id = $1", merchant_id)
            if not exists:
                return False
            # Concurrent rolls queue on the active keys; the last one leaves one active key.
            await self.conn.execute(
                "SELECT 1 FROM merchant_api_keys WHERE merchant_id = $1 AND revoked_at IS NULL "
                "FOR UPDATE",
                merchant_id,
            )
            await self.conn.execute(
                "UPDATE merchant_api_keys SET revoked_at = now() "
                "WHERE merchant_id = $1 AND kind = 'secret' AND revoked_at IS NULL",
                merchant_id,
            )
            await self._insert_key(merchant_id, new_key)
        return True

    async def merchant_for_secret_key(self, secret_key: str) -> str | None:
        merchant_id: str | None = await self.conn.fetchval(
            "SELECT merchant_id FROM merchant_api_keys "
            "WHERE key_sha256 = $1 AND kind = 'secret' AND revoked_at IS NULL",
            key_hash(secret_key),
        )
        return merchant_id

    async def _insert_key(self, merchant_id: str, secret_key: str) -> None:
        await self.conn.execute(
            "INSERT INTO merchant_api_keys (merchant_id, key_sha256, kind, last4) "
            "VALUES ($1, $2, 'secret', $3)",
            merchant_id,
            key_hash(secret_key),
            secret_key[-4:],
        )
