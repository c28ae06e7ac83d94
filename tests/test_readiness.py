"""`/readyz` says not ready, with the reason, when a dependency is missing; `/healthz` still
answers, because the process itself is fine. An optional dependency (the API's Redis) leaves
the service ready but `degraded`."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tests.conftest import PG_ADMIN_URL, dsn, start_service
from tests.support.processes import ServiceProcess, free_port


@pytest.fixture
async def unmigrated_vault_db() -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_bare_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


def start_unready(env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    port = free_port()
    process = ServiceProcess("vault", {**env, "TESSERA_VAULT_PORT": str(port)}, port,
                             tmp_path / "vault.log")  # fmt: skip
    return process.start(ready_path="/healthz")


async def test_a_database_without_migrations_is_not_ready(
    vault_env: dict[str, str], unmigrated_vault_db: ServiceDatabase, tmp_path: Path
) -> None:
    db = unmigrated_vault_db
    env = {**vault_env, "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database)}
    process = start_unready(env, tmp_path)
    try:
        response = httpx.get(process.url + "/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert "run `tessera migrate`" in body["checks"]["database"]
        assert body["checks"]["redis"] == "ok"
    finally:
        process.stop()


def test_an_unreachable_redis_makes_the_service_unready_without_leaking_its_address(
    vault_env: dict[str, str], tmp_path: Path
) -> None:
    closed_port = free_port()
    env = {**vault_env, "TESSERA_VAULT_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"}
    process = start_unready(env, tmp_path)
    try:
        response = httpx.get(process.url + "/readyz")
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["database"] == "ok"
        assert checks["redis"].startswith("unavailable")
        assert str(closed_port) not in response.text
        assert httpx.get(process.url + "/healthz").status_code == 200
    finally:
        process.stop()


def test_the_api_stays_ready_but_degraded_while_its_redis_is_down(
    api_env: dict[str, str], vault: ServiceProcess, tmp_path: Path
) -> None:
    """The API's Redis is a cache (idempotency is decided in Postgres): its loss must not take
    every API pod out of a load balancer. The vault's Redis is not optional (the test above)."""
    closed_port = free_port()
    env = {
        **api_env,
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0",
    }
    api = start_service("api", env, tmp_path)
    try:
        response = httpx.get(api.url + "/readyz")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "degraded"
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["redis"].startswith("unavailable")
        assert str(closed_port) not in response.text
    finally:
        api.stop()
