from __future__ import annotations

import datetime
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest
from core.ids import ALPHABET, IdPrefix, MonotonicIds, id_timestamp, new_id, parse_id

FAST = settings(database=None, deadline=None, max_examples=300)

UTC = datetime.UTC
MOMENT = datetime.datetime(2026, 3, 15, 12, 30, 45, 123456, tzinfo=UTC)


def test_an_id_is_the_prefix_an_underscore_and_26_crockford_characters() -> None:
    value = new_id(IdPrefix.PAYMENT)
    prefix, underscore, body = value.partition("_")
    assert (prefix, underscore) == ("pay", "_")
    assert len(body) == 26
    assert set(body) <= set(ALPHABET)
    assert body[0] in "01234567"


def test_the_alphabet_is_crockford_base32_in_ascii_order() -> None:
    assert len(ALPHABET) == 32
    assert sorted(ALPHABET) == list(ALPHABET)
    assert not set("ilou") & set(ALPHABET)


def test_the_known_prefixes() -> None:
    assert [p.value for p in IdPrefix] == [
        "pay",
        "re",
        "tok",
        "mer",
        "evt",
        "att",
        "pm",
        "we",
        "req",
    ]
    for prefix in IdPrefix:
        assert parse_id(new_id(prefix), prefix).startswith(f"{prefix}_")


def test_the_layout_is_48_bits_of_milliseconds_then_80_random_bits() -> None:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=UTC)
    assert new_id("pay", now=epoch, randbits=lambda _bits: 0) == "pay_" + "0" * 26
    assert new_id("pay", now=epoch, randbits=lambda bits: (1 << bits) - 1) == (
        "pay_" + "0" * 10 + "z" * 16
    )
    one_ms = epoch + datetime.timedelta(milliseconds=1)
    assert new_id("pay", now=one_ms, randbits=lambda _bits: 0) == "pay_" + "0" * 9 + "1" + "0" * 16
    bits_asked: list[int] = []

    def spy(bits: int) -> int:
        bits_asked.append(bits)
        return 0

    new_id("pay", randbits=spy)
    assert bits_asked == [80]


def test_id_timestamp_reads_back_the_creation_time_to_the_millisecond() -> None:
    value = new_id("evt", now=MOMENT)
    assert id_timestamp(value) == MOMENT.replace(microsecond=123000)


def test_a_clock_in_another_time_zone_gives_the_same_instant() -> None:
    paris = datetime.timezone(datetime.timedelta(hours=1))
    value = new_id("evt", now=MOMENT.astimezone(paris))
    assert id_timestamp(value) == MOMENT.replace(microsecond=123000)


def test_ids_sort_by_creation_time() -> None:
    start = MOMENT
    values = [new_id("pay", now=start + datetime.timedelta(milliseconds=i)) for i in range(2000)]
    shuffled = values[:]
    random.shuffle(shuffled)
    assert sorted(shuffled) == values


def test_ten_thousand_ids_are_unique() -> None:
    values = {new_id("pay") for _ in range(10_000)}
    assert len(values) == 10_000


def test_ids_of_the_same_millisecond_all_differ() -> None:
    values = {new_id("pay", now=MOMENT) for _ in range(10_000)}
    assert len(values) == 10_000


@pytest.mark.parametrize("prefix", ["", "PAY", "pay_", "p4y", "toolongprefix", "é"])
def test_new_id_refuses_malformed_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        new_id(prefix)


def test_new_id_refuses_a_naive_or_pre_epoch_clock() -> None:
    with pytest.raises(ValueError, match="aware"):
        new_id("pay", now=datetime.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="range"):
        new_id("pay", now=datetime.datetime(1969, 12, 31, tzinfo=UTC))


def test_parse_id_returns_a_well_formed_id() -> None:
    value = new_id("pay")
    assert parse_id(value, "pay") == value
    assert parse_id(value, IdPrefix.PAYMENT, param="payment") == value


@pytest.mark.parametrize(
    "value",
    [
        "re_01m89x709vyff4x22c452rwpy7",
        "pay01m89x709vyff4x22c452rwpy7",
        "pay_01M89X709VYFF4X22C452RWPY7",
        "pay_01m89x709vyff4x22c452rwpy",
        "pay_01m89x709vyff4x22c452rwpy77",
        "pay_81m89x709vyff4x22c452rwpy7",
        "pay_01m89x709vyff4x22c452rwpyu",
        "pay_01m89x709vyff4x22c452rwpy7\n",
        " pay_01m89x709vyff4x22c452rwpy7",
        "pay_",
        "",
        None,
        42,
    ],
)
def test_parse_id_refuses_malformed_ids_with_the_given_param(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_id(value, "pay", param="payment")
    assert caught.value.code == "invalid_id"
    assert caught.value.param == "payment"
    assert "'pay_'" in caught.value.message


def test_parse_id_names_the_param_id_by_default() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_id("nope", "pay")
    assert caught.value.param == "id"


@pytest.mark.parametrize(
    "value", ["pay", "pay_0123", "PAY_01m89x709vyff4x22c452rwpy7", "_01m89x709vyff4x22c452rwpy7"]
)
def test_id_timestamp_refuses_malformed_ids(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        id_timestamp(value)
    assert caught.value.code == "invalid_id"


def test_id_timestamp_refuses_a_timestamp_beyond_the_year_9999() -> None:
    with pytest.raises(InvalidRequest) as caught:
        id_timestamp("pay_7zzzzzzzzz0000000000000000")
    assert caught.value.code == "invalid_id"


instants = st.datetimes(
    min_value=datetime.datetime(1970, 1, 1),
    max_value=datetime.datetime(9999, 12, 31),
    timezones=st.just(UTC),
)
random_parts = st.integers(min_value=0, max_value=(1 << 80) - 1)


@FAST
@given(first=instants, second=instants, first_random=random_parts, second_random=random_parts)
def test_ids_of_different_milliseconds_sort_like_their_timestamps(
    first: datetime.datetime,
    second: datetime.datetime,
    first_random: int,
    second_random: int,
) -> None:
    a = new_id("pay", now=first, randbits=lambda _bits: first_random)
    b = new_id("pay", now=second, randbits=lambda _bits: second_random)
    ms_a, ms_b = id_timestamp(a), id_timestamp(b)
    if ms_a < ms_b:
        assert a < b
    elif ms_a > ms_b:
        assert a > b
    assert parse_id(a, "pay") == a


@FAST
@given(moment=instants, random_part=random_parts)
def test_the_timestamp_round_trips(moment: datetime.datetime, random_part: int) -> None:
    value = new_id("tok", now=moment, randbits=lambda _bits: random_part)
    assert id_timestamp(value) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_random_ids_carry_128_random_bits_and_no_time() -> None:
    from core.ids import ALPHABET, new_random_id

    ids = [new_random_id("tok") for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    bodies = [i.removeprefix("tok_") for i in ids]
    assert all(len(b) == 26 and set(b) <= set(ALPHABET) for b in bodies)
    values = [int("".join(f"{ALPHABET.index(c):05b}" for c in b), 2) for b in bodies]
    varying = 0
    for bit in range(130):
        ones = sum((v >> bit) & 1 for v in values)
        varying += 0 < ones < len(values)
    assert varying == 128  # the top two bits of 26 base32 characters are always zero


def test_monotonic_ids_sort_in_the_order_they_were_made_within_one_millisecond() -> None:
    moment = datetime.datetime(2026, 11, 26, 9, 0, tzinfo=datetime.UTC)
    ids = MonotonicIds()
    made = [ids.new("evt", now=moment) for _ in range(10_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    for value in made[:3] + made[-3:]:
        assert parse_id(value, "evt") == value
        # 10,000 steps of at most 2^48 stay within the millisecond unless the random start was
        # within 2^61.3 of the top (about one in 200,000): then it is carried one forward.
        assert id_timestamp(value) - moment in (
            datetime.timedelta(0),
            datetime.timedelta(0, 0, 1000),
        )


def test_a_monotonic_id_still_does_not_tell_the_next_one() -> None:
    """Each step adds 48 random bits: two generators continuing from the same id diverge."""
    moment = datetime.datetime(2026, 11, 26, 9, 0, tzinfo=datetime.UTC)
    first, second = MonotonicIds(), MonotonicIds()
    seed = first.new("evt", now=moment)
    second._last = first._last
    assert first.new("evt", now=moment) != second.new("evt", now=moment)
    assert seed < first.new("evt", now=moment)


def test_monotonic_ids_carry_the_timestamp_forward_rather_than_go_back() -> None:
    later = datetime.datetime(2026, 11, 26, 9, 0, 1, tzinfo=datetime.UTC)
    earlier = later - datetime.timedelta(seconds=1)
    ids = MonotonicIds(randbits=lambda bits: (1 << bits) - 1)  # always the largest random part
    a = ids.new("evt", now=later)
    b = ids.new("evt", now=earlier)  # the clock went back: still after `a`
    assert a < b
    assert id_timestamp(b) == later + datetime.timedelta(milliseconds=1)
