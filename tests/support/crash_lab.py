"""The crash campaign's laboratory (tests/test_crash_points.py): an API database of its own,
its merchants, and API and worker processes on it, forked warm (tests/support/warm_start.py), armed
with a failpoint or not."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from api.services.ledger import LedgerReport, LedgerService
from api.services.routing import RoutingConfig
from api.storage.merchants import MerchantRepository
from api.storage.routing import RoutingRepository
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.db import create_pool
from tessera.runtime.migrations import migrate
from tests.conftest import ApiMerchant, dsn, register_vault_merchant
from tests.support.payments import new_key
from tests.support.processes import ServiceProcess, free_port
from tests.support.warm_start import WarmProcess

#: The authorization time-out, and the shortest lease the API accepts with it: long enough that a
#: busy machine does not turn a PSP's prompt answer into an unknown outcome.
AUTHORIZATION_TIMEOUT_SECONDS = 2
LEASE_SECONDS = 8
_SUFFIX = os.environ.get("TESSERA_TEST_DB_SUFFIX", "")
#: Processes starting at once: each is most of a second of CPU, and the machine has two cores.
STARTING = threading.BoundedSemaphore(2)
_PORTS_LOCK = threading.Lock()
_PORTS_GIVEN: set[int] = set()


_LOCAL = threading.local()


def thread_client() -> httpx.Client:
    """This thread's client: `httpx.post` makes a client (and an SSL context) per call, ~40 ms
    of CPU, which dozens of threads retrying would spend instead of the services."""
    client: httpx.Client | None = getattr(_LOCAL, "client", None)
    if client is None:
        client = _LOCAL.client = httpx.Client(timeout=30)
    return client


def post(
    process: ServiceProcess,
    merchant: ApiMerchant,
    path: str,
    body: dict[str, Any] | None,
    key: str | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """`tests.support.payments.post` on this thread's client."""
    headers = {**merchant.auth, "idempotency-key": key or new_key()}
    return thread_client().post(process.url + path, json=body, headers=headers, timeout=timeout)


def new_port() -> int:
    """A free port no other case of this campaign got (threads asking at once would share)."""
    with _PORTS_LOCK:
        while (port := free_port()) in _PORTS_GIVEN:
            pass
        _PORTS_GIVEN.add(port)
        return port


def sql(url: str, query: str, *args: Any) -> list[Any]:
    """One query on a connection of its own (the campaign's threads run no event loop)."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


@dataclass
class Lab:
    """One API database with its merchants and an unarmed API (the survivor) on it."""

    name: str
    env: dict[str, str]
    owner_url: str
    work: Path
    vault: ServiceProcess
    admin_token: str
    merchants: dict[str, ApiMerchant] = field(default_factory=dict)
    survivor: ServiceProcess | None = None
    started: list[WarmProcess] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        name: str,
        api_env: dict[str, str],
        admin_url: str,
        vault: ServiceProcess,
        admin_token: str,
        work: Path,
    ) -> Lab:
        database = ServiceDatabase("api", f"tessera_api_test{_SUFFIX}_{name}")

        async def prepare() -> None:
            await drop_database(admin_url, database.database)
            await ensure_roles_and_databases(admin_url, [database])
            await migrate(dsn(database.owner, database.database), "api.migrations")

        asyncio.run(prepare())
        env = {
            **api_env,
            "TESSERA_API_DATABASE_URL": dsn(database.runtime, database.database),
            "TESSERA_API_MIGRATION_URL": dsn(database.owner, database.database),
            "TESSERA_API_VAULT_URL": vault.url,
            "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": str(AUTHORIZATION_TIMEOUT_SECONDS),
            "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
            "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
        }
        work.mkdir(parents=True, exist_ok=True)
        return cls(name, env, dsn(database.owner, database.database), work, vault, admin_token)

    def add_merchant(self, kind: str, config: RoutingConfig) -> None:
        """Registered at the vault and in this database, as `tessera merchants create` does."""
        at_vault = register_vault_merchant(self.vault, self.admin_token)
        secret_key = f"sk_test_{secrets.token_hex(24)}"

        async def store() -> None:
            conn = await asyncpg.connect(self.env["TESSERA_API_DATABASE_URL"])
            try:
                await MerchantRepository(conn).create(at_vault.id, f"crash {kind}", secret_key)
                routing = RoutingRepository(conn, ttl_seconds=0.001)
                await routing.save(at_vault.id, config)
            finally:
                await conn.close()

        asyncio.run(store())
        self.merchants[kind] = ApiMerchant(at_vault.id, secret_key, at_vault.publishable_key)

    def start(self, role: str, failpoint: str | None = None) -> WarmProcess:
        """An API (`serve`) or worker process on this database, armed with `failpoint`."""
        for attempt in range(3):
            port = new_port() if role == "api" else 0
            env = {**self.env, "TESSERA_API_PORT": str(port)} if port else dict(self.env)
            if failpoint:
                env["TESSERA_FAILPOINTS"] = failpoint
            log = self.work / f"{role}-{failpoint or 'unarmed'}-{secrets.token_hex(3)}.log"
            args = ["serve"] if role == "api" else ["worker"]
            process = WarmProcess("api", env, port, log, args=args)
            self.started.append(process)
            try:
                with STARTING:
                    return process.start(ready_path="/readyz" if role == "api" else "", timeout=60)
            except RuntimeError:
                # Another program may take a free port before the API binds it: take another.
                if "address already in use" not in process.output() or attempt == 2:
                    raise
        raise AssertionError("not reached")

    def stop(self) -> None:
        for process in self.started:
            process.stop()

    def key_state(self, merchant: ApiMerchant, key: str) -> str:
        rows = sql(
            self.owner_url,
            "SELECT recovery_point FROM idempotency_keys WHERE merchant_id = $1 AND key = $2",
            merchant.id,
            key,
        )
        return str(rows[0]["recovery_point"]) if rows else "none"

    def stored_response(self, merchant: ApiMerchant, key: str) -> tuple[int, bytes] | None:
        rows = sql(
            self.owner_url,
            "SELECT response_status, response_body FROM idempotency_keys "
            "WHERE merchant_id = $1 AND key = $2",
            merchant.id,
            key,
        )
        if not rows or rows[0]["response_status"] is None:
            return None
        return int(rows[0]["response_status"]), bytes(rows[0]["response_body"])

    def xact_status(self, xid: str) -> str:
        """Committed or aborted, once the dead client's backend has noticed (never a guess)."""
        deadline = time.monotonic() + 15
        while True:
            [row] = sql(self.owner_url, "SELECT pg_xact_status($1::text::xid8) AS s", xid)
            if row["s"] != "in progress" or time.monotonic() > deadline:
                return str(row["s"])
            time.sleep(0.05)

    def probe(self, what: str, merchant: ApiMerchant, key: str, payment_id: str | None) -> str:
        """The state a transaction's write shows up in (see COMMIT_PROBES)."""
        if what == "key":
            return self.key_state(merchant, key)
        if payment_id is None:
            payment_id = self.payment_of_key(merchant, key)
        if what == "attempts":
            rows = sql(
                self.owner_url,
                "SELECT count(*) AS n FROM payment_attempts WHERE merchant_id = $1 "
                "AND payment_id = $2",
                merchant.id,
                payment_id,
            )
            return str(rows[0]["n"])
        rows = sql(
            self.owner_url,
            "SELECT status FROM payments WHERE merchant_id = $1 AND id = $2",
            merchant.id,
            payment_id,
        )
        return "processing" if rows[0]["status"] == "processing" else "settled"

    def payment_of_key(self, merchant: ApiMerchant, key: str) -> str | None:
        rows = sql(
            self.owner_url,
            "SELECT payment_id FROM idempotency_keys WHERE merchant_id = $1 AND key = $2",
            merchant.id,
            key,
        )
        return str(rows[0]["payment_id"]) if rows and rows[0]["payment_id"] else None

    def ledger(self) -> LedgerReport:
        async def check() -> LedgerReport:
            pool = await create_pool(
                self.env["TESSERA_API_DATABASE_URL"], min_size=1, max_size=1, wait_seconds=10
            )
            try:
                return await LedgerService(pool).check()
            finally:
                await pool.close()

        return asyncio.run(check())
