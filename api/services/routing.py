"""Routing: which processors may take a payment, in which order.

Eligibility comes from the merchant's configuration (enabled processors, rules by currency,
brand, country of issue and amount). Among the eligible ones, the router ranks by expected value:
`auth rate x (amount - fee)`. The auth rate is learned per (processor, brand, currency) over a
sliding window of real outcomes, and sampled (Thompson sampling from a Beta distribution) rather
than averaged, so a processor with few recent outcomes — a new one, or one recovering from an
outage — still gets some traffic and is noticed again. An open circuit breaker takes a processor
out of the ranking. See docs/routing.md.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from api.storage.redis_gate import RedisGate
from tessera.runtime.redis_client import REDIS_ERRORS, RedisClient

#: Outcomes are counted in buckets of this many seconds, over this many buckets.
BUCKET_SECONDS = 60
WINDOW_BUCKETS = 10
#: Prior belief in an unknown processor's auth rate: as if 8 of 10 attempts were approved.
PRIOR_APPROVED, PRIOR_DECLINED = 8.0, 2.0


class Fee(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A fee schedule entry: fixed minor units plus basis points of the amount."""

    fixed: int = 0
    basis_points: int = 0

    def of(self, amount: int) -> int:
        return self.fixed + (amount * self.basis_points + 9_999) // 10_000


class ProcessorFees(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default: Fee = Fee()
    brands: dict[str, Fee] = {}

    def of(self, brand: str, amount: int) -> int:
        return self.brands.get(brand, self.default).of(amount)


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A processor is eligible when no rule names it, or when a rule naming it matches."""

    processor: str
    currency: str | None = None
    brand: str | None = None
    country: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None

    def matches(self, currency: str, brand: str, country: str | None, amount: int) -> bool:
        return (
            (self.currency is None or self.currency == currency)
            and (self.brand is None or self.brand == brand)
            and (self.country is None or self.country == country)
            and (self.min_amount is None or amount >= self.min_amount)
            and (self.max_amount is None or amount <= self.max_amount)
        )


class RoutingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    processors: tuple[str, ...] = ("psp_a",)
    rules: tuple[Rule, ...] = ()
    fees: dict[str, ProcessorFees] = {}
    cascade_soft_declines: bool = False
    #: Tessera retries this merchant's declined renewals (docs/subscriptions.md); off by default.
    recovery: bool = False

    def eligible(self, currency: str, brand: str, country: str | None, amount: int) -> list[str]:
        chosen = []
        for processor in self.processors:
            rules = [r for r in self.rules if r.processor == processor]
            if not rules or any(r.matches(currency, brand, country, amount) for r in rules):
                chosen.append(processor)
        return chosen


#: Declines worth trying elsewhere when the merchant switched cascading on: the issuer's
#: answer may depend on the acquirer. Hard declines (stolen card, expired) never cascade.
SOFT_DECLINES = frozenset({"do_not_honor", "generic_decline", "try_again_later"})


@dataclass
class Candidate:
    processor: str
    fee: int
    auth_rate: float
    expected_value: float


@dataclass
class OutcomeStats:
    """Approvals and attempts per (processor, brand, currency) in Redis time buckets."""

    redis: RedisClient
    clock: Any = time.time
    gate: RedisGate = field(default_factory=RedisGate)
    _cache: dict[str, tuple[float, tuple[int, int]]] = field(default_factory=dict)

    @staticmethod
    def _key(processor: str, brand: str, currency: str, bucket: int) -> str:
        return f"route:{{{processor}}}:{brand}:{currency}:{bucket}"

    async def record(self, processor: str, brand: str, currency: str, approved: bool) -> None:
        if not self.gate.open:
            return  # learning pauses; payments go on
        bucket = int(self.clock() // BUCKET_SECONDS)
        key = self._key(processor, brand, currency, bucket)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, "n", 1)
            if approved:
                pipe.hincrby(key, "ok", 1)
            pipe.expire(key, BUCKET_SECONDS * (WINDOW_BUCKETS + 1))
            await pipe.execute()
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)

    async def window(self, processor: str, brand: str, currency: str) -> tuple[int, int]:
        """(approved, attempts) over the window; cached for a second per process."""
        cache_key = f"{processor}:{brand}:{currency}"
        now = self.clock()
        cached = self._cache.get(cache_key)
        if cached and now - cached[0] < 1.0:
            return cached[1]
        bucket = int(now // BUCKET_SECONDS)
        keys = [self._key(processor, brand, currency, bucket - i) for i in range(WINDOW_BUCKETS)]
        approved = attempts = 0
        if self.gate.open:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(key, "ok", "n")
                for ok, n in await pipe.execute():
                    approved += int(ok or 0)
                    attempts += int(n or 0)
            except REDIS_ERRORS as exc:
                self.gate.failed(exc)
        self._cache[cache_key] = (now, (approved, attempts))
        return approved, attempts


async def rank(
    config: RoutingConfig,
    stats: OutcomeStats,
    *,
    currency: str,
    brand: str,
    country: str | None,
    amount: int,
    is_open: Any,
    rng: random.Random,
) -> list[Candidate]:
    """Eligible processors with closed breakers, best expected value first."""
    candidates = []
    for processor in config.eligible(currency, brand, country, amount):
        if await is_open(processor):
            continue
        approved, attempts = await stats.window(processor, brand, currency)
        rate = rng.betavariate(PRIOR_APPROVED + approved, PRIOR_DECLINED + attempts - approved)
        fee = config.fees.get(processor, ProcessorFees()).of(brand, amount)
        candidates.append(Candidate(processor, fee, rate, rate * (amount - fee)))
    candidates.sort(key=lambda c: c.expected_value, reverse=True)
    return candidates


async def processing_fee(routing: Any, conn: Any, payment: Any, amount: int) -> int:
    """The fee the payment's processor charges for capturing `amount`, by the merchant's fee
    schedule; read on `conn`, the caller's connection (it runs inside a transaction)."""
    config: RoutingConfig = await routing.config(payment["merchant_id"], conn)
    fees = config.fees.get(payment["processor"], ProcessorFees())
    return fees.of(payment["card_brand"], amount)
