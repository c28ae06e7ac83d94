"""Numbered SQL migrations, applied by a command under an advisory lock, never at start-up.

Files are `NNNN_description.sql` in a service's `migrations/` package. Each runs in its own
transaction together with its row in `schema_migrations`, so a failed migration leaves nothing
behind. A migration already applied whose file has since changed stops the run: history is
append-only, a fix is a new migration.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(package: str) -> list[Migration]:
    """The migrations shipped in `package` (e.g. `api.migrations`), in version order."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
        elif entry.name.endswith(".sql"):
            raise MigrationError(f"{entry.name}: migration files are named NNNN_description.sql")
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{package}: two migrations share a version number")
    return found


def latest_version(package: str) -> int:
    migrations = discover(package)
    return migrations[-1].version if migrations else 0


async def migrate(dsn: str, package: str) -> list[Migration]:
    """Apply the pending migrations of `package`; return those applied by this call."""
    migrations = discover(package)
    conn = await asyncpg.connect(dsn)
    try:
        # One migrator per database at a time; others wait here, then find nothing to do.
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", package)
        try:
            await conn.execute(_CREATE_TABLE)
            applied = {
                row["version"]: row["checksum"]
                for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
            }
            done: list[Migration] = []
            for migration in migrations:
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} was changed "
                            "after it was applied; add a new migration instead"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                done.append(migration)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", package)
    finally:
        await conn.close()
