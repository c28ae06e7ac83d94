"""The API's edges: no card number anywhere it writes, bad input, Redis down, rolled keys."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tessera.dbsetup import ServiceDatabase
from tests.conftest import ApiMerchant, dsn
from tests.support.payments import DECLINED, PROCESSOR_ERROR, new_key, pay, post
from tests.support.processes import ServiceProcess
from tests.test_vault_tokens import pg_dump_binary

ROOT = Path(__file__).resolve().parents[1]
CARDS = ["4242424242424242", "5555555555554444", "378282246310005", *DECLINED, PROCESSOR_ERROR]


def forms(pan: str) -> list[str]:
    """A PAN in clear, grouped, in hex and in base64 at every alignment."""
    found = [pan, " ".join(pan[i : i + 4] for i in range(0, len(pan), 4)), pan.encode().hex()]
    for pad in ("", "x", "xx"):
        encoded = base64.b64encode((pad + pan).encode()).decode()
        found.append(encoded[4 if pad else 0 : -4])
    return found


def test_a_full_payment_flow_leaves_no_card_number_in_the_api_database_or_any_log(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    databases: dict[str, ServiceDatabase],
) -> None:
    for number in CARDS:
        response = pay(api, vault, merchant, number=number, amount=990)
        if response.status_code == 201:
            payment = response.json()
            post(api, merchant, f"/v1/payments/{payment['id']}/refunds", {"amount": 100})
    # Requests that carry a card number where none belongs: refused, never echoed.
    post(api, merchant, "/v1/payments", {"amount": 1, "currency": "EUR", "token": CARDS[0]})
    httpx.get(f"{api.url}/v1/payments/{CARDS[1]}", headers=merchant.auth)
    db = databases["api"]
    dump = subprocess.run(
        [pg_dump_binary(), "--no-password", dsn(db.owner, db.database)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "INSERT INTO" in dump or "COPY public.payments" in dump
    logs = {"api": api.output(), "vault": vault.output(), "psp_a": psp_a.output()}
    for pan in CARDS:
        for form in forms(pan):
            assert form not in dump, f"a card number ({form[:6]}…) is in the API database"
            for name, text in logs.items():
                assert form not in text, f"a card number ({form[:6]}…) is in the {name} log"


def test_a_body_over_64_kib_is_refused_with_413(api: ServiceProcess, merchant: ApiMerchant) -> None:
    body = {"amount": 1, "currency": "EUR", "token": "tok_x", "description": "x" * 70_000}
    response = post(api, merchant, "/v1/payments", body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_malformed_json_is_a_400(api: ServiceProcess, merchant: ApiMerchant) -> None:
    response = httpx.post(
        api.url + "/v1/payments",
        content=b'{"amount": 1,',
        headers={**merchant.auth, "idempotency-key": new_key(), "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_with_redis_down_payments_and_replays_still_hold(
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    tmp_path: Path,
) -> None:
    extra = {
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_REDIS_URL": "redis://127.0.0.1:9/0",  # nothing listens on port 9
    }
    port_env = {**api_env, **extra}
    from tests.support.processes import free_port

    port = free_port()
    process = ServiceProcess(
        "api", {**port_env, "TESSERA_API_PORT": str(port)}, port, tmp_path / "api.log"
    ).start(ready_path="/healthz")
    try:
        # Ready, degraded: a load balancer keeps sending payments, which go through (below).
        ready = httpx.get(process.url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        key = new_key()
        first = pay(process, vault, merchant, key=key)
        assert first.status_code == 201, first.text
        body = json.loads(first.request.content)
        again = post(process, merchant, "/v1/payments", body, key)
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    finally:
        process.stop()


def test_a_rolled_secret_key_stops_working(
    api: ServiceProcess, vault: ServiceProcess, api_env: dict[str, str], tokens: dict[str, str]
) -> None:
    from tests.conftest import create_merchant

    merchant = create_merchant(api_env, vault, tokens["admin"], "Rolling")
    assert httpx.get(api.url + "/v1/payments", headers=merchant.auth).status_code == 200
    rolled = subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "merchants",
            "roll-key",
            "--merchant",
            merchant.id,
            "--json",
        ],
        env={**os.environ, **api_env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    new_key_value = json.loads(rolled.stdout)["secret_key"]
    time.sleep(5.2)  # the API caches key lookups for 5 s
    old = httpx.get(api.url + "/v1/payments", headers=merchant.auth)
    assert old.status_code == 401
    fresh = httpx.get(
        api.url + "/v1/payments", headers={"authorization": f"Bearer {new_key_value}"}
    )
    assert fresh.status_code == 200
