from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest
from core.money import (
    CURRENCIES,
    ISO_4217_EXPONENTS,
    MAX_AMOUNT,
    Currency,
    Money,
    format_major,
    parse_currency,
    parse_major,
    validate_amount,
)


def unchecked(value: object) -> Any:
    """A value of the wrong type, on purpose: the runtime checks must refuse it."""
    return value


FAST = settings(database=None, deadline=None, max_examples=300)

EUR = parse_currency("EUR")
USD = parse_currency("USD")
JPY = parse_currency("JPY")
KWD = parse_currency("KWD")


def test_the_table_lists_the_active_currencies_with_their_exponents() -> None:
    assert len(ISO_4217_EXPONENTS) >= 150
    expected = {
        "EUR": 2,
        "USD": 2,
        "GBP": 2,
        "JPY": 0,
        "KRW": 0,
        "CLP": 0,
        "ISK": 0,
        "VND": 0,
        "KWD": 3,
        "BHD": 3,
        "JOD": 3,
        "OMR": 3,
        "TND": 3,
        "IQD": 3,
        "LYD": 3,
        "CLF": 4,
    }
    for code, exponent in expected.items():
        assert ISO_4217_EXPONENTS[code] == exponent


def test_every_code_in_the_table_is_three_upper_case_letters() -> None:
    for code, currency in CURRENCIES.items():
        assert len(code) == 3
        assert code.isascii()
        assert code.isalpha()
        assert code.isupper()
        assert currency == Currency(code, ISO_4217_EXPONENTS[code])
        assert currency.exponent in {0, 2, 3, 4}


def test_withdrawn_and_non_currency_codes_are_not_in_the_table() -> None:
    for code in ("HRK", "VEF", "MRO", "STD", "ZWL", "XAU", "XXX", "XTS", "XDR"):
        assert code not in ISO_4217_EXPONENTS


def test_parse_currency_returns_the_currency_with_its_exponent() -> None:
    assert parse_currency("EUR") == Currency("EUR", 2)
    assert parse_currency("JPY").exponent == 0
    assert parse_currency("KWD").exponent == 3
    assert str(parse_currency("USD")) == "USD"


@pytest.mark.parametrize(
    "value",
    [
        "eur",
        "Eur",
        "EU",
        "EURO",
        "EU1",
        "E R",
        " EUR",
        "\u0415UR",
        "XXX",
        "ABC",
        "",
        978,
        None,
        b"EUR",
    ],
)
def test_parse_currency_refuses_anything_but_a_known_upper_case_code(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_currency(value)
    assert caught.value.code == "invalid_currency"
    assert caught.value.param == "currency"


def test_validate_amount_accepts_positive_ints_up_to_the_maximum() -> None:
    assert validate_amount(1, EUR) == 1
    assert validate_amount(MAX_AMOUNT, EUR) == MAX_AMOUNT
    assert validate_amount(500, JPY, maximum=500) == 500
    assert MAX_AMOUNT == 99_999_999


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (True, "amount_invalid"),
        (False, "amount_invalid"),
        (10.5, "amount_invalid"),
        (10.0, "amount_invalid"),
        ("1050", "amount_invalid"),
        (None, "amount_invalid"),
        (0, "amount_too_small"),
        (-1, "amount_too_small"),
        (MAX_AMOUNT + 1, "amount_too_large"),
        (10**40, "amount_too_large"),
    ],
)
def test_validate_amount_refuses_non_ints_and_out_of_range_amounts(
    amount: object, code: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_amount(amount, EUR)
    assert caught.value.code == code
    assert caught.value.param == "amount"


def test_validate_amount_honours_a_custom_maximum_and_names_it_in_the_message() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_amount(1001, KWD, maximum=1000)
    assert caught.value.code == "amount_too_large"
    assert "1000" in caught.value.message
    assert "1.000 KWD" in caught.value.message


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (1050, EUR, "10.50"),
        (1, EUR, "0.01"),
        (0, EUR, "0.00"),
        (100, USD, "1.00"),
        (-1050, EUR, "-10.50"),
        (1050, JPY, "1050"),
        (0, JPY, "0"),
        (-7, JPY, "-7"),
        (1, KWD, "0.001"),
        (1050, KWD, "1.050"),
        (123456789, KWD, "123456.789"),
        (1, Currency("CLF", 4), "0.0001"),
        (10**30 + 1, EUR, "10000000000000000000000000000.01"),
    ],
)
def test_format_major_writes_exactly_the_currency_decimals(
    amount: int, currency: Currency, text: str
) -> None:
    assert format_major(amount, currency) == text


@pytest.mark.parametrize(
    ("text", "currency", "amount"),
    [
        ("10.5", EUR, 1050),
        ("10.50", EUR, 1050),
        ("10", EUR, 1000),
        ("0.01", EUR, 1),
        ("007.5", EUR, 750),
        ("-10.50", EUR, -1050),
        ("1050", JPY, 1050),
        ("0.001", KWD, 1),
        ("1.05", KWD, 1050),
        ("1", KWD, 1000),
    ],
)
def test_parse_major_reads_decimal_text_into_minor_units(
    text: str, currency: Currency, amount: int
) -> None:
    assert parse_major(text, currency) == amount


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("10.505", EUR),
        ("10.500", EUR),
        ("10.5", JPY),
        ("10.0", JPY),
        ("1.0001", KWD),
        ("", EUR),
        ("10.", EUR),
        (".5", EUR),
        ("+10", EUR),
        (" 10", EUR),
        ("10 ", EUR),
        ("1,50", EUR),
        ("1e3", EUR),
        ("NaN", EUR),
        ("--1", EUR),
        ("\u0661\u0660", EUR),
        ("1" * 100, EUR),
        (1050, EUR),
        (10.5, EUR),
        (None, EUR),
    ],
)
def test_parse_major_refuses_malformed_text_and_excess_decimals(
    text: object, currency: Currency
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_major(text, currency)
    assert caught.value.code == "amount_invalid"
    assert caught.value.param == "amount"


def test_parse_major_errors_do_not_echo_the_input() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_major("4242424242424242.123", EUR)
    assert "4242" not in caught.value.message


def test_money_adds_and_subtracts_within_one_currency() -> None:
    total = Money(1050, EUR) + Money(25, EUR)
    assert total == Money(1075, EUR)
    assert total - Money(2000, EUR) == Money(-925, EUR)
    assert -Money(5, EUR) == Money(-5, EUR)
    assert Money.zero(JPY) == Money(0, JPY)
    assert str(Money(1050, EUR)) == "10.50 EUR"


def test_money_refuses_to_mix_currencies() -> None:
    with pytest.raises(InvalidRequest) as caught:
        Money(100, EUR) + Money(100, USD)
    assert caught.value.code == "currency_mismatch"
    with pytest.raises(InvalidRequest):
        Money(100, EUR) - Money(100, JPY)


def test_money_refuses_floats_and_bools() -> None:
    with pytest.raises(TypeError):
        Money(unchecked(10.5), EUR)
    with pytest.raises(TypeError):
        Money(True, EUR)


def test_money_is_immutable() -> None:
    money = Money(100, EUR)
    with pytest.raises(AttributeError):
        unchecked(money).amount = 5


currencies = st.sampled_from(sorted(CURRENCIES.values(), key=lambda c: c.code))


@FAST
@given(amount=st.integers(min_value=-(10**24), max_value=10**24), currency=currencies)
def test_format_then_parse_gives_back_the_amount(amount: int, currency: Currency) -> None:
    assert parse_major(format_major(amount, currency), currency) == amount


@FAST
@given(
    major=st.integers(min_value=0, max_value=10**12),
    decimals=st.text(alphabet="0123456789", max_size=4),
    currency=currencies,
)
def test_parse_then_format_pads_to_the_currency_decimals(
    major: int, decimals: str, currency: Currency
) -> None:
    text = f"{major}.{decimals}" if decimals else str(major)
    if len(decimals) > currency.exponent:
        with pytest.raises(InvalidRequest):
            parse_major(text, currency)
        return
    formatted = format_major(parse_major(text, currency), currency)
    expected = str(major) if currency.exponent == 0 else f"{major}.{decimals:0<{currency.exponent}}"
    assert formatted == expected
