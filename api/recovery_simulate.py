"""`tessera recovery simulate`: the learned recovery schedule against a fixed one, offline.

A synthetic population renews monthly on stored cards. Its hidden truth — each customer's
payday, which renewals find the account short, cards that expire (and whether and when an
account updater announces the new one), issuers that are briefly down, hard declines — decides
each attempt's outcome. The recovery side sees only what a PSP would tell it: the decline code
(with Mastercard's merchant advice code where the issuer sends one), the card update when it
lands, and each retry's outcome. Both schedules run through the real `core.recovery`
classifier, caps and policy, on a simulated clock; an independent checker counts scheme-cap
violations and retries of hard declines. See docs/subscriptions.md.
"""

from __future__ import annotations

import calendar
import heapq
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.recovery import (
    WINDOW,
    Action,
    Attempt,
    Decline,
    DeclineClass,
    FixedSchedule,
    History,
    LearnedSchedule,
    RecoveryPolicy,
    RecoveryStats,
    Schedule,
    classify,
    scheme_caps,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
#: Renewal cycles simulated (monthly); recoveries run on for up to 30 days after the last.
MONTHS = 3
AMOUNTS = (499, 999, 1499, 2999)

# Hidden truth: how often each kind of trouble meets a renewal, and what it takes to clear.
SHORT_OF_FUNDS = 0.12
EXPIRED = 0.03
UPDATER_FINDS = 0.75  # share of expired cards the account updater announces (within 10 days)
ISSUER_DOWN = 0.015
HARD = 0.01
SOFT_NOISE = 0.02  # "do not honor" with no pattern: a retry succeeds at random
APPROVE_AFTER_PAYDAY = 0.92
APPROVE_BEFORE_PAYDAY = 0.04
APPROVE_NOISE = 0.3
HARD_CODES = ("lost_card", "stolen_card", "closed_account", "stop_recurring")


@dataclass(slots=True)
class Customer:
    brand: str
    amount: int
    renewal_day: int
    renewal_hour: int
    payday: str  # "1", "15", "last" (day of month) or "friday" (weekly)


@dataclass(slots=True)
class Renewal:
    """One renewal's hidden truth."""

    customer: int
    at: datetime
    trouble: str  # "", "short", "expired", "down", "hard", "noise"
    funds_at: datetime | None = None  # short: when the next payday's money arrives
    up_at: datetime | None = None  # down: when the issuer answers again
    update_at: datetime | None = None  # expired: when the account updater announces the card
    hard_code: str = ""
    mac: str | None = None


@dataclass(slots=True)
class Result:
    schedule: str
    declined: int = 0
    recovered: int = 0
    revenue: int = 0
    retries: int = 0
    retries_of_recovered: int = 0
    hard_declines: int = 0
    hard_retries: int = 0
    cap_violations: int = 0
    #: Per decline kind (`Classification.key`): declined, recovered, retries.
    kinds: dict[str, list[int]] = field(default_factory=dict)

    @property
    def attempts_per_recovery(self) -> float:
        return self.retries / self.recovered if self.recovered else 0.0


def next_payday(kind: str, after: datetime) -> datetime:
    """The first payday strictly after `after`, at 06:00 (when the money shows)."""
    day = after.date()
    for _ in range(40):
        day += timedelta(days=1)
        last = calendar.monthrange(day.year, day.month)[1]
        if (
            (kind == "friday" and day.weekday() == 4)
            or (kind == "last" and day.day == last)
            or (kind.isdigit() and day.day == int(kind))
        ):
            return datetime(day.year, day.month, day.day, 6, tzinfo=UTC)
    raise AssertionError(kind)


def population(seed: int, customers: int) -> tuple[list[Customer], list[Renewal]]:
    rng = random.Random(seed)
    people = [
        Customer(
            brand="visa" if rng.random() < 0.6 else "mastercard",
            amount=rng.choice(AMOUNTS),
            renewal_day=rng.randint(1, 28),
            renewal_hour=rng.randint(0, 23),
            payday=rng.choices(("1", "15", "last", "friday"), (40, 20, 25, 15))[0],
        )
        for _ in range(customers)
    ]
    renewals = []
    for month in range(MONTHS):
        for index, person in enumerate(people):
            at = datetime(2026, 1 + month, person.renewal_day, person.renewal_hour, tzinfo=UTC)
            renewal = Renewal(index, at, "")
            draw = rng.random()
            if draw < HARD:
                renewal.trouble = "hard"
                renewal.hard_code = rng.choice(HARD_CODES)
            elif draw < HARD + EXPIRED:
                renewal.trouble = "expired"
                if rng.random() < UPDATER_FINDS:
                    renewal.update_at = at + timedelta(hours=rng.uniform(1, 240))
            elif draw < HARD + EXPIRED + ISSUER_DOWN:
                renewal.trouble = "down"
                renewal.up_at = at + timedelta(hours=rng.uniform(0.5, 8))
            elif draw < HARD + EXPIRED + ISSUER_DOWN + SHORT_OF_FUNDS:
                renewal.trouble = "short"
                renewal.funds_at = next_payday(person.payday, at)
                if person.brand == "mastercard" and rng.random() < 0.5:
                    renewal.mac = rng.choice(("02", "24", "25", "26"))
            elif draw < HARD + EXPIRED + ISSUER_DOWN + SHORT_OF_FUNDS + SOFT_NOISE:
                renewal.trouble = "noise"
            renewals.append(renewal)
    return people, renewals


def _first_decline(renewal: Renewal, brand: str) -> Decline | None:
    """What the PSP answers to the renewal itself (None: approved)."""
    match renewal.trouble:
        case "hard":
            advice = (
                "03" if brand == "mastercard" and renewal.hard_code != "stop_recurring" else None
            )
            if renewal.hard_code == "stop_recurring" and brand == "mastercard":
                advice = "21"
            return Decline(renewal.hard_code, advice, 1 if brand == "visa" else None)
        case "expired":
            return Decline("expired_card", "01" if brand == "mastercard" else None)
        case "down":
            return Decline("issuer_unavailable", None, 2 if brand == "visa" else None)
        case "short":
            return Decline("insufficient_funds", renewal.mac, 2 if brand == "visa" else None)
        case "noise":
            return Decline("do_not_honor", None, 4 if brand == "visa" else None)
    return None


def _retry_approved(renewal: Renewal, at: datetime, rng: random.Random) -> bool:
    """The hidden truth's answer to a retry at `at` (a retry of a hard decline never passes)."""
    match renewal.trouble:
        case "short":
            assert renewal.funds_at is not None
            chance = APPROVE_AFTER_PAYDAY if at >= renewal.funds_at else APPROVE_BEFORE_PAYDAY
            return rng.random() < chance
        case "down":
            assert renewal.up_at is not None
            return at >= renewal.up_at and rng.random() < 0.97
        case "expired":
            return renewal.update_at is not None and at >= renewal.update_at
        case "noise":
            return rng.random() < APPROVE_NOISE
    return False


@dataclass(slots=True)
class _Card:
    attempts: list[Attempt] = field(default_factory=list)
    updated_at: datetime | None = None


def run(
    people: list[Customer], renewals: list[Renewal], schedule: Schedule, name: str, seed: int
) -> Result:
    """Every renewal, then every retry the policy schedules, in time order on one clock."""
    policy = RecoveryPolicy(schedule=schedule)
    learned = schedule if isinstance(schedule, LearnedSchedule) else None
    rng = random.Random(seed)
    result = Result(name)
    cards: defaultdict[int, _Card] = defaultdict(_Card)
    events: list[tuple[datetime, int, str, int]] = []
    for number, renewal in enumerate(renewals):
        events.append((renewal.at, number, "renewal", number))
        if renewal.update_at is not None:
            events.append((renewal.update_at, len(renewals) + number, "update", number))
    heapq.heapify(events)
    sequence = 2 * len(renewals)
    first_decline: dict[int, tuple[datetime, str]] = {}
    awaiting: set[int] = set()
    scheduled: dict[int, datetime] = {}

    def schedule_next(number: int, now: datetime) -> None:
        nonlocal sequence
        renewal = renewals[number]
        card = cards[renewal.customer]
        history = History(
            f"pay_{number}", people[renewal.customer].brand, tuple(card.attempts), card.updated_at
        )
        decision = policy.decide(history, now)
        awaiting.discard(number)
        if decision.action is Action.RETRY:
            assert decision.at is not None
            sequence += 1
            scheduled[number] = decision.at
            heapq.heappush(events, (decision.at, sequence, "retry", number))
        elif decision.action is Action.AWAITING_UPDATE:
            awaiting.add(number)

    while events:
        now, _, kind, number = heapq.heappop(events)
        renewal = renewals[number]
        person = people[renewal.customer]
        card = cards[renewal.customer]
        payment = f"pay_{number}"
        if kind == "update":
            card.updated_at = now
            if number in awaiting:
                schedule_next(number, now)
            continue
        if kind == "renewal":
            decline = _first_decline(renewal, person.brand)
            card.attempts.append(Attempt(payment, now, False, decline is None, decline))
            if decline is None:
                continue
            result.declined += 1
            found = classify(decline)
            first_decline[number] = (now, found.key)
            result.kinds.setdefault(found.key, [0, 0, 0])[0] += 1
            if found.decline_class is DeclineClass.NEVER:
                result.hard_declines += 1
            schedule_next(number, now)
            continue
        if scheduled.get(number) != now:
            continue
        del scheduled[number]
        result.retries += 1
        if renewal.trouble == "hard":
            result.hard_retries += 1
        approved = _retry_approved(renewal, now, rng)
        declined_at, key = first_decline[number]
        result.kinds[key][2] += 1
        if learned is not None:
            learned.stats.record(key, declined_at, now, approved)
        if approved:
            card.attempts.append(Attempt(payment, now, True, True))
            result.recovered += 1
            result.kinds[key][1] += 1
            result.revenue += person.amount
            result.retries_of_recovered += sum(
                1 for a in card.attempts if a.payment_id == payment and a.retry
            )
        else:
            decline = _first_decline(renewal, person.brand)
            card.attempts.append(Attempt(payment, now, True, False, decline))
            schedule_next(number, now)
    for index, card in cards.items():
        result.cap_violations += _violations(people[index].brand, card.attempts)
    return result


def _violations(brand: str, attempts: list[Attempt]) -> int:
    """Counted apart from the policy: retries over the scheme's 30-day and daily caps, per card
    and per payment, and any retry after a hard decline of its payment."""
    caps = scheme_caps(brand)
    count = 0
    retries = [a.at for a in attempts if a.retry]
    for index, at in enumerate(retries):
        if sum(1 for t in retries[: index + 1] if at - t < WINDOW) > caps.per_card:
            count += 1
    if caps.per_card_daily is not None:
        times = [a.at for a in attempts]
        for index, at in enumerate(times):
            if (
                sum(1 for t in times[: index + 1] if at - t < timedelta(days=1))
                > caps.per_card_daily
            ):
                count += 1
    by_payment: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        by_payment[attempt.payment_id].append(attempt)
    for mine in by_payment.values():
        if sum(1 for a in mine if a.retry) > caps.per_payment:
            count += 1
        hard = next(
            (
                a.at
                for a in mine
                if a.decline is not None and classify(a.decline).decline_class is DeclineClass.NEVER
            ),
            None,
        )
        if hard is not None:
            count += sum(1 for a in mine if a.retry and a.at > hard)
    return count


@dataclass(slots=True)
class Report:
    seed: int
    customers: int
    renewals: int
    results: list[Result]
    seconds: float


def simulate(seed: int, customers: int) -> Report:
    began = time.perf_counter()
    people, renewals = population(seed, customers)
    fixed = run(people, renewals, FixedSchedule(), "fixed 1,3,5,7", seed + 1)
    learned_schedule = LearnedSchedule(RecoveryStats(), random.Random(seed + 2))
    learned = run(people, renewals, learned_schedule, "learned", seed + 1)
    return Report(seed, customers, len(renewals), [fixed, learned], time.perf_counter() - began)


def render(report: Report) -> str:
    first = report.results[0]
    lines = [
        f"recovery simulate: seed {report.seed}, {report.customers} customers, "
        f"{report.renewals} renewals over {MONTHS} months from {START.date()}, "
        f"{first.declined} declined ({first.hard_declines} hard)",
        f"{'schedule':<15}{'recovered':>10}{'revenue EUR':>14}{'retries':>9}"
        f"{'retries/recovered':>19}{'hard retries':>14}{'cap violations':>16}",
    ]
    for r in report.results:
        lines.append(
            f"{r.schedule:<15}{r.recovered:>10}{r.revenue / 100:>14.2f}{r.retries:>9}"
            f"{r.attempts_per_recovery:>19.2f}{r.hard_retries:>14}{r.cap_violations:>16}"
        )
    lines.append("by decline kind: declined, then recovered/retries for each schedule")
    for key in sorted(first.kinds):
        cells = "".join(
            f"{r.kinds.get(key, [0, 0, 0])[1]:>10}/{r.kinds.get(key, [0, 0, 0])[2]:<8}"
            for r in report.results
        )
        lines.append(f"  {key:<42}{first.kinds[key][0]:>7}{cells}")
    lines.append(f"simulated in {report.seconds:.1f} s")
    return "\n".join(lines)
