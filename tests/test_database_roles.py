"""Two databases, four roles: each service reaches only its own data, with only its grants."""

from __future__ import annotations

import asyncpg
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import dsn


async def connect(role: str, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn(role, database))


@pytest.mark.parametrize("role", ["tessera_api", "tessera_api_owner"])
async def test_no_api_role_can_connect_to_the_vault_database(
    databases: dict[str, ServiceDatabase], role: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        await connect(role, databases["vault"].database)


@pytest.mark.parametrize("role", ["tessera_vault", "tessera_vault_owner"])
async def test_no_vault_role_can_connect_to_the_api_database(
    databases: dict[str, ServiceDatabase], role: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        await connect(role, databases["api"].database)


@pytest.mark.parametrize("service", ["api", "vault"])
async def test_runtime_roles_own_nothing_and_cannot_create_tables(
    databases: dict[str, ServiceDatabase], service: str
) -> None:
    db = databases[service]
    conn = await connect(db.runtime, db.database)
    try:
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = $1",
            db.runtime,
        )
        assert owned == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE sneaky (x int)")
    finally:
        await conn.close()


async def test_the_vault_runtime_role_cannot_delete_merchants(
    databases: dict[str, ServiceDatabase],
) -> None:
    db = databases["vault"]
    conn = await connect(db.runtime, db.database)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM merchants")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE merchants")
    finally:
        await conn.close()


async def test_the_api_runtime_role_can_only_revoke_keys_never_rewrite_them(
    databases: dict[str, ServiceDatabase],
) -> None:
    db = databases["api"]
    conn = await connect(db.runtime, db.database)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE merchant_api_keys SET key_sha256 = key_sha256")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM merchant_api_keys")
        await conn.execute("UPDATE merchant_api_keys SET revoked_at = revoked_at WHERE false")
    finally:
        await conn.close()


@pytest.mark.parametrize("service", ["api", "vault"])
async def test_roles_are_plain_logins_without_privileges(
    databases: dict[str, ServiceDatabase], service: str
) -> None:
    db = databases[service]
    conn = await connect(db.owner, db.database)
    try:
        for role in (db.owner, db.runtime):
            row = await conn.fetchrow(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                "FROM pg_roles WHERE rolname = $1",
                role,
            )
            assert row is not None
            assert not any(row.values()), f"{role} has a privileged attribute: {dict(row)}"
    finally:
        await conn.close()
