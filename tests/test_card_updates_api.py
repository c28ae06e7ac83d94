"""Card updates, the API half (issue 13): the worker reads each PSP's account-updater list from
its cursor, has the vault replace the card under the payment method's token, shows the new
masked card and sends `payment_method.updated` once. Real API worker, vault and both PSP
simulators; every card number is the test's own (the simulators are shared by the session)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ApiMerchant
from tests.support.payments import psp_authorizations, wait_for
from tests.support.processes import ServiceProcess
from tests.support.subscriptions import execute, get, renew, setup_payment, shop_at, unused_visa


@pytest.fixture(scope="module")
def shops(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> dict[str, ApiMerchant]:
    return {
        processor: shop_at(api_env, vault, tokens["admin"], "Card updates", processor)
        for processor in ("psp_a", "psp_b")
    }


def announce(psp: ServiceProcess, body: dict[str, Any]) -> None:
    response = httpx.post(psp.url + "/admin/account_updates", json=body, timeout=10)
    assert response.status_code == 201, response.text


def card_of(api: ServiceProcess, shop: ApiMerchant, method: str) -> dict[str, Any]:
    response = get(api, shop, f"/v1/payment_methods/{method}")
    assert response.status_code == 200, response.text
    card: dict[str, Any] = response.json()["card"]
    return card


def updated_events(api: ServiceProcess, shop: ApiMerchant, method: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = get(api, shop, "/v1/events", object=method).json()["data"]
    return [e for e in events if e["type"] == "payment_method.updated"]


def logged(workers: list[ServiceProcess], message: str, method: str) -> list[dict[str, Any]]:
    lines = [line for w in workers for line in w.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    return [e for e in entries if e.get("message") == message and e.get("payment_method") == method]


@pytest.mark.parametrize("processor", ["psp_a", "psp_b"])
def test_an_expiry_update_makes_the_renewal_that_was_declined_expired_succeed(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
    processor: str,
) -> None:
    shop = shops[processor]
    number = unused_visa()
    method = setup_payment(api, vault, shop, number)["payment_method"]
    psp = psp_a if processor == "psp_a" else psp_b
    announce(psp, {"number": number, "new_exp_month": 3, "new_exp_year": 2042, "decline_old": True})
    declined = renew(api, shop, method)
    assert declined.status_code == 402, declined.text
    assert declined.json()["error"]["decline_code"] == "expired_card"

    workers()
    wait_for(lambda: card_of(api, shop, method)["exp_year"] == 2042, seconds=30)
    assert card_of(api, shop, method) == {
        "brand": "visa",
        "last4": number[-4:],
        "exp_month": 3,
        "exp_year": 2042,
    }
    [event] = updated_events(api, shop, method)
    assert event["data"]["object"]["id"] == method
    assert event["data"]["object"]["card"]["exp_year"] == 2042
    # What changed, as Stripe's previous_attributes: the old masked card.
    assert event["data"]["previous_attributes"] == {
        "card": {"brand": "visa", "last4": number[-4:], "exp_month": 12, "exp_year": 2040}
    }
    assert number not in json.dumps(event)
    declined_events = get(api, shop, "/v1/events", object=declined.json()["error"]["payment"])
    assert [list(e["data"]) for e in declined_events.json()["data"]] == [["object"]]

    renewal = renew(api, shop, method)
    assert renewal.status_code == 201, renewal.text
    assert (renewal.json()["status"], renewal.json()["processor"]) == ("captured", processor)
    assert renewal.json()["card"]["exp_year"] == 2042


def test_a_number_update_renews_on_the_new_number_with_the_setups_network_transaction_id(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
) -> None:
    shop = shops["psp_a"]
    old, new = unused_visa(), unused_visa()
    method = setup_payment(api, vault, shop, old)["payment_method"]
    body = {"number": old, "new_number": new, "new_exp_month": 7, "new_exp_year": 2043}
    announce(psp_a, {**body, "decline_old": True})

    workers()
    wait_for(lambda: card_of(api, shop, method)["last4"] == new[-4:], seconds=30)
    assert card_of(api, shop, method)["exp_year"] == 2043
    assert len(updated_events(api, shop, method)) == 1

    # The old number is closed at PSP A and the id was issued for it: approved means the vault
    # sent the new number and the scheme let the setup's id carry over the reissue.
    renewal = renew(api, shop, method)
    assert renewal.status_code == 201, renewal.text
    assert renewal.json()["status"] == "captured", renewal.text
    assert renewal.json()["card"]["last4"] == new[-4:]
    [auth] = psp_authorizations(psp_a, f"{renewal.json()['id']}_1")
    assert auth["status"] in ("approved", "captured"), auth


def test_two_workers_apply_an_update_once_and_a_refetch_changes_nothing(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_b: ServiceProcess,
    api_env: dict[str, str],
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
) -> None:
    shop = shops["psp_b"]
    number = unused_visa()
    method = setup_payment(api, vault, shop, number)["payment_method"]
    announce(psp_b, {"number": number, "new_exp_month": 5, "new_exp_year": 2044})
    started = [workers(), workers()]
    wait_for(lambda: card_of(api, shop, method)["exp_year"] == 2044, seconds=30)
    wait_for(lambda: bool(logged(started, "card_updated", method)), seconds=10)

    # Every update read again from the start: the vault answers already_applied, the payment
    # method shows that card already, so nothing is written and no event is sent.
    execute(api_env, "UPDATE card_update_cursors SET cursor = NULL, locked_until = '-infinity'")
    wait_for(lambda: len(logged(started, "card_updated", method)) >= 2, seconds=30)
    applied = logged(started, "card_updated", method)
    assert [e["changed"] for e in applied].count(True) == 1, applied
    assert all(e["outcome"] in ("replaced", "already_applied") for e in applied), applied
    assert len(updated_events(api, shop, method)) == 1
    assert card_of(api, shop, method)["exp_year"] == 2044
