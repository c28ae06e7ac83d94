"""The test cards the PSP simulators share: what each card number does, brands, Luhn, expiry.

Every simulator answers the same card numbers the same way, like the sandboxes of real
processors, so front ends, tests and load tests can choose an outcome by choosing a card. A
simulator that must differ (the second PSP approves two cards the first one does not) derives its
table with `with_overrides`; nothing here knows any simulator's wire format.

Self-contained on purpose: the sandbox image carries `sandbox/` only (`core` is absent there,
tests/test_dockerfiles.py checks it), so brand detection and the Luhn check are a small copy of
`core.cards`, kept in step by a test. Nothing here ever logs, prints or keeps a card number.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "APPROVE",
    "TEST_CARDS",
    "Behaviour",
    "DeclineCode",
    "Outcome",
    "brand_of",
    "decline",
    "expired",
    "is_card_number",
    "luhn_valid",
    "outcome_for",
    "with_overrides",
]


class DeclineCode(StrEnum):
    DO_NOT_HONOR = "do_not_honor"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    EXPIRED_CARD = "expired_card"
    INCORRECT_CVC = "incorrect_cvc"
    LOST_CARD = "lost_card"
    STOLEN_CARD = "stolen_card"
    CLOSED_ACCOUNT = "closed_account"
    #: The cardholder told the issuer to stop this recurring payment (Visa R0).
    STOP_RECURRING = "stop_recurring"
    #: The cardholder revoked every recurring authorization to the merchant (Visa R1).
    REVOCATION_OF_AUTHORIZATION = "revocation_of_authorization"
    ISSUER_UNAVAILABLE = "issuer_unavailable"


class Behaviour(StrEnum):
    APPROVE = "approve"
    DECLINE = "decline"
    #: The processor fails before doing anything: a 5xx, nothing authorized or recorded.
    PROCESSING_ERROR = "processing_error"
    #: The processor authorizes (and records it) but answers only after a long delay.
    SLOW = "slow"
    #: The request waits in the processor's queue: nothing exists (an inquiry says not found)
    #: until `late_seconds` have passed, then it is approved and recorded. The caller has long
    #: given up by then: the late authorization a payment system must reverse.
    LATE = "late"


@dataclass(frozen=True, slots=True)
class Outcome:
    behaviour: Behaviour
    decline_code: DeclineCode | None = None
    #: What a real issuer passes through with a decline, so recovery can be tested: Mastercard's
    #: merchant advice code ("01" new account information, "02" try later, "03" do not try
    #: again, "21" payment cancelled, "24".."30" retry after a delay) and Visa's decline
    #: category (1 never approve, 2 not now, 3 data quality, 4 generic).
    advice_code: str | None = None
    visa_category: int | None = None


APPROVE: Final = Outcome(Behaviour.APPROVE)


def decline(
    code: DeclineCode, *, advice_code: str | None = None, visa_category: int | None = None
) -> Outcome:
    return Outcome(Behaviour.DECLINE, code, advice_code, visa_category)


#: Card number -> outcome. Any other Luhn-valid number is approved; a past expiry date declines
#: any card (except the processing-error card, which fails before the issuer is asked).
TEST_CARDS: Final[Mapping[str, Outcome]] = MappingProxyType(
    {
        "4242424242424242": APPROVE,  # visa
        "5555555555554444": APPROVE,  # mastercard
        "2223003122003222": APPROVE,  # mastercard, 2-series
        "378282246310005": APPROVE,  # amex
        "6011111111111117": APPROVE,  # discover
        "3566002020360505": APPROVE,  # jcb
        "4000000000000002": decline(DeclineCode.DO_NOT_HONOR),
        "4000000000009995": decline(DeclineCode.INSUFFICIENT_FUNDS),
        "4000000000000069": decline(DeclineCode.EXPIRED_CARD),
        "4000000000000127": decline(DeclineCode.INCORRECT_CVC),
        # Declines with the issuer's advice (docs/subscriptions.md's table).
        "4000000000009987": decline(DeclineCode.LOST_CARD, visa_category=1),
        "4000000000009979": decline(DeclineCode.STOLEN_CARD, visa_category=1),
        "4000000000009938": decline(DeclineCode.CLOSED_ACCOUNT, visa_category=1),
        "4000000000009961": decline(DeclineCode.STOP_RECURRING, visa_category=1),
        "4000000000009953": decline(DeclineCode.REVOCATION_OF_AUTHORIZATION, visa_category=1),
        "4000000000009946": decline(DeclineCode.ISSUER_UNAVAILABLE, visa_category=2),
        "5100000000000016": decline(DeclineCode.INSUFFICIENT_FUNDS, advice_code="24"),
        "5100000000000024": decline(DeclineCode.DO_NOT_HONOR, advice_code="02"),
        "5100000000000032": decline(DeclineCode.CLOSED_ACCOUNT, advice_code="03"),
        "5100000000000040": decline(DeclineCode.STOP_RECURRING, advice_code="21"),
        "5100000000000057": decline(DeclineCode.EXPIRED_CARD, advice_code="01"),
        "4000000000000119": Outcome(Behaviour.PROCESSING_ERROR),
        "4000000000000259": Outcome(Behaviour.SLOW),
        "4000000000000341": Outcome(Behaviour.LATE),
        # Declined by PSP A; the second PSP approves it (soft-decline cascading can be seen).
        "4000000000003220": decline(DeclineCode.DO_NOT_HONOR),
    }
)


def with_overrides(
    table: Mapping[str, Outcome], overrides: Mapping[str, Outcome]
) -> Mapping[str, Outcome]:
    """Another simulator's view of the table: `table` with some cards answered differently."""
    return MappingProxyType({**table, **overrides})


def outcome_for(number: str, table: Mapping[str, Outcome] = TEST_CARDS) -> Outcome:
    return table.get(number, APPROVE)


def luhn_valid(digits: str) -> bool:
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


def is_card_number(text: str) -> bool:
    """12 to 19 ASCII digits with a valid check digit (no spaces: processors want digits)."""
    return 12 <= len(text) <= 19 and luhn_valid(text)


# (prefix low, prefix high, brand), compared on the prefix's width; longest prefixes first so an
# exception (6011 Discover inside nothing else, 3528-3589 JCB) wins over a broad range.
_BRANDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("2221", "2720", "mastercard"),
    ("3528", "3589", "jcb"),
    ("6011", "6011", "discover"),
    ("644", "649", "discover"),
    ("300", "305", "diners"),
    ("51", "55", "mastercard"),
    ("34", "34", "amex"),
    ("37", "37", "amex"),
    ("36", "36", "diners"),
    ("38", "39", "diners"),
    ("65", "65", "discover"),
    ("62", "62", "unionpay"),
    ("4", "4", "visa"),
)


def brand_of(number: str) -> str:
    """visa, mastercard, amex, discover, jcb, diners, unionpay or unknown."""
    for low, high, brand in _BRANDS:
        prefix = number[: len(low)]
        if len(prefix) == len(low) and low <= prefix <= high:
            return brand
    return "unknown"


def expired(exp_month: int, exp_year: int, today: datetime.date) -> bool:
    """A card is valid through the last day of its expiry month."""
    return (exp_year, exp_month) < (today.year, today.month)
