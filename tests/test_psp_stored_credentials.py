"""Stored credentials at both PSP simulators (issue 13): a setup (CIT) returns the scheme's
network transaction id, an MIT quoting it is approved, and the scheme rules decline an MIT
without a valid id and a setup without the CVC. Real `python -m sandbox.psp_a|psp_b` processes.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.processes import ServiceProcess, free_port

KEY_A = f"psp_a_{secrets.token_hex(16)}"
KEY_B = f"psp_b_{secrets.token_hex(16)}"
NEXT_YEAR = datetime.date.today().year + 1
VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
NTI = re.compile(r"nti_[a-z2-7]{32}")


def _start(module: str, env: dict[str, str], port: int, log: Any) -> ServiceProcess:
    process = ServiceProcess(module, env, port, log, args=[])
    process.start(ready_path="/healthz")
    return process


@pytest.fixture(scope="module")
def psp_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = free_port()
    env = {"TESSERA_PSP_A_PORT": str(port), "TESSERA_PSP_A_API_KEY": KEY_A}
    log = tmp_path_factory.mktemp("psp_a_sc") / "psp_a.log"
    process = _start("sandbox.psp_a", env, port, log)
    with httpx.Client(
        base_url=process.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=10
    ) as client:
        yield client
    process.stop()


@pytest.fixture(scope="module")
def psp_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = free_port()
    env = {
        "TESSERA_PSP_B_PORT": str(port),
        "TESSERA_PSP_B_API_KEY": KEY_B,
        "TESSERA_PSP_B_NOTIFY_URL": "",
    }
    log = tmp_path_factory.mktemp("psp_b_sc") / "psp_b.log"
    process = _start("sandbox.psp_b", env, port, log)
    with httpx.Client(base_url=process.url, headers={"x-api-key": KEY_B}, timeout=10) as client:
        yield client
    process.stop()


def _ref() -> str:
    return f"ref_{secrets.token_hex(8)}"


def a_authorize(
    client: httpx.Client,
    number: str = VISA,
    *,
    cvc: str | None = "123",
    setup: bool = False,
    mit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    card: dict[str, Any] = {"number": number, "exp_month": 12, "exp_year": NEXT_YEAR}
    if cvc is not None:
        card["cvc"] = cvc
    body: dict[str, Any] = {
        "reference": _ref(),
        "amount": 1500,
        "currency": "EUR",
        "capture": True,
        "card": card,
    }
    if setup:
        body["setup_future_usage"] = "off_session"
    if mit is not None:
        body["payment_method_options"] = {"card": {"mit_exemption": mit}}
    response = client.post("/v1/authorizations", json=body)
    assert response.status_code == 201, response.text
    assert not {VISA, MASTERCARD} & set(re.findall(r"\d{13,19}", response.text))
    answer: dict[str, Any] = response.json()
    return answer


def b_pay(
    client: httpx.Client,
    number: str = VISA,
    *,
    cvc: str | None = "123",
    store: bool = False,
    cont_auth: str | None = None,
    nti: str | None = None,
) -> dict[str, Any]:
    method: dict[str, Any] = {"number": number, "expiryMonth": 12, "expiryYear": NEXT_YEAR}
    if cvc is not None:
        method["cvc"] = cvc
    body: dict[str, Any] = {
        "merchantReference": _ref(),
        "amount": {"value": 1500, "currency": "EUR"},
        "paymentMethod": method,
        "captureImmediately": True,
    }
    if store:
        body |= {"storePaymentMethod": True, "recurringProcessingModel": "CardOnFile"}
    if cont_auth is not None:
        body |= {"shopperInteraction": "ContAuth", "recurringProcessingModel": cont_auth}
        if nti is not None:
            body["additionalData"] = {"networkTxReference": nti}
    response = client.post("/v1/payments", json=body)
    assert response.status_code == 200, response.text
    assert not {VISA, MASTERCARD} & set(re.findall(r"\d{13,19}", response.text))
    answer: dict[str, Any] = response.json()
    return answer


def test_psp_a_setup_returns_a_network_transaction_id_that_renewals_quote(
    psp_a: httpx.Client,
) -> None:
    setup = a_authorize(psp_a, setup=True)
    assert setup["status"] == "captured"
    nti = setup["network_transaction_id"]
    assert NTI.fullmatch(nti)
    plain = a_authorize(psp_a)
    assert "network_transaction_id" not in plain  # only a setup gets one
    for reason in ("recurring", "unscheduled"):
        renewal = a_authorize(
            psp_a, cvc=None, mit={"reason": reason, "network_transaction_id": nti}
        )
        assert renewal["status"] == "captured", renewal
        assert "network_transaction_id" not in renewal


def test_psp_a_declines_an_mit_without_a_valid_network_transaction_id(
    psp_a: httpx.Client,
) -> None:
    nti = a_authorize(psp_a, MASTERCARD, setup=True)["network_transaction_id"]
    missing = a_authorize(psp_a, cvc=None, mit={"reason": "recurring"})
    assert (missing["status"], missing["decline_code"]) == ("declined", "transaction_not_allowed")
    # An id the scheme issued for another card is no id for this one.
    foreign = a_authorize(
        psp_a, cvc=None, mit={"reason": "recurring", "network_transaction_id": nti}
    )
    assert (foreign["status"], foreign["decline_code"]) == ("declined", "transaction_not_allowed")
    forged = nti[:-1] + ("a" if nti[-1] != "a" else "b")
    tampered = a_authorize(
        psp_a, MASTERCARD, cvc=None, mit={"reason": "installment", "network_transaction_id": forged}
    )
    assert tampered["decline_code"] == "transaction_not_allowed"


def test_psp_a_declines_a_setup_without_the_cvc(psp_a: httpx.Client) -> None:
    setup = a_authorize(psp_a, cvc=None, setup=True)
    assert (setup["status"], setup["decline_code"]) == ("declined", "authentication_required")
    assert "network_transaction_id" not in setup
    # The same card without storing it needs no CVC here (the rule is the setup's).
    assert a_authorize(psp_a, cvc=None)["status"] == "captured"


def test_psp_b_store_payment_method_and_cont_auth(psp_b: httpx.Client) -> None:
    setup = b_pay(psp_b, store=True)
    assert setup["resultCode"] == "Authorised"
    nti = setup["additionalData"]["networkTxReference"]
    assert NTI.fullmatch(nti)
    inquiry = psp_b.get("/v1/payments", params={"merchantReference": setup["merchantReference"]})
    assert inquiry.json()["additionalData"] == {"networkTxReference": nti}
    for model in ("Subscription", "UnscheduledCardOnFile"):
        renewal = b_pay(psp_b, cvc=None, cont_auth=model, nti=nti)
        assert renewal["resultCode"] == "Authorised", renewal
        assert "additionalData" not in renewal


def test_psp_b_refuses_cont_auth_without_a_valid_reference_and_a_setup_without_cvc(
    psp_b: httpx.Client,
) -> None:
    missing = b_pay(psp_b, cvc=None, cont_auth="Subscription")
    assert (missing["resultCode"], missing["refusalReason"]) == (
        "Refused",
        "Transaction Not Permitted",
    )
    other_card = b_pay(psp_b, MASTERCARD, store=True)["additionalData"]["networkTxReference"]
    foreign = b_pay(psp_b, cvc=None, cont_auth="Subscription", nti=other_card)
    assert foreign["refusalReason"] == "Transaction Not Permitted"
    no_cvc = b_pay(psp_b, cvc=None, store=True)
    assert (no_cvc["resultCode"], no_cvc["refusalReason"]) == ("Refused", "Authentication required")
    assert "additionalData" not in no_cvc


def test_an_id_issued_by_one_simulator_is_accepted_by_the_other(
    psp_a: httpx.Client, psp_b: httpx.Client
) -> None:
    """Network transaction ids are the scheme's, not the processor's (sandbox/scheme.py)."""
    from_a = a_authorize(psp_a, setup=True)["network_transaction_id"]
    assert b_pay(psp_b, cvc=None, cont_auth="Subscription", nti=from_a)["resultCode"] == (
        "Authorised"
    )
    from_b = b_pay(psp_b, store=True)["additionalData"]["networkTxReference"]
    renewal = a_authorize(
        psp_a, cvc=None, mit={"reason": "recurring", "network_transaction_id": from_b}
    )
    assert renewal["status"] == "captured"
