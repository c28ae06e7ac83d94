"""A whole stack of its own for the assessor's kit (tests/test_pci_evidence.py), and the demo flow
run against it, so the kit judges a stack that has done what a real one does.

Its databases are fresh (`tessera_api_pci<suffix>`, `tessera_vault_pci<suffix>`, where the
suffix is the session's TESSERA_TEST_DB_SUFFIX), made by tessera.dbsetup and migrated as
`make setup` does; its Redis databases (10 and 11, or TESSERA_TEST_PCI_REDIS_DBS) are flushed at
start. PSP A and B, the vault, the API, the API's worker and the vault's worker all run as real
processes, every one of them logging into one directory, which the kit's log scan reads.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from core.ids import new_id
from tessera.dbsetup import (
    AUDITOR_ROLE,
    ServiceDatabase,
    drop_database,
    ensure_roles_and_databases,
    service_dsn,
)
from tessera.pci.context import EvidenceSettings
from tessera.runtime.migrations import migrate
from tests.support.chaos_stack import private_env
from tests.support.processes import ServiceProcess
from tests.support.stack import Stack, start_stack

PG_ADMIN_URL = os.environ.get(
    "TESSERA_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("TESSERA_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
_SUFFIX = os.environ.get("TESSERA_TEST_DB_SUFFIX", "")
DATABASES = {
    "api": ServiceDatabase("api", f"tessera_api_pci{_SUFFIX}"),
    "vault": ServiceDatabase("vault", f"tessera_vault_pci{_SUFFIX}"),
}
_REDIS_API_DB, _REDIS_VAULT_DB = os.environ.get("TESSERA_TEST_PCI_REDIS_DBS", "10,11").split(",")
#: The merchant's checkout page, registered with the vault: the kit fetches the card fields
#: as a browser on it would.
ORIGIN = "https://shop.pci.example"
#: A documented test card (sandbox/cards.py): PSP A and B approve it.
CARD = "4242424242424242"
CVC_TTL_SECONDS = 600


@dataclass
class DemoFlow:
    """What the demo flow made: ids only (the card number stays with the vault)."""

    merchant_id: str
    token: str
    payment: dict[str, Any]
    refund: dict[str, Any]
    psp_b_payment: dict[str, Any]


@dataclass
class PciStack:
    stack: Stack
    log_dir: Path
    admin_token: str
    merchant: dict[str, str]
    demo: DemoFlow
    settings: EvidenceSettings
    databases: dict[str, ServiceDatabase] = field(default_factory=lambda: dict(DATABASES))

    def owner_dsn(self, service: str) -> str:
        db = self.databases[service]
        return service_dsn(PG_ADMIN_URL, db.owner, db.database)

    def as_owner(self, service: str, *statements: str) -> list[dict[str, Any]]:
        """Run SQL as the database's owner role (planted faults, and undoing them); the rows
        the last statement returned."""

        async def execute() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.owner_dsn(service), timeout=10)
            try:
                rows: list[asyncpg.Record] = []
                for statement in statements:
                    rows = await conn.fetch(statement)
                return [dict(row) for row in rows]
            finally:
                await conn.close()

        return asyncio.run(execute())

    def stop(self) -> None:
        self.stack.stop()


def prepare_databases() -> None:
    async def prepare() -> None:
        wanted = list(DATABASES.values())
        for db in wanted:
            await drop_database(PG_ADMIN_URL, db.database)
        await ensure_roles_and_databases(PG_ADMIN_URL, wanted)
        for db in wanted:
            owner = service_dsn(PG_ADMIN_URL, db.owner, db.database)
            await migrate(owner, f"{db.service}.migrations")

    asyncio.run(prepare())


def redis_urls() -> dict[str, str]:
    urls = {"api": f"{REDIS_BASE}/{_REDIS_API_DB}", "vault": f"{REDIS_BASE}/{_REDIS_VAULT_DB}"}
    for url in urls.values():
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
    return urls


def create_merchant(stack: Stack, name: str, *configure: str) -> dict[str, str]:
    """`tessera merchants create --origin …` (and `configure`), as an operator runs it."""
    env = {**os.environ, **stack.env}
    tessera = [sys.executable, "-m", "tessera.cli", "merchants"]
    created = subprocess.run(
        [*tessera, "create", "--name", name, "--origin", ORIGIN, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    merchant: dict[str, str] = json.loads(created.stdout)
    if configure:
        subprocess.run(
            [*tessera, "configure", "--merchant", merchant["merchant_id"], *configure],
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
    return merchant


def _ok(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, f"{response.request.url}: {response.text[:500]}"
    body: dict[str, Any] = response.json()
    return body


def demo_flow(stack: Stack) -> tuple[dict[str, str], DemoFlow]:
    """A merchant tokenizes a card with its CVC from its checkout page, charges it (authorize,
    then capture), refunds part of it; a second merchant's payment goes through PSP B."""
    shop = create_merchant(stack, "PCI kit shop")
    shop_b = create_merchant(stack, "PCI kit shop B", "--processors", "psp_b")
    year = datetime.datetime.now(datetime.UTC).year + 3
    with httpx.Client(timeout=30) as http:

        def tokenize(merchant: dict[str, str]) -> str:
            body = {"number": CARD, "exp_month": 12, "exp_year": year, "cvc": "123"}
            headers = {"authorization": f"Bearer {merchant['publishable_key']}", "origin": ORIGIN}
            answer = http.post(stack.urls["vault"] + "/v1/tokens", json=body, headers=headers)
            return str(_ok(answer, 201)["id"])

        def api(
            merchant: dict[str, str], path: str, body: dict[str, Any], status: int
        ) -> dict[str, Any]:
            headers = {
                "authorization": f"Bearer {merchant['secret_key']}",
                "idempotency-key": new_id("req"),
            }
            return _ok(http.post(stack.urls["api"] + path, json=body, headers=headers), status)

        token = tokenize(shop)
        payment = api(
            shop,
            "/v1/payments",
            {"amount": 2599, "currency": "EUR", "token": token, "capture": False},
            201,
        )
        assert payment["status"] == "authorized", payment
        captured = api(shop, f"/v1/payments/{payment['id']}/capture", {}, 200)
        assert captured["status"] == "captured", captured
        refund = api(shop, f"/v1/payments/{payment['id']}/refunds", {"amount": 1000}, 201)
        psp_b = api(
            shop_b,
            "/v1/payments",
            {"amount": 1250, "currency": "EUR", "token": tokenize(shop_b)},
            201,
        )
        assert psp_b["attempts"][-1]["processor"] == "psp_b", psp_b
    return shop, DemoFlow(shop["merchant_id"], token, captured, refund, psp_b)


def start_vault_worker(stack: Stack, log_dir: Path, merchant: dict[str, str]) -> None:
    """`python -m vault worker`, as `make up` runs it (its payment-page check fetches the card
    fields as the demo merchant's checkout would); returns once its first retention sweep is
    in the audit log, so the kit sees a worker that has worked."""
    env = {
        **stack.env,
        "TESSERA_VAULT_WORKER_POLL_SECONDS": "0.5",
        "TESSERA_VAULT_SCRIPTS_CHECK_PUBLISHABLE_KEY": merchant["publishable_key"],
        "TESSERA_VAULT_SCRIPTS_CHECK_ORIGIN": ORIGIN,
    }
    worker = ServiceProcess("vault", env, 0, log_dir / "vault-worker.log", args=["worker"])
    stack.processes["vault-worker"] = worker.start(ready_path="")

    async def swept() -> bool:
        conn = await asyncpg.connect(stack.env["TESSERA_VAULT_MIGRATION_URL"], timeout=10)
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE action = 'retention.sweep'"
            )
            return bool(found)
        finally:
            await conn.close()

    deadline = time.monotonic() + 30
    while not asyncio.run(swept()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the vault worker made no sweep in 30 s:\n{worker.output()}")
        time.sleep(0.2)


def start_pci_stack(work: Path) -> PciStack:
    """Fresh databases and Redis, every service, the demo flow; the kit's settings for it."""
    prepare_databases()
    urls = redis_urls()
    database_env = {}
    for service, db in DATABASES.items():
        prefix = f"TESSERA_{service.upper()}_"
        database_env[prefix + "DATABASE_URL"] = service_dsn(PG_ADMIN_URL, db.runtime, db.database)
        database_env[prefix + "MIGRATION_URL"] = service_dsn(PG_ADMIN_URL, db.owner, db.database)
    env = private_env(work, database_env, urls["api"], urls["vault"])
    env["TESSERA_VAULT_CVC_TTL_SECONDS"] = str(CVC_TTL_SECONDS)
    log_dir = work / "logs"
    log_dir.mkdir()
    stack = start_stack(env, log_dir, worker=True)
    try:
        merchant, demo = demo_flow(stack)
        start_vault_worker(stack, log_dir, merchant)
    except BaseException:
        stack.stop()
        raise
    settings = EvidenceSettings(
        api_url=stack.urls["api"],
        vault_url=stack.urls["vault"],
        vault_admin_token=env["TESSERA_VAULT_ADMIN_TOKEN"],
        api_database_url=service_dsn(PG_ADMIN_URL, AUDITOR_ROLE, DATABASES["api"].database),
        vault_database_url=service_dsn(PG_ADMIN_URL, AUDITOR_ROLE, DATABASES["vault"].database),
        api_redis_url=urls["api"],
        vault_redis_url=urls["vault"],
        log_paths=(str(log_dir),),
        cvc_ttl_seconds=CVC_TTL_SECONDS,
        publishable_key=merchant["publishable_key"],
        checkout_origin=ORIGIN,
    )
    return PciStack(stack, log_dir, env["TESSERA_VAULT_ADMIN_TOKEN"], merchant, demo, settings)
