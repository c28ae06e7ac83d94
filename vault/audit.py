"""The vault's audit log: append-only, hash-chained, fail-closed (PCI DSS v4.0 requirement 10).

Why it is built this way:

- **Fail closed.** Like HashiCorp Vault, the vault refuses to act when it cannot record the act:
  any failure to write raises `AuditUnavailable` (a `ServiceUnavailable`, so a 503), and the
  caller refuses the operation before any card data leaves the vault.
- **Append-only by grants.** The runtime role `tessera_vault` may SELECT and INSERT `audit_log`,
  never UPDATE, DELETE or TRUNCATE it (migration 0003).
- **Tamper-evident.** Each record's hash covers the previous record's hash, its chain id and its
  sequence number, so an edited, deleted, inserted or reordered record breaks a link that
  `verify` reports. The hash has no secret in it: someone who can rewrite the table (the owner
  role, a DBA) could recompute a consistent chain. `verify` therefore returns every chain's head
  (seq and hash); copying those outside the database from time to time (a log line, WORM
  storage) lets a later comparison catch even a full rewrite or a truncated tail.
- **Not a bottleneck.** There are 16 chains (rows of `audit_chain_heads`). An append claims a
  head nobody else holds (`FOR UPDATE SKIP LOCKED`, starting at a random chain), so concurrent
  appenders never wait on each other unless every chain is busy, and then wait for one. Claiming
  the head, inserting the record and advancing the head is one statement: one round trip.
- **No token ids, no card data.** Tokens are recorded as HMAC-SHA256 of their id under an audit
  key, so the log can be searched for a known token but reveals none. Detail values that
  `core.redaction` would mask are refused (a bug in the caller, not something to store).

Hash construction (version 1), byte for byte:

    hash = SHA-256(prev_hash || be32(chain_id) || be64(seq) || payload)

- `prev_hash`: the previous record's `hash` in the same chain; 32 zero bytes for seq 1.
- `be32`, `be64`: two's-complement big-endian integers (Postgres `int4send`, `int8send`).
- `payload`: compact JSON (no whitespace, UTF-8, object keys sorted by code point, strings with
  the minimal escaping of RFC 8259 as msgspec writes it) of the object
  `{"action", "actor", "detail", "occurred_at", "outcome", "request_id", "token_hmac", "v"}`, where
  `occurred_at` is an integer (microseconds since 1970-01-01T00:00:00Z), `token_hmac` is lower-case
  hex or null, `request_id` a string or null, `detail` an object of strings, integers and booleans
  (`{}` when there is none) and `v` is 1.

The payload is built in Python; Postgres prepends prev_hash, chain id and seq and hashes
(`sha256(...)`) in the same statement that claims the head, because only that statement knows
them. `verify` rebuilds the same bytes from the stored columns.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import random
import re
import struct
from collections.abc import AsyncIterator, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg
import msgspec

from core.errors import ServiceUnavailable
from core.redaction import redact

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

__all__ = [
    "AUDITED_ACTIONS",
    "CHAINS",
    "GENESIS_HASH",
    "AuditLog",
    "AuditUnavailable",
    "BrokenLink",
    "ChainSummary",
    "Problem",
    "VerifyReport",
    "chain_hash",
    "export",
    "payload_bytes",
    "verify",
]

#: Chains created by migration 0003; an append starts looking for a free one at a random chain.
CHAINS: Final = 16
GENESIS_HASH: Final = bytes(32)
#: Every action the vault records (vault/routes.py, card_updates.py, cli.py, retention.py,
#: fingerprints.py, key_inventory.py, watchdog.py), in the order a card's life meets them. The
#: assessor's kit (`tessera pci evidence`, control `audit-log`) shows the latest record of each;
#: tests/test_pci_checks_core.py keeps this list equal to what the code writes. Tokenization
#: itself is not recorded: the card arrives, nothing of it leaves.
AUDITED_ACTIONS: Final = (
    "merchant.register",
    "token.read",
    "forward",
    "token.update",
    "token.delete",
    "retention.sweep",
    "token.shred",
    "detokenize",
    "fingerprint.lookup",
    "keys.rotate",
    "keys.rewrap",
    "keys.inventory",
    "scripts.check",
    "audit.verify",
)
PAYLOAD_VERSION: Final = 1

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_PREFIX: Final = struct.Struct(">iq")
_INT64: Final = 1 << 63
_ACTOR: Final = re.compile(r"[\x21-\x7e]{1,200}")
_ACTION: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_OUTCOME: Final = re.compile(r"[a-z][a-z_]{0,31}")
_DETAIL_KEY: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_DETAIL_KEYS: Final = 16
_MAX_DETAIL_BYTES: Final = 2048
_MAX_REQUEST_ID: Final = 200
_MIN_KEY_BYTES: Final = 32
_encoder: Final = msgspec.json.Encoder(order="sorted")

# One statement: claim a head, insert the record chained to it, advance the head. Under READ
# COMMITTED, FOR UPDATE returns the newest committed version of the head it locks, and the final
# UPDATE re-reads that same row, so seq and prev_hash are always the head's latest. $1 is where
# the search for a free chain starts: chains >= $1 first, then the others.
_APPEND: Final = """
WITH head AS (
    SELECT chain_id, last_seq, last_hash
    FROM audit_chain_heads
    ORDER BY chain_id < $1, chain_id
    LIMIT 1
    FOR UPDATE {skip}
), rec AS (
    SELECT chain_id,
           last_seq + 1 AS seq,
           last_hash AS prev_hash,
           sha256(last_hash || int4send(chain_id) || int8send(last_seq + 1) || $2::bytea) AS hash
    FROM head
), ins AS (
    INSERT INTO audit_log (chain_id, seq, occurred_at, actor, action, token_hmac, outcome,
                           request_id, detail, prev_hash, hash)
    SELECT chain_id, seq, $3, $4, $5, $6, $7, $8, $9::jsonb, prev_hash, hash FROM rec
)
UPDATE audit_chain_heads AS h
SET last_seq = rec.seq, last_hash = rec.hash
FROM rec
WHERE h.chain_id = rec.chain_id
RETURNING h.chain_id
"""
# The fast path skips busy chains; when all are busy it finds none and the slow path waits.
_APPEND_FREE_CHAIN: Final = _APPEND.format(skip="SKIP LOCKED")
_APPEND_WAITING: Final = _APPEND.format(skip="")

_ALL_RECORDS: Final = (
    "SELECT chain_id, seq, occurred_at, actor, action, token_hmac, outcome, request_id, "
    "detail::text AS detail, prev_hash, hash FROM audit_log ORDER BY chain_id, seq"
)
_RECORDS_SINCE: Final = (
    "SELECT chain_id, seq, occurred_at, actor, action, token_hmac, outcome, request_id, "
    "detail::text AS detail, prev_hash, hash FROM audit_log "
    "WHERE $1::timestamptz IS NULL OR occurred_at >= $1 ORDER BY occurred_at, chain_id, seq"
)


class AuditUnavailable(ServiceUnavailable):
    """The audit record could not be written, so the operation it describes must not happen."""

    def __init__(self) -> None:
        super().__init__("The audit log cannot be written; the operation was refused.")


class Problem(StrEnum):
    HASH_MISMATCH = "hash_mismatch"  # the record's content or hash was changed
    GAP = "gap"  # a record is missing
    WRONG_PREV = "wrong_prev"  # the record does not point at its predecessor's hash
    HEAD_MISMATCH = "head_mismatch"  # the chain head disagrees with the chain's last record


class BrokenLink(msgspec.Struct, frozen=True):
    """The first place a chain stops proving itself; `seq` is the record at fault (or missing)."""

    chain_id: int
    seq: int
    problem: Problem
    message: str


class ChainSummary(msgspec.Struct, frozen=True):
    """One chain as verified: keep `head_seq`/`head_hash` outside the database to anchor it."""

    chain_id: int
    records: int
    head_seq: int
    head_hash: str


class VerifyReport(msgspec.Struct, frozen=True):
    ok: bool
    records: int
    chains: tuple[ChainSummary, ...]
    broken: tuple[BrokenLink, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready builtins, for the CLI's output."""
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result


DetailValue: TypeAlias = str | int | bool


def payload_bytes(
    *,
    occurred_at: datetime.datetime,
    actor: str,
    action: str,
    outcome: str,
    request_id: str | None,
    token_hmac: bytes | None,
    detail: Mapping[str, DetailValue],
) -> bytes:
    """The canonical encoding of a record's content (see the module docstring)."""
    return _encoder.encode(
        {
            "action": action,
            "actor": actor,
            "detail": detail,
            "occurred_at": _micros(occurred_at),
            "outcome": outcome,
            "request_id": request_id,
            "token_hmac": None if token_hmac is None else token_hmac.hex(),
            "v": PAYLOAD_VERSION,
        }
    )


def chain_hash(prev_hash: bytes, chain_id: int, seq: int, payload: bytes) -> bytes:
    """The hash Postgres computes on append, recomputed here to verify it."""
    return hashlib.sha256(prev_hash + _PREFIX.pack(chain_id, seq) + payload).digest()


class AuditLog:
    """Appends audit records; every failure to write is an `AuditUnavailable`."""

    def __init__(self, pool: Any, hmac_key: bytes, *, timeout: float = 5.0) -> None:
        if len(hmac_key) < _MIN_KEY_BYTES:
            raise ValueError("the audit HMAC key must be at least 32 bytes")
        self._pool = pool
        self._key = hmac_key
        # A bound on how long an operation may wait for its record (pool, locks, network), after
        # which it is refused rather than left hanging.
        self._timeout = timeout

    def token_hmac(self, token_id: str) -> bytes:
        """What the log stores for a token: findable by whoever holds the key, opaque otherwise."""
        return hmac.new(self._key, token_id.encode(), hashlib.sha256).digest()

    async def append(
        self,
        *,
        actor: str,
        action: str,
        outcome: str,
        request_id: str | None,
        token_id: str | None = None,
        detail: Mapping[str, DetailValue] | None = None,
        conn: Conn | None = None,
    ) -> None:
        """Record one event, or raise. Pass `conn` to write inside the caller's transaction.

        Inside a transaction the record commits or rolls back with the operation, but the chain
        head stays locked until the transaction ends: keep such transactions short.
        Bad arguments (card data in `detail`, a malformed action) raise `ValueError`: a bug.
        """
        clean_detail, detail_json = _check_detail(detail or {})
        _check(actor, action, outcome)
        if request_id is not None:
            # The client chooses request ids; one that looks like a card number is masked.
            request_id = redact(request_id)
            if len(request_id) > _MAX_REQUEST_ID or "\x00" in request_id:
                raise ValueError("request_id is too long or holds a NUL character")
        occurred_at = datetime.datetime.now(datetime.UTC)
        mac = None if token_id is None else self.token_hmac(token_id)
        payload = payload_bytes(
            occurred_at=occurred_at,
            actor=actor,
            action=action,
            outcome=outcome,
            request_id=request_id,
            token_hmac=mac,
            detail=clean_detail,
        )
        args = (
            occurred_at,
            actor,
            action,
            mac,
            outcome,
            request_id,
            detail_json,
        )
        start = random.randrange(CHAINS)
        try:
            if conn is not None:
                await self._write(conn, start, payload, args)
            else:
                async with self._pool.acquire(timeout=self._timeout) as pooled:
                    await self._write(pooled, start, payload, args)
        except AuditUnavailable:
            raise
        except Exception as exc:
            raise AuditUnavailable() from exc

    async def verify(self) -> VerifyReport:
        """`verify` over this log's pool (the admin endpoint and `audit-verify` call this)."""
        return await verify(self._pool)

    async def _write(
        self, conn: Conn, start: int, payload: bytes, args: tuple[object, ...]
    ) -> None:
        row = await conn.fetchrow(_APPEND_FREE_CHAIN, start, payload, *args, timeout=self._timeout)
        if row is None:
            row = await conn.fetchrow(_APPEND_WAITING, start, payload, *args, timeout=self._timeout)
        if row is None:
            raise AuditUnavailable()  # no chain heads at all: the migration did not run


async def verify(source: Any, *, batch: int = 5000) -> VerifyReport:
    """Walk every chain in seq order, recompute every hash, and report the first break of each.

    `source` is a pool or a connection. The walk reads one snapshot (REPEATABLE READ), so
    appends running meanwhile are neither half-seen nor reported as breaks, and streams the rows
    through a server-side cursor, so memory stays flat however long the log is.
    """
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as conn:
            return await _verify(conn, batch)
    return await _verify(source, batch)


async def _verify(conn: Conn, batch: int) -> VerifyReport:
    if conn.is_in_transaction():
        return await _walk(conn, batch)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _walk(conn, batch)


class _Chain:
    """Verification state of one chain while its rows stream past."""

    __slots__ = ("broken", "chain_id", "last_hash", "last_seq", "records")

    def __init__(self, chain_id: int) -> None:
        self.chain_id = chain_id
        self.records = 0
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.broken: BrokenLink | None = None

    def check(self, row: asyncpg.Record) -> None:
        self.records += 1
        if self.broken is not None:
            return
        seq: int = row["seq"]
        expected = self.last_seq + 1
        if seq != expected:
            self.fail(expected, Problem.GAP, f"record {expected} is missing; next is {seq}")
        elif row["prev_hash"] != self.last_hash:
            self.fail(seq, Problem.WRONG_PREV, "prev_hash is not the previous record's hash")
        elif _row_hash(row) != row["hash"]:
            self.fail(seq, Problem.HASH_MISMATCH, "the record does not match its hash")
        else:
            self.last_seq = seq
            self.last_hash = row["hash"]

    def check_head(self, head: asyncpg.Record | None) -> None:
        if self.broken is not None:
            return
        if head is None:
            self.fail(self.last_seq, Problem.HEAD_MISMATCH, "the chain has records but no head")
        elif head["last_seq"] != self.last_seq or head["last_hash"] != self.last_hash:
            self.fail(
                self.last_seq,
                Problem.HEAD_MISMATCH,
                f"the head says seq {head['last_seq']} hash {head['last_hash'].hex()[:16]}…, "
                f"the chain ends at seq {self.last_seq} hash {self.last_hash.hex()[:16]}…",
            )

    def fail(self, seq: int, problem: Problem, message: str) -> None:
        self.broken = BrokenLink(self.chain_id, seq, problem, message)


def _row_hash(row: asyncpg.Record) -> bytes:
    payload = payload_bytes(
        occurred_at=row["occurred_at"],
        actor=row["actor"],
        action=row["action"],
        outcome=row["outcome"],
        request_id=row["request_id"],
        token_hmac=row["token_hmac"],
        detail=msgspec.json.decode(row["detail"]),
    )
    return chain_hash(row["prev_hash"], row["chain_id"], row["seq"], payload)


async def _walk(conn: Conn, batch: int) -> VerifyReport:
    heads = {
        r["chain_id"]: r
        for r in await conn.fetch(
            "SELECT chain_id, last_seq, last_hash FROM audit_chain_heads ORDER BY chain_id"
        )
    }
    chains: dict[int, _Chain] = {}
    current: _Chain | None = None
    async for row in conn.cursor(_ALL_RECORDS, prefetch=batch):
        if current is None or current.chain_id != row["chain_id"]:
            if current is not None:
                current.check_head(heads.get(current.chain_id))
            current = chains[row["chain_id"]] = _Chain(row["chain_id"])
        current.check(row)
    if current is not None:
        current.check_head(heads.get(current.chain_id))
    for chain_id, head in heads.items():
        if chain_id not in chains:  # a chain with no records must still be at genesis
            chains[chain_id] = _Chain(chain_id)
            chains[chain_id].check_head(head)
    ordered = [chains[c] for c in sorted(chains)]
    broken = tuple(c.broken for c in ordered if c.broken is not None)
    summaries = tuple(
        ChainSummary(
            chain_id=c.chain_id,
            records=c.records,
            head_seq=heads[c.chain_id]["last_seq"] if c.chain_id in heads else -1,
            head_hash=heads[c.chain_id]["last_hash"].hex() if c.chain_id in heads else "",
        )
        for c in ordered
    )
    return VerifyReport(
        ok=not broken,
        records=sum(c.records for c in ordered),
        chains=summaries,
        broken=broken,
    )


async def export(
    conn: Conn, since: datetime.datetime | None = None, *, batch: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every record (occurred at or after `since`) in time order, hashes in hex, for admins.

    Streams through a server-side cursor inside a read-only transaction, opened here unless the
    caller has one.
    """
    if conn.is_in_transaction():
        async for row in conn.cursor(_RECORDS_SINCE, since, prefetch=batch):
            yield _exported(row)
        return
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(_RECORDS_SINCE, since, prefetch=batch):
            yield _exported(row)


def _exported(row: asyncpg.Record) -> dict[str, Any]:
    token_hmac: bytes | None = row["token_hmac"]
    return {
        "chain_id": row["chain_id"],
        "seq": row["seq"],
        "occurred_at": row["occurred_at"].isoformat(),
        "actor": row["actor"],
        "action": row["action"],
        "token_hmac": None if token_hmac is None else token_hmac.hex(),
        "outcome": row["outcome"],
        "request_id": row["request_id"],
        "detail": msgspec.json.decode(row["detail"]),
        "prev_hash": row["prev_hash"].hex(),
        "hash": row["hash"].hex(),
    }


def _micros(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    return (moment - _EPOCH) // datetime.timedelta(microseconds=1)


def _check(actor: str, action: str, outcome: str) -> None:
    if not _ACTOR.fullmatch(actor) or redact(actor) != actor:
        raise ValueError("actor must be 1-200 printable ASCII characters, without card data")
    if len(action) > 64 or not _ACTION.fullmatch(action):
        raise ValueError("action must look like 'token.read'")
    if not _OUTCOME.fullmatch(outcome):
        raise ValueError("outcome must look like 'success' or 'denied'")


def _check_detail(detail: Mapping[str, DetailValue]) -> tuple[dict[str, DetailValue], str]:
    """A small flat object of strings, integers and booleans, with nothing a PAN could hide in.

    Messages name the key, never the value: the value may be the card number.
    """
    if len(detail) > _MAX_DETAIL_KEYS:
        raise ValueError(f"detail has more than {_MAX_DETAIL_KEYS} keys")
    clean: dict[str, DetailValue] = {}
    for key, value in detail.items():
        if not isinstance(key, str) or not _DETAIL_KEY.fullmatch(key) or redact(key) != key:
            raise ValueError("detail keys must look like 'reason' or 'psp_status'")
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise ValueError(f"detail[{key!r}] is outside the 64-bit integer range")
            if redact(str(value)) != str(value):
                raise ValueError(f"detail[{key!r}] looks like a card number")
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError(f"detail[{key!r}] holds a NUL character")
            if redact(value) != value:
                raise ValueError(f"detail[{key!r}] looks like it holds a card number")
        else:
            raise ValueError(f"detail[{key!r}] must be a string, an integer or a boolean")
        clean[key] = value
    try:
        encoded = _encoder.encode(clean)
    except (msgspec.EncodeError, UnicodeEncodeError) as exc:
        raise ValueError("detail cannot be encoded as UTF-8 JSON") from exc
    if len(encoded) > _MAX_DETAIL_BYTES:
        raise ValueError(f"detail is larger than {_MAX_DETAIL_BYTES} bytes")
    return clean, encoded.decode()
