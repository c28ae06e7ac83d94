"""PSP simulator A (`sandbox/psp_a.py`), against a real `python -m sandbox.psp_a` process.

One process serves the module, started with a key of its own (so the default key is refused)
and no latency. Every test uses fresh references, so tests don't see each other's objects; the
tests that change the run-time config put it back. Every response any client here receives is
checked for the card numbers the tests send (`no_pan_in`), and the last test reads the process
output for them.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx
import pytest

from core.cards import detect_brand
from core.cards import luhn_valid as core_luhn_valid
from sandbox.cards import TEST_CARDS, brand_of, luhn_valid
from sandbox.psp_a import Config, Settings, SettingsError, Simulator
from tests.support.processes import ROOT, ServiceProcess, free_port

KEY = f"psp_a_{secrets.token_hex(16)}"
NEXT_YEAR = datetime.date.today().year + 1
LAST_YEAR = datetime.date.today().year - 1
DEFAULT_CONFIG = {
    "latency_ms": 0,
    "jitter_ms": 0,
    "latency_distribution": "uniform",
    "slow_seconds": 12,
    "late_seconds": 90,
}

VISA = "4242424242424242"
PROCESSING_ERROR = "4000000000000119"
SLOW = "4000000000000259"
LATE = "4000000000000341"
OTHER_LUHN_VALID = "4000056655665556"
NOT_LUHN_VALID = "4242424242424241"
#: Every card number sent by this module: none may come back in a response or the output.
PANS = frozenset({*TEST_CARDS, OTHER_LUHN_VALID, NOT_LUHN_VALID})


def no_pan_in(response: httpx.Response) -> None:
    text = response.text + "".join(f"{k}: {v}" for k, v in response.headers.items())
    leaked = [pan for pan in PANS if pan in text]
    assert not leaked, f"a card number came back from {response.request.url}: ****{leaked[0][-4:]}"


def check_response(response: httpx.Response) -> None:
    response.read()
    no_pan_in(response)


async def acheck_response(response: httpx.Response) -> None:
    await response.aread()
    no_pan_in(response)


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    port = free_port()
    env = {
        "TESSERA_PSP_A_HOST": "127.0.0.1",
        "TESSERA_PSP_A_PORT": str(port),
        "TESSERA_PSP_A_API_KEY": KEY,
        "TESSERA_PSP_A_LATENCY_MS": "0",
        "TESSERA_PSP_A_JITTER_MS": "0",
        "TESSERA_PSP_A_SLOW_SECONDS": "12",
    }
    log_path = tmp_path_factory.mktemp("psp_a") / "psp_a.log"
    process = ServiceProcess("sandbox.psp_a", env, port, log_path, args=[])
    process.start(ready_path="/healthz")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(psp: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=psp.url,
        headers={"authorization": f"Bearer {KEY}"},
        event_hooks={"response": [check_response]},
        timeout=10,
    ) as http:
        yield http


@pytest.fixture
def aclient(psp: ServiceProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=psp.url,
        headers={"authorization": f"Bearer {KEY}"},
        event_hooks={"response": [acheck_response]},
        timeout=10,
    )


@pytest.fixture
def configure(client: httpx.Client) -> Iterator[Callable[..., dict[str, Any]]]:
    """Change the run-time config for one test; the defaults come back afterwards."""

    def change(**values: Any) -> dict[str, Any]:
        response = client.post("/admin/config", json=values)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    yield change
    assert client.post("/admin/config", json=DEFAULT_CONFIG).status_code == 200


def reference() -> str:
    return f"ref_{secrets.token_hex(8)}"


def authorization_body(
    number: str = VISA,
    *,
    ref: str | None = None,
    amount: int = 1000,
    currency: str = "EUR",
    capture: bool = False,
    exp_year: int = NEXT_YEAR,
) -> dict[str, Any]:
    return {
        "reference": ref or reference(),
        "amount": amount,
        "currency": currency,
        "capture": capture,
        "card": {"number": number, "exp_month": 12, "exp_year": exp_year, "cvc": "123"},
        "metadata": {"payment": "pay_test"},
    }


def authorize(client: httpx.Client, number: str = VISA, **fields: Any) -> httpx.Response:
    return client.post("/v1/authorizations", json=authorization_body(number, **fields))


def approved(client: httpx.Client, *, amount: int = 1000, capture: bool = False) -> dict[str, Any]:
    response = authorize(client, amount=amount, capture=capture)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def recorded(client: httpx.Client, ref: str) -> list[dict[str, Any]]:
    response = client.get("/admin/authorizations", params={"reference": ref})
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.json()["authorizations"]
    return found


# --- authentication ----------------------------------------------------------------------------


def test_the_health_check_needs_no_key(psp: ServiceProcess) -> None:
    response = httpx.get(psp.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", "Bearer psp_a_test_key", f"Basic {KEY}", KEY, f"Bearer {KEY}x"],
    ids=["missing", "wrong", "the-default-key", "other-scheme", "no-scheme", "longer"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/authorizations"),
        ("GET", "/v1/authorizations?reference=x"),
        ("GET", "/v1/authorizations/auth_x"),
        ("POST", "/v1/authorizations/auth_x/capture"),
        ("POST", "/v1/authorizations/auth_x/void"),
        ("POST", "/v1/authorizations/auth_x/refunds"),
    ],
)
def test_every_v1_endpoint_refuses_a_missing_or_wrong_key(
    psp: ServiceProcess, header: str | None, method: str, path: str
) -> None:
    headers = {} if header is None else {"authorization": header}
    body = authorization_body() if path == "/v1/authorizations" else {}
    response = httpx.request(method, psp.url + path, headers=headers, json=body)
    assert response.status_code == 401
    assert error_code(response) == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_refused_authorization_records_nothing(client: httpx.Client, psp: ServiceProcess) -> None:
    body = authorization_body()
    response = httpx.post(psp.url + "/v1/authorizations", json=body)
    assert response.status_code == 401
    assert recorded(client, body["reference"]) == []


# --- authorizations and the card table ---------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4242424242424242", "visa"),
        ("5555555555554444", "mastercard"),
        ("2223003122003222", "mastercard"),
        ("378282246310005", "amex"),
        ("6011111111111117", "discover"),
        ("3566002020360505", "jcb"),
    ],
)
def test_the_approved_table_cards_are_approved_with_brand_and_last4_only(
    client: httpx.Client, number: str, brand: str
) -> None:
    ref = reference()
    response = authorize(client, number, ref=ref, amount=2500)
    assert response.status_code == 201
    auth = response.json()
    assert set(auth) == {
        "id", "reference", "status", "decline_code", "amount", "currency",
        "amount_captured", "amount_refunded", "card", "created",
    }  # fmt: skip
    assert auth["id"].startswith("auth_")
    assert auth["reference"] == ref
    assert auth["status"] == "approved"
    assert auth["decline_code"] is None
    assert (auth["amount"], auth["currency"]) == (2500, "EUR")
    assert (auth["amount_captured"], auth["amount_refunded"]) == (0, 0)
    assert auth["card"] == {"brand": brand, "last4": number[-4:]}
    assert abs(auth["created"] - time.time()) < 60


@pytest.mark.parametrize(
    ("number", "decline_code"),
    [
        ("4000000000000002", "do_not_honor"),
        ("4000000000009995", "insufficient_funds"),
        ("4000000000000069", "expired_card"),
        ("4000000000000127", "incorrect_cvc"),
        ("4000000000003220", "do_not_honor"),
    ],
)
def test_the_declining_table_cards_are_declined_and_recorded(
    client: httpx.Client, number: str, decline_code: str
) -> None:
    ref = reference()
    response = authorize(client, number, ref=ref, capture=True)
    assert response.status_code == 201
    auth = response.json()
    assert (auth["status"], auth["decline_code"]) == ("declined", decline_code)
    assert auth["amount_captured"] == 0
    assert recorded(client, ref) == [auth]


def test_an_approved_authorization_asked_to_capture_is_captured_at_once(
    client: httpx.Client,
) -> None:
    auth = approved(client, amount=1234, capture=True)
    assert auth["status"] == "captured"
    assert auth["amount_captured"] == 1234


def test_any_other_luhn_valid_number_is_approved(client: httpx.Client) -> None:
    response = authorize(client, OTHER_LUHN_VALID)
    assert response.status_code == 201
    assert response.json()["status"] == "approved"
    assert response.json()["card"] == {"brand": "visa", "last4": "5556"}


@pytest.mark.parametrize(
    "number",
    [NOT_LUHN_VALID, "4242 4242 4242 4242", "42424242424", "42424242424242424242", "abcd", ""],
    ids=["check-digit", "spaces", "too-short", "too-long", "letters", "empty"],
)
def test_a_number_that_is_not_a_card_number_is_refused_and_nothing_recorded(
    client: httpx.Client, number: str
) -> None:
    ref = reference()
    response = authorize(client, number, ref=ref)
    assert response.status_code == 400
    assert error_code(response) == "invalid_card"
    assert recorded(client, ref) == []


def test_a_past_expiry_date_declines_any_card_as_expired(client: httpx.Client) -> None:
    response = authorize(client, VISA, exp_year=LAST_YEAR, capture=True)
    assert response.status_code == 201
    assert (response.json()["status"], response.json()["decline_code"]) == (
        "declined",
        "expired_card",
    )


def test_a_card_expiring_this_month_is_still_valid(client: httpx.Client) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    body = authorization_body()
    body["card"].update(exp_month=today.month, exp_year=today.year)
    response = client.post("/v1/authorizations", json=body)
    assert response.json()["status"] == "approved"


def _without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


@pytest.mark.parametrize(
    "change",
    [
        lambda b: _without(b, "reference"),
        lambda b: _without(b, "capture"),
        lambda b: _without(b, "card", "exp_year"),
        lambda b: {**b, "reference": ""},
        lambda b: {**b, "reference": "r" * 101},
        lambda b: {**b, "amount": 0},
        lambda b: {**b, "amount": -5},
        lambda b: {**b, "amount": "10"},
        lambda b: {**b, "currency": "eur"},
        lambda b: {**b, "currency": "EURO"},
        lambda b: {**b, "capture": "yes"},
        lambda b: {**b, "card": {**b["card"], "exp_month": 13}},
        lambda b: {**b, "card": {**b["card"], "cvc": "12a"}},
        lambda b: {**b, "card": {**b["card"], "number": 4242424242424242}},
        lambda b: {**b, "metadata": {"a": 1}},
        lambda b: {**b, "surprise": True},
        lambda b: {**b, "card": {**b["card"], "pan": VISA}},
    ],
)
def test_a_malformed_authorization_is_an_invalid_request(
    client: httpx.Client, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    body = change(authorization_body())
    response = client.post("/v1/authorizations", json=body)
    assert response.status_code == 400, response.text
    assert error_code(response) == "invalid_request"
    if "reference" in body and isinstance(body["reference"], str) and body["reference"]:
        assert recorded(client, body["reference"]) == []


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b"null", b'{"reference": "x",'])
def test_a_body_that_is_not_a_json_object_is_an_invalid_request(
    client: httpx.Client, content: bytes
) -> None:
    response = client.post("/v1/authorizations", content=content)
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"


def test_an_unknown_key_that_is_a_card_number_is_not_echoed(client: httpx.Client) -> None:
    body = {**authorization_body(), VISA: "x"}
    response = client.post("/v1/authorizations", json=body)  # the hook checks the echo
    assert response.status_code == 400
    assert "[redacted]" in response.json()["error"]["message"]


def test_a_body_over_64_kib_is_refused(client: httpx.Client) -> None:
    body = authorization_body()
    body["card"]["holder"] = "x" * 70_000
    response = client.post("/v1/authorizations", json=body)
    assert response.status_code == 413
    assert error_code(response) == "request_too_large"


# --- the processing-error card and the inquiry -------------------------------------------------


def test_the_processing_error_card_answers_500_and_records_nothing(client: httpx.Client) -> None:
    ref = reference()
    response = authorize(client, PROCESSING_ERROR, ref=ref)
    assert response.status_code == 500
    assert error_code(response) == "processing_error"
    inquiry = client.get("/v1/authorizations", params={"reference": ref})
    assert inquiry.status_code == 404
    assert error_code(inquiry) == "not_found"
    assert recorded(client, ref) == []
    # Nothing was recorded, so the reference is free for a retry with another card.
    assert authorize(client, VISA, ref=ref).status_code == 201


def test_the_inquiry_finds_an_authorization_by_reference_and_by_id(client: httpx.Client) -> None:
    auth = approved(client)
    by_reference = client.get("/v1/authorizations", params={"reference": auth["reference"]})
    assert by_reference.status_code == 200
    assert by_reference.json() == auth
    by_id = client.get(f"/v1/authorizations/{auth['id']}")
    assert by_id.status_code == 200
    assert by_id.json() == auth


def test_unknown_references_and_ids_are_not_found(client: httpx.Client) -> None:
    assert client.get("/v1/authorizations", params={"reference": reference()}).status_code == 404
    response = client.get("/v1/authorizations/auth_000000000000000000000000")
    assert response.status_code == 404
    assert error_code(response) == "not_found"


def test_the_inquiry_without_a_reference_is_an_invalid_request(client: httpx.Client) -> None:
    response = client.get("/v1/authorizations")
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"


def test_unknown_routes_and_methods_answer_json_errors(client: httpx.Client) -> None:
    response = client.get("/v2/anything")
    assert (response.status_code, error_code(response)) == (404, "not_found")
    response = client.delete("/v1/authorizations")
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")


# --- idempotency on the reference ------------------------------------------------------------


def test_the_same_reference_again_answers_the_stored_authorization(client: httpx.Client) -> None:
    body = authorization_body(capture=True)
    first = client.post("/v1/authorizations", json=body)
    second = client.post("/v1/authorizations", json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert recorded(client, body["reference"]) == [first.json()]


def test_a_declined_authorization_is_replayed_too(client: httpx.Client) -> None:
    body = authorization_body("4000000000009995")
    first = client.post("/v1/authorizations", json=body)
    second = client.post("/v1/authorizations", json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert len(recorded(client, body["reference"])) == 1


def test_a_replay_shows_the_authorization_as_it_is_now(client: httpx.Client) -> None:
    body = authorization_body()
    auth = client.post("/v1/authorizations", json=body).json()
    client.post(f"/v1/authorizations/{auth['id']}/capture")
    replay = client.post("/v1/authorizations", json=body)
    assert replay.status_code == 200
    assert replay.json()["status"] == "captured"


@pytest.mark.parametrize(
    "change", [{"amount": 1001}, {"currency": "USD"}, {"capture": True}], ids=str
)
def test_the_same_reference_with_other_terms_is_refused(
    client: httpx.Client, change: dict[str, Any]
) -> None:
    body = authorization_body()
    assert client.post("/v1/authorizations", json=body).status_code == 201
    response = client.post("/v1/authorizations", json={**body, **change})
    assert response.status_code == 409
    assert error_code(response) == "reference_reused"
    assert len(recorded(client, body["reference"])) == 1


async def test_twenty_concurrent_requests_with_one_reference_make_one_authorization(
    client: httpx.Client, aclient: httpx.AsyncClient
) -> None:
    body = authorization_body()
    async with aclient:
        responses = await asyncio.gather(
            *(aclient.post("/v1/authorizations", json=body) for _ in range(20))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(recorded(client, body["reference"])) == 1


# --- capture -----------------------------------------------------------------------------------


def test_a_capture_without_an_amount_captures_everything(client: httpx.Client) -> None:
    auth = approved(client, amount=900)
    response = client.post(f"/v1/authorizations/{auth['id']}/capture")
    assert response.status_code == 200
    assert {**auth, "status": "captured", "amount_captured": 900} == response.json()


def test_a_partial_capture_records_the_captured_amount(client: httpx.Client) -> None:
    auth = approved(client, amount=900)
    response = client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 400})
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["amount_captured"]) == ("captured", 400)
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["amount_captured"] == 400


def test_a_capture_larger_than_the_authorization_is_refused(client: httpx.Client) -> None:
    auth = approved(client, amount=900)
    response = client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 901})
    assert response.status_code == 400
    assert error_code(response) == "amount_too_large"
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["status"] == "approved"


@pytest.mark.parametrize("again", [None, {}, {"amount": 400}], ids=["no-body", "empty", "same"])
def test_capturing_again_with_the_same_amount_or_none_changes_nothing(
    client: httpx.Client, again: dict[str, Any] | None
) -> None:
    auth = approved(client, amount=900)
    first = client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 400})
    second = client.post(f"/v1/authorizations/{auth['id']}/capture", json=again)
    assert second.status_code == 200
    assert second.json() == first.json()


def test_capturing_again_with_another_amount_is_refused(client: httpx.Client) -> None:
    auth = approved(client, amount=900)
    client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 400})
    response = client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 500})
    assert response.status_code == 409
    assert error_code(response) == "already_captured"


def test_a_declined_or_voided_authorization_cannot_be_captured(client: httpx.Client) -> None:
    declined = authorize(client, "4000000000000002").json()
    voided = approved(client)
    client.post(f"/v1/authorizations/{voided['id']}/void")
    for auth in (declined, voided):
        response = client.post(f"/v1/authorizations/{auth['id']}/capture")
        assert response.status_code == 409
        assert error_code(response) == "not_capturable"


@pytest.mark.parametrize("body", [{"amount": 0}, {"amount": "5"}, {"amt": 5}])
def test_a_malformed_capture_is_an_invalid_request(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    auth = approved(client)
    response = client.post(f"/v1/authorizations/{auth['id']}/capture", json=body)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")


@pytest.mark.parametrize("action", ["capture", "void", "refunds"])
def test_operations_on_an_unknown_authorization_are_not_found(
    client: httpx.Client, action: str
) -> None:
    body = {"reference": reference(), "amount": 1} if action == "refunds" else None
    response = client.post(f"/v1/authorizations/auth_unknown/{action}", json=body)
    assert (response.status_code, error_code(response)) == (404, "not_found")


# --- void --------------------------------------------------------------------------------------


def test_a_void_releases_an_approved_authorization_once(client: httpx.Client) -> None:
    auth = approved(client)
    first = client.post(f"/v1/authorizations/{auth['id']}/void")
    assert first.status_code == 200
    assert first.json() == {**auth, "status": "voided"}
    again = client.post(f"/v1/authorizations/{auth['id']}/void")
    assert again.status_code == 200
    assert again.json() == first.json()


def test_a_captured_or_declined_authorization_cannot_be_voided(client: httpx.Client) -> None:
    captured = approved(client, capture=True)
    declined = authorize(client, "4000000000000127").json()
    for auth in (captured, declined):
        response = client.post(f"/v1/authorizations/{auth['id']}/void")
        assert response.status_code == 409
        assert error_code(response) == "not_voidable"


# --- refunds -----------------------------------------------------------------------------------


def refund(
    client: httpx.Client, auth_id: str, amount: int, ref: str | None = None
) -> httpx.Response:
    body = {"reference": ref or reference(), "amount": amount}
    return client.post(f"/v1/authorizations/{auth_id}/refunds", json=body)


def test_partial_refunds_add_up_to_the_captured_amount_and_no_further(
    client: httpx.Client,
) -> None:
    auth = approved(client, amount=1000, capture=True)
    first = refund(client, auth["id"], 600)
    assert first.status_code == 201
    created = first.json()
    assert set(created) == {"id", "reference", "authorization", "amount", "status", "created"}
    assert created["id"].startswith("rf_")
    assert (created["authorization"], created["amount"], created["status"]) == (
        auth["id"],
        600,
        "succeeded",
    )
    assert refund(client, auth["id"], 400).status_code == 201
    over = refund(client, auth["id"], 1)
    assert over.status_code == 409
    assert error_code(over) == "amount_exceeds_captured"
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["amount_refunded"] == 1000


def test_refunds_are_limited_by_a_partial_capture(client: httpx.Client) -> None:
    auth = approved(client, amount=1000)
    client.post(f"/v1/authorizations/{auth['id']}/capture", json={"amount": 300})
    response = refund(client, auth["id"], 301)
    assert (response.status_code, error_code(response)) == (409, "amount_exceeds_captured")
    assert refund(client, auth["id"], 300).status_code == 201


def test_the_same_refund_reference_again_answers_the_stored_refund(client: httpx.Client) -> None:
    auth = approved(client, amount=1000, capture=True)
    ref = reference()
    first = refund(client, auth["id"], 250, ref)
    second = refund(client, auth["id"], 250, ref)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["amount_refunded"] == 250


def test_a_refund_reference_with_another_amount_or_authorization_is_refused(
    client: httpx.Client,
) -> None:
    auth = approved(client, amount=1000, capture=True)
    other = approved(client, amount=1000, capture=True)
    ref = reference()
    assert refund(client, auth["id"], 250, ref).status_code == 201
    for auth_id, amount in ((auth["id"], 300), (other["id"], 250)):
        response = refund(client, auth_id, amount, ref)
        assert (response.status_code, error_code(response)) == (409, "reference_reused")
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["amount_refunded"] == 250


def test_only_a_captured_authorization_is_refundable(client: httpx.Client) -> None:
    uncaptured = approved(client)
    declined = authorize(client, "4000000000000002").json()
    for auth in (uncaptured, declined):
        response = refund(client, auth["id"], 1)
        assert (response.status_code, error_code(response)) == (409, "not_refundable")


@pytest.mark.parametrize(
    "body", [{"amount": 5}, {"reference": "r"}, {"reference": "r", "amount": 0}, {}]
)
def test_a_malformed_refund_is_an_invalid_request(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    auth = approved(client, capture=True)
    response = client.post(f"/v1/authorizations/{auth['id']}/refunds", json=body)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")


async def test_twenty_concurrent_refunds_never_exceed_the_captured_amount(
    client: httpx.Client, aclient: httpx.AsyncClient
) -> None:
    auth = approved(client, amount=1000, capture=True)
    async with aclient:
        responses = await asyncio.gather(
            *(
                aclient.post(
                    f"/v1/authorizations/{auth['id']}/refunds",
                    json={"reference": reference(), "amount": 150},
                )
                for _ in range(20)
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 6 + [409] * 14
    assert client.get(f"/v1/authorizations/{auth['id']}").json()["amount_refunded"] == 900


# --- the slow card and latency -----------------------------------------------------------------


async def test_the_slow_card_is_recorded_at_once_and_answered_after_slow_seconds(
    aclient: httpx.AsyncClient, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(slow_seconds=1)
    body = authorization_body(SLOW)
    async with aclient:
        started = time.monotonic()
        pending = asyncio.create_task(aclient.post("/v1/authorizations", json=body))
        await asyncio.sleep(0.3)
        inquiry = await aclient.get("/v1/authorizations", params={"reference": body["reference"]})
        assert not pending.done()
        response = await pending
        elapsed = time.monotonic() - started
    assert inquiry.status_code == 200
    assert inquiry.json()["status"] == "approved"
    assert response.status_code == 201
    assert response.json() == inquiry.json()
    assert elapsed >= 1.0


async def test_the_late_card_is_recorded_only_after_late_seconds_even_if_the_caller_hung_up(
    aclient: httpx.AsyncClient, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(late_seconds=1)
    body = authorization_body(LATE, capture=True)
    async with aclient:
        with pytest.raises(httpx.ReadTimeout):  # the caller gives up first
            await aclient.post("/v1/authorizations", json=body, timeout=0.3)
        during = await aclient.get("/v1/authorizations", params={"reference": body["reference"]})
        await asyncio.sleep(1.2)
        after = await aclient.get("/v1/authorizations", params={"reference": body["reference"]})
    assert during.status_code == 404
    assert after.status_code == 200
    assert after.json()["status"] == "captured"


def test_the_latency_setting_delays_every_v1_request(
    client: httpx.Client, configure: Callable[..., dict[str, Any]]
) -> None:
    auth = approved(client)
    configure(latency_ms=200)
    started = time.monotonic()
    client.get(f"/v1/authorizations/{auth['id']}")
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    authorize(client)
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    client.get("/admin/stats")
    assert time.monotonic() - started < 0.2, "admin endpoints are not delayed"


def test_the_config_endpoint_changes_only_the_given_fields_and_validates(
    client: httpx.Client, configure: Callable[..., dict[str, Any]]
) -> None:
    assert client.get("/admin/config").json() == DEFAULT_CONFIG
    changed = configure(jitter_ms=5, latency_distribution="normal")
    assert changed == {**DEFAULT_CONFIG, "jitter_ms": 5, "latency_distribution": "normal"}
    for bad in (
        {"latency_ms": -1},
        {"jitter_ms": "10"},
        {"slow_seconds": 100_000},
        {"latency_distribution": "poisson"},
        {"error_rate": 0.5},
    ):
        response = client.post("/admin/config", json=bad)
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), bad
    assert client.get("/admin/config").json() == changed


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_latency_is_mean_plus_or_minus_jitter_and_never_negative(
    distribution: Literal["uniform", "normal"],
) -> None:
    config = Config(latency_ms=10, jitter_ms=30, latency_distribution=distribution)
    samples = [Simulator("k", config).latency_seconds() for _ in range(2000)]
    assert min(samples) == 0.0, "clipped at zero"
    assert max(samples) > 0.02
    if distribution == "uniform":
        assert max(samples) <= 0.04
    assert 0.005 < sum(samples) / len(samples) < 0.03


# --- admin ---------------------------------------------------------------------------------------


def test_stats_count_what_happened_since_the_reset(client: httpx.Client) -> None:
    assert client.post("/admin/reset").status_code == 200
    auth = approved(client, amount=1000)
    client.post(f"/v1/authorizations/{auth['id']}/capture")
    refund(client, auth["id"], 100)
    authorize(client, "4000000000009995")
    voided = approved(client)
    client.post(f"/v1/authorizations/{voided['id']}/void")
    authorize(client, PROCESSING_ERROR)
    httpx.get(client.base_url.join("/v1/authorizations/x"))  # no key
    body = authorization_body(capture=True)
    client.post("/v1/authorizations", json=body)
    client.post("/v1/authorizations", json=body)
    assert client.get("/admin/stats").json() == {
        "requests": 10,
        "authorizations": 4,
        "by_status": {"approved": 0, "declined": 1, "captured": 2, "voided": 1},
        "declines": {
            "do_not_honor": 0,
            "insufficient_funds": 1,
            "expired_card": 0,
            "incorrect_cvc": 0,
            "lost_card": 0,
            "stolen_card": 0,
            "closed_account": 0,
            "stop_recurring": 0,
            "revocation_of_authorization": 0,
            "issuer_unavailable": 0,
        },
        "captures": 2,
        "voids": 1,
        "refunds": 1,
        "replays": 1,
        "processing_errors": 1,
        "unauthorized": 1,
    }


def test_the_reset_forgets_every_authorization(client: httpx.Client) -> None:
    auth = approved(client)
    assert len(recorded(client, auth["reference"])) == 1
    assert client.post("/admin/reset").json() == {"reset": True}
    assert recorded(client, auth["reference"]) == []
    assert client.get(f"/v1/authorizations/{auth['id']}").status_code == 404
    assert client.get("/admin/stats").json()["authorizations"] == 0
    # The reference is free again.
    assert authorize(client, ref=auth["reference"]).status_code == 201


def test_the_admin_listing_without_a_reference_lists_everything(client: httpx.Client) -> None:
    client.post("/admin/reset")
    made = [approved(client)["id"] for _ in range(3)]
    listed = client.get("/admin/authorizations").json()["authorizations"]
    assert [auth["id"] for auth in listed] == made


# --- settings, the card table, and the card number's absence ------------------------------------


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TESSERA_PSP_A_HOST": "0.0.0.0",
        "TESSERA_PSP_A_PORT": "9999",
        "TESSERA_PSP_A_API_KEY": "k_1",
        "TESSERA_PSP_A_LATENCY_MS": "25",
        "TESSERA_PSP_A_JITTER_MS": "5.5",
        "TESSERA_PSP_A_SLOW_SECONDS": "3",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (settings.host, settings.port, settings.api_key) == ("0.0.0.0", 9999, "k_1")
    assert settings.config == Config(latency_ms=25, jitter_ms=5.5, slow_seconds=3)


def test_the_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TESSERA_PSP_A_"):
            monkeypatch.delenv(name)
    settings = Settings.from_env()
    assert (settings.host, settings.port, settings.api_key) == (
        "127.0.0.1",
        8201,
        "psp_a_test_key",
    )
    assert settings.config == Config(latency_ms=0, jitter_ms=0, slow_seconds=12)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TESSERA_PSP_A_PORT", "http"),
        ("TESSERA_PSP_A_PORT", "70000"),
        ("TESSERA_PSP_A_LATENCY_MS", "-1"),
        ("TESSERA_PSP_A_JITTER_MS", "lots"),
        ("TESSERA_PSP_A_SLOW_SECONDS", "nan"),
        ("TESSERA_PSP_A_API_KEY", ""),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        Settings.from_env()


def test_the_process_exits_with_code_2_on_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sandbox.psp_a"],
        env={**os.environ, "TESSERA_PSP_A_LATENCY_MS": "slow", "TESSERA_PSP_A_PORT": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "TESSERA_PSP_A_LATENCY_MS" in result.stderr


def test_the_table_cards_are_valid_numbers_whose_brands_agree_with_core() -> None:
    for number in TEST_CARDS:
        assert luhn_valid(number), number[-4:]
        assert core_luhn_valid(number), number[-4:]
        assert brand_of(number) == detect_brand(number).value, number[-4:]
    assert not luhn_valid(NOT_LUHN_VALID)


def test_no_card_number_ever_appears_in_the_process_output(
    client: httpx.Client, psp: ServiceProcess, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(slow_seconds=0, late_seconds=0)
    for number in PANS:
        authorize(client, number)
    output = psp.output()
    assert "psp_a: listening on" in output, "the output is captured (the check means something)"
    leaked = [pan[-4:] for pan in PANS if pan in output]
    assert not leaked, f"card numbers ending {leaked} in the output"
