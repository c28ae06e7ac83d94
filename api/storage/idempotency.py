"""SQL and Redis for idempotency keys. Postgres is the truth; Redis answers replays fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from api.storage.redis_gate import RedisGate
from tessera.runtime.redis_client import REDIS_ERRORS, RedisClient

log = structlog.stdlib.get_logger("tessera.idempotency")


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes


@dataclass(frozen=True)
class KeyRow:
    request_method: str
    request_path: str
    request_hash: bytes
    recovery_point: str
    lease_active: bool
    payment_id: str | None
    response: StoredResponse | None


class IdempotencyRepository:
    def __init__(self, retention_seconds: int, lease_seconds: int) -> None:
        self.retention_seconds = retention_seconds
        self.lease_seconds = lease_seconds

    async def insert(
        self, conn: Any, merchant_id: str, key: str, method: str, path: str, request_hash: bytes
    ) -> Any:
        """Claim a new key (with a lease); returns the lease (its `locked_until`, the holder's
        fencing token, see `holds`), or None if the key exists (and is not expired)."""
        await conn.execute(
            "DELETE FROM idempotency_keys WHERE merchant_id = $1 AND key = $2 "
            "AND expires_at < now()",
            merchant_id,
            key,
        )
        inserted = await conn.fetchval(
            "INSERT INTO idempotency_keys (merchant_id, key, request_method, request_path, "
            "request_hash, recovery_point, locked_until, expires_at) "
            "VALUES ($1, $2, $3, $4, $5, 'started', now() + make_interval(secs => $6), "
            "now() + make_interval(secs => $7)) "
            "ON CONFLICT (merchant_id, key) DO NOTHING RETURNING locked_until",
            merchant_id,
            key,
            method,
            path,
            request_hash,
            float(self.lease_seconds),
            float(self.retention_seconds),
        )
        return inserted

    async def lock(self, conn: Any, merchant_id: str, key: str) -> KeyRow:
        """The existing key, locked for this transaction."""
        row = await conn.fetchrow(
            "SELECT request_method, request_path, request_hash, recovery_point, payment_id, "
            "response_status, response_body, coalesce(locked_until > now(), false) AS leased "
            "FROM idempotency_keys WHERE merchant_id = $1 AND key = $2 FOR UPDATE",
            merchant_id,
            key,
        )
        response = (
            StoredResponse(row["response_status"], bytes(row["response_body"]))
            if row["response_status"] is not None
            else None
        )
        return KeyRow(
            row["request_method"],
            row["request_path"],
            bytes(row["request_hash"]),
            row["recovery_point"],
            row["leased"],
            row["payment_id"],
            response,
        )

    async def lock_free(self, conn: Any, merchant_id: str, key: str) -> KeyRow | None:
        """The key without a row lock (the caller holds its lease), or None if it is gone."""
        exists = await conn.fetchval(
            "SELECT 1 FROM idempotency_keys WHERE merchant_id = $1 AND key = $2", merchant_id, key
        )
        if not exists:
            return None
        async with conn.transaction():
            return await self.lock(conn, merchant_id, key)

    async def renew_lease(self, conn: Any, merchant_id: str, key: str) -> Any:
        """Take the key over (its lease ran out); returns the new lease (the fencing token)."""
        return await conn.fetchval(
            "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3) "
            "WHERE merchant_id = $1 AND key = $2 RETURNING locked_until",
            merchant_id,
            key,
            float(self.lease_seconds),
        )

    async def holds(self, conn: Any, merchant_id: str, key: str, lease: Any) -> bool:
        """Whether `lease` is still the key's, locking the key's row for the caller's
        transaction. Every taker of a key (the first request, a retry after the lease ran out,
        the worker's completer) gets its own `locked_until`; a holder that was paused past its
        lease finds another's there and must write nothing (fencing)."""
        held = await conn.fetchval(
            "SELECT locked_until = $3 FROM idempotency_keys "
            "WHERE merchant_id = $1 AND key = $2 FOR UPDATE",
            merchant_id,
            key,
            lease,
        )
        return bool(held)

    async def set_recovery_point(
        self, conn: Any, merchant_id: str, key: str, point: str, payment_id: str
    ) -> None:
        await conn.execute(
            "UPDATE idempotency_keys SET recovery_point = $3, payment_id = $4 "
            "WHERE merchant_id = $1 AND key = $2",
            merchant_id,
            key,
            point,
            payment_id,
        )

    async def finish(self, conn: Any, merchant_id: str, key: str, response: StoredResponse) -> None:
        await conn.execute(
            "UPDATE idempotency_keys SET recovery_point = 'finished', locked_until = NULL, "
            "response_status = $3, response_body = $4 WHERE merchant_id = $1 AND key = $2",
            merchant_id,
            key,
            response.status,
            response.body,
        )


class ReplayCache:
    """Finished responses in Redis, so replays never touch Postgres. Losing it loses nothing."""

    def __init__(
        self, redis: RedisClient, retention_seconds: int, gate: RedisGate | None = None
    ) -> None:
        self.redis = redis
        self.retention_seconds = retention_seconds
        self.gate = gate or RedisGate()

    @staticmethod
    def _key(merchant_id: str, key: str) -> str:
        return f"api:idem:{{{merchant_id}}}:{key}"

    async def get(self, merchant_id: str, key: str) -> tuple[bytes, StoredResponse] | None:
        if not self.gate.open:
            return None
        try:
            value = await self.redis.get(self._key(merchant_id, key))
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)
            log.warning("replay_cache_unavailable", error=type(exc).__name__)
            return None
        if not isinstance(value, bytes):
            return None
        request_hash, status, body = msgspec.msgpack.decode(value, type=tuple[bytes, int, bytes])
        return request_hash, StoredResponse(status, body)

    async def put(
        self, merchant_id: str, key: str, request_hash: bytes, response: StoredResponse
    ) -> None:
        if not self.gate.open:
            return
        value = msgspec.msgpack.encode((request_hash, response.status, response.body))
        try:
            await self.redis.set(self._key(merchant_id, key), value, ex=self.retention_seconds)
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)
            log.warning("replay_cache_unavailable", error=type(exc).__name__)


class OperationKeys:
    """The extra columns an operation (capture, cancel, refund) keeps on its key."""

    @staticmethod
    async def start(
        conn: Any,
        merchant_id: str,
        key: str,
        *,
        payment_id: str,
        operation: str,
        amount: int,
        refund_id: str | None,
    ) -> None:
        await conn.execute(
            "UPDATE idempotency_keys SET recovery_point = 'operation_started', payment_id = $3, "
            "operation = $4, operation_amount = $5, refund_id = $6 "
            "WHERE merchant_id = $1 AND key = $2",
            merchant_id,
            key,
            payment_id,
            operation,
            amount,
            refund_id,
        )

    @staticmethod
    async def load(conn: Any, merchant_id: str, key: str) -> Any:
        return await conn.fetchrow(
            "SELECT payment_id, operation, operation_amount, refund_id FROM idempotency_keys "
            "WHERE merchant_id = $1 AND key = $2",
            merchant_id,
            key,
        )

    @staticmethod
    async def release(conn: Any, merchant_id: str, key: str) -> None:
        """The outcome is unknown: let the next retry with this key resume at once."""
        await conn.execute(
            "UPDATE idempotency_keys SET locked_until = now() WHERE merchant_id = $1 AND key = $2",
            merchant_id,
            key,
        )
