"""Money as integers in minor units, never floats.

A float cannot represent 0.10 exactly, and a rounding error in a payment is a real loss, so every
amount in Tessera is an `int` counted in the currency's minor unit (cents for EUR, yen for JPY,
fils for KWD). Decimal text ("10.50") is only an input and output format, converted here with
integer arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from core.errors import InvalidRequest

__all__ = [
    "CURRENCIES",
    "ISO_4217_EXPONENTS",
    "MAX_AMOUNT",
    "Currency",
    "Money",
    "format_major",
    "parse_currency",
    "parse_major",
    "validate_amount",
]

MAX_AMOUNT: Final = 99_999_999
"""Default upper bound of a single amount, in minor units (999,999.99 EUR, 99,999,999 JPY).

It fits in 32 bits and keeps a typo (an extra zero or two) from becoming a real charge; a merchant
with larger payments gets an explicit, larger `maximum`.
"""

# Active ISO 4217 codes and their minor-unit exponents (the "N.A." codes - precious metals, SDR,
# test and "no currency" codes - are left out: they are not payment currencies). ANG and XCG are
# both listed while the Netherlands Antillean guilder is being replaced by the Caribbean guilder.
_ISO_4217: Final[dict[str, int]] = {
    "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "ANG": 2, "AOA": 2, "ARS": 2, "AUD": 2, "AWG": 2,
    "AZN": 2, "BAM": 2, "BBD": 2, "BDT": 2, "BGN": 2, "BHD": 3, "BIF": 0, "BMD": 2, "BND": 2,
    "BOB": 2, "BOV": 2, "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2, "BZD": 2, "CAD": 2,
    "CDF": 2, "CHE": 2, "CHF": 2, "CHW": 2, "CLF": 4, "CLP": 0, "CNY": 2, "COP": 2, "COU": 2,
    "CRC": 2, "CUP": 2, "CVE": 2, "CZK": 2, "DJF": 0, "DKK": 2, "DOP": 2, "DZD": 2, "EGP": 2,
    "ERN": 2, "ETB": 2, "EUR": 2, "FJD": 2, "FKP": 2, "GBP": 2, "GEL": 2, "GHS": 2, "GIP": 2,
    "GMD": 2, "GNF": 0, "GTQ": 2, "GYD": 2, "HKD": 2, "HNL": 2, "HTG": 2, "HUF": 2, "IDR": 2,
    "ILS": 2, "INR": 2, "IQD": 3, "IRR": 2, "ISK": 0, "JMD": 2, "JOD": 3, "JPY": 0, "KES": 2,
    "KGS": 2, "KHR": 2, "KMF": 0, "KPW": 2, "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2, "LAK": 2,
    "LBP": 2, "LKR": 2, "LRD": 2, "LSL": 2, "LYD": 3, "MAD": 2, "MDL": 2, "MGA": 2, "MKD": 2,
    "MMK": 2, "MNT": 2, "MOP": 2, "MRU": 2, "MUR": 2, "MVR": 2, "MWK": 2, "MXN": 2, "MXV": 2,
    "MYR": 2, "MZN": 2, "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2, "NPR": 2, "NZD": 2, "OMR": 3,
    "PAB": 2, "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2, "PLN": 2, "PYG": 0, "QAR": 2, "RON": 2,
    "RSD": 2, "RUB": 2, "RWF": 0, "SAR": 2, "SBD": 2, "SCR": 2, "SDG": 2, "SEK": 2, "SGD": 2,
    "SHP": 2, "SLE": 2, "SOS": 2, "SRD": 2, "SSP": 2, "STN": 2, "SVC": 2, "SYP": 2, "SZL": 2,
    "THB": 2, "TJS": 2, "TMT": 2, "TND": 3, "TOP": 2, "TRY": 2, "TTD": 2, "TWD": 2, "TZS": 2,
    "UAH": 2, "UGX": 0, "USD": 2, "USN": 2, "UYI": 0, "UYU": 2, "UYW": 4, "UZS": 2, "VED": 2,
    "VES": 2, "VND": 0, "VUV": 0, "WST": 2, "XAF": 0, "XCD": 2, "XCG": 2, "XOF": 0, "XPF": 0,
    "YER": 2, "ZAR": 2, "ZMW": 2, "ZWG": 2,
}  # fmt: skip

ISO_4217_EXPONENTS: Final[Mapping[str, int]] = MappingProxyType(_ISO_4217)


@dataclass(frozen=True, slots=True)
class Currency:
    """An ISO 4217 currency; build it with `parse_currency` so the exponent is the official one."""

    code: str
    exponent: int

    @property
    def scale(self) -> int:
        """Minor units in one major unit (100 for EUR, 1 for JPY, 1000 for KWD)."""
        scale: int = 10**self.exponent
        return scale

    def __str__(self) -> str:
        return self.code


CURRENCIES: Final[Mapping[str, Currency]] = MappingProxyType(
    {code: Currency(code, exponent) for code, exponent in _ISO_4217.items()}
)


def parse_currency(code: object) -> Currency:
    """Accept only the canonical form, so one currency never has two spellings in the database."""
    if not (
        isinstance(code, str)
        and len(code) == 3
        and code.isascii()
        and code.isalpha()
        and code.isupper()
    ):
        raise InvalidRequest(
            "currency must be a three-letter ISO 4217 code in upper case, such as EUR",
            code="invalid_currency",
            param="currency",
        )
    currency = CURRENCIES.get(code)
    if currency is None:
        raise InvalidRequest(
            "currency is not a supported ISO 4217 currency",
            code="invalid_currency",
            param="currency",
        )
    return currency


def validate_amount(amount: object, currency: Currency, *, maximum: int = MAX_AMOUNT) -> int:
    """Check a client-supplied amount; `bool` is refused although Python counts it as an int."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRequest(
            f"amount must be an integer in the smallest unit of {currency.code}",
            code="amount_invalid",
            param="amount",
        )
    if amount <= 0:
        raise InvalidRequest(
            f"amount must be at least 1 (in the smallest unit of {currency.code})",
            code="amount_too_small",
            param="amount",
        )
    if amount > maximum:
        raise InvalidRequest(
            f"amount must be at most {maximum} ({format_major(maximum, currency)} {currency.code})",
            code="amount_too_large",
            param="amount",
        )
    return amount


def format_major(amount: int, currency: Currency) -> str:
    """Render minor units as decimal text with exactly `exponent` decimals, without floats."""
    sign = "-" if amount < 0 else ""
    if currency.exponent == 0:
        return f"{sign}{abs(amount)}"
    major, minor = divmod(abs(amount), currency.scale)
    return f"{sign}{major}.{minor:0{currency.exponent}d}"


_MAJOR_TEXT = re.compile(r"-?([0-9]+)(?:\.([0-9]+))?", re.ASCII)
_MAX_MAJOR_TEXT = 40  # far above any real amount; bounds the work on hostile input


def parse_major(text: object, currency: Currency) -> int:
    """Inverse of `format_major`; refuses extra decimals rather than rounding money away.

    "10.5" EUR is 1050 and "10.500" EUR is refused, as is "10.5" JPY. A leading "-" is accepted
    so that the two functions are inverses on every int; callers taking payment amounts still
    pass the result through `validate_amount`.
    """
    if not isinstance(text, str) or len(text) > _MAX_MAJOR_TEXT:
        raise _amount_invalid(currency)
    match = _MAJOR_TEXT.fullmatch(text)
    if match is None:
        raise _amount_invalid(currency)
    major, minor = match.group(1), match.group(2) or ""
    if match.group(2) is not None and len(minor) > currency.exponent:
        raise InvalidRequest(
            f"amount has more than {currency.exponent} decimals, the precision of {currency.code}",
            code="amount_invalid",
            param="amount",
        )
    value = int(major) * currency.scale + int(minor.ljust(currency.exponent, "0") or "0")
    return -value if text.startswith("-") else value


def _amount_invalid(currency: Currency) -> InvalidRequest:
    return InvalidRequest(
        f"amount must be a decimal number of {currency.code}, such as "
        f"{format_major(1050 * currency.scale // 100, currency)}",
        code="amount_invalid",
        param="amount",
    )


@dataclass(frozen=True, slots=True)
class Money:
    """An amount tied to its currency, so adding EUR to JPY is an error instead of a number."""

    amount: int
    currency: Currency

    def __post_init__(self) -> None:
        if not isinstance(self.amount, int) or isinstance(self.amount, bool):
            raise TypeError("Money.amount must be an int in minor units")

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __str__(self) -> str:
        return f"{format_major(self.amount, self.currency)} {self.currency.code}"

    @classmethod
    def zero(cls, currency: Currency) -> Money:
        return cls(0, currency)

    def _same_currency(self, other: Money) -> None:
        if not isinstance(other, Money):
            raise TypeError("Money can only be combined with Money")
        if other.currency != self.currency:
            raise InvalidRequest(
                f"cannot combine amounts in {self.currency.code} and {other.currency.code}",
                code="currency_mismatch",
                param="currency",
            )
