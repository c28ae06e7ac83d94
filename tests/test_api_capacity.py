"""Admission control: an overloaded API process makes payments wait for a slot, and refuses
the ones that waited too long with a retryable 503 that wrote nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.conftest import ApiMerchant, start_service
from tests.support.payments import SLOW, pay, post, tokenize
from tests.support.processes import ServiceProcess


def test_payments_beyond_the_limit_wait_for_a_slot_or_are_refused_without_a_trace(
    api_env: dict[str, str],
    vault_env: dict[str, str],
    vault: ServiceProcess,
    merchant: ApiMerchant,
    tmp_path: Path,
) -> None:
    # A vault that waits out the simulator's slow card (4 s), so that payment holds its slot.
    patient = start_service(
        "vault", vault_env, tmp_path, {"TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "8"}
    )
    try:
        api = start_service(
            "api",
            api_env,
            tmp_path,
            {
                "TESSERA_API_VAULT_URL": patient.url,
                "TESSERA_API_MAX_PAYMENTS_IN_FLIGHT": "1",
                "TESSERA_API_ADMISSION_WAIT_SECONDS": "2",
            },
        )
        try:
            answers: dict[str, httpx.Response] = {}

            def slow_payment() -> None:  # the simulator holds this card's answer for 4 s
                answers["slow"] = pay(api, vault, merchant, number=SLOW, key="capacity-slow")

            def queued_payment() -> None:  # waits about 1 s of its 2 s for the slot
                answers["queued"] = post(api, merchant, "/v1/payments", body, "capacity-queued")

            token = tokenize(vault, merchant)
            body = {"amount": 1050, "currency": "EUR", "token": token}
            first = threading.Thread(target=slow_payment)
            first.start()
            time.sleep(0.5)
            refused = post(api, merchant, "/v1/payments", body, "capacity-refused")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "at_capacity"
            time.sleep(0.5)  # about 3 s in: the slow payment holds the only slot for 1 s more
            second = threading.Thread(target=queued_payment)
            second.start()
            first.join(timeout=30)
            second.join(timeout=30)
            assert answers["slow"].status_code == 201
            assert answers["queued"].status_code == 201, answers["queued"].text
            # The refusal wrote nothing: the same key now makes the payment, not a replayed 503.
            retried = post(api, merchant, "/v1/payments", body, "capacity-refused")
            assert retried.status_code == 201
            assert retried.headers.get("idempotent-replayed") != "true"
            ids = {
                answers["slow"].json()["id"],
                answers["queued"].json()["id"],
                retried.json()["id"],
            }
            assert len(ids) == 3
        finally:
            api.stop()
    finally:
        patient.stop()
