"""Small helpers for the payment API's tests: tokenize at the vault, call the API."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ApiMerchant
from tests.support.processes import ServiceProcess

APPROVED = "4242424242424242"
DECLINED = {
    "4000000000000002": "do_not_honor",
    "4000000000009995": "insufficient_funds",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
}
PROCESSOR_ERROR = "4000000000000119"
SLOW = "4000000000000259"
LATE = "4000000000000341"
ROOT = Path(__file__).resolve().parents[2]


def tokenize(vault: ServiceProcess, merchant: ApiMerchant, number: str = APPROVED) -> str:
    response = httpx.post(
        vault.url + "/v1/tokens",
        json={
            "number": number,
            "exp_month": 12,
            "exp_year": 2040,
            "cvc": "1234" if number.startswith(("34", "37")) else "123",
        },
        headers={"authorization": f"Bearer {merchant.publishable_key}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def new_key() -> str:
    return f"test-{secrets.token_hex(8)}"


def post(
    api: ServiceProcess,
    merchant: ApiMerchant,
    path: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
    timeout: float = 30,
) -> httpx.Response:
    headers = {**merchant.auth, "idempotency-key": key or new_key()}
    return httpx.post(api.url + path, json=body, headers=headers, timeout=timeout)


def pay(
    api: ServiceProcess,
    vault: ServiceProcess,
    merchant: ApiMerchant,
    *,
    amount: int = 1050,
    capture: bool = True,
    number: str = APPROVED,
    key: str | None = None,
) -> httpx.Response:
    token = tokenize(vault, merchant, number)
    body = {"amount": amount, "currency": "EUR", "token": token, "capture": capture}
    return post(api, merchant, "/v1/payments", body, key)


def psp_authorizations(psp_a: ServiceProcess, reference: str) -> list[dict[str, Any]]:
    response = httpx.get(psp_a.url + "/admin/authorizations", params={"reference": reference})
    found: list[dict[str, Any]] = response.json()["authorizations"]
    return found


def psp_b_payments(psp_b: ServiceProcess, reference: str) -> list[dict[str, Any]]:
    response = httpx.get(psp_b.url + "/admin/payments", params={"merchantReference": reference})
    body = response.json()
    found: list[dict[str, Any]] = body["payments"] if isinstance(body, dict) else body
    return found


def configure_routing(api_env: dict[str, str], merchant: ApiMerchant, *args: str) -> None:
    """`tessera merchants configure --merchant ID …`, as an operator runs it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "merchants",
            "configure",
            "--merchant",
            merchant.id,
            "--json",
            *args,
        ],
        env={**os.environ, **api_env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )


def wait_for(check: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("the condition did not hold in time")
