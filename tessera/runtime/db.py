"""asyncpg pools and the schema version check shared by both services."""

from __future__ import annotations

from typing import Any

import asyncpg

from tessera.runtime.http import NotReady


async def _keep_session(conn: Any) -> None:
    """Nothing to reset: the services never change a session's state (no SET, LISTEN, advisory
    lock or cursor outside a transaction; tests/test_import_rules.py keeps it so), and asyncpg
    still rolls back a transaction left open. asyncpg's default reset sends `RESET ALL`,
    `UNLISTEN *`, ... on every release: one more round trip per acquire, 11-13 % of the vault's
    CPU under load (docs/perf/README.md)."""


async def create_pool(dsn: str, *, min_size: int, max_size: int, wait_seconds: float) -> Any:
    """A small pool: a few connections per worker beat many (see docs/design)."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=wait_seconds,
        command_timeout=wait_seconds,
        max_inactive_connection_lifetime=300,
        reset=_keep_session,
    )


async def check_schema(pool: Any, expected_version: int) -> None:
    """Ready only when the database carries at least the migrations this build ships."""
    async with pool.acquire(timeout=2) as conn:
        try:
            version = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations", timeout=2
            )
        except asyncpg.UndefinedTableError:
            version = 0
    if version < expected_version:
        raise NotReady(
            f"schema at version {version}, this build needs {expected_version}: "
            "run `tessera migrate`"
        )
