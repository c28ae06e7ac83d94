"""Stored credentials end to end (issue 13): a setup payment makes a payment method, renewals go
as merchant-initiated transactions with its network transaction id through the processor that
set it up, a detached one is never used again. Real API, vault and both PSP simulators."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ApiMerchant, create_merchant
from tests.support.payments import (
    APPROVED,
    SLOW,
    configure_routing,
    new_key,
    post,
    psp_authorizations,
    psp_b_payments,
    tokenize,
    wait_for,
)
from tests.support.processes import ServiceProcess
from tests.support.subscriptions import execute, get, postings, renew, setup_payment, shop_at

MASTERCARD = "5555555555554444"


@pytest.fixture(scope="module")
def shops(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> dict[str, ApiMerchant]:
    """One merchant routed to each processor only, so each setup's processor is known."""
    return {
        processor: shop_at(api_env, vault, tokens["admin"], "Subscriptions", processor)
        for processor in ("psp_a", "psp_b")
    }


@pytest.mark.parametrize("processor", ["psp_a", "psp_b"])
def test_a_setup_then_two_renewals_quote_its_network_transaction_id(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    api_env: dict[str, str],
    shops: dict[str, ApiMerchant],
    processor: str,
) -> None:
    shop = shops[processor]
    setup = setup_payment(api, vault, shop)
    assert (setup["status"], setup["processor"]) == ("captured", processor)
    method_id = setup["payment_method"]
    assert method_id.startswith("pm_")
    # The processor answered the setup with the scheme's id, which Tessera keeps (never shown).
    reference = f"{setup['id']}_1"
    if processor == "psp_a":
        [auth] = psp_authorizations(psp_a, reference)
        assert auth["network_transaction_id"].startswith("nti_")
    else:
        [stored] = psp_b_payments(psp_b, reference)
        assert stored["additionalData"]["networkTxReference"].startswith("nti_")
    method = get(api, shop, f"/v1/payment_methods/{method_id}")
    assert method.status_code == 200, method.text
    assert method.json() == {
        "id": method_id,
        "object": "payment_method",
        "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2040},
        "created": method.json()["created"],
        "usage": "off_session",
        "detached_at": None,
    }
    assert "nti_" not in method.text
    listed = get(api, shop, "/v1/payment_methods", limit=100).json()
    assert method_id in [m["id"] for m in listed["data"]]

    # Routing now prefers the other processor: a renewal stays with the one that set it up.
    other = "psp_a" if processor == "psp_b" else "psp_b"
    configure_routing(api_env, shop, "--processors", other)
    try:
        key = new_key()
        first = renew(api, shop, method_id, "recurring", key)
        assert first.status_code == 201, first.text
        renewal = first.json()
        # The simulators decline an MIT without a valid network transaction id: approved means
        # it went with the setup's id, without a CVC (the vault had none left to send anyway).
        assert (renewal["status"], renewal["processor"]) == ("captured", processor)
        assert renewal["payment_method"] == method_id
        assert renewal["card"]["last4"] == "4242"
        replay = renew(api, shop, method_id, "recurring", key)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.json() == renewal
        second = renew(api, shop, method_id, "unscheduled")
        assert second.status_code == 201, second.text
        assert (second.json()["status"], second.json()["processor"]) == ("captured", processor)
        assert second.json()["id"] != renewal["id"]
    finally:
        configure_routing(api_env, shop, "--processors", processor)

    renewal_reference = f"{renewal['id']}_1"
    if processor == "psp_a":
        assert len(psp_authorizations(psp_a, renewal_reference)) == 1  # the replay sent nothing
    else:
        assert len(psp_b_payments(psp_b, renewal_reference)) == 1
    # Exactly one authorization and one capture, posted as for any customer-present payment.
    kinds = postings(api_env, renewal["id"])
    assert (kinds.count("authorization"), kinds.count("capture")) == (1, 1)
    assert kinds == postings(api_env, setup["id"])
    events = get(api, shop, "/v1/events", object=renewal["id"]).json()["data"]
    assert [e["type"] for e in events] == ["payment.captured"]
    assert events[0]["data"]["object"]["payment_method"] == method_id


def test_a_renewal_whose_network_transaction_id_is_not_valid_is_declined_by_the_simulator(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    shops: dict[str, ApiMerchant],
) -> None:
    for processor in ("psp_a", "psp_b"):
        shop = shops[processor]
        method_id = setup_payment(api, vault, shop, MASTERCARD)["payment_method"]
        # An id the scheme issued for another card: the simulator must refuse it.
        other = setup_payment(api, vault, shop)["payment_method"]
        execute(
            api_env,
            "UPDATE payment_methods SET network_transaction_id = "
            "(SELECT network_transaction_id FROM payment_methods WHERE id = $2) WHERE id = $1",
            method_id,
            other,
        )
        response = renew(api, shop, method_id)
        assert response.status_code == 402, response.text
        error = response.json()["error"]
        assert error["decline_code"] == "transaction_not_allowed", (processor, error)
        declined = get(api, shop, f"/v1/payments/{error['payment']}").json()
        assert (declined["status"], declined["processor"]) == ("declined", processor)
        assert len(declined["attempts"]) == 1  # never failed over to the other processor


def test_a_setup_without_the_cvc_is_declined_and_stores_nothing(
    api: ServiceProcess, vault: ServiceProcess, shops: dict[str, ApiMerchant]
) -> None:
    for shop in shops.values():
        response = httpx.post(
            vault.url + "/v1/tokens",
            json={"number": APPROVED, "exp_month": 12, "exp_year": 2040},
            headers={"authorization": f"Bearer {shop.publishable_key}"},
        )
        assert response.status_code == 201, response.text
        body = {
            "amount": 1200,
            "currency": "EUR",
            "token": response.json()["id"],
            "setup_future_usage": "off_session",
        }
        declined = post(api, shop, "/v1/payments", body)
        assert declined.status_code == 402, declined.text
        assert declined.json()["error"]["decline_code"] == "authentication_required"
        payment = get(api, shop, f"/v1/payments/{declined.json()['error']['payment']}").json()
        assert payment["payment_method"] is None


def test_a_detached_payment_method_is_never_charged_and_its_token_is_deleted(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    setup = setup_payment(api, vault, shop)
    method_id = setup["payment_method"]
    detached = post(api, shop, f"/v1/payment_methods/{method_id}/detach")
    assert detached.status_code == 200, detached.text
    assert detached.json()["detached_at"] is not None
    again = post(api, shop, f"/v1/payment_methods/{method_id}/detach")
    assert again.json() == detached.json()
    assert get(api, shop, f"/v1/payment_methods/{method_id}").json() == detached.json()
    listed = get(api, shop, "/v1/payment_methods", limit=100).json()["data"]
    assert method_id not in [m["id"] for m in listed]
    refused = renew(api, shop, method_id)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "payment_method_detached"
    # No other payment method used the token: the vault deleted it, the card is gone.
    reuse = {"amount": 100, "currency": "EUR", "token": token_of(api_env, setup["id"])}
    gone = post(api, shop, "/v1/payments", reuse)
    assert gone.status_code == 400
    assert gone.json()["error"]["code"] == "token_invalid"
    # The setup payment still names it.
    assert get(api, shop, f"/v1/payments/{setup['id']}").json()["payment_method"] == method_id
    # One event when it was made, one when it was detached (none for detaching again).
    events = get(api, shop, "/v1/events", object=method_id).json()["data"]
    assert [e["type"] for e in events] == ["payment_method.detached", "payment_method.created"]
    assert events[0]["data"]["object"] == detached.json()
    assert events[1]["data"]["object"]["detached_at"] is None
    assert events[1]["request"]["id"] is not None  # the setup payment's request


def token_of(api_env: dict[str, str], payment_id: str) -> str:
    async def read() -> str:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            token: str = await conn.fetchval("SELECT token FROM payments WHERE id = $1", payment_id)
        finally:
            await conn.close()
        return token

    return asyncio.run(read())


def test_another_merchants_payment_method_does_not_exist_for_this_one(
    api: ServiceProcess, vault: ServiceProcess, shops: dict[str, ApiMerchant]
) -> None:
    owner, stranger = shops["psp_a"], shops["psp_b"]
    method_id = setup_payment(api, vault, owner)["payment_method"]
    assert get(api, stranger, f"/v1/payment_methods/{method_id}").status_code == 404
    assert post(api, stranger, f"/v1/payment_methods/{method_id}/detach").status_code == 404
    assert method_id not in [
        m["id"] for m in get(api, stranger, "/v1/payment_methods", limit=100).json()["data"]
    ]
    charged = renew(api, stranger, method_id)
    assert charged.status_code == 400
    assert charged.json()["error"]["code"] == "payment_method_invalid"
    assert get(api, owner, f"/v1/payment_methods/{method_id}").json()["detached_at"] is None
    assert get(api, owner, "/v1/payment_methods/pm_nope").status_code == 404


@pytest.mark.parametrize(
    ("changes", "code", "param"),
    [
        ({"off_session": False}, "parameter_invalid", "off_session"),
        ({"mit_reason": None}, "parameter_missing", "mit_reason"),
        ({"mit_reason": "monthly"}, "parameter_invalid", "mit_reason"),
        ({"token": "tok_" + "0" * 26}, "parameter_invalid", "token"),
        ({"setup_future_usage": "off_session"}, "parameter_invalid", "setup_future_usage"),
        ({"payment_method": "pm_" + "0" * 26}, "payment_method_invalid", "payment_method"),
        ({"payment_method": "pay_x"}, "payment_method_invalid", "payment_method"),
        ({"payment_method": None}, "parameter_invalid", "off_session"),
        ({"payment_method": None, "off_session": False}, "parameter_invalid", "mit_reason"),
        (
            {"payment_method": None, "off_session": False, "mit_reason": None},
            "parameter_missing",
            "token",
        ),
    ],
)
def test_stored_credential_fields_that_make_no_sense_together_are_refused(
    api: ServiceProcess,
    shops: dict[str, ApiMerchant],
    changes: dict[str, Any],
    code: str,
    param: str,
) -> None:
    body: dict[str, Any] = {
        "amount": 1200,
        "currency": "EUR",
        "payment_method": "pm_" + "1" * 26,
        "off_session": True,
        "mit_reason": "recurring",
    }
    for name, value in changes.items():
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    response = post(api, shops["psp_a"], "/v1/payments", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error.get("param")) == (code, param), error


def test_a_setup_that_fails_over_reaches_the_second_processor_without_the_cvc(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    api_env: dict[str, str],
    tokens: dict[str, str],
) -> None:
    """The vault hands a CVC out once: the first processor's attempt took it, so the second
    processor sees a setup without the customer's verification and declines it. No payment
    method is made; the customer has to enter the CVC again (documented)."""
    shop = create_merchant(api_env, vault, tokens["admin"], "Subscriptions failover")
    # PSP B costs 90 % of the amount, so PSP A ranks first (as in test_api_failover.py).
    configure_routing(api_env, shop, "--processors", "psp_a,psp_b", "--fee", "psp_b=0+9000")
    body = {
        "amount": 1200,
        "currency": "EUR",
        "token": tokenize(vault, shop, "4000000000000119"),  # 5xx at A, approved at B
        "setup_future_usage": "off_session",
    }
    response = post(api, shop, "/v1/payments", body)
    assert response.status_code == 402, response.text
    assert response.json()["error"]["decline_code"] == "authentication_required"
    payment = get(api, shop, f"/v1/payments/{response.json()['error']['payment']}").json()
    assert [(a["processor"], a["outcome"]) for a in payment["attempts"]] == [
        ("psp_a", "failed"),
        ("psp_b", "declined"),
    ]
    assert payment["payment_method"] is None
    assert get(api, shop, "/v1/payment_methods").json()["data"] == []


def test_a_setup_whose_outcome_was_unknown_gets_its_payment_method_from_the_reconciler(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
) -> None:
    """The processor's status inquiry carries the network transaction id too, so a setup the
    worker settles makes its payment method as the request itself would have."""
    shop = shops["psp_a"]
    body = {
        "amount": 1200,
        "currency": "EUR",
        "token": tokenize(vault, shop, SLOW),  # answered after the API's time-out
        "setup_future_usage": "off_session",
    }
    response = post(api, shop, "/v1/payments", body)
    assert response.status_code == 202, response.text
    payment_id = response.json()["id"]
    assert response.json()["payment_method"] is None
    workers()

    def settled() -> bool:
        return bool(get(api, shop, f"/v1/payments/{payment_id}").json()["payment_method"])

    wait_for(settled, seconds=30)
    payment = get(api, shop, f"/v1/payments/{payment_id}").json()
    assert payment["status"] == "captured"
    method = get(api, shop, f"/v1/payment_methods/{payment['payment_method']}").json()
    assert method["card"]["last4"] == SLOW[-4:]
    assert nti_of(api_env, payment["payment_method"]).startswith("nti_")


def nti_of(api_env: dict[str, str], payment_method: str) -> str:
    async def read() -> str:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            nti: str = await conn.fetchval(
                "SELECT network_transaction_id FROM payment_methods WHERE id = $1", payment_method
            )
        finally:
            await conn.close()
        return nti

    return asyncio.run(read())


def test_concurrent_renewals_with_one_key_charge_once(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    method_id = setup_payment(api, vault, shop)["payment_method"]
    key = new_key()
    body = {
        "amount": 990,
        "currency": "EUR",
        "payment_method": method_id,
        "off_session": True,
        "mit_reason": "installment",
    }

    async def race() -> list[httpx.Response]:
        headers = {**shop.auth, "idempotency-key": key}
        async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as client:
            return list(
                await asyncio.gather(*(client.post("/v1/payments", json=body) for _ in range(6)))
            )

    answers = asyncio.run(race())
    created = [r.json()["id"] for r in answers if r.status_code == 201]
    assert created, [r.status_code for r in answers]
    assert len(set(created)) == 1
    assert {r.status_code for r in answers} <= {201, 409}  # 409: idempotency_key_in_use
    assert len(psp_authorizations(psp_a, f"{created[0]}_1")) == 1
