"""Decline details from the processors: each test card's decline arrives with the issuer's advice
(Mastercard merchant advice code, Visa decline category) through both simulators and both
connectors, and is classified as docs/subscriptions.md's table says.

The simulators run as processes; the connectors' own parsers read their answers (the vault, which
carries authorizations in production, forwards the processor's body unchanged)."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest

from api.connectors import psp_a as connector_a
from api.connectors import psp_b as connector_b
from api.connectors.base import AuthorizeResult, Outcome, advice_code, visa_category
from core.recovery import Decline, DeclineClass, classify
from sandbox.cards import TEST_CARDS, Behaviour
from tests.conftest import ApiMerchant, create_merchant
from tests.support.payments import configure_routing, pay
from tests.support.processes import ServiceProcess

NEXT_YEAR = datetime.date.today().year + 1


@dataclass(frozen=True)
class Expected:
    code: str
    advice_code: str | None
    visa_category: int | None
    retryable: DeclineClass
    rule: str
    not_before: timedelta = timedelta(0)


N, L, U = DeclineClass.NEVER, DeclineClass.LATER, DeclineClass.AFTER_UPDATE

#: sandbox/README.md's decline table, as docs/subscriptions.md classifies it.
DECLINE_CARDS: dict[str, Expected] = {
    "4000000000000002": Expected("do_not_honor", None, None, L, "do_not_honor"),
    "4000000000009995": Expected("insufficient_funds", None, None, L, "insufficient_funds"),
    "4000000000000069": Expected("expired_card", None, None, U, "expired_card"),
    "4000000000000127": Expected("incorrect_cvc", None, None, U, "incorrect_cvc"),
    "4000000000009987": Expected("lost_card", None, 1, N, "visa_category_1"),
    "4000000000009979": Expected("stolen_card", None, 1, N, "visa_category_1"),
    "4000000000009938": Expected("closed_account", None, 1, N, "visa_category_1"),
    "4000000000009961": Expected("stop_recurring", None, 1, N, "visa_category_1"),
    "4000000000009953": Expected("revocation_of_authorization", None, 1, N, "visa_category_1"),
    "4000000000009946": Expected("issuer_unavailable", None, 2, L, "issuer_unavailable"),
    "5100000000000016": Expected(
        "insufficient_funds", "24", None, L, "insufficient_funds", timedelta(hours=1)
    ),
    "5100000000000024": Expected("do_not_honor", "02", None, L, "do_not_honor"),
    "5100000000000032": Expected("closed_account", "03", None, N, "mac_03"),
    "5100000000000040": Expected("stop_recurring", "21", None, N, "mac_21"),
    "5100000000000057": Expected("expired_card", "01", None, U, "mac_01"),
}


@pytest.fixture(scope="module")
def sim_a(psp_a: ServiceProcess) -> Iterator[httpx.Client]:
    headers = {"authorization": "Bearer psp_a_test_key"}
    with httpx.Client(base_url=psp_a.url, headers=headers, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def sim_b(psp_b: ServiceProcess) -> Iterator[httpx.Client]:
    headers = {"x-api-key": "psp_b_test_key"}
    with httpx.Client(base_url=psp_b.url, headers=headers, timeout=10) as client:
        yield client


@pytest.fixture(scope="module", params=["psp_a", "psp_b"])
def through(
    request: pytest.FixtureRequest,
    api_env: dict[str, str],
    vault: ServiceProcess,
    tokens: dict[str, str],
) -> ApiMerchant:
    """A merchant whose payments go to one processor only."""
    processor: str = request.param
    merchant = create_merchant(api_env, vault, tokens["admin"], f"Declines at {processor}")
    configure_routing(api_env, merchant, "--processors", processor)
    return merchant


def _at_psp_a(client: httpx.Client, number: str) -> tuple[dict[str, Any], AuthorizeResult]:
    response = client.post(
        "/v1/authorizations",
        json={
            "reference": f"ref_{secrets.token_hex(8)}",
            "amount": 1000,
            "currency": "EUR",
            "capture": False,
            "card": {"number": number, "exp_month": 12, "exp_year": NEXT_YEAR, "cvc": "123"},
        },
    )
    body: dict[str, Any] = response.json()
    return body, connector_a._authorization(response.status_code, body)


def _at_psp_b(client: httpx.Client, number: str) -> tuple[dict[str, Any], AuthorizeResult]:
    response = client.post(
        "/v1/payments",
        json={
            "merchantReference": f"ref_{secrets.token_hex(8)}",
            "amount": {"value": 1000, "currency": "EUR"},
            "paymentMethod": {
                "number": number,
                "expiryMonth": 12,
                "expiryYear": NEXT_YEAR,
                "cvc": "737",
                "holderName": "A. Shopper",
            },
            "captureImmediately": False,
        },
    )
    body: dict[str, Any] = response.json()
    return body, connector_b._payment(response.status_code, body, captured=False)


def _check(result: AuthorizeResult, expected: Expected) -> None:
    assert result.outcome is Outcome.DECLINED
    assert (result.decline_code, result.advice_code, result.visa_category) == (
        expected.code,
        expected.advice_code,
        expected.visa_category,
    )
    assert result.decline_code is not None
    found = classify(Decline(result.decline_code, result.advice_code, result.visa_category))
    assert (found.decline_class, found.rule, found.not_before) == (
        expected.retryable,
        expected.rule,
        expected.not_before,
    )


def test_every_declining_test_card_is_in_the_table() -> None:
    """A test card added to sandbox/cards.py without its expected classification fails here."""
    declining = {n for n, o in TEST_CARDS.items() if o.behaviour is Behaviour.DECLINE}
    # Declined by PSP A only (PSP B approves it: cascading); covered by the failover tests.
    assert declining - {"4000000000003220"} == set(DECLINE_CARDS)


@pytest.mark.parametrize("number", sorted(DECLINE_CARDS))
def test_psp_a_decline_details_reach_the_connector_classified(
    sim_a: httpx.Client, number: str
) -> None:
    expected = DECLINE_CARDS[number]
    body, result = _at_psp_a(sim_a, number)
    assert body["decline_code"] == expected.code
    assert body.get("network_advice_code") == expected.advice_code
    assert body.get("visa_decline_category") == expected.visa_category
    _check(result, expected)


@pytest.mark.parametrize("number", sorted(DECLINE_CARDS))
def test_psp_b_decline_details_reach_the_connector_classified(
    sim_b: httpx.Client, number: str
) -> None:
    expected = DECLINE_CARDS[number]
    body, result = _at_psp_b(sim_b, number)
    assert body["resultCode"] == "Refused"
    assert body["refusalReasonCode"].isdigit()
    data = body["additionalData"]
    assert data.get("merchantAdviceCode") == expected.advice_code
    expected_category = None if expected.visa_category is None else str(expected.visa_category)
    assert data.get("visaDeclineCategory") == expected_category
    _check(result, expected)


def test_psp_b_tells_lost_from_stolen_by_the_raw_response_behind_one_refusal_reason(
    sim_b: httpx.Client,
) -> None:
    lost, lost_result = _at_psp_b(sim_b, "4000000000009987")
    stolen, stolen_result = _at_psp_b(sim_b, "4000000000009979")
    assert lost["refusalReason"] == stolen["refusalReason"] == "Blocked Card"
    assert (lost_result.decline_code, stolen_result.decline_code) == ("lost_card", "stolen_card")


def test_psp_b_refusal_without_raw_response_falls_back_to_the_refusal_reason() -> None:
    body = {"pspReference": "P1", "resultCode": "Refused", "refusalReason": "Blocked Card"}
    result = connector_b._payment(200, body, captured=False)
    assert (result.decline_code, result.advice_code, result.visa_category) == (
        "pickup_card",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("24", "24"), ("1", "01"), (21, "21"), ("", None), ("abc", None), ("123", None), (True, None)],
)
def test_advice_code_reads_only_two_digit_codes(value: object, expected: str | None) -> None:
    assert advice_code(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), ("4", 4), (0, None), ("5", None), ("x", None), (True, None)]
)
def test_visa_category_reads_only_one_to_four(value: object, expected: int | None) -> None:
    assert visa_category(value) == expected


@pytest.mark.parametrize("number", sorted(DECLINE_CARDS))
def test_a_declined_payment_shows_its_decline_classified(
    api: ServiceProcess, vault: ServiceProcess, through: ApiMerchant, number: str
) -> None:
    """Through the API and either processor: the payment and its attempt keep the decline with
    the issuer's advice, and say whether it may be retried (core.recovery's table)."""
    expected = DECLINE_CARDS[number]
    response = pay(api, vault, through, number=number)
    assert response.status_code == 402, response.text
    payment = httpx.get(
        api.url + f"/v1/payments/{response.json()['error']['payment']}",
        headers=through.auth,
        timeout=10,
    ).json()
    decline = {
        "code": expected.code,
        "advice_code": expected.advice_code,
        "visa_category": expected.visa_category,
        "retryable": expected.retryable.value,
        "rule": expected.rule,
    }
    assert (payment["status"], payment["decline_code"]) == ("declined", expected.code)
    assert payment["decline"] == decline
    assert [a["decline"] for a in payment["attempts"]] == [decline]


def test_an_approved_payment_has_no_decline(
    api: ServiceProcess, vault: ServiceProcess, through: ApiMerchant
) -> None:
    response = pay(api, vault, through)
    assert response.status_code == 201, response.text
    payment = response.json()
    assert payment["decline"] is None
    assert [a["decline"] for a in payment["attempts"]] == [None]
