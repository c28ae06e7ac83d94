"""Card number, expiry and CVC validation, brand detection and masking.

Every error raised here is built from field names and limits only: a message or a log line must
never carry the card number or the CVC, not even a "wrong" one (it is often one typo away from a
real card).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from core.errors import InvalidRequest

__all__ = [
    "IIN_RANGES",
    "MAX_EXPIRY_YEARS_AHEAD",
    "Brand",
    "IinRange",
    "bin6",
    "detect_brand",
    "last4",
    "luhn_valid",
    "mask_pan",
    "normalize_pan",
    "validate_cvc",
    "validate_expiry",
    "validate_pan",
]


class Brand(StrEnum):
    VISA = "visa"
    MASTERCARD = "mastercard"
    AMEX = "amex"
    DISCOVER = "discover"
    JCB = "jcb"
    UNIONPAY = "unionpay"
    DINERS = "diners"
    MAESTRO = "maestro"
    UNKNOWN = "unknown"

    @property
    def lengths(self) -> frozenset[int]:
        """PAN lengths the brand issues; an unknown brand gets the ISO/IEC 7812 range 12-19."""
        return _LENGTHS[self]

    @property
    def cvc_length(self) -> int:
        return 4 if self is Brand.AMEX else 3


_LENGTHS: Final[dict[Brand, frozenset[int]]] = {
    Brand.VISA: frozenset({13, 16, 19}),
    Brand.MASTERCARD: frozenset({16}),
    Brand.AMEX: frozenset({15}),
    Brand.DISCOVER: frozenset(range(16, 20)),
    Brand.JCB: frozenset(range(16, 20)),
    Brand.UNIONPAY: frozenset(range(16, 20)),
    Brand.DINERS: frozenset(range(14, 20)),
    Brand.MAESTRO: frozenset(range(12, 20)),
    Brand.UNKNOWN: frozenset(range(12, 20)),
}


@dataclass(frozen=True, slots=True)
class IinRange:
    """Issuer identification numbers `low`..`high`, compared on the first `width` digits."""

    low: int
    high: int
    width: int
    brand: Brand


def _r(low: str, high: str, brand: Brand) -> IinRange:
    assert len(low) == len(high)
    return IinRange(int(low), int(high), len(low), brand)


# Precedence: the range with the most digits wins (6011 beats a hypothetical 60, 676770 beats
# 6767), so the table can list broad ranges and their exceptions side by side; ranges of the same
# width never overlap (a test checks it).
#
# 622126-622925 is the China UnionPay range that Discover's network also accepts. These cards
# are issued by UnionPay banks and follow UnionPay's rules, so they are detected as UnionPay; the
# explicit entry only documents the decision (the 62 range would give the same answer).
IIN_RANGES: Final[tuple[IinRange, ...]] = (
    _r("4", "4", Brand.VISA),
    _r("51", "55", Brand.MASTERCARD),
    _r("2221", "2720", Brand.MASTERCARD),
    _r("34", "34", Brand.AMEX),
    _r("37", "37", Brand.AMEX),
    _r("6011", "6011", Brand.DISCOVER),
    _r("644", "649", Brand.DISCOVER),
    _r("65", "65", Brand.DISCOVER),
    _r("3528", "3589", Brand.JCB),
    _r("62", "62", Brand.UNIONPAY),
    _r("622126", "622925", Brand.UNIONPAY),
    _r("81", "81", Brand.UNIONPAY),
    _r("300", "305", Brand.DINERS),
    _r("3095", "3095", Brand.DINERS),
    _r("36", "36", Brand.DINERS),
    _r("38", "39", Brand.DINERS),
    _r("50", "50", Brand.MAESTRO),
    _r("56", "58", Brand.MAESTRO),
    _r("6304", "6304", Brand.MAESTRO),
    _r("6390", "6390", Brand.MAESTRO),
    _r("6759", "6759", Brand.MAESTRO),
    _r("6761", "6763", Brand.MAESTRO),
    _r("676770", "676770", Brand.MAESTRO),
    _r("676774", "676774", Brand.MAESTRO),
)

_WIDTHS: Final = tuple(sorted({r.width for r in IIN_RANGES}, reverse=True))

MAX_EXPIRY_YEARS_AHEAD: Final = 50
"""Expiry years further ahead than this are typos (cards are issued for 3 to 10 years)."""


def luhn_valid(digits: str) -> bool:
    """The mod-10 check digit catches every single-digit typo and most transpositions."""
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def detect_brand(pan: str) -> Brand:
    """Brand from the leading digits; works on a partial number, as typed, too."""
    digits = _leading_digits(pan)
    for width in _WIDTHS:
        if len(digits) < width:
            continue
        prefix = int(digits[:width])
        for iin in IIN_RANGES:
            if iin.width == width and iin.low <= prefix <= iin.high:
                return iin.brand
    return Brand.UNKNOWN


def _leading_digits(text: str) -> str:
    end = 0
    while end < len(text) and end < 19 and "0" <= text[end] <= "9":
        end += 1
    return text[:end]


def normalize_pan(text: str) -> str:
    """Remove the spaces and dashes people type between groups; anything else stays and fails."""
    return text.replace(" ", "").replace("-", "")


def validate_pan(text: object) -> tuple[str, Brand]:
    """Return the normalized PAN and its brand; an unknown brand is valid here (12-19 digits)."""
    if not isinstance(text, str):
        raise _invalid_number("card number must be a string of digits")
    pan = normalize_pan(text)
    if not pan or not (pan.isascii() and pan.isdigit()):
        raise _invalid_number("card number must contain only digits, spaces and dashes")
    brand = detect_brand(pan)
    if len(pan) not in brand.lengths:
        raise _invalid_number(
            f"card number must have {_describe(brand.lengths)} digits for brand {brand.value}"
        )
    if not luhn_valid(pan):
        raise _invalid_number("card number is not valid (check digit mismatch)")
    return pan, brand


def _describe(lengths: frozenset[int]) -> str:
    ordered = sorted(lengths)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]} to {ordered[-1]}"
    return ", ".join(str(n) for n in ordered[:-1]) + f" or {ordered[-1]}"


def _invalid_number(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_number", param="number")


def validate_expiry(month: object, year: object, *, today: datetime.date) -> tuple[int, int]:
    """Return (month, four-digit year); a card is valid through the last day of its month.

    Accepts ints or strings of ASCII digits (form-encoded clients send strings). A two-digit
    year is read as 20YY, as printed on the card. Four-digit years must lie between 2000 and
    `today.year + MAX_EXPIRY_YEARS_AHEAD`. An expired card is reported on the field that makes
    it past: `exp_year` when the year is before this year, otherwise `exp_month`.

    `today` is passed in so the caller chooses the clock and the time zone (issuers honour the
    whole expiry month, so a lenient caller passes the date at UTC-12).
    """
    month_value = _small_int(month, max_digits=2)
    if month_value is None or not 1 <= month_value <= 12:
        raise InvalidRequest(
            "exp_month must be an integer from 1 to 12",
            code="invalid_expiry_month",
            param="exp_month",
        )
    year_value = _expiry_year(year)
    last_year = today.year + MAX_EXPIRY_YEARS_AHEAD
    if year_value is None or not 2000 <= year_value <= last_year:
        raise InvalidRequest(
            f"exp_year must be a year from 2000 to {last_year}, or its last two digits",
            code="invalid_expiry_year",
            param="exp_year",
        )
    if (year_value, month_value) < (today.year, today.month):
        raise InvalidRequest(
            "the card has expired",
            code="expired_card",
            param="exp_year" if year_value < today.year else "exp_month",
        )
    return month_value, year_value


def _small_int(value: object, *, max_digits: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 10**max_digits else None
    if isinstance(value, str) and 0 < len(value) <= max_digits and value.isascii():
        return int(value) if value.isdigit() else None
    return None


def _expiry_year(value: object) -> int | None:
    # Only the two-digit forms (the int 0-99, the text "YY") get the century added: "0099" is
    # the year 99, which is then refused.
    if isinstance(value, str) and len(value) not in (2, 4):
        return None
    year = _small_int(value, max_digits=4)
    if year is not None and year < 100 and not (isinstance(value, str) and len(value) == 4):
        year += 2000
    return year


def validate_cvc(cvc: object, brand: Brand) -> str:
    """Return the CVC unchanged; it is a string because leading zeros are significant."""
    if not (isinstance(cvc, str) and cvc.isascii() and cvc.isdigit()):
        raise InvalidRequest("cvc must be a string of digits", code="invalid_cvc", param="cvc")
    if len(cvc) != brand.cvc_length:
        raise InvalidRequest(
            f"cvc must have {brand.cvc_length} digits for brand {brand.value}",
            code="invalid_cvc",
            param="cvc",
        )
    return cvc


def mask_pan(pan: str, *, show_bin: bool = False) -> str:
    """Plain ASCII, one `*` per hidden digit: "************4242" or "424242******4242".

    The BIN (first 6) is shown only on request and only for PANs of 13+ digits, so at least three
    digits always stay hidden; PCI DSS allows at most the first six and last four.
    """
    _require_pan_digits(pan)
    if show_bin and len(pan) >= 13:
        return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    return "*" * (len(pan) - 4) + pan[-4:]


def last4(pan: str) -> str:
    _require_pan_digits(pan)
    return pan[-4:]


def bin6(pan: str) -> str:
    _require_pan_digits(pan)
    return pan[:6]


def _require_pan_digits(pan: str) -> None:
    # A programming error (the PAN should have gone through validate_pan): no value in the message.
    if not (12 <= len(pan) <= 19 and pan.isascii() and pan.isdigit()):
        raise ValueError("expected a normalized PAN of 12 to 19 ASCII digits")
