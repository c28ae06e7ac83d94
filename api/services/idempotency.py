"""Claiming an idempotency key: the first step of every POST, shared by all of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from api.storage.idempotency import IdempotencyRepository, KeyRow, ReplayCache, StoredResponse
from core.errors import IdempotencyError


class ClaimKind(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    RESUME = "resume"


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    row: KeyRow | None = None
    #: NEW and RESUME: this request's lease on the key, checked before each write (`fenced`).
    lease: Any = None

    @property
    def response(self) -> StoredResponse | None:
        return self.row.response if self.row else None


@dataclass(frozen=True)
class Handled:
    """What a handler answers: status and body bytes, and whether it is a replay."""

    status: int
    body: bytes
    replayed: bool = False


def request_hash(method: str, path: str, body: bytes) -> bytes:
    """Canonical: the same JSON with other spacing or key order is the same request."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
    except msgspec.DecodeError:
        canonical = body
    return hashlib.sha256(method.encode() + b"\0" + path.encode() + b"\0" + canonical).digest()


def reused() -> IdempotencyError:
    return IdempotencyError(
        "This idempotency key was used with a different request.",
        code="idempotency_key_reused",
    )


async def cached_replay(
    replays: ReplayCache, merchant_id: str, key: str, fingerprint: bytes
) -> Handled | None:
    """The fast path: a finished response from Redis, without touching Postgres."""
    cached = await replays.get(merchant_id, key)
    if cached is None:
        return None
    if cached[0] != fingerprint:
        raise reused()
    return Handled(cached[1].status, cached[1].body, replayed=True)


async def claim(
    keys: IdempotencyRepository,
    conn: Any,
    merchant_id: str,
    key: str,
    method: str,
    path: str,
    fingerprint: bytes,
) -> Claim:
    """Inside the caller's transaction: claim a new key, or find the finished response to
    replay, or take over a key whose request died (its lease ran out), or refuse (in use)."""
    lease = await keys.insert(conn, merchant_id, key, method, path, fingerprint)
    if lease is not None:
        return Claim(ClaimKind.NEW, lease=lease)
    row = await keys.lock(conn, merchant_id, key)
    if (row.request_method, row.request_path, row.request_hash) != (method, path, fingerprint):
        raise reused()
    if row.response is not None:
        return Claim(ClaimKind.REPLAY, row)
    if row.lease_active or row.recovery_point == "started":
        raise IdempotencyError(
            "A request with this key is still being processed; retry later.",
            code="idempotency_key_in_use",
        )
    lease = await keys.renew_lease(conn, merchant_id, key)
    return Claim(ClaimKind.RESUME, row, lease)


async def replayed(
    replays: ReplayCache, merchant_id: str, key: str, fingerprint: bytes, claimed: Claim
) -> Handled:
    """A `REPLAY` claim's answer: the finished request's response, cached for the next one."""
    assert claimed.response is not None
    await replays.put(merchant_id, key, fingerprint, claimed.response)
    return Handled(claimed.response.status, claimed.response.body, replayed=True)


async def fenced(keys: IdempotencyRepository, conn: Any, merchant_id: str, key: str) -> Handled:
    """The answer of a request that lost its key to another taker while it was paused (its
    lease ran out): what the other recorded, if it finished, else "in use". It writes nothing:
    the other taker decides, so a card is never charged or a capture booked twice."""
    row = await keys.lock(conn, merchant_id, key)
    if row.response is not None:
        return Handled(row.response.status, row.response.body, replayed=True)
    raise IdempotencyError(
        "A request with this key is still being processed; retry later.",
        code="idempotency_key_in_use",
    )
