"""The capacity model of docs/deploy.md: what one payment costs each tier, and what a peak needs.

Two kinds of input, both measured:
- CPU milliseconds per payment by process (API, vault, Postgres, Redis), from `make bench`
  (`cpu_ms_per_payment` in bench.json): time, so it depends on the machine;
- Postgres and Redis work per payment (commits, rows written, WAL bytes, Redis commands),
  counted here from the servers' own statistics: counts, so they do not depend on the machine
  or on what else runs on it (Redis is a private server, so its command counter is ours).

`python -m tests.bench.capacity` starts the stack on the bench databases, makes authorize-and-
capture payments, counts, and prints the model for 1x, 10x and 100x today's peak with the CPU
figures of the bench.json it is given (`--bench`, default docs/perf/bench.json). It writes
docs/perf/capacity.json. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from tessera.devstack import StackConfig, service_env
from tests.bench import database
from tests.support.processes import ROOT
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack, start_stack

OUT = ROOT / "docs" / "perf"
DATABASES = ("tessera_api_bench", "tessera_vault_bench")
#: Today's peak, an assumption stated in docs/deploy.md: the renewal run on the first of the
#: month, about 2 M renewals over 18 hours, plus customer-present traffic.
TODAY_PEAK_PER_SECOND = 40.0
#: How busy a pod's CPU may run at the peak: headroom for bursts, retries and a lost zone.
TARGET_UTILIZATION = 0.6
#: vCPU per pod (the manifests' CPU limit); one uvicorn process per pod, scaled by pods.
VCPU_PER_POD = {"api": 1.0, "vault": 1.0}
#: Pods never fewer than this: one per zone of a regional cluster.
MIN_PODS = 3


@dataclass(frozen=True)
class Counts:
    """Work one payment (authorize + capture, one call) does in the data stores."""

    payments: int
    #: Transactions, read-only ones included (pg_stat_database.xact_commit).
    api_commits: float
    api_rows_written: float
    vault_commits: float
    vault_rows_written: float
    wal_bytes: float
    redis_commands: float


async def _pg_snapshot(admin_dsn: str) -> dict[str, float]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname, xact_commit, tup_inserted + tup_updated + tup_deleted AS written "
            "FROM pg_stat_database WHERE datname = ANY($1::text[])",
            list(DATABASES),
        )
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    finally:
        await conn.close()
    found = {row["datname"]: row for row in rows}
    return {
        "api_commits": float(found[DATABASES[0]]["xact_commit"]),
        "api_written": float(found[DATABASES[0]]["written"]),
        "vault_commits": float(found[DATABASES[1]]["xact_commit"]),
        "vault_written": float(found[DATABASES[1]]["written"]),
        "wal": float(lsn),
    }


def _redis_commands(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        return float(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def _settled_pg_snapshot(admin_dsn: str) -> dict[str, float]:
    """Backends report their counters when idle, up to 10 s late (PGSTAT_IDLE_INTERVAL): wait
    that long, then read until two reads a second apart agree."""
    time.sleep(11)
    last = asyncio.run(_pg_snapshot(admin_dsn))
    for _ in range(15):
        time.sleep(1.0)
        now = asyncio.run(_pg_snapshot(admin_dsn))
        if now == last:
            return now
        last = now
    return last


def count_per_payment(
    stack: Stack, admin_dsn: str, redis_url: str, merchant: dict[str, str], payments: int
) -> Counts:
    """Make `payments` payments (8 at a time) with nothing else running; divide the deltas."""
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2040}
    auth = {"authorization": f"Bearer {merchant['secret_key']}"}
    with httpx.Client(timeout=30) as client:
        # Tokens first: tokenization is the vault's own cost, not the payment's.
        tokens = [
            client.post(
                stack.urls["vault"] + "/v1/tokens",
                json=card,
                headers={"authorization": f"Bearer {merchant['publishable_key']}"},
            ).json()["id"]
            for _ in range(payments)
        ]
        before = _settled_pg_snapshot(admin_dsn)
        redis_before = _redis_commands(redis_url)

        def pay(token: str) -> int:
            body = {"amount": 1050, "currency": "EUR", "token": token, "capture": True}
            headers = {**auth, "idempotency-key": secrets.token_urlsafe(16)}
            return client.post(
                stack.urls["api"] + "/v1/payments", json=body, headers=headers
            ).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(pay, tokens))
        redis_after = _redis_commands(redis_url)
        after = _settled_pg_snapshot(admin_dsn)
    made = statuses.count(201)
    if made != payments:
        raise RuntimeError(f"{payments - made} payments failed: {sorted(set(statuses))}")
    return Counts(
        payments=made,
        api_commits=(after["api_commits"] - before["api_commits"]) / made,
        api_rows_written=(after["api_written"] - before["api_written"]) / made,
        vault_commits=(after["vault_commits"] - before["vault_commits"]) / made,
        vault_rows_written=(after["vault_written"] - before["vault_written"]) / made,
        wal_bytes=(after["wal"] - before["wal"]) / made,
        redis_commands=(redis_after - redis_before) / made,
    )


def pods_for(rate: float, cpu_ms: float, vcpu: float) -> int:
    busy_vcpu = rate * cpu_ms / 1000
    return max(MIN_PODS, math.ceil(busy_vcpu / (vcpu * TARGET_UTILIZATION)))


def model(cpu_ms: dict[str, float], counts: Counts, peak: float) -> list[dict[str, Any]]:
    """Pods and database load at 1x, 10x and 100x `peak` payments per second."""
    rows = []
    for factor in (1, 10, 100):
        rate = peak * factor
        postgres_vcpu = rate * cpu_ms["postgres"] / 1000 / TARGET_UTILIZATION
        rows.append(
            {
                "factor": factor,
                "payments_per_second": rate,
                "api_pods": pods_for(rate, cpu_ms["api"], VCPU_PER_POD["api"]),
                "vault_pods": pods_for(rate, cpu_ms["vault"], VCPU_PER_POD["vault"]),
                "postgres_vcpu": postgres_vcpu,
                "api_commits_per_second": rate * counts.api_commits,
                "rows_written_per_second": rate
                * (counts.api_rows_written + counts.vault_rows_written),
                "wal_mb_per_second": rate * counts.wal_bytes / 1e6,
                "redis_commands_per_second": rate * counts.redis_commands,
            }
        )
    return rows


def render(cpu_ms: dict[str, float], counts: Counts, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"per payment (authorize + capture; counts over {counts.payments} payments):",
        f"  CPU ms: API {cpu_ms['api']:.2f}, vault {cpu_ms['vault']:.2f}, "
        f"Postgres {cpu_ms['postgres']:.2f}, Redis {cpu_ms['redis']:.2f}",
        f"  API database: {counts.api_commits:.1f} transactions, "
        f"{counts.api_rows_written:.1f} rows written; "
        f"vault database: {counts.vault_commits:.1f} transactions, "
        f"{counts.vault_rows_written:.1f} rows written; WAL {counts.wal_bytes / 1024:.1f} KiB",
        f"  Redis: {counts.redis_commands:.1f} commands",
        "",
        f"{'peak':>6} {'payments/s':>11} {'API pods':>9} {'vault pods':>11} "
        f"{'PG vCPU':>8} {'API xact/s':>11} {'rows/s':>8} {'WAL MB/s':>9} {'Redis ops/s':>12}",
    ]
    for row in rows:
        lines.append(
            f"{row['factor']:>5}x {row['payments_per_second']:>11,.0f} {row['api_pods']:>9} "
            f"{row['vault_pods']:>11} {row['postgres_vcpu']:>8.1f} "
            f"{row['api_commits_per_second']:>11,.0f} {row['rows_written_per_second']:>8,.0f} "
            f"{row['wal_mb_per_second']:>9.1f} {row['redis_commands_per_second']:>12,.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.capacity")
    parser.add_argument("--bench", type=Path, default=OUT / "bench.json")
    parser.add_argument(
        "--cpu",
        help="CPU ms per payment instead of the bench file's: api=3.32,vault=2.76,...",
    )
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--peak", type=float, default=TODAY_PEAK_PER_SECOND)
    args = parser.parse_args()
    if args.cpu:
        cpu_ms = {k: float(v) for k, v in (part.split("=") for part in args.cpu.split(","))}
        source = f"--cpu {args.cpu}"
    else:
        cpu_ms = json.loads(args.bench.read_text())["payments"]["cpu_ms_per_payment"]
        source = str(args.bench)

    config = StackConfig.from_env()
    server = RedisServer().start()
    redis_url = server.url(0)
    env = database.bench_env(service_env(config), config.pg_admin_url, redis_url, server.url(1))
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(env, Path(tmp))
        try:
            merchant = stack.create_merchant("Capacity")
            counts = count_per_payment(
                stack, config.pg_admin_url, redis_url, merchant, args.payments
            )
        finally:
            stack.stop()
            server.stop()
    rows = model(cpu_ms, counts, args.peak)
    print(render(cpu_ms, counts, rows))
    record = {
        "cpu_ms_per_payment": cpu_ms,
        "cpu_source": source,
        "counts": asdict(counts),
        "peak_per_second": args.peak,
        "target_utilization": TARGET_UTILIZATION,
        "rows": rows,
    }
    (OUT / "capacity.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {OUT / 'capacity.json'}")


if __name__ == "__main__":
    main()
