"""Campaigns 2 and 4 (issue 9) on the vault's side: its Redis down, its database lost while a
card is on its way to the processor. Found by the storage campaigns (tests/test_chaos_storage.py),
kept here as precise regression tests against the session's real vault, API and simulators."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import VAULT_DB, create_merchant, register_vault_merchant
from tests.support.echo_server import EchoServer
from tests.support.history import Client, History, Operation, Result, Sources, check
from tests.support.processes import ServiceProcess, free_port
from tests.test_vault_forward import forward, template, tokenize


@pytest.fixture
def vault_without_redis(vault_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    """The vault on the session's database, its Redis a port nobody listens on."""
    port = free_port()
    env = {
        **vault_env,
        "TESSERA_VAULT_PORT": str(port),
        "TESSERA_VAULT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    process = ServiceProcess("vault", env, port, tmp_path / "vault.log")
    process.start(ready_path="/healthz")  # /readyz rightly says Redis is down
    yield process
    process.stop()


def test_a_token_without_a_cvc_is_forwarded_while_redis_is_down(
    vault_without_redis: ServiceProcess, tokens: dict[str, str], psp_echo: EchoServer
) -> None:
    """Redis holds only the CVCs waiting for their one authorization. A token made without a
    CVC has none there, so its card must be forwarded whatever Redis does: every payment was
    `failed` while Redis was down, because the vault asked Redis for a CVC it never had. A
    token with a CVC is refused (503, nothing sent): its CVC cannot be had."""
    vault = vault_without_redis
    shop = register_vault_merchant(vault, tokens["admin"])
    token = tokenize(vault, shop, "4242424242424242")
    before = len(psp_echo.received)

    response = forward(vault, tokens["service"], shop.id, template(token))

    assert response.status_code == 200, response.text
    assert len(psp_echo.received) == before + 1
    with_cvc = httpx.post(
        vault.url + "/v1/tokens",
        json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "cvc": "123"},
        headers={"authorization": f"Bearer {shop.publishable_key}"},
    )
    assert with_cvc.status_code == 503, with_cvc.text
    assert with_cvc.json()["error"]["code"] == "service_unavailable"


def test_the_vaults_database_lost_while_a_card_is_forwarded(
    api: ServiceProcess,
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    tokens: dict[str, str],
    pg_admin_url: str,
    workers: Callable[..., ServiceProcess],
) -> None:
    """The vault records a forward before the card leaves (fail-closed) and its outcome after
    the processor answered. Its database lost in between: PSP A charged the card, the outcome
    cannot be recorded. The vault answered a bare 503, which the API took for "nothing was
    sent": the payment was `failed` while PSP A held the charge (or, with a second processor,
    failed over to it: a second charge). Now the 503 says the card was sent; the payment stays
    `processing` and the worker settles it from PSP A's answer."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "Vault database")
    token = _token(vault, merchant.publishable_key)
    workers()
    history = History()
    done: list[Operation] = []

    async def pay() -> None:
        async with httpx.AsyncClient(base_url=api.url) as http:
            client = Client(http, history, merchant.auth, give_up_seconds=60)
            done.append(await client.authorize(token, 2500, capture=True))

    paying = threading.Thread(target=asyncio.run, args=(pay(),))
    _psp_a_latency(psp_a, 1500)
    try:
        paying.start()
        time.sleep(0.7)  # the forward is recorded and waits for PSP A's answer
        _cut(pg_admin_url, VAULT_DB.database)
        time.sleep(1.5)  # PSP A answers; the vault cannot record the outcome
    finally:
        _restore(pg_admin_url, VAULT_DB.database)
        _psp_a_latency(psp_a, 0)
        paying.join(90)
    sources = Sources(
        api.url, merchant.auth, merchant.id, api_env["TESSERA_API_DATABASE_URL"], psp_a.url
    )
    result = check(history, sources)
    result.print("the vault's database lost during a forward")
    assert done
    assert done[0].status == 202, "the vault's refusal was not taken for an unknown outcome"
    assert done[0].result is Result.OK
    assert result.ok, result.summary()


def _token(vault: ServiceProcess, publishable_key: str) -> str:
    response = httpx.post(
        vault.url + "/v1/tokens",
        json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040},
        headers={"authorization": f"Bearer {publishable_key}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def _psp_a_latency(psp_a: ServiceProcess, millis: int) -> None:
    httpx.post(psp_a.url + "/admin/config", json={"latency_ms": millis}).raise_for_status()


def _admin(pg_admin_url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def _cut(pg_admin_url: str, database: str) -> None:
    """The vault's database unreachable: no new connection, every open one terminated."""
    _admin(
        pg_admin_url,
        f'ALTER DATABASE "{database}" CONNECTION LIMIT 0',
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
    )


def _restore(pg_admin_url: str, database: str) -> None:
    _admin(pg_admin_url, f'ALTER DATABASE "{database}" CONNECTION LIMIT -1')
