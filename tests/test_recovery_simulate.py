"""`tessera recovery simulate`, run small: seeded, so its verdicts are deterministic."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from api.recovery_simulate import Report, _violations, simulate
from core.recovery import Attempt, Decline


@pytest.fixture(scope="module")
def report() -> Report:
    return simulate(seed=7, customers=2000)


def test_the_learned_schedule_recovers_more_with_no_more_attempts(report: Report) -> None:
    fixed, learned = report.results
    assert fixed.schedule.startswith("fixed")
    assert learned.schedule == "learned"
    assert fixed.declined == learned.declined > 0
    assert fixed.recovered > 0
    assert learned.revenue > fixed.revenue
    assert learned.attempts_per_recovery <= fixed.attempts_per_recovery


def test_no_cap_violations_and_no_retry_of_a_hard_decline(report: Report) -> None:
    for result in report.results:
        assert result.hard_declines > 0  # the population has some
        assert result.hard_retries == 0
        assert result.cap_violations == 0


def test_the_violation_checker_sees_what_it_should() -> None:
    """The simulator's zero means something: the checker counts retries over Visa's 15 in 30
    days, over Mastercard's 10 a day, and any retry after a hard decline."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    soft, hard = Decline("insufficient_funds"), Decline("lost_card")
    first = Attempt("pay_1", t0, False, False, soft)
    sixteen = [Attempt("pay_1", t0 + timedelta(days=1 + i), True, False, soft) for i in range(16)]
    assert _violations("visa", [first, *sixteen]) >= 1
    assert _violations("visa", [first, *sixteen[:15]]) == 0
    eleven = [Attempt(f"pay_{i}", t0 + timedelta(hours=i), False, False, soft) for i in range(11)]
    assert _violations("mastercard", eleven) == 1
    after_hard = [
        Attempt("pay_1", t0, False, False, hard),
        Attempt("pay_1", t0 + timedelta(days=1), True, False, hard),
    ]
    assert _violations("visa", after_hard) == 1


def test_the_command_prints_both_schedules() -> None:
    command = [sys.executable, "-m", "tessera.cli", "recovery", "simulate"]
    done = subprocess.run(
        [*command, "--seed", "3", "--customers", "300"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("recovery simulate: seed 3, 300 customers")
    assert any(line.startswith("fixed 1,3,5,7") for line in lines)
    assert any(line.startswith("learned") for line in lines)
