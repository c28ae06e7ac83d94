"""Mask card numbers in free text: the last line of defence before a log line leaves the process.

Code must never log card data; this exists for the day it does by accident (an exception that
echoes a request body, a debug line, a library's log). It is deliberately over-eager.

What is masked: every window of 13 to 19 consecutive digits that passes the Luhn check, where the
digits may be separated by one space or one dash ("4242 4242 4242 4242", "3782-822463-10005"),
wherever it is: inside JSON, glued to letters ("card=4242424242424242x") or inside a longer run of
digits. Overlapping windows are masked together. Each masked stretch becomes
`[REDACTED PAN ****4242]`, keeping only its last four digits.

What is kept: digit runs with no Luhn-valid window of 13-19 digits, so amounts, dates, phone
numbers and most ids stay readable. About one window in ten passes the Luhn check by chance, so
a run of 13 digits is masked with a probability of about 10%, and a run of 16+ digits (which has
many windows) usually is: a price worth paying for a safety net. Runs over 1,000 digits are
masked whole, as `[REDACTED 1234 DIGITS]`, to bound the work.

Digits are Unicode decimal digits (so a PAN typed in full-width digits is masked as well).
"""

from __future__ import annotations

import re
from typing import Final, TypeVar, cast

__all__ = ["MAX_PAN_DIGITS", "MIN_PAN_DIGITS", "redact", "redact_value"]

MIN_PAN_DIGITS: Final = 13
MAX_PAN_DIGITS: Final = 19
_MAX_RUN_DIGITS: Final = 1000
_MAX_DEPTH: Final = 32
_SEPARATORS: Final = " -"

# A run of at least 13 digits, with at most one separator between two digits. There is no
# ambiguity for the engine to backtrack over (a character is a digit or a separator), so this
# stays linear; it is both the fast precheck and the scanner.
_CANDIDATE: Final = re.compile(r"\d(?:[ -]?\d){12,}")

# Luhn contribution of a digit in a doubled position.
_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)

_T = TypeVar("_T")


def redact(text: str) -> str:
    """Return `text` with every Luhn-valid 13-19 digit window masked (see the module docstring)."""
    if len(text) < MIN_PAN_DIGITS:
        return text
    pieces: list[str] = []
    done = 0
    for match in _CANDIDATE.finditer(text):
        run_start = match.start()
        for start, end, replacement in _mask_run(match.group()):
            pieces.append(text[done : run_start + start])
            pieces.append(replacement)
            done = run_start + end
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _mask_run(run: str) -> list[tuple[int, int, str]]:
    """(start, end, replacement) for each stretch of `run` to mask, in order, not overlapping."""
    positions = [i for i, char in enumerate(run) if char not in _SEPARATORS]
    count = len(positions)
    if count > _MAX_RUN_DIGITS:
        return [(0, len(run), f"[REDACTED {count} DIGITS]")]
    values = [int(run[i]) for i in positions]
    # Prefix sums of the Luhn contributions, for both parities of the doubled positions, so
    # that every window is checked in constant time. In a window ending at digit `e`, digit `k`
    # is doubled when e - k is odd, that is when k and e have different parities.
    odd_doubled = [0] * (count + 1)
    even_doubled = [0] * (count + 1)
    for k, value in enumerate(values):
        odd_doubled[k + 1] = odd_doubled[k] + (_DOUBLED[value] if k % 2 else value)
        even_doubled[k + 1] = even_doubled[k] + (value if k % 2 else _DOUBLED[value])
    windows: list[tuple[int, int]] = []
    for end in range(MIN_PAN_DIGITS - 1, count):
        sums = odd_doubled if end % 2 == 0 else even_doubled
        for length in range(MIN_PAN_DIGITS, min(MAX_PAN_DIGITS, end + 1) + 1):
            start = end - length + 1
            if (sums[end + 1] - sums[start]) % 10 == 0:
                windows.append((start, end))
    if not windows:
        return []
    windows.sort()
    merged: list[list[int]] = []
    for start, end in windows:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    result = []
    for start, end in merged:
        last_four = "".join(run[positions[k]] for k in range(end - 3, end + 1))
        result.append((positions[start], positions[end] + 1, f"[REDACTED PAN ****{last_four}]"))
    return result


def redact_value(value: _T) -> _T:
    """Redact every string in a structure of dicts, lists, tuples and sets (for structured logs).

    Returns a new structure; the input is never modified. Dict keys are redacted too. Ints and
    floats whose text holds a card number become the redacted string, bytes are redacted as
    Latin-1 text and stay bytes. Mapping and sequence subclasses come back as plain dicts, lists
    and tuples. Other objects are returned as they are, so the rendered line should be passed
    through `redact` as well. Containers nested deeper than 32 levels (or cyclic) are replaced
    by a placeholder rather than walked.
    """
    return cast(_T, _redact(value, 0))


def _redact(value: object, depth: int) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        text = str(value)
        redacted = redact(text)
        return value if redacted == text else redacted
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1")
        redacted = redact(text)
        return value if redacted == text else type(value)(redacted.encode("latin-1"))
    if isinstance(value, dict | list | tuple | set | frozenset):
        if depth >= _MAX_DEPTH:
            return "[REDACTED: nested too deep]"
        if isinstance(value, dict):
            return {_redact(k, depth + 1): _redact(v, depth + 1) for k, v in value.items()}
        items = [_redact(item, depth + 1) for item in value]
        if isinstance(value, list):
            return items
        if isinstance(value, tuple):
            return tuple(items)
        return frozenset(items) if isinstance(value, frozenset) else set(items)
    return value
