"""`tessera worker`: unknown outcomes settled, abandoned requests finished, stale
authorizations expired, and two workers never act twice on one payment."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import ApiMerchant, create_merchant, start_service
from tests.support.payments import (
    LATE,
    SLOW,
    configure_routing,
    new_key,
    pay,
    post,
    psp_authorizations,
    psp_b_payments,
    tokenize,
    wait_for,
)
from tests.support.processes import ServiceProcess


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
        # The crash came before phase 3: the one event was written when the worker finished.
        events = httpx.get(
            f"{survivor.url}/v1/events", params={"object": payment["id"]}, headers=merchant.auth
        ).json()["data"]
        assert [(e["type"], e["request"]["idempotency_key"]) for e in events] == [
            ("payment.captured", key)
        ]
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

    def events() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(
            f"{api.url}/v1/events", params={"object": payment["id"]}, headers=merchant.auth
        ).json()["data"]
        return found

    # The cancel shows `canceled` from its first phase (before the processor is asked); its
    # event comes with the processor's confirmation: wait for that.
    wait_for(lambda: events()[0]["type"] == "payment.canceled")
    assert status(api, merchant, payment["id"]) == "canceled"
    [authorization] = psp_authorizations(psp_a, f"{payment['id']}_1")
    assert authorization["status"] == "voided"
    [canceled, _] = events()
    assert (canceled["type"], canceled["request"]) == ("payment.canceled", None)


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


@pytest.fixture
def late_processors(psp_a: ServiceProcess, psp_b: ServiceProcess) -> Iterator[None]:
    """The late card's request waits 8 s at either simulator instead of 90: after the API's
    time-out (the vault's forward gives up at 2 s), after the worker (started then) applied
    its 1 s cut-off."""
    for psp in (psp_a, psp_b):
        httpx.post(psp.url + "/admin/config", json={"late_seconds": 8}).raise_for_status()
    yield
    for psp in (psp_a, psp_b):
        httpx.post(psp.url + "/admin/config", json={"late_seconds": 90}).raise_for_status()


def read(api: ServiceProcess, merchant: ApiMerchant, payment_id: str) -> dict[str, Any]:
    payment: dict[str, Any] = httpx.get(
        f"{api.url}/v1/payments/{payment_id}", headers=merchant.auth
    ).json()
    return payment


def late_reversal(api: ServiceProcess, merchant: ApiMerchant, payment_id: str) -> str | None:
    value: str | None = read(api, merchant, payment_id)["attempts"][0]["late_reversal"]
    return value


@pytest.mark.parametrize(
    ("capture", "reversal", "status_at_psp"),
    [(True, "refunded", "captured"), (False, "voided", "voided")],
)
def test_a_late_authorization_of_a_failed_payment_is_reversed_at_psp_a(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
    late_processors: None,
    capture: bool,
    reversal: str,
    status_at_psp: str,
) -> None:
    response = pay(api, vault, merchant, number=LATE, capture=capture, amount=880)
    assert response.status_code == 202, response.text
    payment_id = response.json()["id"]
    workers(TESSERA_API_PROCESSOR_CUTOFF_SECONDS="1")
    wait_for(lambda: status(api, merchant, payment_id) == "failed")
    # Failed means the processor answered "not found" after the cut-off: nothing there yet.
    assert read(api, merchant, payment_id)["failure_code"] == "not_found_at_processor"

    wait_for(lambda: late_reversal(api, merchant, payment_id) == reversal, 30)
    payment = read(api, merchant, payment_id)
    assert payment["status"] == "failed"
    assert (payment["amount_authorized"], payment["amount_captured"]) == (0, 0)
    [authorization] = psp_authorizations(psp_a, f"{payment_id}_1")
    assert authorization["status"] == status_at_psp
    assert authorization["amount_refunded"] == (880 if capture else 0)
    assert payment["attempts"][0]["processor_reference"] == authorization["id"]


def test_a_late_authorization_of_a_failed_payment_is_reversed_at_psp_b(
    api: ServiceProcess,
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_b: ServiceProcess,
    tokens: dict[str, str],
    workers: Callable[..., ServiceProcess],
    late_processors: None,
) -> None:
    only_b = create_merchant(api_env, vault, tokens["admin"], "Late at PSP B")
    configure_routing(api_env, only_b, "--processors", "psp_b")
    response = pay(api, vault, only_b, number=LATE, capture=True, amount=990)
    assert response.status_code == 202, response.text
    payment_id = response.json()["id"]
    workers(TESSERA_API_PROCESSOR_CUTOFF_SECONDS="1")
    wait_for(lambda: status(api, only_b, payment_id) == "failed")
    wait_for(lambda: late_reversal(api, only_b, payment_id) == "refunded", 30)

    def refunded_at_psp_b() -> bool:
        [late] = psp_b_payments(psp_b, f"{payment_id}_1")
        return [(m["type"], m["status"]) for m in late["modifications"]] == [
            ("refund", "succeeded")
        ]

    wait_for(refunded_at_psp_b)  # PSP B confirms the refund a moment later
    assert read(api, only_b, payment_id)["status"] == "failed"


def test_a_failed_payment_that_never_shows_up_stops_being_watched(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    workers: Callable[..., ServiceProcess],
) -> None:
    """The default late card waits 90 s: with a 2 s window the worker stops asking first."""
    response = pay(api, vault, merchant, number=LATE, amount=770)
    assert response.status_code == 202, response.text
    payment_id = response.json()["id"]
    worker = workers(
        TESSERA_API_PROCESSOR_CUTOFF_SECONDS="1",
        TESSERA_API_LATE_AUTHORIZATION_WINDOW_SECONDS="2",
    )

    def closed() -> bool:
        return any(
            '"window_closed"' in line and payment_id in line
            for line in worker.output().splitlines()
        )

    wait_for(closed, seconds=30)
    payment = read(api, merchant, payment_id)
    assert payment["status"] == "failed"
    assert payment["attempts"][0]["late_reversal"] is None


def test_the_worker_touches_its_heartbeat_file_after_every_cycle(
    workers: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    heartbeat = tmp_path / "worker.heartbeat"
    workers(TESSERA_API_WORKER_HEARTBEAT_PATH=str(heartbeat))
    wait_for(heartbeat.exists)
    first = heartbeat.stat().st_mtime_ns
    wait_for(lambda: heartbeat.stat().st_mtime_ns > first)  # idle cycles every 0.2 s
