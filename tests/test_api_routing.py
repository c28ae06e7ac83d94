"""The router: eligibility by rules, expected value from learned auth rates and fees, breakers
that open under failure and close after recovery. Against the real Redis."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from api.services.breaker import CircuitBreaker
from api.services.routing import Fee, OutcomeStats, ProcessorFees, RoutingConfig, Rule, rank
from tests.conftest import ApiMerchant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def redis_client(redis_urls: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_urls["api"])
    yield client
    await client.aclose()


def names() -> tuple[str, str]:
    suffix = secrets.token_hex(3)
    return f"pspx_{suffix}", f"pspy_{suffix}"


async def never_open(_: str) -> bool:
    return False


async def feed(stats: OutcomeStats, processor: str, approved: int, declined: int) -> None:
    for _ in range(approved):
        await stats.record(processor, "visa", "EUR", approved=True)
    for _ in range(declined):
        await stats.record(processor, "visa", "EUR", approved=False)


async def first_choices(
    config: RoutingConfig, stats: OutcomeStats, draws: int = 400, amount: int = 6000
) -> dict[str, int]:
    rng = random.Random(7)
    counts: dict[str, int] = {}
    for _ in range(draws):
        ranked = await rank(
            config,
            stats,
            currency="EUR",
            brand="visa",
            country=None,
            amount=amount,
            is_open=never_open,
            rng=rng,
        )
        counts[ranked[0].processor] = counts.get(ranked[0].processor, 0) + 1
    return counts


async def test_with_equal_auth_rates_the_cheaper_processor_is_preferred(
    redis_client: aioredis.Redis,
) -> None:
    a, b = names()
    stats = OutcomeStats(redis_client)
    await feed(stats, a, 1600, 400)
    await feed(stats, b, 1600, 400)
    fees = {a: ProcessorFees(Fee(0, 300)), b: ProcessorFees(Fee(0, 100))}
    counts = await first_choices(RoutingConfig((a, b), (), fees), stats)
    assert counts.get(b, 0) > 0.75 * 400, counts


async def test_with_different_auth_rates_the_better_processor_is_preferred(
    redis_client: aioredis.Redis,
) -> None:
    a, b = names()
    stats = OutcomeStats(redis_client)
    await feed(stats, a, 270, 30)  # 90 %
    await feed(stats, b, 180, 120)  # 60 %
    fees = {a: ProcessorFees(Fee(0, 250)), b: ProcessorFees(Fee(0, 150))}
    counts = await first_choices(RoutingConfig((a, b), (), fees), stats)
    assert counts.get(a, 0) > 0.95 * 400, counts


async def test_a_processor_without_recent_outcomes_still_gets_explored(
    redis_client: aioredis.Redis,
) -> None:
    a, b = names()
    stats = OutcomeStats(redis_client)
    await feed(stats, a, 85, 15)  # known, good; b has no data: its prior keeps it in play
    counts = await first_choices(RoutingConfig((a, b)), stats)
    assert 0 < counts.get(b, 0) < counts.get(a, 0), counts


def test_rules_restrict_where_a_processor_is_eligible() -> None:
    config = RoutingConfig(
        ("psp_a", "psp_b"),
        (Rule("psp_b", currency="EUR", max_amount=50_000), Rule("psp_b", brand="amex")),
    )
    assert config.eligible("EUR", "visa", None, 1000) == ["psp_a", "psp_b"]
    assert config.eligible("USD", "visa", None, 1000) == ["psp_a"]
    assert config.eligible("EUR", "visa", None, 60_000) == ["psp_a"]
    assert config.eligible("USD", "amex", None, 60_000) == ["psp_a", "psp_b"]


def test_fees_are_fixed_plus_basis_points_per_brand() -> None:
    fees = ProcessorFees(Fee(10, 140), {"amex": Fee(20, 250)})
    assert fees.of("visa", 10_000) == 10 + 140
    assert fees.of("amex", 10_000) == 20 + 250
    assert fees.of("visa", 1) == 11  # a fraction of a cent rounds up


async def test_the_breaker_opens_under_failure_and_closes_after_a_good_probe(
    redis_client: aioredis.Redis,
) -> None:
    now = [1000.0]
    breaker = CircuitBreaker(redis_client, open_seconds=10, clock=lambda: now[0])
    processor = names()[0]
    for _ in range(6):
        await breaker.record(processor, ok=True)
    for _ in range(5):
        await breaker.record(processor, ok=False)
    assert await breaker.is_open(processor) is False  # 5 errors of 11 calls: under 50 %
    for _ in range(2):
        await breaker.record(processor, ok=False)
    assert await breaker.state(processor) == "open"
    assert await breaker.is_open(processor) is True
    now[0] += 11  # half-open: one probe goes through, the next call waits
    assert await breaker.is_open(processor) is False
    assert await breaker.is_open(processor) is True
    await breaker.record(processor, ok=False)  # the probe failed: open again
    assert await breaker.state(processor) == "open"
    now[0] += 11
    assert await breaker.is_open(processor) is False
    await breaker.record(processor, ok=True)  # the probe succeeded: closed
    assert await breaker.state(processor) == "closed"
    assert await breaker.is_open(processor) is False


def test_merchants_configure_changes_routing_and_keeps_what_it_is_not_told(
    api_env: dict[str, str], merchant: ApiMerchant
) -> None:
    def configure(*args: str) -> dict[str, object]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tessera.cli",
                "merchants",
                "configure",
                "--merchant",
                merchant.id,
                "--json",
                *args,
            ],
            env={**os.environ, **api_env},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        parsed: dict[str, object] = json.loads(result.stdout)
        return parsed

    first = configure(
        "--processors",
        "psp_a,psp_b",
        "--fee",
        "psp_a=10+140",
        "--fee",
        "psp_b:amex=20+250",
        "--cascade-soft-declines",
    )
    assert first["processors"] == ["psp_a", "psp_b"]
    assert first["cascade_soft_declines"] is True
    assert first["fees"] == {
        "psp_a": {"default": {"fixed": 10, "basis_points": 140}, "brands": {}},
        "psp_b": {
            "default": {"fixed": 0, "basis_points": 0},
            "brands": {"amex": {"fixed": 20, "basis_points": 250}},
        },
    }
    second = configure("--no-cascade-soft-declines", "--rule", "psp_b:currency=EUR")
    assert second["processors"] == ["psp_a", "psp_b"]
    assert second["cascade_soft_declines"] is False
    assert second["rules"] == [
        {
            "processor": "psp_b",
            "currency": "EUR",
            "brand": None,
            "country": None,
            "min_amount": None,
            "max_amount": None,
        }
    ]
    configure("--processors", "psp_a")  # back to the default for the other tests
