"""Control `no-sad-stored`: no sensitive authentication data (CVC, PIN, track data) is stored.

The vault receives a CVC with a card, seals it (AES-256-GCM under the card's data key, bound to
the token) and keeps it in its Redis only, with a TTL of at most an hour, until the first
forward takes it (`vault.tokens.CvcStore`); nothing else may keep one, anywhere. Three parts:

- **The vault's database schema** (3.3.1.2): no column named like a CVC, PIN or track data
  (`cvc`, `cvv`, `cvn`, `cid`, `csc`, `pin`, `track`, `security_code`…) except the boolean
  `tokens.cvc_provided`; and every column that can hold free text or bytes (text, bytea, json,
  arrays…) is one of the `DOCUMENTED_VAULT_COLUMNS`, each with what it holds. A new text or
  bytea column fails until it is documented here: the sealed card record
  (`tokens.ciphertext`) is the only one that holds card data, and no other may start to.
- **The vault's Redis** (3.3.1.2, 3.3.2): every `vault:cvc:<token>` key has a TTL (none is
  persistent), no more than the vault's CVC TTL remains of it (its age is the TTL setting
  minus what remains: none is older than the setting allows), and its value is sealed (the
  msgpack triple data key, 12-byte nonce, ciphertext of a 3-4 digit CVC plus the 16-byte GCM
  tag), never a CVC in clear. No other key holds anything CVC-shaped: a name with cvc/cvv in
  it, a value (or hash field, list item, set member) of exactly 3 or 4 digits, a JSON field
  named like a CVC, or a sealed-CVC triple under another name. The known counters
  (`vault:detokenize:admin:*`, `vault:fingerprints:lookup:*`) must hold integers and expire.
- **The API's database schema** (3.3.1): no column named like SAD either (the API never
  receives a CVC; the PAN scan of `pan-outside-vault` reads its data).

The CVC TTL is `TESSERA_PCI_CVC_TTL_SECONDS`, else the vault's own variable
`TESSERA_VAULT_CVC_TTL_SECONDS` if the kit's environment has it, else 3600: the most the vault
accepts (its settings refuse more), so no CVC can lawfully be older than that.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from core.redaction import redact
from tessera.pci.context import EvidenceContext
from tessera.pci.evidence import UNREACHABLE
from tessera.pci.model import Control, ControlResult
from tessera.pci.scan import safe_name
from tessera.runtime import redis_client

CONTROL = Control(
    "no-sad-stored",
    "No sensitive authentication data stored: no CVC column in either database, the vault's "
    "held CVCs sealed and expiring",
    ("3.3.1", "3.3.1.2", "3.3.2"),
)

#: A column (or JSON field) named like sensitive authentication data.
SAD_NAME: Final = re.compile(
    r"(^|_)(cvc2?|cvv2?|cvn|cav2|cid|csc|pin|pin_?block|track[12]?|track_?data|mag_?stripe)"
    r"(_|$)|security_?code|verification_?(code|value)",
    re.IGNORECASE,
)
#: Columns named like SAD that are not: table.column -> the one type it must have.
SAD_NAME_EXCEPTIONS: Final = {"tokens.cvc_provided": "bool"}
#: Column types that cannot hold free text or bytes.
NON_TEXT_TYPES: Final = frozenset(
    {
        "bool",
        "int2",
        "int4",
        "int8",
        "float4",
        "float8",
        "numeric",
        "date",
        "timestamp",
        "timestamptz",
        "interval",
        "uuid",
        "oid",
    }
)
#: Every vault column that can hold text or bytes, its type, and what it holds (PCI DSS 3.3.1.2:
#: nothing else may appear without being documented here).
DOCUMENTED_VAULT_COLUMNS: Final[dict[str, tuple[str, str]]] = {
    "tokens.ciphertext": ("bytea", "the sealed card record (PAN and name), AES-256-GCM"),
    "tokens.nonce": ("bytea", "the record's 96-bit GCM nonce (CHECK: 12 bytes)"),
    "tokens.fingerprint": ("bytea", "HMAC-SHA256 of the PAN (CHECK: 32 bytes)"),
    "tokens.id": ("text", "token id (CHECK: tok_ + 26 characters)"),
    "tokens.merchant_id": ("text", "merchant id (foreign key)"),
    "tokens.data_key_id": ("text", "data key id (foreign key)"),
    "tokens.brand": ("text", "card brand name"),
    "tokens.bin": ("text", "first six digits (CHECK: 6 digits; PCI DSS allows BIN + last 4)"),
    "tokens.last4": ("text", "last four digits (CHECK: 4 digits)"),
    "tokens.card_update": (
        "text",
        "the account update last applied, destination:update id (CHECK: name characters only)",
    ),
    "data_keys.id": ("text", "data key id (CHECK: dek_ + 26 characters)"),
    "data_keys.purpose": ("text", "card, fingerprint or audit (CHECK)"),
    "data_keys.merchant_id": ("text", "merchant id (foreign key)"),
    "data_keys.wrapped_key": ("bytea", "a data key wrapped by the KMS key"),
    "data_keys.kek_version": ("text", "the KMS key version that wrapped it"),
    "merchants.id": ("text", "merchant id (CHECK: mer_ + 16-40 letters and digits)"),
    "merchants.publishable_key_sha256": ("bytea", "SHA-256 of the key (CHECK: 32 bytes)"),
    "merchants.allowed_origins": ("_text", "the merchant's checkout origins"),
    "audit_log.actor": ("text", "admin, service or merchant:<id>"),
    "audit_log.action": ("text", "an action name (CHECK: dotted lower-case words)"),
    "audit_log.token_hmac": ("bytea", "HMAC of a token id (CHECK: 32 bytes)"),
    "audit_log.outcome": ("text", "an outcome word (CHECK: lower-case, 32 characters)"),
    "audit_log.request_id": ("text", "the request's id"),
    "audit_log.detail": ("jsonb", "small details (counts, destination, reason; redacted)"),
    "audit_log.prev_hash": ("bytea", "the chain's previous hash (CHECK: 32 bytes)"),
    "audit_log.hash": ("bytea", "this record's hash (CHECK: 32 bytes)"),
    "audit_chain_heads.last_hash": ("bytea", "the chain's head hash (CHECK: 32 bytes)"),
    "schema_migrations.name": ("text", "a migration file's name"),
    "schema_migrations.checksum": ("text", "a migration file's checksum"),
    "worker_jobs.name": ("text", "a periodic job's name"),
    "worker_jobs.locked_by": ("text", "the worker holding its lease"),
    "worker_jobs.last_outcome": ("text", "the job's last outcome"),
}

_COLUMNS = """
SELECT table_schema, table_name, column_name, udt_name
FROM information_schema.columns
WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
  AND table_schema NOT LIKE 'pg_toast%'
ORDER BY 1, 2, ordinal_position
"""
CVC_PREFIX: Final = b"vault:cvc:"
#: Keys the vault counts with: their values are integers, and they expire.
COUNTERS: Final = (b"vault:detokenize:admin:", b"vault:fingerprints:lookup:")
_DIGITS_3_OR_4: Final = re.compile(rb'^\s*"?[0-9]{3,4}"?\s*$')
_CVC_IN_NAME: Final = re.compile(rb"cvc|cvv|cvn|security.?code", re.IGNORECASE)
_NONCE_BYTES: Final = 12
#: A sealed CVC: 3 or 4 digits plus the 16-byte GCM tag.
_SEALED_CVC_BYTES: Final = (19, 20)
_DEFAULT_CVC_TTL_SECONDS: Final = 3600


def _column_name(row: Any) -> str:
    schema = "" if row["table_schema"] == "public" else f"{row['table_schema']}."
    return f"{schema}{row['table_name']}.{row['column_name']}"


def sad_named(columns: list[Any], where: str) -> list[str]:
    """Columns named like SAD, except the documented exceptions with their type."""
    problems = []
    for row in columns:
        name = _column_name(row)
        if not SAD_NAME.search(row["column_name"]):
            continue
        if SAD_NAME_EXCEPTIONS.get(name) == row["udt_name"]:
            continue
        problems.append(f"{where}: column {name} ({row['udt_name']}) is named like SAD")
    return problems


def undocumented_text(columns: list[Any]) -> list[str]:
    problems = []
    for row in columns:
        name, kind = _column_name(row), row["udt_name"]
        if kind in NON_TEXT_TYPES:
            continue
        documented = DOCUMENTED_VAULT_COLUMNS.get(name)
        if documented is None:
            problems.append(
                f"vault database: column {name} ({kind}) can hold text or bytes and is not "
                "documented (tessera/pci/checks/cvc.py DOCUMENTED_VAULT_COLUMNS)"
            )
        elif documented[0] != kind:
            problems.append(
                f"vault database: column {name} is {kind}, documented as {documented[0]}"
            )
    return problems


async def _schema(ctx: EvidenceContext, which: str) -> list[Any]:
    async with ctx.database("vault" if which == "vault" else "api") as conn:
        rows: list[Any] = await conn.fetch(_COLUMNS)
    return rows


def cvc_ttl_seconds(ctx: EvidenceContext) -> tuple[int, str]:
    """The CVC TTL the vault runs with, and where that figure comes from."""
    if ctx.settings.cvc_ttl_seconds:
        return ctx.settings.cvc_ttl_seconds, "TESSERA_PCI_CVC_TTL_SECONDS"
    from_vault = os.environ.get("TESSERA_VAULT_CVC_TTL_SECONDS", "")
    if from_vault.isdigit() and int(from_vault) > 0:
        return int(from_vault), "TESSERA_VAULT_CVC_TTL_SECONDS"
    return _DEFAULT_CVC_TTL_SECONDS, "3600: the most the vault accepts (no setting was given)"


@dataclass
class RedisReport:
    keys: int = 0
    held_cvcs: int = 0
    oldest_age_ms: int | None = None
    longest_remaining_ms: int | None = None
    counters: int = 0
    other_kinds: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self, ttl: int, ttl_source: str) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "held_cvcs": self.held_cvcs,
            "cvc_ttl_seconds": ttl,
            "cvc_ttl_from": ttl_source,
            "oldest_cvc_age_seconds": None
            if self.oldest_age_ms is None
            else round(self.oldest_age_ms / 1000, 1),
            "longest_remaining_ttl_seconds": None
            if self.longest_remaining_ms is None
            else round(self.longest_remaining_ms / 1000, 1),
            "counters": self.counters,
            "other_keys_by_prefix": self.other_kinds,
        }


def sealed_cvc(value: Any) -> bool:
    """Whether a value is the vault's sealed-CVC triple (data key id, nonce, ciphertext)."""
    if not isinstance(value, bytes):
        return False
    try:
        key_id, nonce, sealed = msgspec.msgpack.decode(value, type=tuple[str, bytes, bytes])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return (
        key_id.startswith("dek_")
        and len(nonce) == _NONCE_BYTES
        and len(sealed) in _SEALED_CVC_BYTES
    )


def cvc_shaped(pieces: list[bytes]) -> str | None:
    """Why one of a value's pieces looks like a CVC, or None."""
    for piece in pieces:
        if _DIGITS_3_OR_4.match(piece):
            return "a value of exactly 3 or 4 digits"
        if sealed_cvc(piece):
            return "a sealed CVC (data key, nonce, ciphertext)"
        if piece[:1] in (b"{", b"["):
            try:
                document = json.loads(piece)
            except ValueError:
                continue
            reason = _cvc_in_json(document)
            if reason:
                return reason
    return None


def _cvc_in_json(document: Any, depth: int = 0) -> str | None:
    if depth > 16:
        return None
    if isinstance(document, dict):
        for key, value in document.items():
            if isinstance(key, str) and SAD_NAME.search(key):
                return f"a JSON field named {key!r}"
            reason = _cvc_in_json(value, depth + 1)
            if reason:
                return reason
    elif isinstance(document, list):
        for item in document:
            reason = _cvc_in_json(item, depth + 1)
            if reason:
                return reason
    elif isinstance(document, str) and _DIGITS_3_OR_4.match(document.encode()):
        return "a JSON string of exactly 3 or 4 digits"
    return None


def _prefix(key: bytes) -> str:
    """A key's kind for the evidence: its name up to the last colon (`vault:monitor:*`)."""
    head, colon, _ = key.rpartition(b":")
    return safe_name(head + colon + b"*") if colon else "(no prefix)"


async def scan_vault_redis(ctx: EvidenceContext, ttl: int) -> RedisReport:
    report = RedisReport()
    client = redis_client.connect(
        ctx.settings.vault_redis_url, socket_timeout=10, socket_connect_timeout=10
    )
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await _judge_keys(client, batch, ttl, report)
                batch = []
        if batch:
            await _judge_keys(client, batch, ttl, report)
    finally:
        await client.aclose()
    return report


async def _judge_keys(client: Any, keys: list[bytes], ttl: int, report: RedisReport) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        answers = await pipe.execute()
    kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in answers[0::2]]
    remaining = answers[1::2]
    async with client.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "string":
                pipe.get(key)
            elif kind == "hash":
                pipe.hgetall(key)
            elif kind == "list":
                pipe.lrange(key, 0, -1)
            elif kind == "set":
                pipe.smembers(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1)
            elif kind == "stream":
                pipe.xrange(key, "-", "+")
            else:
                pipe.exists(key)
        values = await pipe.execute()
    for key, kind, pttl, value in zip(keys, kinds, remaining, values, strict=True):
        if kind == "none" or pttl == -2:
            continue  # expired or taken since SCAN
        report.keys += 1
        name = safe_name(key)
        if key.startswith(CVC_PREFIX):
            _judge_held_cvc(name, kind, pttl, value, ttl, report)
            continue
        if key.startswith(COUNTERS):
            report.counters += 1
            if kind != "string" or not (isinstance(value, bytes) and value.strip().isdigit()):
                report.problems.append(f"vault Redis: counter {name} does not hold an integer")
            if pttl < 0:
                report.problems.append(f"vault Redis: counter {name} never expires")
            continue
        kind_name = _prefix(key)
        report.other_kinds[kind_name] = report.other_kinds.get(kind_name, 0) + 1
        if _CVC_IN_NAME.search(key):
            report.problems.append(f"vault Redis: key {name} is named like a CVC")
        reason = cvc_shaped(_pieces(value))
        if reason:
            report.problems.append(f"vault Redis: {kind} {name} holds {reason}")


def _judge_held_cvc(
    name: str, kind: str, pttl: int, value: Any, ttl: int, report: RedisReport
) -> None:
    report.held_cvcs += 1
    if pttl < 0:
        report.problems.append(f"vault Redis: held CVC {name} has no TTL (kept forever)")
    else:
        age = ttl * 1000 - pttl
        report.oldest_age_ms = max(age, report.oldest_age_ms or age)
        report.longest_remaining_ms = max(pttl, report.longest_remaining_ms or pttl)
        if pttl > ttl * 1000:
            report.problems.append(
                f"vault Redis: held CVC {name} has {pttl / 1000:.0f} s left, more than the "
                f"{ttl} s TTL"
            )
    if kind != "string" or not sealed_cvc(value):
        report.problems.append(f"vault Redis: held CVC {name} is not a sealed CVC ({kind})")


def _pieces(value: Any) -> list[bytes]:
    if value is None or isinstance(value, int | float):
        return []
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, str):
        return [value.encode()]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in (*_pieces(k), *_pieces(v))]
    if isinstance(value, list | tuple | set):
        return [p for item in value for p in _pieces(item)]
    return []


async def _part(name: str, work: Awaitable[Any], unreached: dict[str, str]) -> Any:
    """One part's result, or None (and the reason in `unreached`) if it cannot be reached."""
    try:
        return await work
    except UNREACHABLE as exc:
        unreached[name] = redact(f"{type(exc).__name__}: {exc}")[:300]
        return None


async def run(ctx: EvidenceContext) -> ControlResult:
    ttl, ttl_source = cvc_ttl_seconds(ctx)
    unreached: dict[str, str] = {}
    vault_columns = await _part("vault_database", _schema(ctx, "vault"), unreached)
    api_columns = await _part("api_database", _schema(ctx, "api"), unreached)
    redis: RedisReport | None = await _part("vault_redis", scan_vault_redis(ctx, ttl), unreached)
    failures = [
        *sad_named(vault_columns or [], "vault database"),
        *undocumented_text(vault_columns or []),
        *sad_named(api_columns or [], "API database"),
        *(redis.problems if redis else []),
    ]
    text_columns = [
        _column_name(r) for r in vault_columns or [] if r["udt_name"] not in NON_TEXT_TYPES
    ]
    evidence: dict[str, Any] = {
        "vault_database": None
        if vault_columns is None
        else {
            "columns": len(vault_columns),
            "text_or_bytes_columns": {
                name: DOCUMENTED_VAULT_COLUMNS.get(name, ("?", "UNDOCUMENTED"))[1]
                for name in text_columns
            },
            "sad_named_exceptions": SAD_NAME_EXCEPTIONS,
        },
        "api_database": None if api_columns is None else {"columns": len(api_columns)},
        "vault_redis": redis.to_dict(ttl, ttl_source) if redis else None,
        "not_reached": unreached,
        "problems": failures,
    }
    not_reached = "; ".join(f"{part}: {why}" for part, why in unreached.items())
    if failures:
        suffix = f". Not reached: {not_reached}" if unreached else ""
        return CONTROL.failed("; ".join(failures) + suffix, evidence)
    if unreached:
        return CONTROL.not_checked(
            f"nothing wrong in what was reached, but not every part could be: {not_reached}",
            evidence,
        )
    assert vault_columns is not None
    assert api_columns is not None
    assert redis is not None
    age = redis.to_dict(ttl, ttl_source)["oldest_cvc_age_seconds"]
    summary = (
        f"No column named like SAD in either database ({len(vault_columns)} vault and "
        f"{len(api_columns)} API columns); the vault's {len(text_columns)} text/bytes columns "
        f"are all documented, only tokens.ciphertext holds card data; {redis.held_cvcs} held "
        f"CVC(s) in the vault's Redis, all sealed and expiring within the {ttl} s TTL"
        + (f" (oldest {age} s old)" if age is not None else "")
        + f"; no other of its {redis.keys - redis.held_cvcs} keys holds anything CVC-shaped."
    )
    return CONTROL.passed(summary, evidence)
