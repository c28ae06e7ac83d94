"""`make chaos`, the storage half (issue 9, campaigns 2, 4 and 5): long runs of the storage
faults, each judged by the history checker, and asynchronous replication's loss measured against
synchronous replication's none. The quick versions run in CI (tests/test_chaos_storage.py,
tests/test_chaos_leases.py, tests/test_chaos_vault.py).

One stack on private storage: a Postgres primary whose DSN names two standbys' ports as well
(`target_session_attrs=read-write`), a `redis-server` without persistence, two API processes.
Phases, `CHAOS_STORAGE_SECONDS` (default 40) of load each, concurrent clients authorizing,
capturing, cancelling and refunding with retries on the same key:

1. Postgres restarts: `pg_ctl stop -m immediate`, 3 s down, restart; three times.
2. Redis: kill -9 (3 s), FLUSHALL, CLIENT PAUSE (2 s); twice each. Then PSP A fails until
   its circuit breaker opens, FLUSHALL loses it, and it must open again from new failures.
3. A frozen API process: SIGSTOP of the API most clients use, past the idempotency lease; the
   clients turn to the other API process, the worker finishes what the frozen one held; SIGCONT.
4. Failover, asynchronous replication: the primary's WAL sender is stopped (SIGSTOP) for 3 s
   while clients are acknowledged, then every primary process SIGKILLed and the standby
   promoted. What the standby never received is lost: measured.
5. Failover, synchronous replication (`synchronous_standby_names`, `synchronous_commit=on`):
   the same; commits wait for the standby instead, nothing acknowledged is lost.

Prints each phase's figures and a table; exits 1 on any violation (phase 4's losses are the
measurement, reported, not a failure).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.chaos_stack import open_shop, private_env
from tests.support.history import CheckResult, Client, History, Result, Workload, check
from tests.support.pgcluster import API_DB, VAULT_DB, PgCluster, prepare_databases, service_env
from tests.support.processes import ServiceProcess, free_port
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack, start_stack

SECONDS = float(os.environ.get("CHAOS_STORAGE_SECONDS", "40"))
LEASE_SECONDS = 8
FAST = {
    "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "2",
    "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
    "TESSERA_API_DB_TIMEOUT_SECONDS": "2",
    "TESSERA_VAULT_DB_TIMEOUT_SECONDS": "2",
    "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
    "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "2",
    "TESSERA_API_PROCESSOR_CUTOFF_SECONDS": "10",
}
RETRYABLE_CODES = {"service_unavailable", "processor_unavailable", "payment_busy", "at_capacity"}


@dataclass
class Phase:
    name: str
    faults: int = 0
    result: CheckResult | None = None
    history: History = field(default_factory=History)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Phase 4: its losses are what it measures, not violations of the run.
    measures_loss: bool = False

    def answers(self) -> dict[str, int]:
        return dict(self.history.statuses())

    @property
    def failed(self) -> bool:
        if self.problems:
            return True
        return self.result is not None and not self.result.ok and not self.measures_loss


@dataclass
class Campaign:
    work: Path
    primary: PgCluster
    ports: list[int]
    redis: RedisServer
    stack: Stack
    second_api: ServiceProcess
    clusters: list[PgCluster]
    phases: list[Phase] = field(default_factory=list)

    def run(
        self,
        phase: Phase,
        faults: Callable[[Phase], None],
        *,
        urls: tuple[str, ...] = (),
        request_timeout: float = 20.0,
        processors: tuple[str, ...] = (),
    ) -> None:
        """The workload on a merchant of its own while `faults` runs, then the check."""
        print(f"\n== {phase.name}", flush=True)
        shop = open_shop(self.stack, phase.name, *processors)
        api, *others = urls or (self.stack.urls["api"],)
        workload = Workload(
            api,
            shop.auth,
            shop.tokens,
            phase.history,
            concurrency=6,
            other_urls=others,
            request_timeout=request_timeout,
        )
        workload.run_in_background()
        try:
            faults(phase)
        finally:
            workload.stop(timeout=300)
        phase.problems += [f"workload: {e}" for e in workload.errors]
        phase.result = check(
            phase.history, shop.sources(self.stack, psp_b=True), settle_seconds=120
        )
        phase.result.print(phase.name)
        for note in phase.notes:
            print(f"  {note}")
        statuses = phase.history.statuses()
        if "500" in statuses:
            phase.problems.append(f"{statuses['500']} answers were 500")
        self.phases.append(phase)


def postgres_restarts(campaign: Campaign) -> Phase:
    phase = Phase("postgres restarts (pg_ctl stop -m immediate)")

    def faults(phase: Phase) -> None:
        for _ in range(3):
            time.sleep(SECONDS / 4)
            start = phase.history.now()
            campaign.primary.stop("immediate")
            time.sleep(3)
            end = phase.history.now()
            campaign.primary.start()
            phase.faults += 1
            _retryable_only(phase, (start, end), "while stopped")
        time.sleep(SECONDS / 4)

    campaign.run(phase, faults)
    return phase


def redis_losses(campaign: Campaign) -> Phase:
    phase = Phase("redis kill -9 / FLUSHALL / CLIENT PAUSE")
    redis = campaign.redis

    def faults(phase: Phase) -> None:
        pause = SECONDS / 7
        for _ in range(2):
            time.sleep(pause)
            redis.kill()
            time.sleep(3)
            redis.start()
            time.sleep(pause)
            redis.flushall()
            time.sleep(pause)
            redis.pause(2)
            time.sleep(2)
            phase.faults += 3
        time.sleep(pause)

    campaign.run(phase, faults)
    return phase


def breaker_rebuilds(campaign: Campaign) -> Phase:
    """PSP A fails until its breaker opens (payments fail over to PSP B); FLUSHALL loses the
    open breaker, PSP A is tried again, and the breaker opens again from new failures alone."""
    phase = Phase("breaker lost with FLUSHALL, rebuilt")
    print(f"\n== {phase.name}", flush=True)
    # PSP B's fee makes PSP A the router's first choice whenever its breaker is closed.
    shop = open_shop(
        campaign.stack, phase.name, "--processors", "psp_a,psp_b", "--fee", "psp_b=0+9000"
    )
    redis, psp_a = campaign.redis, campaign.stack.urls["psp_a"]
    redis.flushall()

    def is_open() -> bool:
        return bool(redis.keys("breaker:{psp_a}:open_until"))

    async def pay_until_open() -> int:
        async with httpx.AsyncClient(base_url=campaign.stack.urls["api"]) as http:
            client = Client(http, phase.history, shop.auth)
            for count in range(1, 61):
                await client.authorize(shop.tokens[0], 900, capture=True)
                if is_open():
                    return count
        phase.problems.append("the breaker did not open")
        return 0

    httpx.post(psp_a + "/admin/config", json={"fail_all_5xx": True}).raise_for_status()
    try:
        before = asyncio.run(pay_until_open())
        redis.flushall()
        phase.faults += 1
        if is_open():
            phase.problems.append("FLUSHALL left the breaker open")
        after = asyncio.run(pay_until_open())
    finally:
        httpx.post(psp_a + "/admin/config", json={"fail_all_5xx": False}).raise_for_status()
    phase.result = check(phase.history, shop.sources(campaign.stack, psp_b=True))
    phase.result.print(phase.name)
    phase.notes.append(f"payments until the breaker opened: {before}, after FLUSHALL: {after}")
    print(f"  {phase.notes[-1]}", flush=True)
    campaign.phases.append(phase)
    return phase


def frozen_api(campaign: Campaign) -> Phase:
    """Clients use the second API process first; it is frozen past the lease."""
    phase = Phase("API process frozen (SIGSTOP) past its leases")
    frozen = campaign.second_api
    process = frozen.process
    assert process is not None

    def faults(phase: Phase) -> None:
        time.sleep(SECONDS / 3)
        start = phase.history.now()
        process.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_SECONDS + 4)
        process.send_signal(signal.SIGCONT)
        phase.faults += 1
        phase.notes.append(
            f"answers while frozen {dict(phase.history.statuses((start, phase.history.now())))}"
        )
        time.sleep(SECONDS / 3)

    urls = (frozen.url, campaign.stack.urls["api"])
    campaign.run(phase, faults, urls=urls, request_timeout=5)
    return phase


def failover(campaign: Campaign, *, synchronous: bool) -> Phase:
    kind = "synchronous" if synchronous else "asynchronous"
    phase = Phase(f"failover, {kind} replication", measures_loss=not synchronous)
    primary = campaign.primary
    name = f"standby{len(campaign.clusters)}"
    standby = primary.standby(name, port=campaign.ports[len(campaign.clusters)])
    campaign.clusters.append(standby)
    standby.start()
    primary.wait_for_standby(name)
    if synchronous:
        primary.configure(synchronous_standby_names=name, synchronous_commit="on")
        primary.wait_for_standby(name, "sync")
    else:
        primary.configure(synchronous_standby_names="")

    def faults(phase: Phase) -> None:
        time.sleep(SECONDS / 3)
        sender = primary.sql(
            "SELECT pid FROM pg_stat_replication WHERE application_name = $1", name
        )[0]["pid"]
        os.kill(sender, signal.SIGSTOP)  # the link to the standby stalls
        stalled = phase.history.now()
        time.sleep(3)
        killed = phase.history.now()
        primary.kill()  # every process of it, the stopped WAL sender too
        time.sleep(1)
        standby.promote()
        promoted = phase.history.now()
        phase.faults += 1
        acknowledged = [
            op
            for op in phase.history.operations
            if op.result is Result.OK and op.completed and stalled <= op.completed <= killed
        ]
        phase.notes.append(
            f"acknowledged while the standby was cut off (3 s): {len(acknowledged)} operations"
        )
        _retryable_only(phase, (killed, promoted), "without a primary")
        time.sleep(SECONDS / 3)

    campaign.run(phase, faults)
    campaign.primary = standby
    result = phase.result
    assert result is not None
    lost_ops = [v for v in result.violations if "missing" in v or "no payment" in v]
    phase.notes.append(
        f"lost: {len(result.lost)} acknowledged payments, {len(lost_ops)} violations naming "
        f"missing data, {len(result.orphaned_at_psp)} authorizations left at a PSP for a payment "
        f"Tessera lost, {len(result.violations)} violations in all"
    )
    print(f"  {phase.notes[-1]}", flush=True)
    if synchronous and result.lost:
        phase.problems.append(f"synchronous replication lost {len(result.lost)} payments")
    return phase


def _retryable_only(phase: Phase, window: tuple[float, float], label: str) -> None:
    """Every failure that started in the window is a documented retryable 503."""
    calls = [c for c in phase.history.calls if window[0] <= c.started <= window[1]]
    failures = [c for c in calls if c.status is None or c.status >= 500]
    bad = [c for c in failures if c.status != 503 or c.code not in RETRYABLE_CODES]
    phase.notes.append(f"answers {label}: {dict(phase.history.statuses(window))}")
    if bad:
        phase.problems.append(f"{len(bad)} non-retryable failures {label}: {bad[:3]}")


def start(work: Path) -> Campaign:
    primary = PgCluster.initialise("primary").start()
    prepare_databases(primary, [API_DB, VAULT_DB])
    ports = [primary.port, free_port(), free_port()]
    redis = RedisServer().start()
    env = private_env(work, service_env(ports), redis.url(0), redis.url(1))
    stack = start_stack(env, work, worker=True, extra=FAST)
    port = free_port()
    second = ServiceProcess(
        "api", {**stack.env, "TESSERA_API_PORT": str(port)}, port, work / "api-2.log"
    ).start(timeout=60)
    return Campaign(work, primary, ports, redis, stack, second, [primary])


def report(campaign: Campaign) -> None:
    print("\nstorage chaos report")
    header = f"  {'phase':<46} {'faults':>6} {'ops':>5} {'ok':>5} {'failed':>6} {'unknown':>7}"
    print(header + f" {'503':>5} {'500':>4} {'lost':>4} {'violations':>10}")
    for phase in campaign.phases:
        result = phase.result
        assert result is not None
        totals = {r: sum(row.get(r, 0) for row in result.counts.values()) for r in Result}
        answers = phase.answers()
        print(
            f"  {phase.name:<46} {phase.faults:>6} {sum(totals.values()):>5} "
            f"{totals[Result.OK]:>5} {totals[Result.FAILED]:>6} {totals[Result.UNKNOWN]:>7} "
            f"{answers.get('503', 0):>5} {answers.get('500', 0):>4} {len(result.lost):>4} "
            f"{len(result.violations):>10}"
        )
    for phase in campaign.phases:
        for problem in phase.problems:
            print(f"  PROBLEM {phase.name}: {problem}")
    print(f"  logs {campaign.work}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tessera-chaos-storage-"))
    started = time.monotonic()
    campaign = start(work)
    try:
        postgres_restarts(campaign)
        redis_losses(campaign)
        breaker_rebuilds(campaign)
        frozen_api(campaign)
        failover(campaign, synchronous=False)
        failover(campaign, synchronous=True)
    finally:
        campaign.second_api.stop()
        campaign.stack.stop()
        campaign.redis.stop()
        for cluster in campaign.clusters:
            cluster.remove()
    report(campaign)
    print(f"  duration {time.monotonic() - started:.0f} s")
    return 1 if any(phase.failed for phase in campaign.phases) else 0


if __name__ == "__main__":
    sys.exit(main())
