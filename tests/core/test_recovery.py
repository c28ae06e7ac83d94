"""core.recovery: the decline table, the caps under a moving clock, and the schedules."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest
from core.recovery import (
    DEFAULT_CAPS,
    WINDOW,
    Action,
    Attempt,
    Caps,
    Decline,
    DeclineClass,
    FixedSchedule,
    History,
    LearnedSchedule,
    RecoveryPolicy,
    RecoveryStats,
    Situation,
    classify,
    scheme_caps,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
N, L, U = DeclineClass.NEVER, DeclineClass.LATER, DeclineClass.AFTER_UPDATE


@pytest.mark.parametrize(
    ("decline", "expected"),
    [
        # Tessera's codes (what PSP A's decline_code and PSP B's refusalReason map to).
        (Decline("lost_card"), N),
        (Decline("stolen_card"), N),
        (Decline("closed_account"), N),
        (Decline("invalid_number"), N),
        (Decline("stop_recurring"), N),
        (Decline("do_not_try_again"), N),
        (Decline("transaction_not_allowed"), N),
        (Decline("authentication_required"), N),
        (Decline("a_code_nobody_listed"), N),
        (Decline("insufficient_funds"), L),
        (Decline("issuer_unavailable"), L),
        (Decline("try_again_later"), L),
        (Decline("do_not_honor"), L),
        (Decline("generic_decline"), L),
        (Decline("expired_card"), U),
        (Decline("incorrect_cvc"), U),
        # Mastercard merchant advice codes.
        (Decline("insufficient_funds", merchant_advice_code="03"), N),
        (Decline("do_not_honor", merchant_advice_code="21"), N),
        (Decline("do_not_honor", merchant_advice_code="01"), U),
        (Decline("insufficient_funds", merchant_advice_code="02"), L),
        (Decline("a_code_nobody_listed", merchant_advice_code="02"), L),
        (Decline("insufficient_funds", merchant_advice_code="24"), L),
        (Decline("insufficient_funds", merchant_advice_code="30"), L),
        (Decline("expired_card", merchant_advice_code="03"), N),
        # Visa decline categories.
        (Decline("insufficient_funds", visa_category=1), N),
        (Decline("do_not_honor", visa_category=1), N),
        (Decline("a_code_nobody_listed", visa_category=2), L),
        (Decline("a_code_nobody_listed", visa_category=3), U),
        (Decline("a_code_nobody_listed", visa_category=4), L),
        (Decline("lost_card", visa_category=2), N),
    ],
)
def test_each_decline_is_classified_as_the_table_says(
    decline: Decline, expected: DeclineClass
) -> None:
    assert classify(decline).decline_class is expected


@pytest.mark.parametrize(
    ("mac", "wait"),
    [
        ("24", HOUR),
        ("25", DAY),
        ("26", 2 * DAY),
        ("27", 4 * DAY),
        ("28", 6 * DAY),
        ("29", 8 * DAY),
        ("30", 10 * DAY),
    ],
)
def test_a_mastercard_retry_after_advice_is_the_earliest_retry(mac: str, wait: timedelta) -> None:
    history = _declined("mastercard", Decline("insufficient_funds", merchant_advice_code=mac))
    eager = RecoveryPolicy(schedule=Eager())
    assert eager.next_attempt(history, T0) == T0 + wait


# --- hard declines --------------------------------------------------------------------------


@dataclass(frozen=True)
class Eager:
    """A schedule that always wants to try at once: only the policy's rules stop it."""

    def propose(self, situation: Situation) -> datetime | None:
        return situation.earliest


def _declined(
    brand: str, decline: Decline, *, payment: str = "pay_1", at: datetime = T0
) -> History:
    return History(payment, brand, (Attempt(payment, at, False, False, decline),))


HARD = st.sampled_from(
    [
        Decline("lost_card"),
        Decline("stolen_card"),
        Decline("closed_account"),
        Decline("invalid_number"),
        Decline("stop_recurring"),
        Decline("insufficient_funds", merchant_advice_code="03"),
        Decline("insufficient_funds", merchant_advice_code="21"),
        Decline("insufficient_funds", visa_category=1),
        Decline("expired_card", visa_category=1),
    ]
)
SOFT = st.sampled_from(
    [
        Decline("insufficient_funds"),
        Decline("issuer_unavailable"),
        Decline("try_again_later", visa_category=2),
        Decline("insufficient_funds", merchant_advice_code="02"),
        Decline("insufficient_funds", merchant_advice_code="25"),
        Decline("do_not_honor", visa_category=4),
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    hard=HARD,
    soft=st.lists(SOFT, max_size=4),
    hard_first=st.booleans(),
    brand=st.sampled_from(["visa", "mastercard", "amex"]),
    later=st.integers(min_value=0, max_value=90 * 24),
    updated_after=st.one_of(st.none(), st.integers(min_value=1, max_value=24 * 20)),
    days=st.lists(st.integers(min_value=0, max_value=29), max_size=6),
)
def test_a_hard_decline_is_never_retried_by_any_schedule_at_any_time(
    hard: Decline,
    soft: list[Decline],
    hard_first: bool,
    brand: str,
    later: int,
    updated_after: int | None,
    days: list[int],
) -> None:
    """Whatever else the payment saw, whichever schedule, at any later time, even after the
    card was updated: a payment with a hard decline gets no attempt."""
    declines = [hard, *soft] if hard_first else [*soft, hard]
    attempts = tuple(
        Attempt("pay_1", T0 + i * DAY, i > 0, False, d) for i, d in enumerate(declines)
    )
    updated = None if updated_after is None else T0 + updated_after * HOUR
    history = History("pay_1", brand, attempts, updated)
    now = attempts[-1].at + later * HOUR
    for schedule in (Eager(), FixedSchedule(tuple(sorted(days))), FixedSchedule()):
        decision = RecoveryPolicy(schedule=schedule).decide(history, now)
        assert decision.action is Action.NEVER
        assert decision.at is None


def test_a_hard_decline_blocks_the_cards_other_payments_until_the_card_is_updated() -> None:
    attempts = (
        Attempt("pay_1", T0, False, False, Decline("insufficient_funds")),
        Attempt("pay_2", T0 + HOUR, False, False, Decline("lost_card")),
    )
    policy = RecoveryPolicy(schedule=Eager())
    blocked = policy.decide(History("pay_1", "visa", attempts), T0 + 2 * HOUR)
    assert (blocked.action, blocked.at) == (Action.NEVER, None)
    assert blocked.reason == "card: lost_card"
    replaced = History("pay_1", "visa", attempts, card_updated_at=T0 + DAY)
    assert policy.next_attempt(replaced, T0 + DAY) == T0 + DAY


def test_an_expired_card_waits_for_its_update_and_goes_as_soon_as_it_lands() -> None:
    policy = RecoveryPolicy()
    history = _declined("visa", Decline("expired_card"))
    waiting = policy.decide(history, T0 + 5 * DAY)
    assert (waiting.action, waiting.at) == (Action.AWAITING_UPDATE, None)
    stale = History("pay_1", "visa", history.card_attempts, card_updated_at=T0 - DAY)
    assert policy.decide(stale, T0 + DAY).action is Action.AWAITING_UPDATE
    landed = T0 + 2 * DAY + 3 * HOUR
    updated = History("pay_1", "visa", history.card_attempts, card_updated_at=landed)
    assert policy.next_attempt(updated, landed) == landed  # not at the fixed schedule's day 3
    mac_01 = _declined("mastercard", Decline("do_not_honor", merchant_advice_code="01"))
    assert policy.decide(mac_01, T0 + DAY).action is Action.AWAITING_UPDATE


def test_an_approved_payment_has_nothing_to_recover() -> None:
    attempts = (
        Attempt("pay_1", T0, False, False, Decline("insufficient_funds")),
        Attempt("pay_1", T0 + DAY, True, True),
    )
    assert RecoveryPolicy().next_attempt(History("pay_1", "visa", attempts), T0 + DAY) is None
    assert RecoveryPolicy().next_attempt(History("pay_2", "visa", attempts), T0) is None


def test_a_retry_the_merchant_asks_for_follows_the_same_table_and_caps() -> None:
    """On request the schedule does not matter; the class, the issuer's advice and the caps do."""
    policy = RecoveryPolicy(caps={"visa": Caps(per_card=2, per_payment=2)})
    soft = _declined("visa", Decline("insufficient_funds"))
    assert policy.on_request(soft, T0 + HOUR) == policy.on_request(soft, T0 + HOUR)
    now = policy.on_request(soft, T0 + HOUR)
    assert (now.action, now.at) == (Action.RETRY, T0 + HOUR)  # the fixed day 1 does not apply
    assert policy.on_request(_declined("visa", Decline("lost_card")), T0 + HOUR).at is None
    waiting = policy.on_request(_declined("visa", Decline("expired_card")), T0 + HOUR)
    assert waiting.action is Action.AWAITING_UPDATE
    advised = _declined("mastercard", Decline("insufficient_funds", merchant_advice_code="25"))
    assert policy.on_request(advised, T0 + HOUR).at == T0 + DAY  # not now: the issuer said 24 h
    retried = History(
        "pay_1",
        "visa",
        (
            *soft.card_attempts,
            Attempt("pay_1", T0 + HOUR, True, False, Decline("insufficient_funds")),
            Attempt("pay_1", T0 + 2 * HOUR, True, False, Decline("insufficient_funds")),
        ),
    )
    assert policy.on_request(retried, T0 + 3 * HOUR).action is Action.EXHAUSTED


def test_a_retry_awaiting_its_answer_counts_against_the_caps_and_decides_nothing_else() -> None:
    """Another payment of the card has a retry in flight: it takes a place under the card's cap
    (two deciders cannot both use the last one), and being unanswered it is no hard decline."""
    policy = RecoveryPolicy(Eager(), caps={"visa": Caps(per_card=1, per_payment=5)})
    decline = Decline("insufficient_funds")
    in_flight = Attempt("pay_2", T0 + HOUR, True, False, None, pending=True)
    both = History(
        "pay_1",
        "visa",
        (
            Attempt("pay_1", T0, False, False, decline),
            Attempt("pay_2", T0, False, False, decline),
            in_flight,
        ),
    )
    decision = policy.decide(both, T0 + 2 * HOUR)
    # The card's one retry is taken until T0 + 1 h + 30 days: past this recovery's end.
    assert (decision.action, decision.reason) == (Action.EXHAUSTED, "caps")
    alone = History("pay_1", "visa", both.card_attempts[:2])
    assert policy.decide(alone, T0 + 2 * HOUR).at == T0 + 2 * HOUR
    # Its own unanswered attempt is not the decline the payment is judged on.
    own = History("pay_2", "visa", both.card_attempts)
    assert policy.decide(own, T0 + 2 * HOUR).classification == classify(decline)


# --- the fixed schedule ---------------------------------------------------------------------


def test_the_fixed_schedule_tries_on_days_1_3_5_7_then_is_exhausted() -> None:
    policy = RecoveryPolicy()
    history = _declined("visa", Decline("insufficient_funds"))
    tried = []
    now = T0
    while (at := policy.next_attempt(history, now)) is not None:
        tried.append(at)
        retry = Attempt("pay_1", at, True, False, Decline("insufficient_funds"))
        history = History("pay_1", "visa", (*history.card_attempts, retry))
        now = at
    assert tried == [T0 + d * DAY for d in (1, 3, 5, 7)]
    assert policy.decide(history, now).action is Action.EXHAUSTED


# --- caps -----------------------------------------------------------------------------------


def test_caps_are_configurable_lower_never_higher() -> None:
    assert scheme_caps("visa") == Caps(15, 15, None)
    assert scheme_caps("mastercard") == Caps(35, 35, 10)
    assert scheme_caps("amex") == DEFAULT_CAPS
    RecoveryPolicy(caps={"visa": Caps(4, 2, 3), "mastercard": Caps(35, 35, 10)})
    for too_high in (Caps(16, 15), Caps(15, 16), Caps(-1, 4)):
        with pytest.raises(InvalidRequest):
            RecoveryPolicy(caps={"visa": too_high})
    with pytest.raises(InvalidRequest, match="per_card_daily"):
        RecoveryPolicy(caps={"mastercard": Caps(35, 35, None)})  # no daily cap is higher
    with pytest.raises(InvalidRequest, match="per_card_daily"):
        RecoveryPolicy(caps={"mastercard": Caps(35, 35, 11)})
    with pytest.raises(InvalidRequest):
        RecoveryPolicy(recovery_window=WINDOW + HOUR)


def _walk(
    policy: RecoveryPolicy,
    brand: str,
    first_declines: dict[str, datetime],
    decline: Decline,
    *,
    until: timedelta = 45 * DAY,
    step: timedelta = HOUR,
) -> list[Attempt]:
    """Move a clock hour by hour; whenever the policy says a payment may go, it goes and is
    declined again. Returns every attempt on the card."""
    attempts = [Attempt(p, at, False, False, decline) for p, at in first_declines.items()]
    attempts.sort(key=lambda a: a.at)
    now = min(first_declines.values())
    end = now + until
    while now <= end:
        for payment, first in first_declines.items():
            if first > now:
                continue
            history = History(payment, brand, tuple(a for a in attempts if a.at <= now))
            at = policy.next_attempt(history, now)
            assert at is None or at >= now  # never in the past
            if at is not None and at <= now:
                attempts.append(Attempt(payment, now, True, False, decline))
        now += step
    return attempts


def _worst(attempts: list[Attempt], window: timedelta, *, retries_only: bool) -> int:
    times = sorted(a.at for a in attempts if a.retry or not retries_only)
    return max((sum(1 for t in times if at - window < t <= at) for at in times), default=0)


def test_one_payment_under_a_30_day_clock_gets_its_cap_and_not_one_more() -> None:
    eager = RecoveryPolicy(schedule=Eager())
    attempts = _walk(eager, "visa", {"pay_1": T0}, Decline("insufficient_funds"))
    assert sum(a.retry for a in attempts) == 15
    lowered = RecoveryPolicy(schedule=Eager(), caps={"visa": Caps(per_card=6, per_payment=4)})
    attempts = _walk(lowered, "visa", {"pay_1": T0}, Decline("insufficient_funds"))
    assert sum(a.retry for a in attempts) == 4
    assert max(a.at for a in attempts) <= T0 + WINDOW


def test_a_card_under_a_30_day_clock_stays_within_its_caps_across_payments() -> None:
    """Monthly and weekly payments on one card, each eager to retry: the card's 30-day and
    daily caps hold in every window while the clock moves through 60 days."""
    eager = RecoveryPolicy(schedule=Eager())
    payments = {f"pay_{i}": T0 + i * 5 * DAY + i * HOUR for i in range(8)}
    for brand, caps in (("visa", scheme_caps("visa")), ("mastercard", scheme_caps("mastercard"))):
        attempts = _walk(eager, brand, payments, Decline("insufficient_funds"), until=60 * DAY)
        assert _worst(attempts, WINDOW, retries_only=True) == caps.per_card  # reached, not passed
        if caps.per_card_daily is not None:
            assert _worst(attempts, DAY, retries_only=False) == caps.per_card_daily
        per_payment: defaultdict[str, int] = defaultdict(int)
        for attempt in attempts:
            per_payment[attempt.payment_id] += attempt.retry
        assert max(per_payment.values()) <= caps.per_payment


@settings(max_examples=60, deadline=None)
@given(
    brand=st.sampled_from(["visa", "mastercard", "amex"]),
    per_card=st.integers(min_value=0, max_value=15),
    per_payment=st.integers(min_value=0, max_value=15),
    daily=st.integers(min_value=0, max_value=10),
    offsets=st.lists(st.integers(min_value=0, max_value=40 * 24), min_size=1, max_size=5),
    declines=st.lists(SOFT, min_size=1, max_size=5),
    eager=st.booleans(),
    step_hours=st.sampled_from([1, 5, 13]),
)
def test_the_policy_never_exceeds_the_caps(
    brand: str,
    per_card: int,
    per_payment: int,
    daily: int,
    offsets: list[int],
    declines: list[Decline],
    eager: bool,
    step_hours: int,
) -> None:
    caps = Caps(per_card, per_payment, daily)
    policy = RecoveryPolicy(schedule=Eager() if eager else FixedSchedule(), caps={brand: caps})
    firsts = {f"pay_{i}": T0 + o * HOUR for i, o in enumerate(offsets)}
    attempts = _walk(policy, brand, firsts, declines[0], until=70 * DAY, step=step_hours * HOUR)
    assert _worst(attempts, WINDOW, retries_only=True) <= per_card
    retried_on_a_day = [a for a in attempts if a.retry]
    if retried_on_a_day:
        assert all(
            sum(1 for t in attempts if a.at - DAY < t.at <= a.at) <= daily for a in retried_on_a_day
        )
    by_payment: defaultdict[str, list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        by_payment[attempt.payment_id].append(attempt)
    for mine in by_payment.values():
        assert sum(a.retry for a in mine) <= per_payment
        assert all(a.at <= mine[0].at + WINDOW for a in mine)


# --- the learned schedule -------------------------------------------------------------------


def _situation(at: datetime = T0, retries: int = 0) -> Situation:
    found = classify(Decline("insufficient_funds"))
    return Situation(found, at, retries, at, at + WINDOW)


def _stats_paying_on_the_15th(
    outcomes: int, good: float = 0.9, other: float = 0.05
) -> RecoveryStats:
    """Retries of insufficient funds that succeed on the 15th more often than elsewhere."""
    stats = RecoveryStats()
    key = classify(Decline("insufficient_funds")).key
    rng = random.Random(5)
    for _ in range(outcomes):
        declined = T0 + rng.randrange(0, 60 * 24) * HOUR
        at = declined + rng.randrange(1, 29 * 24) * HOUR
        stats.record(key, declined, at, rng.random() < (good if at.day == 15 else other))
    return stats


def test_the_learned_schedule_falls_back_to_the_fixed_one_without_enough_data() -> None:
    learned = LearnedSchedule(_stats_paying_on_the_15th(100), random.Random(1), min_outcomes=300)
    for retries in range(4):
        expected = FixedSchedule().propose(_situation(retries=retries))
        assert learned.propose(_situation(retries=retries)) == expected
    assert learned.propose(_situation(retries=4)) is None


def test_the_learned_schedule_finds_the_good_day() -> None:
    learned = LearnedSchedule(_stats_paying_on_the_15th(5000), random.Random(1))
    days = [learned.propose(_situation()) for _ in range(300)]
    assert sum(1 for d in days if d is not None and d.day == 15) > 290


def test_the_learned_schedule_explores_while_the_evidence_is_thin() -> None:
    """With a smaller difference and outcomes spread thin, the 15th is the favourite, yet other
    days still get tried: their draws are wide (Thompson sampling, as routing does)."""
    learned = LearnedSchedule(_stats_paying_on_the_15th(2000, 0.6, 0.3), random.Random(1))
    days = [learned.propose(_situation()) for _ in range(300)]
    counts = Counter(d.day for d in days if d is not None)
    assert counts.most_common(1)[0][0] == 15
    assert 300 - counts[15] > 30
    assert len(counts) > 5


def test_the_learned_schedule_is_deterministic_given_a_seed() -> None:
    stats = _stats_paying_on_the_15th(2000, 0.6, 0.3)
    first = LearnedSchedule(stats, random.Random(42))
    second = LearnedSchedule(stats, random.Random(42))
    proposals = [(first.propose(_situation()), second.propose(_situation())) for _ in range(50)]
    assert all(a == b for a, b in proposals)
    other = LearnedSchedule(stats, random.Random(43))
    assert [other.propose(_situation()) for _ in range(50)] != [a for a, _ in proposals]


def test_the_learned_schedule_stays_within_the_recovery_and_after_the_earliest_time() -> None:
    learned = LearnedSchedule(_stats_paying_on_the_15th(5000), random.Random(3))
    situation = Situation(classify(Decline("insufficient_funds")), T0, 1, T0 + 3 * DAY, T0 + WINDOW)
    for _ in range(100):
        at = learned.propose(situation)
        assert at is not None
        assert T0 + 3 * DAY <= at <= T0 + WINDOW
