"""Fixtures that give tests real Postgres databases, Redis and service processes.

The suite uses its own databases (`tessera_api_test`, `tessera_vault_test`), recreated and
migrated once per session, and Redis databases 14 and 15, flushed once per session, so running
the tests never touches what `make run` shows. Two suites can run side by side on one machine
with `TESSERA_TEST_DB_SUFFIX` (e.g. `_2`: `tessera_api_test_2`) and `TESSERA_TEST_REDIS_DBS`
(e.g. `4,5`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from core.ids import new_id
from tessera.dbsetup import (
    ServiceDatabase,
    drop_database,
    ensure_roles_and_databases,
    service_dsn,
)
from tessera.runtime.migrations import migrate
from tests.support import shared_http
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess, free_port
from vault.kms.local import LocalKms

shared_http.install()

PG_ADMIN_URL = os.environ.get(
    "TESSERA_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("TESSERA_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")

_SUFFIX = os.environ.get("TESSERA_TEST_DB_SUFFIX", "")
API_DB = ServiceDatabase("api", f"tessera_api_test{_SUFFIX}")
VAULT_DB = ServiceDatabase("vault", f"tessera_vault_test{_SUFFIX}")
_REDIS_API_DB, _REDIS_VAULT_DB = os.environ.get("TESSERA_TEST_REDIS_DBS", "14,15").split(",")


def dsn(role: str, database: str) -> str:
    return service_dsn(PG_ADMIN_URL, role, database)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def databases() -> dict[str, ServiceDatabase]:
    async def prepare() -> None:
        for db in (API_DB, VAULT_DB):
            await drop_database(PG_ADMIN_URL, db.database)
        await ensure_roles_and_databases(PG_ADMIN_URL, [API_DB, VAULT_DB])
        for db in (API_DB, VAULT_DB):
            await migrate(dsn(db.owner, db.database), f"{db.service}.migrations")

    asyncio.run(prepare())
    return {"api": API_DB, "vault": VAULT_DB}


@pytest.fixture(scope="session")
def redis_urls() -> dict[str, str]:
    urls = {"api": f"{REDIS_BASE}/{_REDIS_API_DB}", "vault": f"{REDIS_BASE}/{_REDIS_VAULT_DB}"}
    for url in urls.values():
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    return urls


@pytest.fixture(scope="session")
def tokens() -> dict[str, str]:
    return {"service": secrets.token_urlsafe(32), "admin": secrets.token_urlsafe(32)}


@pytest.fixture(scope="session")
def psp_echo() -> Iterator[EchoServer]:
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def psp_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The PSP A simulator, as `make run` starts it."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("psp_a")) / "psp_a.log"
    env = {"TESSERA_PSP_A_PORT": str(port), "TESSERA_PSP_A_SLOW_SECONDS": "4"}
    process = ServiceProcess("sandbox.psp_a", env, port, log, args=[])
    process.start(ready_path="/healthz")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def psp_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The PSP B simulator; the `api` fixture points its notifications at the API."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("psp_b")) / "psp_b.log"
    env = {"TESSERA_PSP_B_PORT": str(port), "TESSERA_PSP_B_SLOW_SECONDS": "4"}
    process = ServiceProcess("sandbox.psp_b", env, port, log, args=[])
    process.start(ready_path="/healthz")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def local_kms_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("kms") / "keyring.json"
    LocalKms.create_keyring(str(path))
    return str(path)


@pytest.fixture(scope="session")
def vault_env(
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    tokens: dict[str, str],
    local_kms_path: str,
    psp_echo: EchoServer,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
) -> dict[str, str]:
    db = databases["vault"]
    destinations = {
        "echo": {"url": psp_echo.url, "paths": ["/v1/authorizations"]},
        "psp_a": {
            "url": psp_a.url,
            "paths": ["/v1/authorizations"],
            "card_update_paths": ["/v1/account_updates/card"],
        },
        "psp_b": {
            "url": psp_b.url,
            "paths": ["/v1/payments"],
            "card_update_paths": ["/v1/cardUpdates/details"],
        },
    }
    return {
        "TESSERA_VAULT_LOCAL_KMS_PATH": local_kms_path,
        "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations),
        "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "2",
        "TESSERA_MODE": "development",
        "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(db.owner, db.database),
        "TESSERA_VAULT_REDIS_URL": redis_urls["vault"],
        "TESSERA_VAULT_SERVICE_TOKEN": tokens["service"],
        "TESSERA_VAULT_ADMIN_TOKEN": tokens["admin"],
        "TESSERA_VAULT_SHUTDOWN_TIMEOUT_SECONDS": "10",
    }


#: The API environment of this session, once a test asked for it (for the ledger check).
_SESSION_API_ENV: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def ledger_balances_at_the_end_of_the_session() -> Iterator[None]:
    """After every test of the session, `tessera ledger check` (the real command) must find the
    ledger balanced and equal to the payments table: every payment, refund, failover and
    crash the suites made is accounted for."""
    yield
    if not _SESSION_API_ENV:
        return  # no test used the API's database
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "ledger", "check"],
        env={**os.environ, **_SESSION_API_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "payments_checked" in json.loads(result.stdout), result.stdout


@pytest.fixture(scope="session")
def api_env(
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    tokens: dict[str, str],
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
) -> dict[str, str]:
    db = databases["api"]
    env = {
        "TESSERA_MODE": "development",
        "TESSERA_API_DATABASE_URL": dsn(db.runtime, db.database),
        "TESSERA_API_MIGRATION_URL": dsn(db.owner, db.database),
        "TESSERA_API_REDIS_URL": redis_urls["api"],
        "TESSERA_API_VAULT_SERVICE_TOKEN": tokens["service"],
        "TESSERA_API_SHUTDOWN_TIMEOUT_SECONDS": "10",
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_PSP_B_URL": psp_b.url,
        # Every worker on the session's database reads the account-updater lists this often: a
        # list read to its end rests this long for all of them (the default, 5 minutes, would
        # hold up the card-update tests after any earlier test's worker).
        "TESSERA_API_CARD_UPDATE_POLL_SECONDS": "0.2",
    }
    _SESSION_API_ENV.update(env)
    return env


def start_service(
    module: str, env: dict[str, str], log_dir: Path, extra: dict[str, str] | None = None
) -> ServiceProcess:
    port = free_port()
    prefix = "TESSERA_API_" if module == "api" else "TESSERA_VAULT_"
    full_env = {**env, f"{prefix}PORT": str(port), **(extra or {})}
    log_path = log_dir / f"{module}-{port}.log"
    return ServiceProcess(module, full_env, port, log_path).start()


@pytest.fixture(scope="session")
def vault(
    vault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = start_service("vault", vault_env, tmp_path_factory.mktemp("vault"))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api(
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    extra = {"TESSERA_API_VAULT_URL": vault.url}
    process = start_service("api", api_env, tmp_path_factory.mktemp("api"), extra)
    notify = {"notify_url": process.url + "/v1/notifications/psp_b"}
    httpx.post(psp_b.url + "/admin/config", json=notify).raise_for_status()
    yield process
    process.stop()


@dataclass(frozen=True)
class VaultMerchant:
    id: str
    publishable_key: str
    origins: tuple[str, ...]


def register_vault_merchant(
    vault: ServiceProcess, admin_token: str, origins: tuple[str, ...] = ()
) -> VaultMerchant:
    merchant = VaultMerchant(new_id("mer"), f"pk_test_{secrets.token_hex(24)}", origins)
    response = httpx.post(
        vault.url + "/v1/merchants",
        json={
            "id": merchant.id,
            "publishable_key": merchant.publishable_key,
            "allowed_origins": list(origins),
        },
        headers={"authorization": f"Bearer {admin_token}"},
    )
    assert response.status_code == 201, response.text
    return merchant


@pytest.fixture(scope="session")
def shop(vault: ServiceProcess, tokens: dict[str, str]) -> VaultMerchant:
    return register_vault_merchant(vault, tokens["admin"], ("https://shop.example",))


@pytest.fixture(scope="session")
def other_shop(vault: ServiceProcess, tokens: dict[str, str]) -> VaultMerchant:
    return register_vault_merchant(vault, tokens["admin"], ("https://other.example",))


@dataclass(frozen=True)
class ApiMerchant:
    id: str
    secret_key: str
    publishable_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secret_key}"}


def create_merchant(
    api_env: dict[str, str],
    vault: ServiceProcess,
    admin_token: str,
    name: str = "Shop",
    origins: tuple[str, ...] = (),
) -> ApiMerchant:
    """`tessera merchants create`, as an operator runs it: the merchant exists in both services."""
    origin_args = [arg for origin in origins for arg in ("--origin", origin)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "merchants",
            "create",
            "--name",
            name,
            *origin_args,
            "--json",
        ],
        env={
            **os.environ,
            **api_env,
            "TESSERA_API_VAULT_URL": vault.url,
            "TESSERA_VAULT_ADMIN_TOKEN": admin_token,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    created = json.loads(result.stdout)
    return ApiMerchant(created["merchant_id"], created["secret_key"], created["publishable_key"])


@pytest.fixture(scope="session")
def merchant(api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]) -> ApiMerchant:
    return create_merchant(api_env, vault, tokens["admin"])


@pytest.fixture(scope="session")
def other_merchant(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> ApiMerchant:
    return create_merchant(api_env, vault, tokens["admin"], "Other shop")


@pytest.fixture(autouse=True)
def fresh_routing_state(redis_urls: dict[str, str]) -> None:
    """Each test starts with no learned auth rates and closed breakers: what one test does to a
    processor (a staged outage, a run of declines) must not steer the next test's routing."""
    client = redis.Redis.from_url(redis_urls["api"])
    try:
        for pattern in ("route:*", "breaker:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def workers(
    api_env: dict[str, str], vault: ServiceProcess, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """`tessera worker` processes against the session's stack, stopped after the test;
    keyword arguments are extra environment variables."""
    started: list[ServiceProcess] = []

    def start(**extra: str) -> ServiceProcess:
        env = {
            **api_env,
            "TESSERA_API_VAULT_URL": vault.url,
            "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
            **extra,
        }
        log = tmp_path / f"worker-{len(started)}.log"
        process = ServiceProcess("api", env, 0, log, args=["worker"])
        process.start(ready_path="")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
