"""Find card numbers in bytes: in clear, and inside hex and base64 (one level nested).

A finding is a run of 13 to 19 ASCII digits, whole digit groups separated by at most one space
or dash ("4242 4242 4242 4242", "3782-822463-10005"), that passes the Luhn check and whose
leading digits are a brand's issuer range (`core.cards.IIN_RANGES`) with a length that brand
issues. The brand rule is what keeps epoch milliseconds (they start with 1), ids and amounts
out: about one digit run in ten passes the Luhn check by chance, far fewer also fall in an
issuer range at a valid length. Test cards are card numbers too: a test card where it must not
be is the same breach of the boundary as a real one, so nothing is exempted.

Unlike `core.redaction` (a safety net that masks every Luhn-valid window, glued or not), this
reports what it is sure of: a digit run is a candidate only as whole groups, never a window
cut out of a longer run of digits, and a run inside a string of 20 or more hex characters is
skipped (PSP references, hashes and a dump's bytea values are hex: one PSP A id in a few
hundred holds a Luhn-valid 13-digit run; the hex decoder looks at those strings instead), and
the decimals of a number
are not a card number either ("0.3529…", "1.79567459…e+09": floats print 16 or 17
decimals, and a tenth of those that start like a brand pass the Luhn check; the metrics pages
are full of them). A run glued to other letters ("pan4242…") is reported.

Encoded copies are found by decoding every even-length run of at least 26 hex characters (a
13-digit number in hex) and every run of at least 20 base64 characters (standard or URL-safe,
at each of the four alignments, leniently) and scanning what comes out, once more inside that
(hex inside base64, base64 inside hex), but no deeper.

A `Finding` carries the number itself (`pan`) for the one place that needs it, the vault's
fingerprint lookup; `to_dict()`, the only form that goes into evidence, has the masked number
(first six, "…", last four) and never the digits.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from core.cards import IIN_RANGES, Brand, detect_brand, luhn_valid
from core.redaction import redact

__all__ = [
    "BLOCK_BYTES",
    "Finding",
    "Hit",
    "LineBlocks",
    "iter_blocks",
    "line_of",
    "mask",
    "safe_name",
    "scan",
    "scan_block",
]

_MIN_DIGITS: Final = 13
_MAX_DIGITS: Final = 19
#: First digits of every issuer range: epoch milliseconds (1…) are dismissed at once.
_ISSUED_FIRST_DIGITS: Final = frozenset(str(r.low)[0] for r in IIN_RANGES)
_ISSUED_FIRST_BYTES: Final = frozenset(ord(d) for d in _ISSUED_FIRST_DIGITS)
#: 13 or more characters of digits, spaces and dashes, from a digit to a digit; where two
#: separators meet, `_segments` cuts (the exact rule as one regular expression, a digit and an
#: optional separator at a time, is 2.5 times slower).
_RUN: Final = re.compile(rb"[0-9][0-9 -]{11,}[0-9]")
_GROUP: Final = re.compile(rb"[0-9]+")
_DOT: Final = ord(".")
_DIGIT_BYTES: Final = frozenset(b"0123456789")
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_HEX_CHARS: Final = frozenset(_HEX_DIGITS)
#: Digits glued into this many hex characters or more are part of a hex string.
_HEX_STRING: Final = 20
_ALNUM: Final = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Hex characters become "x", everything else ".": runs are then found with `bytes.find`.
_HEX_MARKS: Final = bytes(ord("x") if c in _HEX_CHARS else ord(".") for c in range(256))
#: A 13-digit number takes 26 hex characters.
_HEX_NEEDLE: Final = b"x" * 26
#: Three ASCII digits filling one base64 quantum (see `_base64_runs`).
_BASE64_DIGITS: Final = re.compile(rb"[MNO][DTjz][AEIMQUYcgk][w-z0-5]")
_BASE64_TAIL: Final = re.compile(rb"[A-Za-z0-9+/_-]+")
_BASE64_CHARS: Final = frozenset(_ALNUM | frozenset(b"+/_-"))
_MIN_BASE64: Final = 20
_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
#: What decoded bytes must contain to be worth scanning: a digit run or an encoding of one.
_MAY_HOLD_A_NUMBER: Final = re.compile(
    rb"[0-9][0-9 -]{11,}[0-9]|[MNO][DTjz][AEIMQUYcgk][w-z0-5]|[0-9A-Fa-f]{26}"
)
#: Decodings inside decodings: hex inside base64 (a JSON body's bytes), base64 inside hex (a
#: bytea column in a dump holding base64), and no deeper.
_MAX_DEPTH: Final = 2
#: What `iter_blocks` hands to the scanner at a time (cut at a line end).
BLOCK_BYTES: Final = 4 * 1024 * 1024


def mask(pan: str) -> str:
    """First six, an ellipsis, last four: never more of the number (PCI DSS 3.4.1)."""
    return f"{pan[:6]}…{pan[-4:]}"


@dataclass(frozen=True, slots=True)
class Hit:
    """A card number at `offset` of a block (for encoded ones, the offset of the encoded run)."""

    offset: int
    pan: str = field(repr=False)
    brand: Brand
    #: "clear", "hex", "base64", or the layers outside in: "base64+hex".
    encoding: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A card number found somewhere; `pan` is for the vault's lookup only, never evidence."""

    pan: str = field(repr=False)
    brand: Brand
    encoding: str
    #: Where, as the caller names it: "payments (dump line 812, row 3)", "api.log:17", a key.
    location: str
    source: str = ""

    @property
    def masked(self) -> str:
        return mask(self.pan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "masked": self.masked,
            "brand": str(self.brand),
            "encoding": self.encoding,
            "source": self.source,
            "location": self.location,
        }


def _brand_of(pan: str) -> Brand | None:
    if pan[0] not in _ISSUED_FIRST_DIGITS:
        return None
    brand = detect_brand(pan)
    if brand is Brand.UNKNOWN or len(pan) not in brand.lengths or not luhn_valid(pan):
        return None
    return brand


def _not_standalone(data: bytes, start: int, end: int) -> bool:
    """Whether the digits at start..end are part of something else: the decimals of a number
    ("0.3529…", "1.79567459…e+09": the metrics pages and logs are full of them, and
    their 16-19 decimals pass the Luhn check one time in ten) or a token of hex characters."""
    if start >= 2 and data[start - 1] == _DOT and data[start - 2] in _DIGIT_BYTES:
        return True
    return _hex_glued(data, start, end)


def _hex_glued(data: bytes, start: int, end: int) -> bool:
    """Whether the digits at start..end sit inside a string of hex characters (an id, a hash, a
    bytea value) rather than standing alone or next to a word ("card4242…", "pan4242…"): glued
    to a hex letter, with at least `_HEX_STRING` hex characters in all (looked at no further)."""
    before = start
    while before > 0 and start - before < _HEX_STRING and data[before - 1] in _HEX_CHARS:
        before -= 1
    after = end
    while after < len(data) and after - end < _HEX_STRING and data[after] in _HEX_CHARS:
        after += 1
    return (before < start or after > end) and after - before >= _HEX_STRING


def _segments(data: bytes, start: int, end: int) -> Iterator[list[tuple[int, int]]]:
    """The digit groups of data[start:end], split where two groups are more than one
    character apart ("2026-11-26  4242…": two separators are a boundary)."""
    segment: list[tuple[int, int]] = []
    for group in _GROUP.finditer(data, start, end):
        if segment and group.start() - segment[-1][1] > 1:
            yield segment
            segment = []
        segment.append(group.span())
    if segment:
        yield segment


def _clear(data: bytes) -> Iterator[tuple[int, str, Brand]]:
    """(offset, number, brand) of every card number written in clear in `data`."""
    for run in _RUN.finditer(data):
        text = run[0]
        if text.isdigit():  # one group, the common case (epoch milliseconds): no more work
            if len(text) > _MAX_DIGITS or text[0] not in _ISSUED_FIRST_BYTES:
                continue
            pan = text.decode()
            brand = _brand_of(pan)
            if brand is not None and not _not_standalone(data, run.start(), run.end()):
                yield run.start(), pan, brand
            continue
        for groups in _segments(data, *run.span()):
            index = 0
            while index < len(groups):
                found = None
                digits = b""
                # The shortest span of whole groups from here that is a card number: a number
                # followed by a space and its CVC, or preceded by a date, is still found.
                for last in range(index, len(groups)):
                    digits += data[groups[last][0] : groups[last][1]]
                    if len(digits) > _MAX_DIGITS:
                        break
                    if len(digits) < _MIN_DIGITS:
                        continue
                    pan = digits.decode()
                    brand = _brand_of(pan)
                    if brand is not None:
                        start, end = groups[index][0], groups[last][1]
                        if not _not_standalone(data, start, end):
                            found = (last, start, pan, brand)
                        break
                if found is None:
                    index += 1
                    continue
                last, start, pan, brand = found
                yield start, pan, brand
                index = last + 1


def _hex_runs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, decoded bytes) of every run of 26+ hex characters (both halves of an odd one:
    a hex letter before or after an encoding glues onto it).

    Found with `bytes.find` on a translated copy (hex characters to "x"), several times faster
    than a regular expression that tries a match at every hex letter of ordinary text."""
    marks = data.translate(_HEX_MARKS)
    at = marks.find(_HEX_NEEDLE)
    while at >= 0:
        end = marks.find(b".", at)
        end = len(data) if end < 0 else end
        text = data[at:end]
        for piece in (text,) if len(text) % 2 == 0 else (text[:-1], text[1:]):
            yield at, binascii.unhexlify(piece)
        at = marks.find(_HEX_NEEDLE, end)


def _base64_runs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, decoded bytes) of every base64 run of 20+ characters that encodes three ASCII
    digits in a row somewhere, decoded at the alignment those digits show.

    Three digits d1 d2 d3 always encode to `[MNO][DTjz][AEIMQUYcgk][w-z0-5]` when they fill
    one 4-character quantum, and a card number, grouped or not, always fills one. So instead
    of decoding every long word, id and path at four alignments, the scan searches that
    pattern (in C) and decodes only the runs around its matches, at the alignment of the match.
    """
    done: set[tuple[int, int]] = set()
    run_start = run_end = -1
    for digits in _BASE64_DIGITS.finditer(data):
        at = digits.start()
        if at >= run_end:
            run_start = at
            while run_start > 0 and data[run_start - 1] in _BASE64_CHARS:
                run_start -= 1
            tail = _BASE64_TAIL.match(data, at)
            run_end = tail.end() if tail else at
        if run_end - run_start < _MIN_BASE64:
            continue
        shift = (at - run_start) % 4
        if (run_start, shift) in done:
            continue
        done.add((run_start, shift))
        piece = data[run_start + shift : run_end].translate(_URLSAFE)
        piece = piece[: len(piece) - 1] if len(piece) % 4 == 1 else piece
        piece += b"=" * (-len(piece) % 4)
        try:
            decoded = binascii.a2b_base64(piece, strict_mode=False)
        except binascii.Error:  # (lenient mode raises only for hopeless padding)
            continue
        yield run_start, decoded


def scan_block(data: bytes, _layers: tuple[str, ...] = ()) -> list[Hit]:
    """Every card number in `data`, in clear and encoded, with its offset in `data`."""
    encoding = "+".join(_layers) or "clear"
    hits = [Hit(offset, pan, brand, encoding) for offset, pan, brand in _clear(data)]
    if len(_layers) >= _MAX_DEPTH:
        return hits
    seen = {(hit.offset, hit.pan) for hit in hits}
    for layer, runs in (("hex", _hex_runs(data)), ("base64", _base64_runs(data))):
        for offset, decoded in runs:
            if not _MAY_HOLD_A_NUMBER.search(decoded):
                continue  # most decoded runs are hashes and ids: random bytes
            for inner in scan_block(decoded, (*_layers, layer)):
                if (offset, inner.pan) not in seen:
                    seen.add((offset, inner.pan))
                    hits.append(Hit(offset, inner.pan, inner.brand, inner.encoding))
    return hits


def scan(data: bytes | str, location: str, source: str = "") -> list[Finding]:
    """Every card number in one value (a Redis value, a metrics page), all at `location`."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return [Finding(h.pan, h.brand, h.encoding, location, source) for h in scan_block(raw)]


class LineBlocks:
    """Cuts a byte stream into blocks that end at line ends, so a number never straddles two
    blocks (a line longer than `size` is cut where it must be), each with its first line's
    number. `feed` what arrives, `close` at the end; both return the blocks ready to scan."""

    def __init__(self, size: int = BLOCK_BYTES) -> None:
        self.size = size
        self.line = 1
        self.pending = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self.pending += chunk
        if len(self.pending) < self.size:
            return []
        cut = self.pending.rfind(b"\n") + 1 or len(self.pending)
        return [self._take(cut)]

    def close(self) -> list[tuple[int, bytes]]:
        return [self._take(len(self.pending))] if self.pending else []

    def _take(self, cut: int) -> tuple[int, bytes]:
        block = bytes(self.pending[:cut])
        del self.pending[:cut]
        first = self.line
        self.line += block.count(b"\n")
        return first, block


def iter_blocks(chunks: Iterable[bytes], size: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block) from a byte stream (see `LineBlocks`)."""
    blocks = LineBlocks(size)
    for chunk in chunks:
        yield from blocks.feed(chunk)
    yield from blocks.close()


def safe_name(raw: bytes | str, limit: int = 200) -> str:
    """A name for the evidence (a Redis key, a file, a table): as it is, unless it holds a card
    number in any encoding, which is then all that is said of it, masked."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    hits = scan_block(data)
    if hits:
        numbers = ", ".join(f"{mask(h.pan)} ({h.encoding})" for h in hits)
        return f"<a name holding {numbers}>"
    return redact(data.decode("utf-8", "backslashreplace"))[:limit]


def line_of(block: bytes, first_line: int, offset: int) -> int:
    return first_line + block.count(b"\n", 0, offset)
