"""A detect-secrets plugin: card numbers in the repository.

Flags every Luhn-valid run of 13 to 19 digits (spaces or dashes between digits allowed) that
stands on its own and is not one of the simulators' documented test cards (`sandbox.cards`,
PSP B's error card). A real card number committed by mistake is a PCI incident; the test cards
are what the docs, tests and demos are meant to use.

Loaded by tessera/security/secrets_check.py (detect-secrets custom plugin, by path).
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any

from detect_secrets.plugins.base import BasePlugin

from sandbox.cards import TEST_CARDS, luhn_valid
from sandbox.psp_b import ERROR_CARD

#: The documented test cards: any other Luhn-valid number is reported.
ALLOWED_TEST_CARDS = frozenset({*TEST_CARDS, ERROR_CARD})

#: A digit run not glued to letters, digits or "_" (an identifier's digits are not a card), nor
#: the fraction of a decimal number (a long fraction in a benchmark's JSON, "0.4135…").
_CANDIDATE = re.compile(r"(?<![0-9A-Za-z_])(?<!\d\.)\d(?:[ -]?\d){12,18}(?![0-9A-Za-z_])")


def card_numbers(text: str) -> Generator[str, None, None]:
    """Luhn-valid 13-19 digit numbers in `text` that are not documented test cards."""
    for match in _CANDIDATE.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits) and digits not in ALLOWED_TEST_CARDS:
            yield match.group()


#: What detect-secrets calls a finding of this plugin (the kind, not a secret).
FINDING_KIND = "Card number (Luhn-valid, not a documented test card)"


class LuhnCardNumberDetector(BasePlugin):
    """detect-secrets' interface: the raw values found in one line."""

    secret_type = FINDING_KIND

    def analyze_string(self, string: str, **_: Any) -> Generator[str, None, None]:
        # Reported as "PAN <digits>": detect-secrets drops any value without a letter in it
        # (its `is_not_alphanumeric_string` filter), and a bare card number has none. Only the
        # value's hash is kept in the baseline.
        for number in card_numbers(string):
            yield "PAN " + re.sub(r"[ -]", "", number)
