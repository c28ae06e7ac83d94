"""Recovering declined renewals: which declines may be tried again, when, and how often.

Pure domain: the decline classification (from Tessera's decline codes, Mastercard's merchant
advice codes and Visa's decline categories), the schemes' retry caps, and the policy that turns a
card's attempt history into the next attempt's time — or none. The worker and the API ask the
same `RecoveryPolicy`, so no path can retry what it refuses. Table and sources:
docs/subscriptions.md.

A hard decline is never retried: `RecoveryPolicy.decide` returns no time for a payment with a
`never` decline, nor for any payment of a card with a `never` decline since its last update,
whatever the schedule proposes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Protocol

from core.errors import InvalidRequest

__all__ = [
    "DEFAULT_CAPS",
    "MAC_RETRY_AFTER",
    "SCHEME_CAPS",
    "WINDOW",
    "Action",
    "Attempt",
    "Caps",
    "Classification",
    "Decision",
    "Decline",
    "DeclineClass",
    "FixedSchedule",
    "History",
    "LearnedSchedule",
    "RecoveryPolicy",
    "RecoveryStats",
    "Schedule",
    "Situation",
    "classify",
    "scheme_caps",
]

#: The schemes count reattempts over 30 days; so do the caps, and a recovery lasts at most that.
WINDOW: Final = timedelta(days=30)
DAY: Final = timedelta(days=1)


class DeclineClass(StrEnum):
    NEVER = "never"
    LATER = "later"
    AFTER_UPDATE = "after_update"


#: Tessera's decline codes (what the connectors map each PSP's codes to) by class.
NEVER_CODES: Final = frozenset(
    {
        "do_not_try_again",
        "lost_card",
        "stolen_card",
        "pickup_card",
        "closed_account",
        "invalid_number",
        "invalid_account",
        "no_such_issuer",
        "stop_recurring",
        "revocation_of_authorization",
        "transaction_not_allowed",
        "fraudulent",
        "authentication_required",
    }
)
LATER_CODES: Final = frozenset(
    {
        "insufficient_funds",
        "issuer_unavailable",
        "try_again_later",
        "do_not_honor",
        "generic_decline",
        "withdrawal_limit_exceeded",
        "processing_error",
    }
)
AFTER_UPDATE_CODES: Final = frozenset({"expired_card", "incorrect_cvc"})

#: Mastercard merchant advice codes 24-30 ("retry after …"): the earliest a retry may go.
MAC_RETRY_AFTER: Final[Mapping[str, timedelta]] = MappingProxyType(
    {
        "24": timedelta(hours=1),
        "25": timedelta(hours=24),
        "26": timedelta(days=2),
        "27": timedelta(days=4),
        "28": timedelta(days=6),
        "29": timedelta(days=8),
        "30": timedelta(days=10),
    }
)


@dataclass(frozen=True, slots=True)
class Decline:
    """A decline as the processor gave it: our code and, when the issuer sent them, the advice."""

    code: str
    merchant_advice_code: str | None = None  # Mastercard: "01", "02", "03", "21", "24".."30"
    visa_category: int | None = None  # Visa: 1 never, 2 not now, 3 data quality, 4 generic


@dataclass(frozen=True, slots=True)
class Classification:
    decline_class: DeclineClass
    #: Which rule of the table decided (shown in the payment's recovery and in the docs).
    rule: str
    #: The earliest a retry may go after the decline (Mastercard MAC 24-30), else zero.
    not_before: timedelta = timedelta(0)

    @property
    def key(self) -> str:
        """What the learned schedule counts outcomes by: the class and the rule that chose it."""
        return f"{self.decline_class}:{self.rule}"


def classify(decline: Decline) -> Classification:
    """The table of docs/subscriptions.md. A `never` signal from any source wins,
    then `after_update`, then `later`; a code nobody knows is `never` (a fee and a scheme
    programme cost more than one lost retry)."""
    mac, category, code = decline.merchant_advice_code, decline.visa_category, decline.code
    if category == 1:
        return Classification(DeclineClass.NEVER, "visa_category_1")
    if mac in ("03", "21"):
        return Classification(DeclineClass.NEVER, f"mac_{mac}")
    if code in NEVER_CODES:
        return Classification(DeclineClass.NEVER, code)
    if mac == "01":
        return Classification(DeclineClass.AFTER_UPDATE, "mac_01")
    if code in AFTER_UPDATE_CODES:
        return Classification(DeclineClass.AFTER_UPDATE, code)
    if category == 3:
        return Classification(DeclineClass.AFTER_UPDATE, "visa_category_3")
    if mac is not None and mac in MAC_RETRY_AFTER:
        return Classification(DeclineClass.LATER, code, MAC_RETRY_AFTER[mac])
    if code in LATER_CODES:
        return Classification(DeclineClass.LATER, code)
    if mac == "02" or category in (2, 4):
        return Classification(DeclineClass.LATER, "unlisted_code_soft_advice")
    return Classification(DeclineClass.NEVER, "unknown_code")


# --- caps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    """Retries a card or a payment may get. `per_card`: retries of any of the card's payments
    in any 30 days; `per_payment`: retries of one payment (its recovery lasts at most 30 days);
    `per_card_daily`: attempts of any kind on the card in any 24 hours (None: no such rule)."""

    per_card: int
    per_payment: int
    per_card_daily: int | None = None

    def lowered(self, configured: Caps) -> Caps:
        """`configured`, after checking that no number is higher than these (the scheme's)."""
        for name in ("per_card", "per_payment", "per_card_daily"):
            mine, theirs = getattr(self, name), getattr(configured, name)
            if theirs is not None and theirs < 0:
                raise InvalidRequest(f"{name} must not be negative", param=name)
            if mine is not None and (theirs is None or theirs > mine):
                raise InvalidRequest(
                    f"{name} may be at most the scheme's {mine}", code="cap_too_high", param=name
                )
        return configured


#: Published caps (docs/subscriptions.md): Visa, 15 reattempts in 30 days (categories
#: 2-4); Mastercard, 35 in 30 days (same card, merchant, amount) and 10 declines a day per card.
SCHEME_CAPS: Final[Mapping[str, Caps]] = MappingProxyType(
    {"visa": Caps(per_card=15, per_payment=15), "mastercard": Caps(35, 35, 10)}
)
#: Brands without a published cap that we know of: Visa's 30-day number and Mastercard's daily
#: one, the stricter of each (an assumption, see the docs).
DEFAULT_CAPS: Final = Caps(per_card=15, per_payment=15, per_card_daily=10)


def scheme_caps(brand: str) -> Caps:
    return SCHEME_CAPS.get(brand, DEFAULT_CAPS)


# --- history and decisions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One authorization attempt on the card: a payment's first one, or a retry of it."""

    payment_id: str
    at: datetime
    retry: bool
    approved: bool
    decline: Decline | None = None
    #: Sent, its answer not recorded yet: it counts against the caps, and decides nothing else.
    pending: bool = False


@dataclass(frozen=True, slots=True)
class History:
    """What the policy judges on: every attempt on the card in the last 30 days or more (all its
    payments, oldest first), the payment under recovery, and the card's last account update."""

    payment_id: str
    brand: str
    card_attempts: tuple[Attempt, ...]
    card_updated_at: datetime | None = None

    def of_payment(self) -> list[Attempt]:
        return [a for a in self.card_attempts if a.payment_id == self.payment_id]


class Action(StrEnum):
    RETRY = "retry"
    NEVER = "never"
    AWAITING_UPDATE = "awaiting_update"
    EXHAUSTED = "exhausted"
    NOTHING_TO_RECOVER = "nothing_to_recover"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    at: datetime | None = None
    reason: str = ""
    classification: Classification | None = None


@dataclass(frozen=True, slots=True)
class Situation:
    """What a schedule sees of a payment under recovery (no hidden truth, only its history)."""

    classification: Classification
    declined_at: datetime  # the payment's first decline
    retries: int  # retries made so far
    earliest: datetime  # now, or later if the issuer asked to wait
    deadline: datetime  # the recovery's end


class Schedule(Protocol):
    def propose(self, situation: Situation) -> datetime | None:
        """When to try next, at or after `situation.earliest`; None: no more tries."""
        ...


@dataclass(frozen=True, slots=True)
class FixedSchedule:
    """Retries on fixed days after the first decline (default 1, 3, 5, 7)."""

    days: tuple[int, ...] = (1, 3, 5, 7)

    def propose(self, situation: Situation) -> datetime | None:
        if situation.retries >= len(self.days):
            return None
        return max(situation.earliest, situation.declined_at + self.days[situation.retries] * DAY)


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """Classification, scheme caps (per brand, configurable lower) and a schedule."""

    schedule: Schedule = FixedSchedule()
    caps: Mapping[str, Caps] = field(default_factory=dict)
    recovery_window: timedelta = WINDOW

    def __post_init__(self) -> None:
        for brand, configured in self.caps.items():
            scheme_caps(brand).lowered(configured)
        if not timedelta(0) < self.recovery_window <= WINDOW:
            raise InvalidRequest("the recovery window is at most 30 days", param="window")

    def caps_for(self, brand: str) -> Caps:
        return self.caps.get(brand, scheme_caps(brand))

    def next_attempt(self, history: History, now: datetime) -> datetime | None:
        return self.decide(history, now).at

    def on_request(self, history: History, now: datetime) -> Decision:
        """A retry the merchant asks for now (`POST /v1/payments/{id}/retry`): the same
        classification, caps and recovery window, without the schedule. It may go now only if
        the decision is `retry` at `now`; a later `at` is when the caps (or the issuer's advice)
        would allow it."""
        return RecoveryPolicy(_AtOnce(), self.caps, self.recovery_window).decide(history, now)

    def decide(self, history: History, now: datetime) -> Decision:
        mine = history.of_payment()
        answered = [a for a in mine if not a.pending]
        if not answered or any(a.approved for a in mine):
            return Decision(Action.NOTHING_TO_RECOVER, reason="no declined attempt")
        for attempt in mine:
            hard = _hard(attempt)
            if hard is not None:
                return Decision(Action.NEVER, reason=hard.rule, classification=hard)
        updated = history.card_updated_at
        for attempt in history.card_attempts:
            hard = _hard(attempt)
            if hard is not None and (updated is None or attempt.at >= updated):
                return Decision(Action.NEVER, reason=f"card: {hard.rule}", classification=hard)
        last = answered[-1]
        assert last.decline is not None  # a declined attempt carries its decline (_hard saw it)
        found = classify(last.decline)
        deadline = answered[0].at + self.recovery_window
        if found.decline_class is DeclineClass.AFTER_UPDATE:
            if updated is None or updated <= last.at:
                return Decision(Action.AWAITING_UPDATE, reason=found.rule, classification=found)
            candidate: datetime | None = max(now, updated)
        else:
            earliest = max(now, last.at + found.not_before)
            retries = sum(1 for a in mine if a.retry)
            candidate = self.schedule.propose(
                Situation(found, answered[0].at, retries, earliest, deadline)
            )
            if candidate is not None:
                candidate = max(candidate, earliest)
        if candidate is None:
            return Decision(Action.EXHAUSTED, reason="schedule", classification=found)
        allowed = _within_caps(candidate, self.caps_for(history.brand), mine, history)
        if allowed is None or allowed > deadline:
            return Decision(Action.EXHAUSTED, reason="caps", classification=found)
        return Decision(Action.RETRY, allowed, found.rule, found)


@dataclass(frozen=True, slots=True)
class _AtOnce:
    def propose(self, situation: Situation) -> datetime | None:
        return situation.earliest


def _hard(attempt: Attempt) -> Classification | None:
    if attempt.approved or attempt.pending:
        return None
    if attempt.decline is None:  # a declined attempt without a code: nothing says it may retry
        return Classification(DeclineClass.NEVER, "unknown_code")
    found = classify(attempt.decline)
    return found if found.decline_class is DeclineClass.NEVER else None


def _within_caps(
    candidate: datetime, caps: Caps, mine: Sequence[Attempt], history: History
) -> datetime | None:
    """The earliest time at or after `candidate` at which one more retry stays within every
    cap, or None if the payment has had all its retries."""
    if sum(1 for a in mine if a.retry) >= caps.per_payment:
        return None
    rules = [(sorted(a.at for a in history.card_attempts if a.retry), WINDOW, caps.per_card)]
    if caps.per_card_daily is not None:
        rules.append((sorted(a.at for a in history.card_attempts), DAY, caps.per_card_daily))
    at = candidate
    moved = True
    while moved:
        moved = False
        for times, window, cap in rules:
            if cap <= 0:
                return None
            inside = [t for t in times if at - window < t <= at]
            if len(inside) >= cap:
                at = inside[len(inside) - cap] + window  # when enough of them left the window
                moved = True
    return at


# --- the learned schedule --------------------------------------------------------------------

#: "Hours since the decline" is counted in these buckets (lower bounds, hours).
HOUR_BUCKETS: Final = (0, 2, 6, 12, 24, 48, 96, 168, 336)


def _hours_bucket(hours: float) -> int:
    bucket = 0
    for index, bound in enumerate(HOUR_BUCKETS):
        if hours >= bound:
            bucket = index
    return bucket


@dataclass(slots=True)
class RecoveryStats:
    """Retry outcomes per decline kind (`Classification.key`) by hours since the decline, day
    of month and weekday: what the learned schedule knows, and all it knows."""

    cells: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    totals: dict[str, list[int]] = field(default_factory=dict)

    @staticmethod
    def features(declined_at: datetime, at: datetime) -> tuple[int, int, int]:
        hours = (at - declined_at).total_seconds() / 3600
        return _hours_bucket(hours), at.day, at.weekday()

    def record(self, key: str, declined_at: datetime, at: datetime, approved: bool) -> None:
        hours, day, weekday = self.features(declined_at, at)
        for cell in ((key, "h", hours), (key, "d", day), (key, "w", weekday)):
            counts = self.cells.setdefault(cell, [0, 0])
            counts[0] += approved
            counts[1] += 1
        total = self.totals.setdefault(key, [0, 0])
        total[0] += approved
        total[1] += 1


@dataclass(slots=True)
class LearnedSchedule:
    """Tries at the time with the best sampled recovery rate before the recovery's end.

    Like routing (docs/routing.md), rates are drawn from their Beta posteriors rather than
    averaged (Thompson sampling): a cell with few outcomes — an hour or a day nobody tried yet —
    has wide draws and gets tried sometimes. A candidate's rate is the decline kind's rate times
    the lifts of its hours-since-decline, day-of-month and weekday cells. Until a decline kind has
    `min_outcomes` outcomes, the fixed schedule decides. Deterministic given `rng`'s seed."""

    stats: RecoveryStats
    rng: random.Random
    fallback: FixedSchedule = FixedSchedule()
    max_retries: int = 4
    min_outcomes: int = 300
    #: Weight of the prior (the kind's overall rate) in each cell, in outcomes.
    prior_strength: float = 4.0

    def propose(self, situation: Situation) -> datetime | None:
        if situation.retries >= self.max_retries:
            return None
        key = situation.classification.key
        approved, tried = self.stats.totals.get(key, (0, 0))
        if tried < self.min_outcomes:
            return self.fallback.propose(situation)
        base = (approved + 1) / (tried + 2)
        drawn: dict[tuple[str, int], float] = {}

        def lift(dimension: str, value: int) -> float:
            cell = (dimension, value)
            if cell not in drawn:
                ok, n = self.stats.cells.get((key, dimension, value), (0, 0))
                alpha = self.prior_strength * base + ok
                beta = self.prior_strength * (1 - base) + n - ok
                drawn[cell] = self.rng.betavariate(alpha, beta) / base
            return drawn[cell]

        best: tuple[float, datetime] | None = None
        for at in _candidates(situation):
            hours, day, weekday = RecoveryStats.features(situation.declined_at, at)
            score = lift("h", hours) * lift("d", day) * lift("w", weekday)
            if best is None or score > best[0]:
                best = (score, at)
        return None if best is None else best[1]


def _candidates(situation: Situation) -> list[datetime]:
    """From the earliest allowed time: then, in 1, 6 and 12 hours, then daily until the end."""
    start = situation.earliest
    times = [start + timedelta(hours=h) for h in (0, 1, 6, 12)]
    times += [start + days * DAY for days in range(1, 31)]
    return [t for t in times if t <= situation.deadline]
