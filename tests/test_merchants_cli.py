"""`tessera merchants create|roll-key`: one command, the merchant exists in both services."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from tessera.dbsetup import ServiceDatabase
from tests.conftest import dsn
from tests.support.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def tessera(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def cli_env(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> dict[str, str]:
    return {
        **api_env,
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_VAULT_ADMIN_TOKEN": tokens["admin"],
    }


async def test_create_registers_the_merchant_in_the_api_and_the_vault(
    api_env: dict[str, str],
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
) -> None:
    env = cli_env(api_env, vault, tokens)
    args = ["merchants", "create", "--name", "Shop", "--json",
            "--origin", "https://shop.example", "--origin", "http://127.0.0.1:8300"]  # fmt: skip
    result = tessera(args, env)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"merchant_id", "secret_key", "publishable_key"}
    assert created["secret_key"].startswith("sk_test_")
    assert created["publishable_key"].startswith("pk_test_")

    api_db = await asyncpg.connect(dsn("tessera_api_owner", databases["api"].database))
    vault_db = await asyncpg.connect(dsn("tessera_vault_owner", databases["vault"].database))
    try:
        key_row = await api_db.fetchrow(
            "SELECT key_sha256, last4 FROM merchant_api_keys WHERE merchant_id = $1",
            created["merchant_id"],
        )
        assert key_row is not None
        assert key_row["key_sha256"] == hashlib.sha256(created["secret_key"].encode()).digest()
        dump = json.dumps([dict(r) for r in await api_db.fetch("SELECT * FROM merchants")],
                          default=str)  # fmt: skip
        assert created["secret_key"] not in dump
        vault_row = await vault_db.fetchrow(
            "SELECT publishable_key_sha256, allowed_origins FROM merchants WHERE id = $1",
            created["merchant_id"],
        )
        assert vault_row is not None
        assert (
            vault_row["publishable_key_sha256"]
            == hashlib.sha256(created["publishable_key"].encode()).digest()
        )
        assert vault_row["allowed_origins"] == ["http://127.0.0.1:8300", "https://shop.example"]
    finally:
        await api_db.close()
        await vault_db.close()


async def test_roll_key_replaces_the_secret_key_and_the_old_one_stops_working(
    api_env: dict[str, str],
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
) -> None:
    env = cli_env(api_env, vault, tokens)
    created = json.loads(tessera(["merchants", "create", "--name", "R", "--json"], env).stdout)
    rolled = tessera(["merchants", "roll-key", "--merchant", created["merchant_id"], "--json"], env)
    assert rolled.returncode == 0, rolled.stderr
    new_key = json.loads(rolled.stdout)["secret_key"]
    assert new_key != created["secret_key"]

    from api.storage.merchants import MerchantRepository

    conn = await asyncpg.connect(dsn("tessera_api", databases["api"].database))
    try:
        merchants = MerchantRepository(conn)
        assert await merchants.merchant_for_secret_key(created["secret_key"]) is None
        assert await merchants.merchant_for_secret_key(new_key) == created["merchant_id"]
    finally:
        await conn.close()


def test_create_without_the_vault_admin_credential_writes_nothing(
    api_env: dict[str, str], vault: ServiceProcess
) -> None:
    env = {**api_env, "TESSERA_API_VAULT_URL": vault.url, "TESSERA_VAULT_ADMIN_TOKEN": ""}
    result = tessera(["merchants", "create", "--name", "NoAdmin", "--json"], env)
    assert result.returncode == 1
    assert "TESSERA_VAULT_ADMIN_TOKEN" in result.stderr


def test_create_with_a_wrong_admin_credential_is_refused_by_the_vault(
    api_env: dict[str, str], vault: ServiceProcess
) -> None:
    env = {**api_env, "TESSERA_API_VAULT_URL": vault.url, "TESSERA_VAULT_ADMIN_TOKEN": "x" * 40}
    result = tessera(["merchants", "create", "--name", "Wrong", "--json"], env)
    assert result.returncode == 1
    assert "vault refused" in result.stderr
