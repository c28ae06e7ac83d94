"""Campaigns 2 and 4 of issue 9, the quick part (CI): Postgres dies and Redis is lost under
load, with the history checker (campaign 5, `tests/support/history.py`) judging every run.

One stack for the module, on private storage this module starts (never the machine's servers):
a Postgres cluster whose DSN also names a standby's port (`target_session_attrs=read-write`),
and a `redis-server` without persistence. Concurrent clients authorize, capture, cancel and
refund while

- Redis is paused (CLIENT PAUSE), killed (-9) and flushed (FLUSHALL): payments go on from
  Postgres, the caches and the circuit breakers' counts fill again (an open breaker lost with
  Redis opening again is in `make chaos`);
- Postgres is stopped with `pg_ctl stop -m immediate` and restarted: every request in the gap
  is a documented retryable 503, the pools recover within seconds;
- the primary is SIGKILLed and a synchronous standby (`pg_basebackup -R`,
  `synchronous_standby_names`) promoted: nothing acknowledged is lost.

After each, the checker must find every acknowledged operation applied exactly once, none
applied that failed, the ledger balanced and equal to the payments, the simulators in agreement.
The long runs, and asynchronous replication's loss measured against synchronous replication's
none, are `make chaos` (`tests/chaos_storage.py`). The paused lock holder is
`tests/test_chaos_leases.py`; the vault's side, `tests/test_chaos_vault.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.chaos_stack import Shop, open_shop, private_env
from tests.support.history import Client, History, Kind, Result, Workload, check
from tests.support.pgcluster import API_DB, VAULT_DB, PgCluster, prepare_databases, service_env
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack, start_stack

#: Short time-outs, so leases run out and unknown outcomes settle within the test. The
#: database time-out bounds every wait for Postgres (pool, connect, statement).
DB_TIMEOUT = 2.0
AUTHORIZATION_TIMEOUT = 2.0
FAST = {
    "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": str(AUTHORIZATION_TIMEOUT),
    "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": "8",
    "TESSERA_API_DB_TIMEOUT_SECONDS": str(DB_TIMEOUT),
    "TESSERA_VAULT_DB_TIMEOUT_SECONDS": str(DB_TIMEOUT),
    "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
    "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "2",
    "TESSERA_API_PROCESSOR_CUTOFF_SECONDS": "10",
}
#: The longest a request may take when everything it waits for times out: the token read at
#: the vault, two transactions (pool wait plus a statement each), the forward through the vault.
#: Anything slower is a hang.
NO_HANG_SECONDS = 2 * (AUTHORIZATION_TIMEOUT + 2) + 2 * (2 * DB_TIMEOUT)
#: The documented 503 codes (docs/api.md): each says "retry with the same key".
RETRYABLE_CODES = {"service_unavailable", "processor_unavailable", "payment_busy", "at_capacity"}


class Storage:
    """The module's private Postgres (and the port its standby will take) and Redis."""

    def __init__(self) -> None:
        self.primary = PgCluster.initialise("primary").start()
        prepare_databases(self.primary, [API_DB, VAULT_DB])
        self.standby_port = free_port()
        self.standby: PgCluster | None = None
        self.redis = RedisServer().start()

    def close(self) -> None:
        self.redis.stop()
        for cluster in (self.standby, self.primary):
            if cluster is not None:
                cluster.remove()


@pytest.fixture(scope="module")
def storage() -> Iterator[Storage]:
    storage = Storage()
    yield storage
    storage.close()


@pytest.fixture(scope="module")
def stack(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = Path(tmp_path_factory.mktemp("chaos-storage"))
    databases = service_env([storage.primary.port, storage.standby_port])
    env = private_env(work, databases, storage.redis.url(0), storage.redis.url(1))
    stack = start_stack(env, work, worker=True, extra=FAST)
    yield stack
    stack.stop()


def _run(
    stack: Stack, shop: Shop, faults: Callable[[History], dict[str, tuple[float, float]]]
) -> tuple[History, dict[str, tuple[float, float]]]:
    """The workload around `faults`, which returns its windows by name."""
    history = History()
    workload = Workload(stack.urls["api"], shop.auth, shop.tokens, history, concurrency=5)
    workload.run_in_background()
    try:
        time.sleep(1)
        windows = faults(history)
        time.sleep(1)
    finally:
        workload.stop()
    assert workload.errors == []
    return history, windows


def _report(history: History, windows: dict[str, tuple[float, float]]) -> None:
    for name, window in windows.items():
        print(f"  answers while {name}: {dict(sorted(history.statuses(window).items()))}")
    print(f"  slowest answer {max(c.seconds for c in history.calls):.2f} s", flush=True)


def _assert_no_500_and_no_hang(history: History) -> None:
    statuses = history.statuses()
    assert "500" not in statuses
    assert "none" not in statuses, "a request got no answer"
    assert max(c.seconds for c in history.calls) < NO_HANG_SECONDS


def _assert_retryable_503s(history: History, window: tuple[float, float]) -> None:
    """Every failure started in the window is a 503 with a documented retryable code."""
    started = [c for c in history.calls if window[0] <= c.started <= window[1]]
    failures = [c for c in started if c.status is None or c.status >= 500]
    assert failures, "no request failed in the window: the fault did not bite"
    assert {c.status for c in failures} == {503}
    assert {c.code for c in failures} <= RETRYABLE_CODES


def _recovery_seconds(stack: Stack, shop: Shop, history: History, since: float) -> float:
    """Seconds from `since` until a new payment is answered 201 (retried with its key on any
    retryable answer, and recorded in the history like every other operation)."""

    async def probe() -> float:
        async with httpx.AsyncClient(base_url=stack.urls["api"]) as http:
            client = Client(http, history, shop.auth)
            payment = await client.authorize(shop.tokens[0], 500, capture=True)
        assert payment.result is Result.OK
        assert payment.completed is not None
        return payment.completed - since

    return asyncio.run(probe())


# --- Redis ------------------------------------------------------------------------------------


def test_redis_lost_under_load(storage: Storage, stack: Stack) -> None:
    """CLIENT PAUSE ALL for 2 s (every Redis call waits out its 2 s time-out), kill -9 (no
    persistence: every cached answer, auth-rate window and breaker gone) for 2 s, a restart,
    FLUSHALL. Payments go on from Postgres; nothing is charged twice or lost."""
    shop = open_shop(stack, "Redis loss")

    def faults(history: History) -> dict[str, tuple[float, float]]:
        windows = {}
        start = history.now()
        storage.redis.pause(2)
        time.sleep(2)
        windows["paused"] = (start, history.now())
        start = history.now()
        storage.redis.kill()
        time.sleep(2)
        windows["killed"] = (start, history.now())
        storage.redis.start()
        time.sleep(1)
        start = history.now()
        storage.redis.flushall()
        time.sleep(1)
        windows["flushed"] = (start, history.now())
        return windows

    history, windows = _run(stack, shop, faults)
    result = check(history, shop.sources(stack))
    result.print("redis: CLIENT PAUSE (2 s), kill -9 (2 s), FLUSHALL, under load")
    _report(history, windows)
    assert result.ok, result.summary()
    _assert_no_500_and_no_hang(history)
    kinds = {op.index: op.kind for op in history.operations}
    killed = windows["killed"]
    payments = [
        c
        for c in history.calls
        if killed[0] <= c.started <= killed[1] and kinds[c.operation] is Kind.AUTHORIZE
    ]
    # The tokens hold no CVC, so no step of a payment needs Redis: none may fail for want of it.
    assert any(c.status == 201 for c in payments), "no payment succeeded while Redis was down"
    assert not [c for c in payments if c.status == 502], "payments failed for want of Redis"
    _assert_caches_refill(storage, stack, shop)


def _assert_caches_refill(storage: Storage, stack: Stack, shop: Shop) -> None:
    """After Redis lost everything: a replay comes from Postgres, identical, and is cached
    again; new payments fill the router's window and the breaker's counts. Within seconds, not
    at once: after a Redis time-out (the pause) an API process leaves Redis alone for a while."""
    body = {"amount": 700, "currency": "EUR", "token": shop.tokens[0], "reference": "refill"}
    started = time.monotonic()
    deadline = started + 20
    with httpx.Client(base_url=stack.urls["api"], headers=shop.auth, timeout=20) as http:
        first = http.post("/v1/payments", json=body, headers={"idempotency-key": "refill"})
        assert first.status_code == 201, first.text
        storage.redis.flushall()
        cached = f"api:idem:{{{shop.merchant_id}}}:refill"
        while not storage.redis.keys(cached):
            assert time.monotonic() < deadline, "the replay cache did not refill"
            replay = http.post("/v1/payments", json=body, headers={"idempotency-key": "refill"})
            assert replay.status_code == 201
            assert replay.headers.get("idempotent-replayed") == "true"
            assert replay.content == first.content
            time.sleep(0.5)
        count = 0
        while not (storage.redis.keys("route:{psp_a}:*") and storage.redis.keys("breaker:*")):
            assert time.monotonic() < deadline, "the router's window or the breaker's counts"
            count += 1
            again = {**body, "reference": f"refill-{count}"}
            headers = {"idempotency-key": f"refill-{count}"}
            assert http.post("/v1/payments", json=again, headers=headers).status_code == 201
            time.sleep(0.2)
    print(f"  caches refilled {time.monotonic() - started:.1f} s after FLUSHALL", flush=True)


# --- Postgres ---------------------------------------------------------------------------------


def test_postgres_stopped_immediately_under_load(storage: Storage, stack: Stack) -> None:
    shop = open_shop(stack, "Postgres stop")
    recovered: list[float] = []

    def faults(history: History) -> dict[str, tuple[float, float]]:
        start = history.now()
        storage.primary.stop("immediate")
        time.sleep(2)
        windows = {"stopped": (start, history.now())}
        storage.primary.start()
        recovered.append(_recovery_seconds(stack, shop, history, history.now()))
        return windows

    history, windows = _run(stack, shop, faults)
    result = check(history, shop.sources(stack))
    result.print("postgres: pg_ctl stop -m immediate for 2 s under load, then a restart")
    _report(history, windows)
    print(f"  first new payment {recovered[0]:.2f} s after the restart")
    _assert_retryable_503s(history, windows["stopped"])
    _assert_no_500_and_no_hang(history)
    assert recovered[0] < 10, "the pools did not recover within seconds"
    assert result.ok, result.summary()


def test_failover_to_a_synchronous_standby_loses_nothing(storage: Storage, stack: Stack) -> None:
    """The services' DSN names the primary and the standby's port (read-write sessions
    only). A standby made with `pg_basebackup -R`, synchronous (`synchronous_standby_names`,
    `synchronous_commit=on`); under load the primary is SIGKILLed (every server process at
    once), then the standby promoted. Every request in between is a retryable 503, the
    services reconnect to the new primary by themselves, and nothing acknowledged is missing.
    (Asynchronous replication's loss, measured, is in `make chaos`.) Last in the module: the
    old primary is gone."""
    standby = storage.primary.standby("standby1", port=storage.standby_port)
    storage.standby = standby
    standby.start()
    storage.primary.configure(synchronous_standby_names="standby1", synchronous_commit="on")
    storage.primary.wait_for_standby("standby1", "sync")
    shop = open_shop(stack, "Failover")
    recovered: list[float] = []

    def faults(history: History) -> dict[str, tuple[float, float]]:
        start = history.now()
        storage.primary.kill()
        time.sleep(1)
        standby.promote()
        windows = {"no primary": (start, history.now())}
        recovered.append(_recovery_seconds(stack, shop, history, history.now()))
        return windows

    history, windows = _run(stack, shop, faults)
    result = check(history, shop.sources(stack))
    result.print("postgres: primary SIGKILLed, synchronous standby promoted, under load")
    _report(history, windows)
    print(f"  first new payment {recovered[0]:.2f} s after the promotion")
    assert not standby.in_recovery()
    _assert_retryable_503s(history, windows["no primary"])
    _assert_no_500_and_no_hang(history)
    assert recovered[0] < 10, "the services did not find the new primary within seconds"
    assert result.ok, result.summary()
    assert result.lost == []
