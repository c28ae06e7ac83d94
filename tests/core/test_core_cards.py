from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.cards import (
    IIN_RANGES,
    MAX_EXPIRY_YEARS_AHEAD,
    Brand,
    bin6,
    detect_brand,
    last4,
    luhn_valid,
    mask_pan,
    normalize_pan,
    validate_cvc,
    validate_expiry,
    validate_pan,
)
from core.errors import InvalidRequest

FAST = settings(database=None, deadline=None, max_examples=300)

TEST_CARDS = {
    "4242424242424242": Brand.VISA,
    "4000000000000002": Brand.VISA,
    "5555555555554444": Brand.MASTERCARD,
    "2223003122003222": Brand.MASTERCARD,
    "378282246310005": Brand.AMEX,
    "6011111111111117": Brand.DISCOVER,
    "3566002020360505": Brand.JCB,
    "6200000000000005": Brand.UNIONPAY,
    "36227206271667": Brand.DINERS,
    "3056930009020004": Brand.DINERS,
}


def fullwidth(ascii_digits: str) -> str:
    """The same digits in full width, as some keyboards type them."""
    return "".join(chr(0xFF10 + int(char)) for char in ascii_digits)


def check_digit(partial: str) -> str:
    """Independent Luhn implementation, so the tests do not trust the code under test."""
    total = 0
    for index, char in enumerate(reversed(partial)):
        value = int(char)
        if index % 2 == 0:  # doubled once the check digit is appended
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return str((10 - total % 10) % 10)


def make_pan(prefix: str, length: int) -> str:
    body = prefix + "0" * (length - len(prefix) - 1)
    return body + check_digit(body)


# Luhn ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pan", sorted(TEST_CARDS))
def test_the_test_cards_pass_the_luhn_check(pan: str) -> None:
    assert luhn_valid(pan)


@pytest.mark.parametrize(
    "digits",
    ["4242424242424241", "4242424242424243", "5555555555554440", "378282246310006", "1"],
)
def test_a_wrong_check_digit_fails_the_luhn_check(digits: str) -> None:
    assert not luhn_valid(digits)


@pytest.mark.parametrize(
    "text", ["", "4242 4242 4242 4242", "4242-4242", "42a2", fullwidth("4242"), "-0"]
)
def test_luhn_refuses_anything_but_ascii_digits(text: str) -> None:
    assert not luhn_valid(text)


def test_luhn_detects_every_single_digit_change() -> None:
    pan = "4242424242424242"
    for position in range(len(pan)):
        for digit in "0123456789":
            if digit != pan[position]:
                assert not luhn_valid(pan[:position] + digit + pan[position + 1 :])


@FAST
@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_luhn_accepts_exactly_the_numbers_ending_in_their_check_digit(partial: str) -> None:
    assert luhn_valid(partial + check_digit(partial))
    wrong = str((int(check_digit(partial)) + 1) % 10)
    assert not luhn_valid(partial + wrong)


# Brand detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("pan", "brand"), sorted(TEST_CARDS.items()))
def test_the_test_cards_are_detected_as_their_brand(pan: str, brand: Brand) -> None:
    assert detect_brand(pan) is brand
    assert validate_pan(pan) == (pan, brand)


@pytest.mark.parametrize(
    ("prefix", "brand"),
    [
        ("4", Brand.VISA),
        ("49", Brand.VISA),
        ("51", Brand.MASTERCARD),
        ("55", Brand.MASTERCARD),
        ("2220", Brand.UNKNOWN),
        ("2221", Brand.MASTERCARD),
        ("2500", Brand.MASTERCARD),
        ("2720", Brand.MASTERCARD),
        ("2721", Brand.UNKNOWN),
        ("34", Brand.AMEX),
        ("37", Brand.AMEX),
        ("35", Brand.UNKNOWN),
        ("6011", Brand.DISCOVER),
        ("6010", Brand.UNKNOWN),
        ("6012", Brand.UNKNOWN),
        ("643", Brand.UNKNOWN),
        ("644", Brand.DISCOVER),
        ("649", Brand.DISCOVER),
        ("65", Brand.DISCOVER),
        ("3527", Brand.UNKNOWN),
        ("3528", Brand.JCB),
        ("3589", Brand.JCB),
        ("3590", Brand.UNKNOWN),
        ("62", Brand.UNIONPAY),
        ("622125", Brand.UNIONPAY),
        ("622126", Brand.UNIONPAY),
        ("622925", Brand.UNIONPAY),
        ("81", Brand.UNIONPAY),
        ("300", Brand.DINERS),
        ("305", Brand.DINERS),
        ("306", Brand.UNKNOWN),
        ("3095", Brand.DINERS),
        ("3096", Brand.UNKNOWN),
        ("36", Brand.DINERS),
        ("38", Brand.DINERS),
        ("39", Brand.DINERS),
        ("50", Brand.MAESTRO),
        ("56", Brand.MAESTRO),
        ("58", Brand.MAESTRO),
        ("59", Brand.UNKNOWN),
        ("6304", Brand.MAESTRO),
        ("6390", Brand.MAESTRO),
        ("6759", Brand.MAESTRO),
        ("6761", Brand.MAESTRO),
        ("6763", Brand.MAESTRO),
        ("676770", Brand.MAESTRO),
        ("676774", Brand.MAESTRO),
        ("676771", Brand.UNKNOWN),
        ("1", Brand.UNKNOWN),
        ("9", Brand.UNKNOWN),
    ],
)
def test_brand_detection_follows_the_iin_ranges(prefix: str, brand: Brand) -> None:
    assert detect_brand(make_pan(prefix, 16)) is brand


def test_brand_detection_works_on_partial_numbers_as_they_are_typed() -> None:
    assert detect_brand("") is Brand.UNKNOWN
    assert detect_brand("2") is Brand.UNKNOWN
    assert detect_brand("22") is Brand.UNKNOWN
    assert detect_brand("222") is Brand.UNKNOWN
    assert detect_brand("2221") is Brand.MASTERCARD
    assert detect_brand("4") is Brand.VISA
    assert detect_brand("37") is Brand.AMEX
    assert detect_brand("abc") is Brand.UNKNOWN


def test_iin_ranges_of_the_same_width_never_overlap() -> None:
    for first in IIN_RANGES:
        assert first.low <= first.high
        for second in IIN_RANGES:
            if first is not second and first.width == second.width:
                assert first.high < second.low or second.high < first.low


def test_every_brand_but_unknown_has_an_iin_range() -> None:
    assert {r.brand for r in IIN_RANGES} == set(Brand) - {Brand.UNKNOWN}


# Lengths and validate_pan ------------------------------------------------------------------------

BRAND_PREFIXES = {
    Brand.VISA: "4",
    Brand.MASTERCARD: "2720",
    Brand.AMEX: "37",
    Brand.DISCOVER: "6011",
    Brand.JCB: "3530",
    Brand.UNIONPAY: "62",
    Brand.DINERS: "36",
    Brand.MAESTRO: "6759",
    Brand.UNKNOWN: "9",
}

EXPECTED_LENGTHS = {
    Brand.VISA: {13, 16, 19},
    Brand.MASTERCARD: {16},
    Brand.AMEX: {15},
    Brand.DISCOVER: {16, 17, 18, 19},
    Brand.JCB: {16, 17, 18, 19},
    Brand.UNIONPAY: {16, 17, 18, 19},
    Brand.DINERS: {14, 15, 16, 17, 18, 19},
    Brand.MAESTRO: set(range(12, 20)),
    Brand.UNKNOWN: set(range(12, 20)),
}


@pytest.mark.parametrize("brand", list(Brand))
def test_each_brand_accepts_exactly_its_lengths(brand: Brand) -> None:
    assert brand.lengths == EXPECTED_LENGTHS[brand]
    for length in range(8, 24):
        pan = make_pan(BRAND_PREFIXES[brand], length)
        if length in EXPECTED_LENGTHS[brand]:
            assert validate_pan(pan) == (pan, brand)
        else:
            with pytest.raises(InvalidRequest) as caught:
                validate_pan(pan)
            assert caught.value.code == "invalid_number"
            assert caught.value.param == "number"


@pytest.mark.parametrize("brand", list(Brand))
def test_only_amex_has_a_four_digit_cvc(brand: Brand) -> None:
    assert brand.cvc_length == (4 if brand is Brand.AMEX else 3)


def test_normalize_pan_strips_only_spaces_and_dashes() -> None:
    assert normalize_pan("4242 4242-4242  4242") == "4242424242424242"
    assert normalize_pan("4242\t4242") == "4242\t4242"
    assert normalize_pan("4242.4242") == "4242.4242"


@pytest.mark.parametrize(
    "text",
    ["4242 4242 4242 4242", "4242-4242-4242-4242", " 4242424242424242 ", "3782 822463 10005"],
)
def test_validate_pan_accepts_spaces_and_dashes(text: str) -> None:
    pan, _brand = validate_pan(text)
    assert pan == normalize_pan(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " - ",
        "4242424242424241",
        "4242 4242 4242 424",
        "42424242424242424242",
        "4242.4242.4242.4242",
        "4242\t4242424242424242",
        "4242424242424242x",
        fullwidth("4242424242424242"),
        "+4242424242424242",
        "37828224631000",
        "5555555555554444 1",
        "1" * 10_000,
        4242424242424242,
        None,
    ],
)
def test_validate_pan_refuses_malformed_numbers_without_echoing_them(text: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_pan(text)
    assert caught.value.code == "invalid_number"
    assert caught.value.param == "number"
    assert "4242" not in caught.value.message
    assert "1111" not in caught.value.message


# Expiry ----------------------------------------------------------------------------------------

TODAY = datetime.date(2026, 3, 15)


def test_a_card_is_valid_through_the_last_day_of_its_expiry_month() -> None:
    assert validate_expiry(3, 2026, today=datetime.date(2026, 3, 31)) == (3, 2026)
    assert validate_expiry(2, 2028, today=datetime.date(2028, 2, 29)) == (2, 2028)
    assert validate_expiry(12, 2026, today=datetime.date(2026, 12, 31)) == (12, 2026)


def test_a_card_expires_on_the_first_day_of_the_next_month() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_expiry(3, 2026, today=datetime.date(2026, 4, 1))
    assert caught.value.code == "expired_card"
    assert caught.value.param == "exp_month"


def test_an_expiry_in_a_past_year_is_reported_on_the_year() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_expiry(12, 2025, today=datetime.date(2026, 1, 1))
    assert caught.value.code == "expired_card"
    assert caught.value.param == "exp_year"


@pytest.mark.parametrize(
    ("month", "year", "expected"),
    [
        (3, 2026, (3, 2026)),
        (12, 2026, (12, 2026)),
        (1, 2027, (1, 2027)),
        ("07", "2030", (7, 2030)),
        ("7", "30", (7, 2030)),
        (7, 30, (7, 2030)),
        (7, "30", (7, 2030)),
        (1, TODAY.year + MAX_EXPIRY_YEARS_AHEAD, (1, TODAY.year + MAX_EXPIRY_YEARS_AHEAD)),
    ],
)
def test_validate_expiry_accepts_ints_strings_and_two_digit_years(
    month: object, year: object, expected: tuple[int, int]
) -> None:
    assert validate_expiry(month, year, today=TODAY) == expected


@pytest.mark.parametrize("month", [0, 13, -1, "0", "13", "1a", "", " 1", "001", True, 1.0, None])
def test_validate_expiry_refuses_months_outside_1_to_12(month: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_expiry(month, 2030, today=TODAY)
    assert caught.value.code == "invalid_expiry_month"
    assert caught.value.param == "exp_month"


@pytest.mark.parametrize(
    "year",
    [
        1999,
        100,
        999,
        TODAY.year + MAX_EXPIRY_YEARS_AHEAD + 1,
        10_000,
        -1,
        "0099",
        "030",
        "3",
        "20300",
        fullwidth("2030"),
        "",
        True,
        2030.0,
        None,
    ],
)
def test_validate_expiry_refuses_years_outside_the_window(year: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_expiry(12, year, today=TODAY)
    assert caught.value.code == "invalid_expiry_year"
    assert caught.value.param == "exp_year"


def test_two_digit_years_in_the_past_are_expired_not_invalid() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_expiry(12, 25, today=TODAY)
    assert caught.value.code == "expired_card"


@FAST
@given(
    month=st.integers(min_value=1, max_value=12),
    year=st.integers(min_value=2000, max_value=2100),
    today=st.dates(min_value=datetime.date(2000, 1, 1), max_value=datetime.date(2090, 12, 31)),
)
def test_expiry_is_valid_exactly_until_the_end_of_its_month(
    month: int, year: int, today: datetime.date
) -> None:
    first_of_month = datetime.date(year, month, 1)
    still_valid = today < first_of_month or (today.year, today.month) == (year, month)
    in_window = year <= today.year + MAX_EXPIRY_YEARS_AHEAD
    if still_valid and in_window:
        assert validate_expiry(month, year, today=today) == (month, year)
    else:
        with pytest.raises(InvalidRequest) as caught:
            validate_expiry(month, year, today=today)
        assert caught.value.code == ("expired_card" if in_window else "invalid_expiry_year")


# CVC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cvc", "brand"),
    [("123", Brand.VISA), ("012", Brand.MASTERCARD), ("1234", Brand.AMEX), ("000", Brand.UNKNOWN)],
)
def test_validate_cvc_accepts_the_brand_length(cvc: str, brand: Brand) -> None:
    assert validate_cvc(cvc, brand) == cvc


@pytest.mark.parametrize(
    ("cvc", "brand"),
    [
        ("1234", Brand.VISA),
        ("12", Brand.VISA),
        ("123", Brand.AMEX),
        ("12a", Brand.VISA),
        ("", Brand.VISA),
        (" 123", Brand.VISA),
        (fullwidth("123"), Brand.VISA),
        (123, Brand.VISA),
        (None, Brand.VISA),
    ],
)
def test_validate_cvc_refuses_other_lengths_and_non_digits_without_echoing(
    cvc: object, brand: Brand
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_cvc(cvc, brand)
    assert caught.value.code == "invalid_cvc"
    assert caught.value.param == "cvc"
    if isinstance(cvc, str) and cvc.strip():
        assert cvc.strip() not in caught.value.message


# Masking ---------------------------------------------------------------------------------------


def test_mask_pan_keeps_only_the_last_four_digits_by_default() -> None:
    assert mask_pan("4242424242424242") == "************4242"
    assert mask_pan("378282246310005") == "***********0005"


def test_mask_pan_can_show_the_bin_and_the_last_four() -> None:
    assert mask_pan("4242424242424242", show_bin=True) == "424242******4242"
    assert mask_pan("378282246310005", show_bin=True) == "378282*****0005"
    assert mask_pan("4222222222225", show_bin=True) == "422222***2225"


def test_mask_pan_hides_the_bin_of_a_twelve_digit_pan() -> None:
    pan = make_pan("6759", 12)
    assert mask_pan(pan, show_bin=True) == "********" + pan[-4:]


def test_last4_and_bin6() -> None:
    assert last4("5555555555554444") == "4444"
    assert bin6("5555555555554444") == "555555"


@pytest.mark.parametrize("bad", ["", "4242", "42424242424", "4242 4242 4242 4242", "4" * 20])
def test_masking_helpers_refuse_anything_but_a_normalized_pan(bad: str) -> None:
    for helper in (mask_pan, last4, bin6):
        with pytest.raises(ValueError, match="normalized PAN") as caught:
            helper(bad)
        assert "4242" not in str(caught.value)


@FAST
@given(st.sampled_from(sorted(TEST_CARDS)), st.booleans())
def test_a_masked_pan_never_reveals_more_than_bin_and_last_four(pan: str, show_bin: bool) -> None:
    masked = mask_pan(pan, show_bin=show_bin)
    assert len(masked) == len(pan)
    visible = [i for i, char in enumerate(masked) if char != "*"]
    assert len(visible) <= 10
    assert all(masked[i] == pan[i] for i in visible)
    assert masked.endswith(pan[-4:])


def test_the_country_of_issue_comes_from_the_bin_when_known() -> None:
    from core.bins import country_of

    assert country_of("424242") == "US"
    assert country_of("356600") == "JP"
    assert country_of("497012") == "FR"
    assert country_of("999999") is None
    assert country_of("4242") is None
