"""`make bench-recovery`: what the recovery of declined renewals costs, on this machine.

A whole stack (API, vault, both simulators, Postgres, Redis) on fresh bench databases, a merchant
with recovery on, and BENCH_RECOVERIES (default 300) renewals the scripted issuer declines
`insufficient_funds` and then approves (BENCH_RECOVERY_WORKERS, default 1,2,1,2: a batch per
entry, worked by that many workers). It prints:

- the declined renewal's response time (p50/p99: the decline, its recovery scheduled, both
  events, in the request's transaction) against an approved renewal's;
- the worker's retries per second at the fixed schedule's first day (each: a transaction that
  decides under the payment's and the card's locks and writes the attempt, the MIT through the
  vault to PSP A, a transaction that records it, moves the payment on and posts the ledger),
  with one worker and with two working the same queue.

Numbers only; nothing asserts. The worker runs in this process with its clock moved a day on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog

from api.settings import ApiSettings
from api.wiring import open_services
from tessera.runtime.db import create_pool
from tessera.runtime.redis_client import connect as connect_redis
from tessera.runtime.settings import load_settings
from tests.bench import database
from tests.support.stack import Stack, start_stack
from tests.support.subscriptions import unused_visa

COUNT = int(os.environ.get("BENCH_RECOVERIES", "300"))
WORKERS = [int(w) for w in os.environ.get("BENCH_RECOVERY_WORKERS", "1,2,1,2").split(",") if w]


class Shop:
    def __init__(self, stack: Stack, merchant: dict[str, str]) -> None:
        self.stack = stack
        self.api = httpx.Client(
            base_url=stack.urls["api"],
            headers={"authorization": f"Bearer {merchant['secret_key']}"},
            timeout=30,
        )
        self.vault = httpx.Client(
            base_url=stack.urls["vault"],
            headers={"authorization": f"Bearer {merchant['publishable_key']}"},
            timeout=30,
        )
        self.psp_a = httpx.Client(base_url=stack.urls["psp_a"], timeout=30)

    def post(self, body: dict[str, Any]) -> tuple[httpx.Response, float]:
        key = {"idempotency-key": os.urandom(12).hex()}
        started = time.perf_counter()
        response = self.api.post("/v1/payments", json=body, headers=key)
        return response, (time.perf_counter() - started) * 1000

    def payment_method(self, number: str) -> str:
        card = {"number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123"}
        token = self.vault.post("/v1/tokens", json=card).json()["id"]
        setup = {"amount": 1200, "currency": "EUR", "token": token}
        response, _ = self.post({**setup, "setup_future_usage": "off_session"})
        assert response.status_code == 201, response.text
        method: str = response.json()["payment_method"]
        return method

    def renewal(self, method: str) -> tuple[httpx.Response, float]:
        body = {
            "amount": 1200,
            "currency": "EUR",
            "payment_method": method,
            "off_session": True,
            "mit_reason": "recurring",
        }
        return self.post(body)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def declined_renewals(shop: Shop, count: int) -> tuple[list[float], list[float]]:
    """`count` renewals declined (each of its own card), and as many approved; their times."""
    declined, approved = [], []
    for _ in range(count):
        number = unused_visa()
        method = shop.payment_method(number)
        script = {"number": number, "outcomes": [{"decline_code": "insufficient_funds"}]}
        shop.psp_a.post("/admin/issuer_script", json=script).raise_for_status()
        response, ms = shop.renewal(method)
        assert response.status_code == 402, response.text
        declined.append(ms)
        response, ms = shop.renewal(method)
        assert response.status_code == 201, response.text
        approved.append(ms)
    return declined, approved


async def retries_per_second(env: dict[str, str], workers: int, expected: int) -> float:
    """Workers (in this process, each with its own pool) run the due retries until none is
    left; the retries per second."""
    settings = load_settings(ApiSettings, env)
    pools = [
        await create_pool(settings.database_url, min_size=1, max_size=4, wait_seconds=10)
        for _ in range(workers)
    ]
    redis_client = connect_redis(settings.redis_url, socket_timeout=2)
    moment = datetime.now(UTC) + timedelta(days=1, minutes=5)
    try:
        async with open_services(settings, pools[0], redis_client) as first:
            others = [open_services(settings, pool, redis_client) for pool in pools[1:]]
            services = [first, *[await o.__aenter__() for o in others]]
            for s in services:
                s.recovery.clock = lambda: moment
                await s.recovery.run_due(0)  # the learned schedule's read, before the clock

            async def drain(s: Any) -> int:
                done = 0
                while (looked := await s.recovery.run_due(50)) > 0:
                    done += looked
                return done

            started = time.perf_counter()
            looked = sum(await asyncio.gather(*(drain(s) for s in services)))
            seconds = time.perf_counter() - started
            for o in others:
                await o.__aexit__(None, None, None)
    finally:
        await redis_client.aclose()
        for pool in pools:
            await pool.close()
    print(f"    ({workers} worker(s): {looked} recoveries looked at, {expected} expected)")
    return looked / seconds


def main() -> None:
    # The worker runs in this process: its info lines would be this benchmark's cost.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    _, env = database.fresh_bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(env, Path(tmp))
        try:
            merchant = stack.create_merchant("Recovery bench", "--recovery")
            shop = Shop(stack, merchant)
            print("\nwarming up (100 recoveries, not counted) ...", flush=True)
            declined_renewals(shop, 100)
            asyncio.run(retries_per_second({**stack.env}, 1, 100))
            for workers in WORKERS:
                print(f"\n{COUNT} renewals declined, then approved (recovery on) ...", flush=True)
                declined, approved = declined_renewals(shop, COUNT)
                for name, times in (("declined renewal", declined), ("approved", approved)):
                    print(
                        f"  {name:<38} p50 {statistics.median(times):6.1f} ms  "
                        f"p99 {percentile(times, 0.99):6.1f} ms",
                        flush=True,
                    )
                worker_env = {**stack.env, "TESSERA_API_LOG_LEVEL": "warning"}
                rate = asyncio.run(retries_per_second(worker_env, workers, COUNT))
                print(f"  {'worker retries, ' + str(workers) + ' worker(s)':<38} {rate:8.1f} /s")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
