"""`tessera worker`: unknown outcomes settled, abandoned requests finished, stale
authorizations expired, and two workers never act twice on one payment."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import ApiMerchant, start_service
from tests.support.payments import SLOW, new_key, pay, post, psp_authorizations, tokenize
from tests.support.processes import ServiceProcess


def worker_env(
    api_env: dict[str, str], vault: ServiceProcess, psp_a: ServiceProcess
) -> dict[str, str]:
    return {
        **api_env,
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
    }


@pytest.fixture
def workers(
    api_env: dict[str, str], vault: ServiceProcess, psp_a: ServiceProcess, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(**extra: str) -> ServiceProcess:
        env = {**worker_env(api_env, vault, psp_a), **extra}
        log = tmp_path / f"worker-{len(started)}.log"
        process = ServiceProcess("api", env, 0, log, args=["worker"])
        process.start(ready_path="")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def wait_for(check: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("the condition did not hold in time")


def status(api: ServiceProcess, merchant: ApiMerchant, payment_id: str) -> str:
    response = httpx.get(f"{api.url}/v1/payments/{payment_id}", headers=merchant.auth)
    value: str = response.json()["status"]
    return value


def test_the_reconciler_settles_a_processing_payment_with_the_processor_that_approved_it(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
) -> None:
    response = pay(api, vault, merchant, number=SLOW)
    assert response.status_code == 202
    payment_id = response.json()["id"]
    workers()
    wait_for(lambda: status(api, merchant, payment_id) == "captured")
    payment = httpx.get(f"{api.url}/v1/payments/{payment_id}", headers=merchant.auth).json()
    assert payment["amount_captured"] == payment["amount"]
    assert len(psp_authorizations(psp_a, f"{payment_id}_1")) == 1


def test_the_completer_finishes_a_request_whose_api_process_was_killed(
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    extra = {
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "0.5",
        "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": "6",
        "TESSERA_FAILPOINTS": "after_processor_call",
    }
    doomed = start_service("api", api_env, tmp_path, extra)
    key = new_key()
    body = {"amount": 321, "currency": "EUR", "token": tokenize(vault, merchant)}
    with pytest.raises(httpx.HTTPError):
        post(doomed, merchant, "/v1/payments", body, key)
    doomed.stop()
    workers()

    survivor = start_service(
        "api", api_env, tmp_path, {k: v for k, v in extra.items() if k != "TESSERA_FAILPOINTS"}
    )
    try:

        def replayed() -> bool:
            response = post(survivor, merchant, "/v1/payments", body, key)
            return response.status_code == 201

        wait_for(replayed, seconds=20)
        final = post(survivor, merchant, "/v1/payments", body, key)
        assert final.headers["idempotent-replayed"] == "true"
        payment = final.json()
        assert payment["status"] == "captured"
        assert len(psp_authorizations(psp_a, f"{payment['id']}_1")) == 1
    finally:
        survivor.stop()


def test_an_authorization_not_captured_in_time_is_canceled(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
) -> None:
    payment = pay(api, vault, merchant, capture=False).json()
    assert payment["status"] == "authorized"
    workers(TESSERA_API_AUTHORIZATION_EXPIRY_SECONDS="1")
    wait_for(lambda: status(api, merchant, payment["id"]) == "canceled")
    [authorization] = psp_authorizations(psp_a, f"{payment['id']}_1")
    assert authorization["status"] == "voided"


def test_two_workers_never_act_twice_on_one_payment(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
    databases: dict[str, ServiceDatabase],
) -> None:
    ids = []
    for _ in range(6):
        response = pay(api, vault, merchant, number=SLOW, amount=77)
        assert response.status_code == 202
        ids.append(response.json()["id"])
    started_workers = [workers(), workers()]

    def all_captured() -> bool:
        return all(status(api, merchant, p) == "captured" for p in ids)

    wait_for(all_captured, seconds=30)
    logs = [
        json.loads(line)
        for w in started_workers
        for line in w.output().splitlines()
        if line.startswith("{")
    ]
    for payment_id in ids:
        settled = [
            e
            for e in logs
            if e.get("message") == "reconciled"
            and e.get("payment") == payment_id
            and e.get("outcome") != "still_unknown"
        ]
        assert len(settled) == 1, settled
        assert len(psp_authorizations(psp_a, f"{payment_id}_1")) == 1
