"""`GET /v1/keys`: the key inventory an assessor asks for (PCI DSS 3.6.1, 3.7.1-3.7.5).

What it answers, all from the KMS and the vault's own tables, nothing from memory:

- the KEK: every version the KMS lists (created, state, primary) and the cryptoperiod the vault
  is configured with (`TESSERA_VAULT_KEK_CRYPTOPERIOD_DAYS`, Terraform's rotation period);
- data keys per KEK version and purpose, and data keys under a version the KMS does not list;
- every card DEK: created, KEK version, the records it holds against `DataKeyPolicy.max_records`,
  the first and last record's time (last - created beyond `max_age_seconds` means it was used
  for new records past its cryptoperiod), whether a live token still uses it;
- every fingerprint key (one per merchant) and the audit key: id, KEK version, created;
- an unwrap of every data key under the KMS with its own associated data, right now: per key
  `ok` or the error code. The unwrapped bytes are checked for length and dropped; no key
  material, wrapped or not, is ever in the answer.

Bounded: data keys are read in batches of `BATCH` (keyset on the id) and unwrapped at most
`CONCURRENCY` at a time; one aggregate over `tokens` (a sequential scan: there is no index on
`data_key_id`) gives every card DEK's counts. Records are counted from `tokens`: deleting a
token shreds its link to the key, so `records` is what the key still protects, not every record
it ever sealed (the vault's own counter enforces the bound as it encrypts).

Every call is audited (`keys.inventory`: once before the first unwrap, once with the outcome).
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections import Counter
from typing import Any

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State

from core.errors import TesseraError
from vault import listeners
from vault.audit import AuditLog
from vault.auth import ADMIN, require
from vault.crypto import KEY_BYTES, dek_aad
from vault.keys import KeyService
from vault.kms.base import KeyManagementService, WrappedKey
from vault.openapi import ADMIN_TOKEN
from vault.routes import record

#: Data keys read (and unwrapped) per batch.
BATCH = 500
#: Unwraps in flight at once (Cloud KMS answers in milliseconds; this bounds the burst).
CONCURRENCY = 16

_CARD_RECORDS = (
    "SELECT data_key_id, count(*) AS records, min(created_at) AS first_record, "
    "max(created_at) AS last_record FROM tokens WHERE data_key_id IS NOT NULL "
    "GROUP BY data_key_id"
)
_KEYS_AFTER = (
    "SELECT id, purpose, merchant_id, wrapped_key, kek_version, created_at FROM data_keys "
    "WHERE id > $1 ORDER BY id LIMIT $2"
)


class KekVersionView(msgspec.Struct):
    #: As data keys name it (`data_keys.kek_version`): the local KMS's number, or Cloud KMS's
    #: full `…/cryptoKeyVersions/N`.
    name: str
    #: Unix seconds.
    created: int
    #: "enabled", "disabled", "destroyed", "destroy_scheduled", … (the KMS's, lower-case).
    state: str
    primary: bool
    #: Data keys wrapped under this version, per purpose (card, fingerprint, audit).
    data_keys: dict[str, int]


class KekView(msgspec.Struct):
    provider: str
    #: How long a KEK version may be primary (Terraform's `rotation_period`).
    cryptoperiod_days: int
    #: Every version the KMS lists, oldest first; empty if it could not list them.
    versions: list[KekVersionView]
    #: Why the versions could not be listed (an error code), or null.
    versions_error: str | None = None


class DataKeyPolicyView(msgspec.Struct):
    #: Records one card DEK may encrypt.
    max_records: int
    #: How long one card DEK may be used for new records, in seconds.
    max_age_seconds: int


class VersionCount(msgspec.Struct):
    kek_version: str
    purpose: str
    count: int


class DataKeyCounts(msgspec.Struct):
    total: int
    by_kek_version: list[VersionCount]
    #: KEK versions data keys name that the KMS did not list (with how many keys each).
    unknown_kek_versions: dict[str, int]


class CardKeyView(msgspec.Struct):
    id: str
    created: int
    kek_version: str
    #: Tokens whose card this key encrypts (live tokens: shredding unlinks a token).
    records: int
    #: Unix seconds of the first and last of those tokens; null when there is none.
    first_record: int | None
    last_record: int | None
    #: Whether a live token still needs this key.
    in_use: bool
    #: "ok", or the error code the KMS's unwrap raised.
    unwrap: str
    unwrap_reason: str | None = None


class ScopedKeyView(msgspec.Struct):
    """A fingerprint key (one per merchant) or the audit key (merchant null)."""

    id: str
    merchant: str | None
    kek_version: str
    created: int
    unwrap: str
    unwrap_reason: str | None = None


class UnwrapSummary(msgspec.Struct):
    #: Data keys unwrapped (every one in the table).
    checked: int
    ok: int
    failed: int
    #: Failures per error code.
    errors: dict[str, int]
    seconds: float


class KeyInventory(msgspec.Struct):
    #: Unix seconds, the vault's clock.
    generated: int
    kek: KekView
    data_key_policy: DataKeyPolicyView
    data_keys: DataKeyCounts
    card_keys: list[CardKeyView]
    fingerprint_keys: list[ScopedKeyView]
    audit_keys: list[ScopedKeyView]
    unwrap: UnwrapSummary
    object: str = "key_inventory"


def _seconds(moment: datetime.datetime) -> int:
    return int(moment.timestamp())


async def _unwrap_outcome(
    kms: KeyManagementService, row: Any, limit: asyncio.Semaphore
) -> tuple[str, str | None]:
    """("ok", None) or (error code, its message): the key itself never leaves this function."""
    aad = dek_aad(row["id"], row["purpose"], row["merchant_id"])
    async with limit:
        try:
            key = await kms.unwrap(WrappedKey(row["wrapped_key"], row["kek_version"]), aad=aad)
        except TesseraError as exc:  # KmsError and its kinds: messages hold no request data
            return exc.code, exc.message[:200]
        except Exception as exc:  # anything else: its type only, never its text
            return "error", type(exc).__name__
    length = len(key)
    del key
    if length != KEY_BYTES:
        return "wrong_length", f"unwrapped to {length} bytes, not {KEY_BYTES}"
    return "ok", None


async def build_inventory(
    kms: KeyManagementService, pool: Any, keys: KeyService, provider: str, cryptoperiod_days: int
) -> KeyInventory:
    try:
        versions = await kms.versions()
        versions_error = None
    except TesseraError as exc:
        versions, versions_error = [], exc.code
    known = {v.name for v in versions}
    stats = {row["data_key_id"]: row for row in await pool.fetch(_CARD_RECORDS)}

    per_version: Counter[tuple[str, str]] = Counter()
    card_keys: list[CardKeyView] = []
    fingerprint_keys: list[ScopedKeyView] = []
    audit_keys: list[ScopedKeyView] = []
    errors: Counter[str] = Counter()
    limit = asyncio.Semaphore(CONCURRENCY)
    started = time.monotonic()
    after = ""
    while rows := await pool.fetch(_KEYS_AFTER, after, BATCH):
        outcomes = await asyncio.gather(*(_unwrap_outcome(kms, row, limit) for row in rows))
        for row, (outcome, reason) in zip(rows, outcomes, strict=True):
            per_version[(row["kek_version"], row["purpose"])] += 1
            if outcome != "ok":
                errors[outcome] += 1
            created = _seconds(row["created_at"])
            if row["purpose"] == "card":
                used = stats.get(row["id"])
                card_keys.append(
                    CardKeyView(
                        id=row["id"],
                        created=created,
                        kek_version=row["kek_version"],
                        records=used["records"] if used else 0,
                        first_record=_seconds(used["first_record"]) if used else None,
                        last_record=_seconds(used["last_record"]) if used else None,
                        in_use=used is not None,
                        unwrap=outcome,
                        unwrap_reason=reason,
                    )
                )
            else:
                scoped = ScopedKeyView(
                    id=row["id"],
                    merchant=row["merchant_id"],
                    kek_version=row["kek_version"],
                    created=created,
                    unwrap=outcome,
                    unwrap_reason=reason,
                )
                (fingerprint_keys if row["purpose"] == "fingerprint" else audit_keys).append(scoped)
        after = rows[-1]["id"]
    unwrap_seconds = time.monotonic() - started

    checked = sum(per_version.values())
    unknown: Counter[str] = Counter()
    for (version, _purpose), count in per_version.items():
        if versions_error is None and version not in known:
            unknown[version] += count
    policy = keys.ring.policy
    return KeyInventory(
        generated=_seconds(datetime.datetime.now(datetime.UTC)),
        kek=KekView(
            provider=provider,
            cryptoperiod_days=cryptoperiod_days,
            versions=[
                KekVersionView(
                    name=v.name,
                    created=_seconds(v.created),
                    state=v.state,
                    primary=v.primary,
                    data_keys={p: n for (kv, p), n in sorted(per_version.items()) if kv == v.name},
                )
                for v in versions
            ],
            versions_error=versions_error,
        ),
        data_key_policy=DataKeyPolicyView(policy.max_records, int(policy.max_age_seconds)),
        data_keys=DataKeyCounts(
            total=checked,
            by_kek_version=[VersionCount(v, p, n) for (v, p), n in sorted(per_version.items())],
            unknown_kek_versions=dict(sorted(unknown.items())),
        ),
        card_keys=card_keys,
        fingerprint_keys=fingerprint_keys,
        audit_keys=audit_keys,
        unwrap=UnwrapSummary(
            checked=checked,
            ok=checked - sum(errors.values()),
            failed=sum(errors.values()),
            errors=dict(sorted(errors.items())),
            seconds=round(unwrap_seconds, 3),
        ),
    )


class KeyInventoryController(Controller):
    path = "/v1/keys"
    opt = {"listeners": listeners.ADMIN}
    guards = [require(ADMIN)]
    security = ADMIN_TOKEN
    tags = ["admin"]

    @get(operation_id="keyInventory")
    async def inventory(
        self,
        request: Request[Any, Any, Any],
        keys: KeyService,
        audit: AuditLog,
        state: State,
    ) -> KeyInventory:
        """The KEK's versions and cryptoperiod, every data key by KEK version and purpose, each
        card DEK's use against its bounds, and every data key unwrapped once under the KMS
        (the outcome only, never key material). Reads only; audited."""
        settings = state.settings
        await record(audit, request, ADMIN, "keys.inventory", "requested")
        inventory = await build_inventory(
            keys.kms, state.pool, keys, settings.kms_provider, settings.kek_cryptoperiod_days
        )
        detail: dict[str, str | int | bool] = {
            "data_keys": inventory.unwrap.checked,
            "unwrap_failed": inventory.unwrap.failed,
            "kek_versions": len(inventory.kek.versions),
        }
        outcome = "ok" if not inventory.unwrap.failed else "unwrap_failed"
        await record(audit, request, ADMIN, "keys.inventory", outcome, detail=detail)
        return inventory
