"""Migrations: applied by a command, to an empty database, once, under a lock."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import MigrationError, discover, latest_version, migrate
from tests.conftest import PG_ADMIN_URL, dsn

EXPECTED_TABLES = {
    "api": {
        "schema_migrations",
        "merchants",
        "merchant_api_keys",
        "payments",
        "payment_attempts",
        "refunds",
        "idempotency_keys",
        "merchant_routing",
        "processor_operations",
        "processed_notifications",
        "events",
        "webhook_endpoints",
        "webhook_deliveries",
        "ledger_postings",
        "ledger_entries",
        "payment_methods",
        "card_update_cursors",
    },
    "vault": {
        "schema_migrations",
        "merchants",
        "data_keys",
        "tokens",
        "audit_log",
        "audit_chain_heads",
        "worker_jobs",
    },
}


@pytest.fixture
async def empty_database(request: pytest.FixtureRequest) -> AsyncIterator[ServiceDatabase]:
    service = request.param
    db = ServiceDatabase(service, f"tessera_{service}_mig_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


async def tables(db: ServiceDatabase) -> set[str]:
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


@pytest.mark.parametrize("empty_database", ["api", "vault"], indirect=True)
async def test_all_migrations_apply_to_an_empty_database(empty_database: ServiceDatabase) -> None:
    db = empty_database
    package = f"{db.service}.migrations"
    applied = await migrate(dsn(db.owner, db.database), package)
    assert [m.version for m in applied] == [m.version for m in discover(package)]
    assert await tables(db) == EXPECTED_TABLES[db.service]
    conn = await asyncpg.connect(dsn(db.runtime, db.database))
    try:
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        assert version == latest_version(package)
        owner = await conn.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'merchants'"
        )
        assert owner == db.owner
    finally:
        await conn.close()


@pytest.mark.parametrize("empty_database", ["api", "vault"], indirect=True)
async def test_a_second_run_applies_nothing(empty_database: ServiceDatabase) -> None:
    db = empty_database
    await migrate(dsn(db.owner, db.database), f"{db.service}.migrations")
    assert await migrate(dsn(db.owner, db.database), f"{db.service}.migrations") == []


@pytest.mark.parametrize("empty_database", ["api", "vault"], indirect=True)
async def test_concurrent_runs_apply_each_migration_once(empty_database: ServiceDatabase) -> None:
    db = empty_database
    package = f"{db.service}.migrations"
    results = await asyncio.gather(
        *(migrate(dsn(db.owner, db.database), package) for _ in range(4))
    )
    assert sorted(len(r) for r in results) == [0, 0, 0, len(discover(package))]
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
            discover(package)
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("empty_database", ["vault"], indirect=True)
async def test_a_migration_changed_after_it_was_applied_stops_the_run(
    empty_database: ServiceDatabase,
) -> None:
    db = empty_database
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        await migrate(dsn(db.owner, db.database), "vault.migrations")


@pytest.mark.parametrize("empty_database", ["api"], indirect=True)
async def test_the_runtime_role_cannot_run_migrations(empty_database: ServiceDatabase) -> None:
    db = empty_database
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await migrate(dsn(db.runtime, db.database), "api.migrations")
    assert await tables(db) == set()


def test_migration_files_follow_the_naming_rule() -> None:
    for service in ("api", "vault"):
        folder = Path(__file__).parents[1] / service / "migrations"
        names = sorted(p.name for p in folder.glob("*.sql"))
        assert names, f"{service} has no migrations"
        versions = [int(n[:4]) for n in names]
        assert versions == list(range(1, len(names) + 1)), "versions are 0001, 0002, ..."
