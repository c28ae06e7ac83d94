"""The local stack: private Postgres/Redis when none answers, and `tessera dev up`/`down`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis

from tessera import devstack
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def private_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Postgres runs as an unprivileged user when we are root: its folder must be reachable.
    base = Path(tmp_path_factory.mktemp("private"))
    for parent in [base, *base.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return base


@pytest.mark.slow
def test_a_private_postgres_starts_where_nothing_answers_and_stops_again(
    private_dir: Path,
) -> None:
    port = free_port()
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert not asyncio.run(devstack._pg_answers(dsn))
    devstack.start_private_postgres(dsn, base=private_dir / "pg")
    try:
        assert asyncio.run(devstack._pg_answers(dsn))

        async def version() -> str:
            conn = await asyncpg.connect(dsn)
            try:
                return str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()

        assert asyncio.run(version())
    finally:
        devstack.stop_private_postgres(base=private_dir / "pg")
    assert not asyncio.run(devstack._pg_answers(dsn))


def test_a_private_redis_starts_where_nothing_answers_and_stops_again(private_dir: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    assert not devstack._redis_answers(url)
    devstack.start_private_redis(url, base=private_dir / "redis")
    try:
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        devstack.stop_private_redis(base=private_dir / "redis")
    assert not devstack._redis_answers(url)


def test_missing_binaries_name_the_debian_packages(
    monkeypatch: pytest.MonkeyPatch, private_dir: Path
) -> None:
    monkeypatch.setenv("PATH", str(private_dir))  # a PATH with nothing on it
    monkeypatch.setattr(devstack, "_find_binary", lambda name: None)
    with pytest.raises(devstack.StackError, match="apt-get install postgresql"):
        devstack.start_private_postgres("postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(devstack.StackError, match="apt-get install redis-server"):
        devstack.start_private_redis("redis://127.0.0.1:1")


@pytest.mark.slow
def test_dev_up_starts_every_service_and_dev_down_stops_them(tmp_path: Path) -> None:
    ports = {
        "api": free_port(),
        "vault": free_port(),
        "psp-a": free_port(),
        "psp-b": free_port(),
        "shop": free_port(),
    }
    env = {
        **os.environ,
        "TESSERA_ROOT": str(tmp_path),
        "TESSERA_API_PORT": str(ports["api"]),
        "TESSERA_VAULT_PORT": str(ports["vault"]),
        "TESSERA_PSP_A_PORT": str(ports["psp-a"]),
        "TESSERA_PSP_B_PORT": str(ports["psp-b"]),
        "TESSERA_DEMO_PORT": str(ports["shop"]),
    }
    tessera = [sys.executable, "-m", "tessera.cli"]
    up = subprocess.run(
        [*tessera, "dev", "up"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for name, port in ports.items():
            path = "/healthz" if name.startswith("psp") or name == "shop" else "/readyz"
            assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200, name
        demo = json.loads((tmp_path / ".run" / "demo.json").read_text())
        assert demo["secret_key"] in up.stdout
        assert demo["publishable_key"] in up.stdout
        assert f"http://127.0.0.1:{ports['api']}" in up.stdout
        checkout = httpx.get(f"http://127.0.0.1:{ports['shop']}/")
        assert checkout.status_code == 200
        assert demo["publishable_key"] in checkout.text  # the shop runs with the demo's keys
        assert (tmp_path / ".run" / "logs" / "api.log").exists()
        vault_worker = (tmp_path / ".run" / "logs" / "vault-worker.log").read_text()
        assert '"message": "worker_started"' in vault_worker, vault_worker
    finally:
        down = subprocess.run(
            [*tessera, "dev", "down"], env=env, capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert "stopped 7 service process(es)" in down.stdout
    for port in ports.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
