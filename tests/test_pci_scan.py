"""The card-number scanner of the assessor's kit (tessera/pci/scan.py): the simulators' test
cards planted in clear, hex and base64 are found, masked; what only looks like one is not."""

from __future__ import annotations

import base64
import json
import secrets
import time

import pytest

from core.cards import detect_brand, luhn_valid
from sandbox.cards import TEST_CARDS
from tessera.pci.scan import Finding, iter_blocks, line_of, mask, safe_name, scan, scan_block

CARDS = sorted(TEST_CARDS)


def found(data: bytes | str) -> list[tuple[str, str]]:
    return [(f.pan, f.encoding) for f in scan(data, "here")]


def luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def grouped(pan: str, separator: str) -> str:
    return separator.join(pan[i : i + 4] for i in range(0, len(pan), 4))


@pytest.mark.parametrize("pan", CARDS)
def test_every_test_card_is_found_in_clear_as_people_and_programs_write_it(pan: str) -> None:
    plain = [
        pan,
        f'{{"number": "{pan}", "amount": 2599}}',
        grouped(pan, " "),
        grouped(pan, "-"),
        f"2026-11-26 12:00:01 card={pan} cvc=123",  # a date before, a CVC after
        f"{pan} 123",
        f"pan{pan}",  # glued to a word
        f"card{pan}",  # ... even one that ends in a hex letter
        f"tok_{pan}",
        f"{pan}\t2599\tEUR",  # a COPY row of pg_dump
        f"/v1/cards/{pan}/verify?x=1",
    ]
    for text in plain:
        assert found(text) == [(pan, "clear")], text


@pytest.mark.parametrize("pan", CARDS)
def test_every_test_card_is_found_in_hex_and_base64_and_one_inside_the_other(pan: str) -> None:
    body = json.dumps({"card": {"number": pan, "cvc": "123"}}).encode()
    encoded = {
        "hex": [
            pan.encode().hex(),
            pan.encode().hex().upper(),
            "\\\\x" + body.hex(),  # a bytea column in a pg_dump COPY row
            "f" + pan.encode().hex(),  # odd length: a hex letter glued on
        ],
        "base64": [
            b64(pan.encode()),
            b64(body),
            b64(body).rstrip("="),
            base64.urlsafe_b64encode(b"\xfb\xff" + pan.encode()).decode(),  # - and _
            "data-" + b64(b"x" + body),  # glued to a prefix, misaligned
            f"Authorization: Basic {b64(f'{pan}:x'.encode())}",
        ],
        "base64+hex": [b64(body.hex().encode())],
        "hex+base64": ["\\\\x" + b64(body).encode().hex()],
    }
    for encoding, texts in encoded.items():
        for text in texts:
            assert found(text) == [(pan, encoding)], (encoding, text)


def test_several_numbers_are_each_found_once_with_where_they_are() -> None:
    amex, visa, mastercard = "378282246310005", "4242424242424242", "5555555555554444"
    text = (
        f"first {amex} then {grouped(visa, ' ')}\n"
        f"and {b64(mastercard.encode())} and {visa.encode().hex()}\n"
    ).encode()
    hits = scan_block(text)
    assert [(h.pan, h.encoding) for h in hits] == [
        (amex, "clear"),
        (visa, "clear"),
        (visa, "hex"),
        (mastercard, "base64"),
    ]
    assert [line_of(text, 1, h.offset) for h in hits] == [1, 1, 2, 2]
    assert text[hits[0].offset : hits[0].offset + 15] == amex.encode()


def test_what_only_looks_like_a_card_number_is_not_reported() -> None:
    epoch_millis = luhn_complete("171234567890")  # 13 digits, Luhn-valid, no issuer starts 1
    no_brand = luhn_complete("990000000000000")  # 16 digits, Luhn-valid, no brand
    not_luhn = "4242424242424241"
    wrong_length = luhn_complete("5555555555554444")  # 17 digits: no Mastercard has 17
    assert luhn_valid(epoch_millis)
    assert luhn_valid(no_brand)
    assert luhn_valid(wrong_length)
    assert len(wrong_length) == 17
    assert detect_brand(wrong_length).value == "mastercard"
    hex_reference = "5f3c2a" + luhn_complete("400000000001") + "abc"  # a PSP id: all hex
    decimals = luhn_complete("352967447700012")  # a JCB number's shape and check digit
    # A bytea value in a dump: hex of a JSON body, whose hex holds a Diners-shaped digit run
    bytea = "\\\\x7b226964223a22706179" + luhn_complete("386238747331303") + "7a6271396838"
    negatives = [
        epoch_millis,
        f'{{"ts": {epoch_millis}, "amount": 259900, "currency": "EUR"}}',
        no_brand,
        not_luhn,
        wrong_length,
        hex_reference,
        "4242424242424242" + "42424",  # a card inside a longer run of digits
        "pay_01jd8f3z4y5x6w7v8t9s0r1q2p",  # ULID-ish ids  # pragma: allowlist secret
        "req_01HX4242424242ZZQ7M2N8K4",
        "amount=1999 refunded=250 balance=1749 2026-11-26T12:00:00.123456Z",
        "+44 20 7946 0958, +1-202-555-0173",  # phone numbers
        "1712345678901 1712345678902 1712345678903",
        f"http_request_duration_seconds_sum 0.{decimals}",  # a float's decimals
        f'"created": 1.{decimals}e+09',
        bytea,
        b64(no_brand.encode()),
        no_brand.encode().hex(),
    ]
    for text in negatives:
        assert found(text) == [], text
    random_tokens = [secrets.token_urlsafe(32) + " " + secrets.token_hex(32) for _ in range(2000)]
    assert found("\n".join(random_tokens)) == []


def test_a_finding_shows_six_and_four_digits_at_most() -> None:
    (finding,) = scan(f"x {CARDS[0]} y", "api.log:3", "logs")
    assert finding.masked == mask(CARDS[0]) == f"{CARDS[0][:6]}…{CARDS[0][-4:]}"
    assert finding.to_dict() == {
        "masked": finding.masked,
        "brand": str(detect_brand(CARDS[0])),
        "encoding": "clear",
        "source": "logs",
        "location": "api.log:3",
    }
    assert CARDS[0] not in repr(finding)
    assert CARDS[0] not in json.dumps(finding.to_dict())
    short = luhn_complete("422222222222")  # a 13-digit Visa: 3 digits stay hidden
    assert mask(short) == f"{short[:6]}…{short[-4:]}"
    assert isinstance(finding, Finding)


def test_blocks_end_at_line_ends_and_keep_the_line_count() -> None:
    lines = [f"line {i} nothing here".encode() for i in range(1, 200)]
    lines[150] = f"line 151 card {CARDS[1]}".encode()
    lines[180] = f"line 181 card {b64(CARDS[2].encode())}".encode()
    data = b"\n".join(lines) + b"\n"
    chunks = [data[i : i + 97] for i in range(0, len(data), 97)]
    located = []
    for first_line, block in iter_blocks(chunks, size=500):
        assert block.endswith(b"\n")
        for hit in scan_block(block):
            located.append((hit.pan, line_of(block, first_line, hit.offset)))
    assert located == [(CARDS[1], 151), (CARDS[2], 181)]


def test_many_megabytes_of_logs_hold_exactly_the_planted_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Correctness at scale (and the rate, printed: not asserted)."""
    template = (
        '{{"event": "request", "method": "POST", "path": "/v1/payments/pay_{id}/capture", '
        '"status": 200, "duration_ms": 12.{n}, "request_id": "req_{rid}", "ts": {ts}, '
        '"timestamp": "2026-11-26T12:00:00.{n:06d}Z", "processor_reference": "{ref}", '
        '"amount": {amount}, "level": "info", "service": "api"}}'
    )
    lines = [
        template.format(
            id=secrets.token_hex(13),
            n=n,
            rid=secrets.token_urlsafe(18),
            ts=1764158400000 + n,
            ref=secrets.token_hex(12),
            amount=n * 7,
        )
        for n in range(20_000)
    ]
    planted = {1_000: CARDS[0], 9_999: CARDS[3], 19_000: CARDS[4]}
    for n, pan in planted.items():
        lines[n] = lines[n].replace('"level"', f'"body": "{b64(pan.encode())}", "level"')
    data = ("\n".join(lines) + "\n").encode()
    started = time.perf_counter()
    located = {}
    for first_line, block in iter_blocks([data], size=1 << 20):
        for hit in scan_block(block):
            located[line_of(block, first_line, hit.offset) - 1] = hit.pan
    seconds = time.perf_counter() - started
    assert located == planted
    rate = len(data) / 1e6 / seconds
    with capsys.disabled():
        print(f"\nscan: {len(data) / 1e6:.1f} MB of JSON log lines at {rate:.0f} MB/s")


def test_a_name_that_holds_a_card_number_is_never_repeated_in_the_evidence() -> None:
    pan = CARDS[0]
    assert safe_name(b"idem:mer_1:order-17") == "idem:mer_1:order-17"
    for name in (f"cache:{pan}", f"cache:{b64(pan.encode())}", f"x/{pan.encode().hex()}.log"):
        said = safe_name(name)
        assert said.startswith(f"<a name holding {mask(pan)} (")
        assert pan not in said
        assert name not in said
