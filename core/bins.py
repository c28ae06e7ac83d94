"""Country of issue by BIN, for routing rules.

A deliberately small sample table: the simulators' test cards and a few well-known ranges. A
production deployment replaces it with a licensed BIN database behind the same function; an
unknown BIN has no country, and a rule that names a country then does not match.
"""

from __future__ import annotations

from typing import Final

#: (first BIN, last BIN, ISO 3166-1 alpha-2), six-digit prefixes, most specific first.
_RANGES: Final[tuple[tuple[int, int, str], ...]] = (
    (424242, 424242, "US"),  # Visa test card
    (400000, 400000, "US"),  # Visa test cards (declines, errors)
    (555555, 555555, "US"),  # Mastercard test card
    (222300, 222300, "US"),  # Mastercard 2-series test card
    (378282, 378282, "US"),  # American Express test card
    (601111, 601111, "US"),  # Discover test card
    (356600, 356600, "JP"),  # JCB test card
    (497010, 497019, "FR"),  # Cartes Bancaires co-branded Visa (sample)
    (453997, 453997, "DE"),  # sample German Visa range
)


def country_of(bin6: str) -> str | None:
    if len(bin6) != 6 or not bin6.isdigit():
        return None
    number = int(bin6)
    for first, last, country in _RANGES:
        if first <= number <= last:
            return country
    return None
