"""The stack with every network hop of the payment API through a fault proxy (issue 9,
campaign 3): the API's Postgres, its Redis, its vault, its direct line to each PSP (captures,
cancels, refunds, inquiries), and the vault's forwarding to each PSP (authorizations).

The worker reaches the PSPs through the same proxies as the API (a processor that cannot be
reached cannot be reached by either), and its database, Redis and vault directly: it is the
settler the campaign relies on, and its COMMITs and connections must not blur what is counted
of the API's. A test that needs the client's retry, not the worker, to finish a request pauses it
(`paused_worker`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import redis

from tests.support.fault_proxy import FaultProxy
from tests.support.processes import ServiceProcess, free_port

#: The API's time-outs in this stack (short, so a campaign is quick; in the ratios production has).
DB_TIMEOUT_SECONDS = 2.0
AUTHORIZATION_TIMEOUT_SECONDS = 2.0
VAULT_FORWARD_TIMEOUT_SECONDS = 1.5
#: The API waits for the vault this much longer than the authorization time-out (api/wiring.py).
VAULT_CLIENT_TIMEOUT_SECONDS = AUTHORIZATION_TIMEOUT_SECONDS + 2
#: redis-py's socket time-out in both services (tessera/runtime/service.py).
REDIS_TIMEOUT_SECONDS = 2.0
LEASE_SECONDS = 8
DB_POOL_MAX = 4
PROCESSOR_CUTOFF_SECONDS = 4

#: The hops, by name: what each proxy stands in front of.
HOPS = ("postgres", "redis", "vault", "psp_a_forward", "psp_b_forward", "psp_a", "psp_b")


def _through(url: str, proxy: FaultProxy) -> str:
    """`url` with its host:port replaced by the proxy's."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{proxy.address}", parts.path, parts.query, ""))


@dataclass
class NetworkStack:
    proxies: dict[str, FaultProxy]
    api: ServiceProcess
    vault: ServiceProcess
    psp_a: ServiceProcess
    psp_b: ServiceProcess
    worker: ServiceProcess
    #: The API's database (name) and Redis (URL), reached directly, for the leak checks.
    api_database: str
    api_redis_url: str
    pg_admin_url: str
    #: Direct (not proxied) API settings, for the CLI and the worker.
    direct_env: dict[str, str]
    processes: list[ServiceProcess] = field(default_factory=list)

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.process is not None and process.process.poll() is None:
                process.stop()
        for proxy in self.proxies.values():
            proxy.stop()

    def postgres_backends(self) -> list[dict[str, Any]]:
        """The API database's server processes that came through the Postgres proxy."""
        ports = sorted(self.proxies["postgres"].all_upstream_ports())

        async def query() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.pg_admin_url)
            try:
                rows = await conn.fetch(
                    "SELECT client_port, state, usename FROM pg_stat_activity "
                    "WHERE datname = $1 AND client_port = ANY($2::int[])",
                    self.api_database,
                    ports,
                )
            finally:
                await conn.close()
            return [dict(row) for row in rows]

        return asyncio.run(query())

    def redis_clients(self) -> list[int]:
        """Ports of the Redis clients that came through the Redis proxy."""
        ports = self.proxies["redis"].all_upstream_ports()
        client = redis.Redis.from_url(self.api_redis_url)
        try:
            listed = client.client_list()
        finally:
            client.close()
        found = [int(str(entry["addr"]).rsplit(":", 1)[1]) for entry in listed]
        return [port for port in found if port in ports]


def start_network_stack(
    *,
    work: Path,
    api_env: dict[str, str],
    vault_env: dict[str, str],
    pg_admin_url: str,
    extra_api: dict[str, str] | None = None,
) -> NetworkStack:
    """Simulators of its own (their records are this campaign's alone), a vault and an API whose
    every hop goes through a `FaultProxy`, and a worker."""
    processes: list[ServiceProcess] = []
    proxies: dict[str, FaultProxy] = {}

    def started(process: ServiceProcess, ready: str = "/readyz") -> ServiceProcess:
        processes.append(process)
        return process.start(ready_path=ready)

    try:
        psps = {}
        for name in ("psp_a", "psp_b"):
            port = free_port()
            env = {
                f"TESSERA_{name.upper()}_PORT": str(port),
                f"TESSERA_{name.upper()}_SLOW_SECONDS": "4",
            }
            psps[name] = started(
                ServiceProcess(f"sandbox.{name}", env, port, work / f"{name}.log", args=[]),
                "/healthz",
            )
        for name, psp in psps.items():
            proxies[f"{name}_forward"] = FaultProxy("127.0.0.1", psp.port, f"{name}_forward")
            proxies[name] = FaultProxy("127.0.0.1", psp.port, name)
        database = urlsplit(api_env["TESSERA_API_DATABASE_URL"])
        proxies["postgres"] = FaultProxy(database.hostname or "127.0.0.1", database.port or 5432)
        redis_url = urlsplit(api_env["TESSERA_API_REDIS_URL"])
        proxies["redis"] = FaultProxy(redis_url.hostname or "127.0.0.1", redis_url.port or 6379)
        for proxy in proxies.values():
            proxy.start()

        destinations = {
            "psp_a": {"url": proxies["psp_a_forward"].url(), "paths": ["/v1/authorizations"]},
            "psp_b": {"url": proxies["psp_b_forward"].url(), "paths": ["/v1/payments"]},
        }
        vault_port = free_port()
        vault = started(
            ServiceProcess(
                "vault",
                {
                    **vault_env,
                    "TESSERA_VAULT_PORT": str(vault_port),
                    "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations),
                    "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": str(VAULT_FORWARD_TIMEOUT_SECONDS),
                },
                vault_port,
                work / "vault.log",
            )
        )
        proxies["vault"] = FaultProxy("127.0.0.1", vault.port, "vault").start()

        timeouts = {
            "TESSERA_API_DB_TIMEOUT_SECONDS": str(DB_TIMEOUT_SECONDS),
            "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": str(AUTHORIZATION_TIMEOUT_SECONDS),
            "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
            "TESSERA_API_PROCESSOR_CUTOFF_SECONDS": str(PROCESSOR_CUTOFF_SECONDS),
            "TESSERA_API_DB_POOL_MAX": str(DB_POOL_MAX),
        }
        direct_env = {
            **api_env,
            **timeouts,
            "TESSERA_API_VAULT_URL": vault.url,
            "TESSERA_API_PSP_A_URL": psps["psp_a"].url,
            "TESSERA_API_PSP_B_URL": psps["psp_b"].url,
        }
        api_port = free_port()
        proxied = {
            **direct_env,
            "TESSERA_API_PORT": str(api_port),
            "TESSERA_API_DATABASE_URL": _through(
                api_env["TESSERA_API_DATABASE_URL"], proxies["postgres"]
            ),
            "TESSERA_API_REDIS_URL": _through(api_env["TESSERA_API_REDIS_URL"], proxies["redis"]),
            "TESSERA_API_VAULT_URL": proxies["vault"].url(),
            "TESSERA_API_PSP_A_URL": proxies["psp_a"].url(),
            "TESSERA_API_PSP_B_URL": proxies["psp_b"].url(),
            **(extra_api or {}),
        }
        api = started(ServiceProcess("api", proxied, api_port, work / "api.log"))
        notify = f"{api.url}/v1/notifications/psp_b"
        httpx.post(
            psps["psp_b"].url + "/admin/config", json={"notify_url": notify}, timeout=10
        ).raise_for_status()
        worker_env = {
            **direct_env,
            "TESSERA_API_PSP_A_URL": proxies["psp_a"].url(),
            "TESSERA_API_PSP_B_URL": proxies["psp_b"].url(),
            "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
        }
        worker = started(
            ServiceProcess(
                "api",
                worker_env,
                0,
                work / "worker.log",
                args=["worker"],
            ),
            "",
        )
    except BaseException:
        for process in reversed(processes):
            if process.process is not None and process.process.poll() is None:
                process.stop()
        for proxy in proxies.values():
            proxy.stop()
        raise
    return NetworkStack(
        proxies=proxies,
        api=api,
        vault=vault,
        psp_a=psps["psp_a"],
        psp_b=psps["psp_b"],
        worker=worker,
        api_database=(database.path or "/").lstrip("/"),
        api_redis_url=api_env["TESSERA_API_REDIS_URL"],
        pg_admin_url=pg_admin_url,
        direct_env=direct_env,
        processes=processes,
    )


@contextmanager
def paused_worker(stack: NetworkStack) -> Iterator[None]:
    """The worker stopped (SIGSTOP) meanwhile, so what finishes a request is the client."""
    assert stack.worker.process is not None
    stack.worker.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        stack.worker.process.send_signal(signal.SIGCONT)


def environment_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "full")
