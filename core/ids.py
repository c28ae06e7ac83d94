"""Prefixed, time-sortable, unguessable object ids, such as `pay_01jdc5v8kq0y4nq7a6m2tcw9hx`.

Layout (the ULID layout, in lower case): after the prefix and an underscore come 26 characters of
Crockford base32 (alphabet `0123456789abcdefghjkmnpqrstvwxyz`) encoding a 128-bit number:

- the top 48 bits: milliseconds since the Unix epoch (UTC), good until the year 10889;
- the low 80 bits: random, from `secrets`.

26 characters hold 130 bits, so the first character is always 0-7. Because the timestamp comes
first, and the alphabet is in ASCII order, sorting ids as strings sorts them by creation time
(to the millisecond): ids make good primary keys and pagination cursors. Ids created within the
same millisecond are ordered randomly, not by creation: nothing may rely on their order —
except the ids one `MonotonicIds` makes, which sort in the order it made them (events: two
written by one transaction list in the order they happened).
80 random bits make an id unguessable (an object id is not a secret, but knowing one must not
help to find another) and make a collision negligible (~2^40 ids in one millisecond).
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from core.errors import InvalidRequest

__all__ = [
    "ALPHABET",
    "IdPrefix",
    "MonotonicIds",
    "id_timestamp",
    "new_id",
    "new_random_id",
    "parse_id",
]

ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
_TIMESTAMP_BITS: Final = 48
_RANDOM_BITS: Final = 80
_ENCODED_LENGTH: Final = 26
_TIMESTAMP_CHARS: Final = 10
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_PREFIX: Final = re.compile(r"[a-z]{1,8}")
_BODY: Final = re.compile(rf"[0-7][{ALPHABET}]{{{_ENCODED_LENGTH - 1}}}")


class IdPrefix(StrEnum):
    PAYMENT = "pay"
    REFUND = "re"
    TOKEN = "tok"  # noqa: S105 - an id prefix, not a credential
    MERCHANT = "mer"
    EVENT = "evt"
    ATTEMPT = "att"
    PAYMENT_METHOD = "pm"
    WEBHOOK_ENDPOINT = "we"
    REQUEST = "req"


def new_id(
    prefix: str,
    *,
    now: datetime.datetime | None = None,
    randbits: Callable[[int], int] = secrets.randbits,
) -> str:
    """Return a new id; `now` and `randbits` exist so tests can pin the clock and the randomness.

    `prefix` is usually an `IdPrefix`; any 1-8 lower-case ASCII letters are accepted.
    """
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("an id prefix is 1 to 8 lower-case ASCII letters")
    millis = time.time_ns() // 1_000_000 if now is None else _millis(now)
    if not 0 <= millis < 1 << _TIMESTAMP_BITS:
        raise ValueError("the clock is outside the range of an id timestamp")
    random_part = randbits(_RANDOM_BITS)
    if not 0 <= random_part < 1 << _RANDOM_BITS:
        raise ValueError("randbits returned a value out of range")
    return f"{prefix}_{_encode((millis << _RANDOM_BITS) | random_part)}"


class MonotonicIds:
    """Ids like `new_id`'s that sort in the order this generator made them, even within one
    millisecond (the ULID spec's monotonic mode, with a random step): an id made in the same
    millisecond as the one before takes the previous random part plus 1 plus 48 random bits,
    so knowing one id still does not tell the next. If the random part would overflow, or the
    clock went back, the timestamp is carried forward a millisecond."""

    def __init__(self, randbits: Callable[[int], int] = secrets.randbits) -> None:
        self._randbits = randbits
        self._last = -1

    def new(self, prefix: str, *, now: datetime.datetime | None = None) -> str:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError("an id prefix is 1 to 8 lower-case ASCII letters")
        millis = time.time_ns() // 1_000_000 if now is None else _millis(now)
        value = (millis << _RANDOM_BITS) | self._randbits(_RANDOM_BITS)
        if value <= self._last:
            value = self._last + 1 + self._randbits(48)
        if not 0 <= value >> _RANDOM_BITS < 1 << _TIMESTAMP_BITS:
            raise ValueError("the clock is outside the range of an id timestamp")
        self._last = value
        return f"{prefix}_{_encode(value)}"


def parse_id(value: object, prefix: str, *, param: str = "id") -> str:
    """Check that `value` has the shape of an id with `prefix`; whether it exists is not known here.

    Only the canonical form (lower case) is accepted, so one object never has two spellings.
    """
    expected = f"{prefix}_"
    if (
        not isinstance(value, str)
        or not value.startswith(expected)
        or not _BODY.fullmatch(value, len(expected))
    ):
        raise InvalidRequest(
            f"{param} must be an id starting with {expected!r} followed by "
            f"{_ENCODED_LENGTH} characters",
            code="invalid_id",
            param=param,
        )
    return value


def id_timestamp(value: str) -> datetime.datetime:
    """When the id was created (UTC, millisecond precision), read back from the id itself."""
    prefix, _, body = value.rpartition("_")
    if not _PREFIX.fullmatch(prefix) or not _BODY.fullmatch(body):
        raise InvalidRequest(
            f"id must be a prefix, an underscore and {_ENCODED_LENGTH} characters",
            code="invalid_id",
            param="id",
        )
    millis = _decode(body[:_TIMESTAMP_CHARS])
    try:
        return _EPOCH + datetime.timedelta(milliseconds=millis)
    except OverflowError:
        raise InvalidRequest(
            "id carries a timestamp beyond the year 9999", code="invalid_id", param="id"
        ) from None


def _millis(moment: datetime.datetime) -> int:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the clock must return an aware datetime")
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


def _encode(number: int) -> str:
    chars = []
    for _ in range(_ENCODED_LENGTH):
        number, digit = divmod(number, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def _decode(text: str) -> int:
    number = 0
    for char in text:
        number = number * 32 + ALPHABET.index(char)
    return number


def new_random_id(prefix: str) -> str:
    """`prefix_` + 26 characters carrying 128 random bits and nothing else: for identifiers that
    must be unguessable and reveal nothing, not even when they were made (vault tokens)."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"invalid id prefix: {prefix!r}")
    return f"{prefix}_{_encode(secrets.randbits(128))}"
