"""Create the two databases and their four roles on a Postgres server (development and CI).

Each service has an *owner* role, which owns its database and runs its migrations, and a
*runtime* role, which the service logs in as and which gets only the grants its migrations
give it. `PUBLIC` loses CONNECT on both databases, so no role of one service can even connect to
the other's database. In production the same roles are made by the platform (see deploy/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

SERVICES = ("api", "vault")
#: The assessor's kit (`tessera pci evidence`) reads both databases as this role and can write
#: neither: member of `pg_read_all_data`, CONNECT on both, nothing else.
AUDITOR_ROLE = "tessera_auditor"


@dataclass(frozen=True)
class ServiceDatabase:
    service: str
    database: str

    @property
    def owner(self) -> str:
        return f"tessera_{self.service}_owner"

    @property
    def runtime(self) -> str:
        return f"tessera_{self.service}"


def default_databases(suffix: str = "") -> list[ServiceDatabase]:
    return [ServiceDatabase(s, f"tessera_{s}{suffix}") for s in SERVICES]


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unsafe identifier: {name!r}")
    return f'"{name}"'


async def ensure_roles_and_databases(admin_dsn: str, databases: list[ServiceDatabase]) -> None:
    """Idempotent: safe to run before every `make run` and every test session."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        # Roles are cluster-wide; serialise concurrent set-ups (two test runs, say).
        await admin.execute("SELECT pg_advisory_lock(hashtextextended('tessera_dbsetup', 0))")
        for db in databases:
            for role in (db.owner, db.runtime):
                exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                if not exists:
                    await admin.execute(
                        f"CREATE ROLE {_ident(role)} LOGIN NOSUPERUSER NOCREATEDB "
                        "NOCREATEROLE NOREPLICATION NOBYPASSRLS"
                    )
            exists = await admin.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", db.database
            )
            if not exists:
                await admin.execute(
                    f"CREATE DATABASE {_ident(db.database)} OWNER {_ident(db.owner)} "
                    "TEMPLATE template0 ENCODING 'UTF8'"
                )
            await admin.execute(f"REVOKE ALL ON DATABASE {_ident(db.database)} FROM PUBLIC")
            await admin.execute(
                f"GRANT CONNECT ON DATABASE {_ident(db.database)} TO {_ident(db.runtime)}"
            )
        await _ensure_auditor(admin, databases)
        await admin.execute("SELECT pg_advisory_unlock(hashtextextended('tessera_dbsetup', 0))")
    finally:
        await admin.close()
    for db in databases:
        conn = await asyncpg.connect(admin_dsn, database=db.database)
        try:
            await conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            await conn.execute(f"ALTER SCHEMA public OWNER TO {_ident(db.owner)}")
            await conn.execute(f"GRANT USAGE ON SCHEMA public TO {_ident(db.runtime)}")
        finally:
            await conn.close()


async def _ensure_auditor(admin: asyncpg.Connection[Any], databases: list[ServiceDatabase]) -> None:
    if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", AUDITOR_ROLE):
        await admin.execute(
            f"CREATE ROLE {_ident(AUDITOR_ROLE)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            "NOREPLICATION NOBYPASSRLS"
        )
    await admin.execute(f"GRANT pg_read_all_data TO {_ident(AUDITOR_ROLE)}")
    for db in databases:
        await admin.execute(
            f"GRANT CONNECT ON DATABASE {_ident(db.database)} TO {_ident(AUDITOR_ROLE)}"
        )


async def drop_database(admin_dsn: str, database: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await admin.close()


def service_dsn(base_dsn: str, role: str, database: str) -> str:
    """The DSN of `base_dsn`'s server, as `role`, on `database` (dev and tests: trust auth)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}@{host}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))
