"""Does the vault hold this card? The fingerprint lookup, for the assessor's kit (admin only).

When `tessera pci evidence` finds a card number outside the vault (in the API's database, a
log, a cache), the first question is whether it is one of the cards the vault holds: a card
that leaked on its way to or from the vault, or one that never came near it. The kit asks here,
in one call, for every number it found; the answer says, for each number in order, whether a
live token holds that card for any merchant and how many, and never carries a digit of it.

How: a card's fingerprint is an HMAC under each merchant's own key (`KeyService.fingerprint`),
so the same card has unrelated fingerprints at two merchants and no single value can be looked
up everywhere. Only merchants with a live token of the same BIN and last four (kept in clear)
can hold the card, so only their keys are used, and each candidate is then compared by
fingerprint through the (merchant, fingerprint) index.

It is an oracle for "is this number stored", so it stays with administrators (admin listener,
admin credential), takes at most `MAX_NUMBERS` per call and `NUMBERS_PER_HOUR` an hour from
all administrators together (guessing the six hidden digits behind a known BIN and last four is
about 100,000 Luhn-valid candidates: four days at this rate, every call of it audited, while a
kit run asks about 100 at most), and every call is audited with its count, never a number.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, post
from litestar.datastructures import State

from core.cards import bin6, last4, validate_pan
from core.errors import InvalidRequest, RateLimited
from tessera.runtime.http import error_responses
from vault import listeners
from vault.audit import AuditLog
from vault.auth import ADMIN, require
from vault.keys import KeyService
from vault.openapi import ADMIN_TOKEN
from vault.routes import record

#: Numbers one call may ask about (the kit asks about every distinct number it found at once).
MAX_NUMBERS: Final = 100
#: Numbers all administrators together may ask about per clock hour.
NUMBERS_PER_HOUR: Final = 1000
_COUNTER_TTL_SECONDS: Final = 2 * 3600

_CANDIDATE_MERCHANTS = (
    "SELECT DISTINCT merchant_id, bin, last4 FROM tokens "
    "WHERE deleted_at IS NULL AND bin || last4 = ANY($1::text[])"
)
_COUNT_BY_FINGERPRINT = (
    "SELECT t.fingerprint, count(*) AS n FROM tokens t "
    "JOIN unnest($1::text[], $2::bytea[]) AS c (merchant_id, fingerprint) "
    "ON t.merchant_id = c.merchant_id AND t.fingerprint = c.fingerprint "
    "WHERE t.deleted_at IS NULL GROUP BY t.fingerprint"
)


class FingerprintLookup(msgspec.Struct, forbid_unknown_fields=True):
    numbers: Annotated[
        list[
            Annotated[
                str,
                msgspec.Meta(
                    min_length=12, max_length=32, extra_json_schema={"pattern": "^[0-9 -]+$"}
                ),
            ]
        ],
        msgspec.Meta(min_length=1, max_length=MAX_NUMBERS),
    ]


class StoredCard(msgspec.Struct):
    #: Whether a live token of any merchant holds this card.
    stored: bool
    #: How many live tokens hold it (the same card tokenized twice, or at two merchants).
    tokens: int


class FingerprintLookupResult(msgspec.Struct):
    #: One per number asked about, in the same order.
    results: list[StoredCard]
    object: str = "fingerprint_lookup"


def lookup_counter(now: datetime.datetime) -> str:
    """The Redis key counting this hour's numbers (expires an hour after the hour ends)."""
    return f"vault:fingerprints:lookup:{int(now.timestamp()) // 3600}"


def _valid_numbers(numbers: list[str]) -> list[str]:
    valid = []
    for index, number in enumerate(numbers):
        try:
            pan, _brand = validate_pan(number)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, code=exc.code, param=f"numbers[{index}]") from None
        valid.append(pan)
    return valid


async def stored_cards(pool: Any, keys: KeyService, pans: list[str]) -> list[StoredCard]:
    """For each PAN, how many live tokens of any merchant hold it."""
    by_bin_last4: dict[str, set[str]] = defaultdict(set)
    for pan in pans:
        by_bin_last4[bin6(pan) + last4(pan)].add(pan)
    rows = await pool.fetch(_CANDIDATE_MERCHANTS, list(by_bin_last4))
    merchants: list[str] = []
    fingerprints: list[bytes] = []
    pan_of: dict[bytes, str] = {}
    for row in rows:
        for pan in by_bin_last4[row["bin"] + row["last4"]]:
            fingerprint = await keys.fingerprint(row["merchant_id"], pan)
            merchants.append(row["merchant_id"])
            fingerprints.append(fingerprint)
            pan_of[fingerprint] = pan
    counts: dict[str, int] = defaultdict(int)
    if fingerprints:
        for row in await pool.fetch(_COUNT_BY_FINGERPRINT, merchants, fingerprints):
            counts[pan_of[bytes(row["fingerprint"])]] += row["n"]
    return [StoredCard(stored=counts[pan] > 0, tokens=counts[pan]) for pan in pans]


class FingerprintController(Controller):
    path = "/v1/fingerprints"
    opt = {"listeners": listeners.ADMIN}
    guards = [require(ADMIN)]
    security = ADMIN_TOKEN
    tags = ["admin"]

    @post(
        "/lookup",
        operation_id="lookupFingerprints",
        status_code=200,
        responses=error_responses(429),
    )
    async def lookup(
        self,
        request: Request[Any, Any, Any],
        data: FingerprintLookup,
        keys: KeyService,
        audit: AuditLog,
        state: State,
    ) -> FingerprintLookupResult:
        """Whether the vault holds each card (a live token of any merchant), in the order
        asked; the answer carries no digit of any number. Rate-limited and audited."""
        count = len(data.numbers)
        try:
            pans = _valid_numbers(data.numbers)
        except InvalidRequest:
            await record(audit, request, ADMIN, "fingerprint.lookup", "invalid_number")
            raise
        counter = lookup_counter(datetime.datetime.now(datetime.UTC))
        async with state.redis.pipeline(transaction=False) as pipe:
            pipe.incrby(counter, count)
            pipe.expire(counter, _COUNTER_TTL_SECONDS)
            used, _ = await pipe.execute()
        if used > NUMBERS_PER_HOUR:
            await record(
                audit,
                request,
                ADMIN,
                "fingerprint.lookup",
                "rate_limited",
                detail={"numbers": count},
            )
            raise RateLimited("Too many numbers looked up this hour.")
        results = await stored_cards(state.pool, keys, pans)
        await record(
            audit,
            request,
            ADMIN,
            "fingerprint.lookup",
            "success",
            detail={"numbers": count, "stored": sum(r.stored for r in results)},
        )
        return FingerprintLookupResult(results)
