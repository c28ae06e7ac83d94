"""Campaigns 2 and 4 (issue 9) on the vault's side: its Redis down, its database lost while a
card is on its way to the processor. Found by the storage campaigns (tests/test_chaos_storage.py),
kept here as precise regression tests against the session's real vault, API and simulators."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import register_vault_merchant
from tests.support.echo_server import EchoServer
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
