"""PSP simulator B (`sandbox/psp_b.py`), against a real `python -m sandbox.psp_b` process.

One process serves the module, with an API key and an HMAC key of its own and notifications
50 ms after an operation. Notifications go to a small real HTTP server per test (`receiver`),
which verifies every signature the way a merchant would: with its own implementation of the
documented algorithm, not the simulator's. Every test uses fresh references; tests that change
the run-time config get it back through `configure`. Every response and every notification is
checked for the card numbers the tests send, and the last test reads the process output.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sandbox.cards import TEST_CARDS, Behaviour
from sandbox.psp_a import SettingsError
from sandbox.psp_b import (
    CARDS,
    DEFAULT_HMAC_KEY,
    ERROR_CARD,
    RETRY_DELAYS,
    Config,
    Settings,
    sign_notification,
    signing_string,
    verify_notification,
)
from tests.support.processes import ROOT, ServiceProcess, free_port

KEY = f"psp_b_{secrets.token_hex(16)}"
HMAC_KEY = secrets.token_bytes(32)
NEXT_YEAR = datetime.date.today().year + 1
LAST_YEAR = datetime.date.today().year - 1
DEFAULT_CONFIG: dict[str, Any] = {
    "latency_ms": 0,
    "jitter_ms": 0,
    "latency_distribution": "uniform",
    "slow_seconds": 12,
    "late_seconds": 90,
    "notify_url": "",
    "notify_delay_ms": 50,
    "fail_next_captures": 0,
    "fail_next_refunds": 0,
}

VISA = "4242424242424242"
SLOW = "4000000000000259"
LATE = "4000000000000341"
OTHER_LUHN_VALID = "4000056655665556"
NOT_LUHN_VALID = "4242424242424241"
#: Every card number sent by this module: none may come back in a response, a notification or
#: the output.
PANS = frozenset({*TEST_CARDS, ERROR_CARD, OTHER_LUHN_VALID, NOT_LUHN_VALID})


def assert_no_pan(text: str, where: str) -> None:
    leaked = [pan for pan in PANS if pan in text]
    assert not leaked, f"a card number came back in {where}: ****{leaked[0][-4:]}"


def check_response(response: httpx.Response) -> None:
    response.read()
    headers = "".join(f"{k}: {v}" for k, v in response.headers.items())
    assert_no_pan(response.text + headers, str(response.request.url))


async def acheck_response(response: httpx.Response) -> None:
    await response.aread()
    assert_no_pan(response.text, str(response.request.url))


# --- a merchant's notification endpoint ------------------------------------------------------


def merchant_signature(item: dict[str, Any], key: bytes) -> str:
    """The documented algorithm, written out again the way a merchant would."""
    amount = item["amount"]
    fields = [
        item["pspReference"],
        item.get("originalReference", ""),
        item["merchantAccountCode"],
        item["merchantReference"],
        str(amount["value"]),
        amount["currency"],
        item["eventCode"],
        item["success"],
    ]
    digest = hmac.new(key, ":".join(fields).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def merchant_accepts(item: dict[str, Any], key: bytes = HMAC_KEY) -> bool:
    given = item.get("additionalData", {}).get("hmacSignature", "")
    return hmac.compare_digest(merchant_signature(item, key), given)


@dataclass
class Arrival:
    at: float
    raw: bytes
    item: dict[str, Any]


@dataclass
class Receiver:
    """A real HTTP server that records each notification and answers 200 with Adyen's
    `[accepted]`, except that notifications of an event code in `failures` get the statuses
    listed there first, in turn (by event code: other notifications may arrive in any order)."""

    failures: dict[str, list[int]] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/notifications"

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                document = json.loads(raw)
                assert document["live"] == "false"
                [wrapper] = document["notificationItems"]
                item = wrapper["NotificationRequestItem"]
                with owner._changed:
                    script = owner.failures.get(item["eventCode"])
                    status = script.pop(0) if script else 200
                    arrival = Arrival(time.monotonic(), raw, item)
                    owner.arrivals.append(arrival)
                    owner._changed.notify_all()
                body = b"[accepted]" if status == 200 else b"oops"
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: `stop` (shutdown) waits for one poll.
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait(self, psp_reference: str, count: int = 1, timeout: float = 5) -> list[Arrival]:
        """The arrivals of the notification with this pspReference, once there are `count`."""

        def found() -> list[Arrival]:
            return [a for a in self.arrivals if a.item["pspReference"] == psp_reference]

        with self._changed:
            self._changed.wait_for(lambda: len(found()) >= count, timeout=timeout)
            arrived = found()
        assert len(arrived) >= count, f"{len(arrived)} of {count} notifications arrived"
        return arrived

    def item(self, psp_reference: str) -> dict[str, Any]:
        """The one notification with this pspReference, checked as a merchant checks it."""
        arrival = self.wait(psp_reference)[0]
        assert merchant_accepts(arrival.item), "the signature does not verify"
        assert_no_pan(arrival.raw.decode(), "a notification")
        return arrival.item


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    port = free_port()
    env = {
        "TESSERA_PSP_B_HOST": "127.0.0.1",
        "TESSERA_PSP_B_PORT": str(port),
        "TESSERA_PSP_B_API_KEY": KEY,
        "TESSERA_PSP_B_HMAC_KEY": HMAC_KEY.hex(),
        "TESSERA_PSP_B_NOTIFY_URL": "",
        "TESSERA_PSP_B_NOTIFY_DELAY_MS": "50",
        "TESSERA_PSP_B_LATENCY_MS": "0",
        "TESSERA_PSP_B_JITTER_MS": "0",
        "TESSERA_PSP_B_SLOW_SECONDS": "12",
    }
    log_path = tmp_path_factory.mktemp("psp_b") / "psp_b.log"
    process = ServiceProcess("sandbox.psp_b", env, port, log_path, args=[])
    process.start(ready_path="/healthz")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(psp: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=psp.url,
        headers={"x-api-key": KEY},
        event_hooks={"response": [check_response]},
        timeout=10,
    ) as http:
        yield http


@pytest.fixture
def aclient(psp: ServiceProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=psp.url,
        headers={"x-api-key": KEY},
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


@pytest.fixture
def receiver(configure: Callable[..., dict[str, Any]]) -> Iterator[Receiver]:
    """A fresh notification endpoint, set as `notify_url` for this test only (a notification
    keeps the URL it was made for, so later tests never receive this test's)."""
    server = Receiver().start()
    configure(notify_url=server.url)
    yield server
    server.stop()


def reference() -> str:
    return f"ref_{secrets.token_hex(8)}"


def payment_body(
    number: str = VISA,
    *,
    ref: str | None = None,
    value: int = 1000,
    currency: str = "EUR",
    capture: bool = False,
    exp_month: int | str = 12,
    exp_year: int | str = NEXT_YEAR,
) -> dict[str, Any]:
    return {
        "merchantReference": ref or reference(),
        "amount": {"value": value, "currency": currency},
        "paymentMethod": {
            "number": number,
            "expiryMonth": exp_month,
            "expiryYear": exp_year,
            "cvc": "737",
            "holderName": "A. Shopper",
        },
        "captureImmediately": capture,
    }


def pay(client: httpx.Client, number: str = VISA, **fields: Any) -> httpx.Response:
    return client.post("/v1/payments", json=payment_body(number, **fields))


def authorised(client: httpx.Client, *, value: int = 1000, capture: bool = False) -> str:
    """A new authorised payment's pspReference."""
    response = pay(client, value=value, capture=capture)
    assert response.status_code == 200, response.text
    assert response.json()["resultCode"] == "Authorised"
    psp_reference: str = response.json()["pspReference"]
    return psp_reference


def money(value: int, currency: str = "EUR") -> dict[str, Any]:
    return {"value": value, "currency": currency}


def capture(
    client: httpx.Client, psp_ref: str, value: int, *, currency: str = "EUR", ref: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"amount": money(value, currency)}
    if ref is not None:
        body["merchantReference"] = ref
    return client.post(f"/v1/payments/{psp_ref}/captures", json=body)


def refund(
    client: httpx.Client, psp_ref: str, value: int, *, ref: str | None = None
) -> httpx.Response:
    body = {"merchantReference": ref or reference(), "amount": money(value)}
    return client.post(f"/v1/payments/{psp_ref}/refunds", json=body)


def captured(client: httpx.Client, value: int = 1000) -> str:
    """An authorised payment with a capture of `value` received (and soon confirmed)."""
    psp_ref = authorised(client, value=value)
    assert capture(client, psp_ref, value).status_code == 201
    return psp_ref


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["status"] == response.status_code
    assert set(body) == {"status", "errorCode", "message", "errorType"}
    code: str = body["errorCode"]
    return code


def recorded(client: httpx.Client, ref: str) -> list[dict[str, Any]]:
    response = client.get("/admin/payments", params={"merchantReference": ref})
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.json()["payments"]
    return found


def payment(client: httpx.Client, psp_ref: str) -> dict[str, Any]:
    response = client.get(f"/v1/payments/{psp_ref}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def modification_statuses(client: httpx.Client, psp_ref: str) -> list[tuple[str, str]]:
    return [(m["type"], m["status"]) for m in payment(client, psp_ref)["modifications"]]


def wait_until(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- authentication ----------------------------------------------------------------------------


def test_the_health_check_needs_no_key(psp: ServiceProcess) -> None:
    response = httpx.get(psp.url + "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"x-api-key": "psp_b_test_key"},
        {"x-api-key": KEY + "x"},
        {"authorization": f"Bearer {KEY}"},
    ],
    ids=["missing", "wrong", "the-default-key", "longer", "bearer-instead"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/payments"),
        ("GET", "/v1/payments?merchantReference=x"),
        ("GET", "/v1/payments/PSPREF0000000000"),
        ("POST", "/v1/payments/PSPREF0000000000/captures"),
        ("POST", "/v1/payments/PSPREF0000000000/cancels"),
        ("POST", "/v1/payments/PSPREF0000000000/refunds"),
    ],
)
def test_every_v1_endpoint_refuses_a_missing_or_wrong_api_key(
    psp: ServiceProcess, headers: dict[str, str], method: str, path: str
) -> None:
    body = payment_body() if path == "/v1/payments" else {}
    response = httpx.request(method, psp.url + path, headers=headers, json=body)
    check_response(response)
    assert response.status_code == 401
    assert error_code(response) == "unauthorized"
    assert response.json()["errorType"] == "security"


def test_a_refused_request_records_nothing(client: httpx.Client, psp: ServiceProcess) -> None:
    body = payment_body()
    assert httpx.post(psp.url + "/v1/payments", json=body).status_code == 401
    assert recorded(client, body["merchantReference"]) == []


# --- payments and the card table -----------------------------------------------------------------


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
def test_the_approved_table_cards_are_authorised_in_a_200_body(
    client: httpx.Client, number: str, brand: str
) -> None:
    ref = reference()
    response = pay(client, number, ref=ref, value=2500)
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"pspReference", "merchantReference", "resultCode", "amount"}
    assert re.fullmatch(r"[A-Z0-9]{16}", answer["pspReference"])
    assert answer["merchantReference"] == ref
    assert answer["resultCode"] == "Authorised"
    assert answer["amount"] == money(2500)
    [stored] = recorded(client, ref)
    assert stored["paymentMethod"] == {"brand": brand, "lastFour": number[-4:]}
    assert stored["modifications"] == []


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("4000000000000002", "Do Not Honor"),
        ("4000000000009995", "Not enough balance"),
        ("4000000000000069", "Expired Card"),
        ("4000000000000127", "CVC Declined"),
    ],
)
def test_the_declining_table_cards_are_refused_with_a_reason_and_recorded(
    client: httpx.Client, number: str, reason: str
) -> None:
    ref = reference()
    response = pay(client, number, ref=ref, capture=True)
    assert response.status_code == 200
    answer = response.json()
    assert (answer["resultCode"], answer["refusalReason"]) == ("Refused", reason)
    [stored] = recorded(client, ref)
    assert (stored["pspReference"], stored["refusalReason"]) == (answer["pspReference"], reason)


@pytest.mark.parametrize("number", ["4000000000000119", "4000000000003220"])
def test_the_two_cards_psp_a_fails_or_declines_are_authorised_at_psp_b(
    client: httpx.Client, number: str
) -> None:
    response = pay(client, number)
    assert (response.status_code, response.json()["resultCode"]) == (200, "Authorised")


def test_the_error_card_answers_error_and_the_inquiry_finds_it(client: httpx.Client) -> None:
    ref = reference()
    response = pay(client, ERROR_CARD, ref=ref)
    assert response.status_code == 200
    assert response.json()["resultCode"] == "Error"
    assert "refusalReason" not in response.json()
    inquiry = client.get("/v1/payments", params={"merchantReference": ref})
    assert inquiry.json()["resultCode"] == "Error"
    assert pay(client, ERROR_CARD, ref=ref).json() == response.json(), "final for its reference"


def test_psp_b_answers_the_shared_table_but_for_three_cards() -> None:
    differing = {n for n in {*TEST_CARDS, *CARDS} if TEST_CARDS.get(n) != CARDS.get(n)}
    assert differing == {"4000000000000119", "4000000000003220", ERROR_CARD}
    assert CARDS["4000000000000119"].behaviour is Behaviour.APPROVE
    assert CARDS["4000000000003220"].behaviour is Behaviour.APPROVE
    assert CARDS[ERROR_CARD].behaviour is Behaviour.PROCESSING_ERROR
    assert ERROR_CARD not in TEST_CARDS, "PSP A approves it like any other number"


def test_any_other_luhn_valid_number_is_authorised(client: httpx.Client) -> None:
    assert pay(client, OTHER_LUHN_VALID).json()["resultCode"] == "Authorised"


@pytest.mark.parametrize(
    "number",
    [NOT_LUHN_VALID, "4242 4242 4242 4242", "42424242424", "42424242424242424242", "abcd", ""],
    ids=["check-digit", "spaces", "too-short", "too-long", "letters", "empty"],
)
def test_a_number_that_is_not_a_card_number_is_refused_and_nothing_recorded(
    client: httpx.Client, number: str
) -> None:
    ref = reference()
    response = pay(client, number, ref=ref)
    assert (response.status_code, error_code(response)) == (422, "invalid_card")
    assert recorded(client, ref) == []


def test_a_past_expiry_refuses_any_card_as_expired(client: httpx.Client) -> None:
    answer = pay(client, VISA, exp_year=LAST_YEAR).json()
    assert (answer["resultCode"], answer["refusalReason"]) == ("Refused", "Expired Card")


@pytest.mark.parametrize(
    ("month", "year"), [("03", str(NEXT_YEAR)), ("3", NEXT_YEAR), (3, str(NEXT_YEAR))]
)
def test_the_expiry_may_be_digit_strings_as_at_adyen(
    client: httpx.Client, month: int | str, year: int | str
) -> None:
    response = pay(client, exp_month=month, exp_year=year)
    assert response.json()["resultCode"] == "Authorised"


def _without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


@pytest.mark.parametrize(
    "change",
    [
        lambda b: _without(b, "merchantReference"),
        lambda b: _without(b, "amount", "currency"),
        lambda b: _without(b, "paymentMethod", "expiryYear"),
        lambda b: {**b, "merchantReference": ""},
        lambda b: {**b, "merchantReference": "r" * 101},
        lambda b: {**b, "amount": money(0)},
        lambda b: {**b, "amount": {"value": "10", "currency": "EUR"}},
        lambda b: {**b, "amount": 1000},
        lambda b: {**b, "amount": money(10, "eur")},
        lambda b: {**b, "captureImmediately": "yes"},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "expiryMonth": 13}},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "expiryMonth": "13"}},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "cvc": "12a"}},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "type": "paypal"}},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "number": 4242424242424242}},
        lambda b: {**b, "reference": "snake_case_is_psp_a"},
        lambda b: {**b, "paymentMethod": {**b["paymentMethod"], "pan": VISA}},
    ],
)
def test_a_malformed_payment_is_a_validation_error(
    client: httpx.Client, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    body = change(payment_body())
    response = client.post("/v1/payments", json=body)
    assert (response.status_code, error_code(response)) == (422, "validation_error"), response.text
    ref = body.get("merchantReference")
    if isinstance(ref, str) and ref:
        assert recorded(client, ref) == []


@pytest.mark.parametrize("content", [b"", b"{", b'{"merchantReference": "x",'])
def test_a_body_that_is_not_json_is_invalid_json(client: httpx.Client, content: bytes) -> None:
    response = client.post("/v1/payments", content=content)
    assert (response.status_code, error_code(response)) == (400, "invalid_json")


@pytest.mark.parametrize("content", [b"[]", b"null", b"12"])
def test_json_that_is_not_an_object_is_a_validation_error(
    client: httpx.Client, content: bytes
) -> None:
    response = client.post("/v1/payments", content=content)
    assert (response.status_code, error_code(response)) == (422, "validation_error")


def test_an_unknown_key_that_is_a_card_number_is_not_echoed(client: httpx.Client) -> None:
    response = client.post("/v1/payments", json={**payment_body(), VISA: "x"})
    assert response.status_code == 422  # the hook checks the echo
    assert "[redacted]" in response.json()["message"]


def test_a_body_over_64_kib_is_refused(client: httpx.Client) -> None:
    body = payment_body()
    body["paymentMethod"]["holderName"] = "x" * 70_000
    response = client.post("/v1/payments", json=body)
    assert (response.status_code, error_code(response)) == (413, "request_too_large")


def test_unknown_routes_and_methods_answer_json_errors(client: httpx.Client) -> None:
    response = client.get("/v2/anything")
    assert (response.status_code, error_code(response)) == (404, "not_found")
    response = client.delete("/v1/payments")
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")


# --- idempotency on merchantReference ----------------------------------------------------------


def test_the_same_payment_again_answers_the_same_and_records_one(client: httpx.Client) -> None:
    body = payment_body(capture=True)
    first = client.post("/v1/payments", json=body)
    second = client.post("/v1/payments", json=body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json() == first.json()
    assert len(recorded(client, body["merchantReference"])) == 1


def test_a_refused_payment_is_replayed_as_the_same_refusal(client: httpx.Client) -> None:
    body = payment_body("4000000000009995")
    first = client.post("/v1/payments", json=body).json()
    assert client.post("/v1/payments", json=body).json() == first
    assert len(recorded(client, body["merchantReference"])) == 1


@pytest.mark.parametrize(
    "change",
    [{"amount": money(1001)}, {"amount": money(1000, "USD")}, {"captureImmediately": True}],
    ids=["amount", "currency", "capture"],
)
def test_the_same_reference_with_other_terms_is_refused_with_422(
    client: httpx.Client, change: dict[str, Any]
) -> None:
    body = payment_body()
    assert client.post("/v1/payments", json=body).status_code == 200
    response = client.post("/v1/payments", json={**body, **change})
    assert (response.status_code, error_code(response)) == (422, "reference_reused")
    assert len(recorded(client, body["merchantReference"])) == 1


async def test_twenty_concurrent_payments_with_one_reference_make_one_authorisation(
    client: httpx.Client, aclient: httpx.AsyncClient
) -> None:
    body = payment_body()
    async with aclient:
        responses = await asyncio.gather(
            *(aclient.post("/v1/payments", json=body) for _ in range(20))
        )
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["pspReference"] for r in responses}) == 1
    assert len(recorded(client, body["merchantReference"])) == 1


# --- the slow card and the inquiry -------------------------------------------------------------


async def test_the_slow_card_is_recorded_at_once_and_answered_after_slow_seconds(
    aclient: httpx.AsyncClient, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(slow_seconds=0.6)
    body = payment_body(SLOW)
    async with aclient:
        started = time.monotonic()
        pending = asyncio.create_task(aclient.post("/v1/payments", json=body))
        await asyncio.sleep(0.2)
        params = {"merchantReference": body["merchantReference"]}
        inquiry = await aclient.get("/v1/payments", params=params)
        assert not pending.done()
        response = await pending
        elapsed = time.monotonic() - started
    assert inquiry.status_code == 200
    assert inquiry.json()["resultCode"] == "Authorised"
    assert response.json()["pspReference"] == inquiry.json()["pspReference"]
    assert elapsed >= 0.6


async def test_the_late_card_is_recorded_only_after_late_seconds_even_if_the_caller_hung_up(
    aclient: httpx.AsyncClient, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(late_seconds=1)
    body = payment_body(LATE)
    params = {"merchantReference": body["merchantReference"]}
    async with aclient:
        # The caller gives up waiting for the answer first (a slow connect on a loaded machine
        # is not what this test is about, so only the read is bounded so tightly).
        with pytest.raises(httpx.ReadTimeout):
            await aclient.post("/v1/payments", json=body, timeout=httpx.Timeout(0.3, connect=10))
        during = await aclient.get("/v1/payments", params=params)
        await asyncio.sleep(1.2)
        after = await aclient.get("/v1/payments", params=params)
    assert during.status_code == 404
    assert after.status_code == 200
    assert after.json()["resultCode"] == "Authorised"


def test_the_inquiry_finds_a_payment_by_merchant_reference_and_by_psp_reference(
    client: httpx.Client,
) -> None:
    body = payment_body(value=777)
    answer = client.post("/v1/payments", json=body).json()
    by_reference = client.get(
        "/v1/payments", params={"merchantReference": body["merchantReference"]}
    )
    assert by_reference.status_code == 200
    view = by_reference.json()
    assert set(view) == {
        "pspReference", "merchantReference", "resultCode", "amount", "captureImmediately",
        "paymentMethod", "creationDate", "modifications",
    }  # fmt: skip
    assert {k: view[k] for k in answer} == answer
    assert (view["captureImmediately"], view["modifications"]) == (False, [])
    assert datetime.datetime.fromisoformat(view["creationDate"]).tzinfo is not None
    assert payment(client, answer["pspReference"]) == view


def test_unknown_references_are_not_found(client: httpx.Client) -> None:
    response = client.get("/v1/payments", params={"merchantReference": reference()})
    assert (response.status_code, error_code(response)) == (404, "not_found")
    response = client.get("/v1/payments/UNKNOWN000000000")
    assert (response.status_code, error_code(response)) == (404, "not_found")


def test_the_inquiry_without_a_merchant_reference_is_a_validation_error(
    client: httpx.Client,
) -> None:
    response = client.get("/v1/payments")
    assert (response.status_code, error_code(response)) == (422, "validation_error")


# --- captures: received now, confirmed by a notification -----------------------------------------


def test_a_capture_is_received_and_then_confirmed_by_a_signed_notification(
    client: httpx.Client, receiver: Receiver, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(notify_delay_ms=600)  # long enough to see the capture `received`
    psp_ref = authorised(client, value=1000)
    ref = reference()
    response = capture(client, psp_ref, 600, ref=ref)
    assert response.status_code == 201
    received = response.json()
    assert set(received) == {
        "pspReference", "paymentPspReference", "merchantReference", "amount", "status",
    }  # fmt: skip
    assert re.fullmatch(r"[A-Z0-9]{16}", received["pspReference"])
    assert received["pspReference"] != psp_ref
    assert (received["paymentPspReference"], received["status"]) == (psp_ref, "received")
    assert (received["merchantReference"], received["amount"]) == (ref, money(600))
    assert modification_statuses(client, psp_ref) == [("capture", "received")]

    item = receiver.item(received["pspReference"])
    assert item["eventCode"] == "CAPTURE"
    assert (item["originalReference"], item["merchantReference"]) == (psp_ref, ref)
    assert (item["amount"], item["success"]) == (money(600), "true")
    assert item["merchantAccountCode"] == "TesseraSandbox"
    assert "reason" not in item
    assert datetime.datetime.fromisoformat(item["eventDate"]).tzinfo is not None
    assert modification_statuses(client, psp_ref) == [("capture", "succeeded")]


def test_a_capture_without_a_reference_is_notified_with_the_payments(
    client: httpx.Client, receiver: Receiver
) -> None:
    body = payment_body()
    psp_ref = client.post("/v1/payments", json=body).json()["pspReference"]
    received = capture(client, psp_ref, 1000).json()
    assert "merchantReference" not in received
    item = receiver.item(received["pspReference"])
    assert item["merchantReference"] == body["merchantReference"]


def test_capturing_again_with_the_same_amount_answers_the_first_capture(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref = authorised(client)
    first = capture(client, psp_ref, 400)
    second = capture(client, psp_ref, 400)
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    other = capture(client, psp_ref, 500)
    assert (other.status_code, error_code(other)) == (422, "already_captured")
    receiver.item(first.json()["pspReference"])
    assert modification_statuses(client, psp_ref) == [("capture", "succeeded")]


@pytest.mark.parametrize(
    "case",
    ["refused", "too-large", "other-currency", "captured-immediately", "cancelled", "unknown"],
)
def test_a_capture_that_cannot_be_done_is_refused_at_once(client: httpx.Client, case: str) -> None:
    psp_ref, value, currency = authorised(client, value=1000), 1000, "EUR"
    expected = (422, "not_capturable")
    if case == "refused":
        psp_ref = pay(client, "4000000000000002").json()["pspReference"]
    elif case == "too-large":
        value, expected = 1001, (422, "amount_too_large")
    elif case == "other-currency":
        currency, expected = "USD", (422, "currency_mismatch")
    elif case == "captured-immediately":
        psp_ref, expected = authorised(client, capture=True), (422, "already_captured")
    elif case == "cancelled":
        assert client.post(f"/v1/payments/{psp_ref}/cancels").status_code == 201
    else:
        psp_ref, expected = "UNKNOWN000000000", (404, "not_found")
    response = capture(client, psp_ref, value, currency=currency)
    assert (response.status_code, error_code(response)) == expected


@pytest.mark.parametrize(
    "body", [{}, {"amount": money(0)}, {"amount": 5}, {"amount": money(5), "extra": 1}]
)
def test_a_malformed_capture_is_a_validation_error(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post(f"/v1/payments/{authorised(client)}/captures", json=body)
    assert (response.status_code, error_code(response)) == (422, "validation_error")


# --- cancels -------------------------------------------------------------------------------------


def test_a_cancel_is_received_and_then_confirmed_by_a_cancellation_notification(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref = authorised(client, value=1234)
    ref = reference()
    response = client.post(f"/v1/payments/{psp_ref}/cancels", json={"merchantReference": ref})
    assert response.status_code == 201
    received = response.json()
    assert set(received) == {"pspReference", "paymentPspReference", "merchantReference", "status"}
    assert (received["paymentPspReference"], received["status"]) == (psp_ref, "received")
    item = receiver.item(received["pspReference"])
    assert (item["eventCode"], item["success"]) == ("CANCELLATION", "true")
    assert (item["originalReference"], item["merchantReference"]) == (psp_ref, ref)
    assert item["amount"] == money(1234), "the payment's amount"
    assert modification_statuses(client, psp_ref) == [("cancel", "succeeded")]


def test_a_cancel_needs_no_body_and_a_second_cancel_answers_the_first(
    client: httpx.Client,
) -> None:
    psp_ref = authorised(client)
    first = client.post(f"/v1/payments/{psp_ref}/cancels")
    second = client.post(f"/v1/payments/{psp_ref}/cancels", json={})
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    assert [kind for kind, _ in modification_statuses(client, psp_ref)] == ["cancel"]


def test_a_captured_or_refused_payment_cannot_be_cancelled(client: httpx.Client) -> None:
    for psp_ref in (
        captured(client),
        authorised(client, capture=True),
        pay(client, "4000000000000127").json()["pspReference"],
    ):
        response = client.post(f"/v1/payments/{psp_ref}/cancels")
        assert (response.status_code, error_code(response)) == (422, "not_cancellable")


# --- refunds -------------------------------------------------------------------------------------


def test_refunds_are_confirmed_by_signed_notifications_up_to_the_captured_amount(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref = authorised(client, value=1000)
    receiver.item(capture(client, psp_ref, 800).json()["pspReference"])
    ref = reference()
    first = refund(client, psp_ref, 500, ref=ref)
    assert first.status_code == 201
    assert first.json()["status"] == "received"
    assert (first.json()["merchantReference"], first.json()["amount"]) == (ref, money(500))
    assert refund(client, psp_ref, 300).status_code == 201
    over = refund(client, psp_ref, 1)
    assert (over.status_code, error_code(over)) == (422, "amount_exceeds_captured")
    item = receiver.item(first.json()["pspReference"])
    assert (item["eventCode"], item["success"], item["amount"]) == ("REFUND", "true", money(500))
    assert (item["originalReference"], item["merchantReference"]) == (psp_ref, ref)
    wait_until(lambda: ("refund", "received") not in modification_statuses(client, psp_ref))
    assert modification_statuses(client, psp_ref) == [
        ("capture", "succeeded"),
        ("refund", "succeeded"),
        ("refund", "succeeded"),
    ]


def test_a_payment_captured_immediately_is_refundable_at_once(client: httpx.Client) -> None:
    psp_ref = authorised(client, value=700, capture=True)
    assert refund(client, psp_ref, 700).status_code == 201
    assert error_code(refund(client, psp_ref, 1)) == "amount_exceeds_captured"


def test_a_refund_is_idempotent_on_its_merchant_reference(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref, other = captured(client), captured(client)
    ref = reference()
    first = refund(client, psp_ref, 250, ref=ref)
    second = refund(client, psp_ref, 250, ref=ref)
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    for target, value in ((psp_ref, 300), (other, 250)):
        response = refund(client, target, value, ref=ref)
        assert (response.status_code, error_code(response)) == (422, "reference_reused")
    receiver.item(first.json()["pspReference"])
    time.sleep(0.15)  # a second notification would have come by now
    assert len(receiver.wait(first.json()["pspReference"])) == 1
    assert [kind for kind, _ in modification_statuses(client, psp_ref)] == ["capture", "refund"]


def test_an_uncaptured_cancelled_or_refused_payment_is_not_refundable(
    client: httpx.Client,
) -> None:
    cancelled = authorised(client)
    client.post(f"/v1/payments/{cancelled}/cancels")
    refused = pay(client, "4000000000000002", capture=True).json()["pspReference"]
    for psp_ref in (authorised(client), cancelled, refused):
        response = refund(client, psp_ref, 1)
        assert (response.status_code, error_code(response)) == (422, "not_refundable")


def test_a_refund_in_another_currency_or_of_an_unknown_payment_is_refused(
    client: httpx.Client,
) -> None:
    psp_ref = captured(client)
    body = {"merchantReference": reference(), "amount": money(10, "USD")}
    response = client.post(f"/v1/payments/{psp_ref}/refunds", json=body)
    assert (response.status_code, error_code(response)) == (422, "currency_mismatch")
    response = refund(client, "UNKNOWN000000000", 10)
    assert (response.status_code, error_code(response)) == (404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"amount": money(5)},
        {"merchantReference": "r"},
        {"merchantReference": "r", "amount": money(0)},
    ],
)
def test_a_malformed_refund_is_a_validation_error(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post(f"/v1/payments/{captured(client)}/refunds", json=body)
    assert (response.status_code, error_code(response)) == (422, "validation_error")


async def test_twenty_concurrent_refunds_never_exceed_the_captured_amount(
    client: httpx.Client, aclient: httpx.AsyncClient
) -> None:
    psp_ref = captured(client, 1000)
    async with aclient:
        responses = await asyncio.gather(
            *(
                aclient.post(
                    f"/v1/payments/{psp_ref}/refunds",
                    json={"merchantReference": reference(), "amount": money(150)},
                )
                for _ in range(20)
            )
        )
    assert sorted(r.status_code for r in responses) == [201] * 6 + [422] * 14
    refunds = [m for m in payment(client, psp_ref)["modifications"] if m["type"] == "refund"]
    assert sum(m["amount"]["value"] for m in refunds) == 900


# --- failures reported by notifications --------------------------------------------------------


def test_fail_next_refunds_makes_the_next_refunds_fail_and_gives_the_amount_back(
    client: httpx.Client, receiver: Receiver, configure: Callable[..., dict[str, Any]]
) -> None:
    psp_ref = captured(client, 1000)
    assert configure(fail_next_refunds=1)["fail_next_refunds"] == 1
    failing = refund(client, psp_ref, 1000)
    assert failing.status_code == 201, "received, like any other"
    assert client.get("/admin/config").json()["fail_next_refunds"] == 0, "used up"
    item = receiver.item(failing.json()["pspReference"])
    assert (item["eventCode"], item["success"]) == ("REFUND", "false")
    assert item["reason"] == "Refund refused by the acquirer"
    refunds = [m for m in payment(client, psp_ref)["modifications"] if m["type"] == "refund"]
    assert [(m["status"], m["reason"]) for m in refunds] == [
        ("failed", "Refund refused by the acquirer")
    ]
    succeeding = refund(client, psp_ref, 1000)
    assert succeeding.status_code == 201, "the failed refund gave the amount back"
    assert receiver.item(succeeding.json()["pspReference"])["success"] == "true"


def test_fail_next_captures_makes_the_next_captures_fail_and_the_payment_capturable_again(
    client: httpx.Client, receiver: Receiver, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(fail_next_captures=2)
    first, second = authorised(client), authorised(client)
    failed = [capture(client, psp_ref, 1000).json() for psp_ref in (first, second)]
    for received in failed:
        item = receiver.item(received["pspReference"])
        assert (item["eventCode"], item["success"]) == ("CAPTURE", "false")
        assert item["reason"] == "Capture refused by the acquirer"
    assert error_code(refund(client, first, 1)) == "not_refundable"
    again = capture(client, first, 1000)
    assert again.status_code == 201
    assert receiver.item(again.json()["pspReference"])["success"] == "true"
    assert modification_statuses(client, first) == [("capture", "failed"), ("capture", "succeeded")]


def test_a_refund_of_a_capture_that_then_fails_fails_too(
    client: httpx.Client, receiver: Receiver, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(fail_next_captures=1, notify_delay_ms=500)  # the refund comes before it fails
    psp_ref = authorised(client)
    received = capture(client, psp_ref, 1000).json()
    pending_refund = refund(client, psp_ref, 400)
    assert pending_refund.status_code == 201, "a capture in flight counts as captured"
    assert receiver.item(received["pspReference"])["success"] == "false"
    item = receiver.item(pending_refund.json()["pspReference"])
    assert (item["success"], item["reason"]) == ("false", "The payment's capture failed")


# --- authorisation notifications, retries, replays ----------------------------------------------


@pytest.mark.parametrize(
    ("number", "success", "reason"),
    [(VISA, "true", None), ("4000000000009995", "false", "Not enough balance"),
     (ERROR_CARD, "false", "Acquirer Error")],
)  # fmt: skip
def test_every_payment_is_notified_while_a_notify_url_is_set(
    client: httpx.Client, receiver: Receiver, number: str, success: str, reason: str | None
) -> None:
    body = payment_body(number, value=4321)
    answer = client.post("/v1/payments", json=body).json()
    item = receiver.item(answer["pspReference"])
    assert (item["eventCode"], item["success"], item.get("reason")) == (
        "AUTHORISATION",
        success,
        reason,
    )
    assert "originalReference" not in item
    assert (item["merchantReference"], item["amount"]) == (body["merchantReference"], money(4321))


def test_without_a_notify_url_a_notification_is_kept_unsent_until_replayed(
    client: httpx.Client, configure: Callable[..., dict[str, Any]]
) -> None:
    psp_ref = captured(client)
    capture_ref = payment(client, psp_ref)["modifications"][0]["pspReference"]
    wait_until(lambda: modification_statuses(client, psp_ref) == [("capture", "succeeded")])
    [note] = client.get("/admin/notifications", params={"pspReference": capture_ref}).json()[
        "notifications"
    ]
    assert (note["status"], note["attempts"], note["url"]) == ("unsent", 0, "")
    assert note["eventCode"] == "CAPTURE"
    late = Receiver().start()
    try:
        configure(notify_url=late.url)
        replay = client.post("/admin/notifications/replay", json={"pspReference": capture_ref})
        assert replay.json() == {"pspReference": capture_ref, "eventCode": "CAPTURE", "status": 200}
        assert late.item(capture_ref)["success"] == "true"
    finally:
        late.stop()


def test_a_notification_is_retried_until_the_receiver_answers_2xx(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref = captured(client)
    receiver.failures["REFUND"] = [500, 503]
    received = refund(client, psp_ref, 100).json()
    arrivals = receiver.wait(received["pspReference"], count=3)
    assert len({a.raw for a in arrivals}) == 1, "the same document each time"
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(arrivals)]
    assert gaps[0] >= RETRY_DELAYS[0] * 0.9
    assert gaps[1] >= RETRY_DELAYS[1] * 0.9
    assert merchant_accepts(arrivals[-1].item)

    def delivered() -> bool:
        params = {"pspReference": received["pspReference"]}
        [note] = client.get("/admin/notifications", params=params).json()["notifications"]
        return bool(note["status"] == "delivered" and note["attempts"] == 3)

    wait_until(delivered)


def test_the_retry_schedule_is_bounded_and_gives_up_after_ten_attempts() -> None:
    assert RETRY_DELAYS == (0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0)
    assert len(RETRY_DELAYS) + 1 == 10
    assert sum(RETRY_DELAYS) < 30


def test_a_receiver_that_does_not_answer_is_retried(
    client: httpx.Client, configure: Callable[..., dict[str, Any]]
) -> None:
    configure(notify_url=f"http://127.0.0.1:{free_port()}/nobody")
    psp_ref = authorised(client)

    def attempts() -> int:
        params = {"pspReference": psp_ref}
        notes = client.get("/admin/notifications", params=params).json()["notifications"]
        return int(notes[0]["attempts"]) if notes else 0

    wait_until(lambda: attempts() >= 2, timeout=3)
    [note] = client.get("/admin/notifications", params={"pspReference": psp_ref}).json()[
        "notifications"
    ]
    assert (note["status"], note["lastStatus"]) == ("pending", None)


def test_the_replay_endpoint_sends_a_delivered_notification_again_byte_for_byte(
    client: httpx.Client, receiver: Receiver
) -> None:
    psp_ref = captured(client)
    received = refund(client, psp_ref, 100).json()
    receiver.item(received["pspReference"])
    response = client.post(
        "/admin/notifications/replay", json={"pspReference": received["pspReference"]}
    )
    assert response.status_code == 200
    assert response.json() == {
        "pspReference": received["pspReference"],
        "eventCode": "REFUND",
        "status": 200,
    }
    first, replayed = receiver.wait(received["pspReference"], count=2)
    assert replayed.raw == first.raw, "same document, same signature: a true replay"
    assert client.get("/admin/stats").json()["notifications"]["replayed"] >= 1


def test_replaying_an_unknown_notification_is_not_found(client: httpx.Client) -> None:
    response = client.post("/admin/notifications/replay", json={"pspReference": "NOPE"})
    assert (response.status_code, error_code(response)) == (404, "not_found")
    response = client.post("/admin/notifications/replay", json={})
    assert (response.status_code, error_code(response)) == (422, "validation_error")


# --- the signature -------------------------------------------------------------------------------

ITEM: dict[str, Any] = {
    "eventCode": "REFUND",
    "pspReference": "ABCDEFGH12345678",
    "originalReference": "ZYXWVUTS87654321",
    "merchantAccountCode": "TesseraSandbox",
    "merchantReference": "refund-1",
    "amount": {"value": 1050, "currency": "EUR"},
    "success": "true",
    "eventDate": "2025-01-01T00:00:00+00:00",
}


def test_the_signature_is_hmac_sha256_over_the_documented_fields() -> None:
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert (
        signing_string(ITEM)
        == "ABCDEFGH12345678:ZYXWVUTS87654321:TesseraSandbox:refund-1:1050:EUR:REFUND:true"
    )
    assert sign_notification(ITEM, key) == merchant_signature(ITEM, key)
    without_original = {k: v for k, v in ITEM.items() if k != "originalReference"}
    assert signing_string(without_original).startswith("ABCDEFGH12345678::TesseraSandbox:")
    assert sign_notification(without_original, key) == merchant_signature(without_original, key)


def test_the_test_vector_in_the_readme_signs_as_documented() -> None:
    item = {
        **ITEM,
        "pspReference": "Z6GJXCBF6TYMA8NB",
        "originalReference": "MIOZY2NZEHDCYV5E",
        "merchantReference": "rf-1",
        "amount": {"value": 400, "currency": "EUR"},
    }
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    expected = "LbTCv09ApfN+BohivY8l+6QKbFnDbwUkOqWIM6sD6LM="
    assert signing_string(item) == (
        "Z6GJXCBF6TYMA8NB:MIOZY2NZEHDCYV5E:TesseraSandbox:rf-1:400:EUR:REFUND:true"
    )
    assert sign_notification(item, key) == merchant_signature(item, key) == expected
    readme = (ROOT / "sandbox" / "README.md").read_text()
    assert expected in readme
    assert "00112233445566778899AABBCCDDEEFF" in readme


@pytest.mark.parametrize(
    "change",
    [
        {"success": "false"},
        {"amount": {"value": 1051, "currency": "EUR"}},
        {"amount": {"value": 1050, "currency": "USD"}},
        {"eventCode": "CAPTURE"},
        {"merchantReference": "refund-2"},
        {"pspReference": "ABCDEFGH12345679"},
        {"originalReference": ""},
    ],
    ids=str,
)
def test_a_changed_field_fails_verification(change: dict[str, Any]) -> None:
    signed = {**ITEM, "additionalData": {"hmacSignature": sign_notification(ITEM, HMAC_KEY)}}
    assert verify_notification(signed, HMAC_KEY)
    assert not verify_notification({**signed, **change}, HMAC_KEY)


def test_a_wrong_key_or_a_missing_signature_fails_verification() -> None:
    signed = {**ITEM, "additionalData": {"hmacSignature": sign_notification(ITEM, HMAC_KEY)}}
    assert not verify_notification(signed, secrets.token_bytes(32))
    assert not verify_notification(ITEM, HMAC_KEY)
    assert not verify_notification({**ITEM, "additionalData": {"hmacSignature": 5}}, HMAC_KEY)


# --- admin ---------------------------------------------------------------------------------------


def test_stats_count_what_happened_since_the_reset(client: httpx.Client) -> None:
    assert client.post("/admin/reset").json() == {"reset": True}
    psp_ref = authorised(client, value=1000)  # 1
    capture(client, psp_ref, 1000)  # 2
    refund(client, psp_ref, 100)  # 3
    pay(client, "4000000000009995")  # 4
    pay(client, ERROR_CARD)  # 5
    cancelled = authorised(client)  # 6
    client.post(f"/v1/payments/{cancelled}/cancels")  # 7
    httpx.get(client.base_url.join("/v1/payments/x"))  # 8, no key
    body = payment_body()
    client.post("/v1/payments", json=body)  # 9
    client.post("/v1/payments", json=body)  # 10, a replay
    # Capture, refund and cancel are done (and their notifications made) 50 ms after each.
    wait_until(lambda: client.get("/admin/stats").json()["notifications"]["created"] == 3)
    assert client.get("/admin/stats").json() == {
        "requests": 10,
        "payments": 5,
        "by_result": {"Authorised": 3, "Refused": 1, "Error": 1},
        "refusals": {
            "Do Not Honor": 0,
            "Not enough balance": 1,
            "Expired Card": 0,
            "CVC Declined": 0,
            "Blocked Card": 0,
            "Refused": 0,
            "Revocation Of Auth": 0,
            "Issuer Unavailable": 0,
        },
        "captures": {"received": 1, "succeeded": 1, "failed": 0},
        "cancels": {"received": 1, "succeeded": 1, "failed": 0},
        "refunds": {"received": 1, "succeeded": 1, "failed": 0},
        "replays": 1,
        "processing_errors": 0,
        "unauthorized": 1,
        "injected": {"errors": 0, "timeouts": 0, "declines": 0},
        "notifications": {
            "created": 3,
            "attempts": 0,
            "delivered": 0,
            "failed_attempts": 0,
            "abandoned": 0,
            "unsent": 3,
            "pending": 0,
            "replayed": 0,
        },
    }


def test_delivery_stats_count_attempts_and_deliveries(
    client: httpx.Client, receiver: Receiver
) -> None:
    client.post("/admin/reset")
    receiver.failures["AUTHORISATION"] = [500]
    psp_ref = authorised(client)
    receiver.wait(psp_ref, count=2)
    wait_until(lambda: client.get("/admin/stats").json()["notifications"]["delivered"] == 1)
    assert client.get("/admin/stats").json()["notifications"] == {
        "created": 1,
        "attempts": 2,
        "delivered": 1,
        "failed_attempts": 1,
        "abandoned": 0,
        "unsent": 0,
        "pending": 0,
        "replayed": 0,
    }


def test_the_reset_forgets_every_payment(client: httpx.Client) -> None:
    body = payment_body()
    psp_ref = client.post("/v1/payments", json=body).json()["pspReference"]
    assert client.post("/admin/reset").json() == {"reset": True}
    assert recorded(client, body["merchantReference"]) == []
    assert client.get(f"/v1/payments/{psp_ref}").status_code == 404
    assert client.get("/admin/stats").json()["payments"] == 0
    assert client.post("/v1/payments", json=body).json()["pspReference"] != psp_ref


def test_the_admin_listing_without_a_reference_lists_everything(client: httpx.Client) -> None:
    client.post("/admin/reset")
    made = [authorised(client) for _ in range(3)]
    listed = client.get("/admin/payments").json()["payments"]
    assert [p["pspReference"] for p in listed] == made


def test_the_config_endpoint_changes_only_the_given_fields_and_validates(
    client: httpx.Client, configure: Callable[..., dict[str, Any]]
) -> None:
    assert client.get("/admin/config").json() == DEFAULT_CONFIG
    changed = configure(notify_url="https://merchant.example/adyen", fail_next_refunds=3)
    assert changed == {
        **DEFAULT_CONFIG,
        "notify_url": "https://merchant.example/adyen",
        "fail_next_refunds": 3,
    }
    for bad in (
        {"notify_url": "ftp://x"},
        {"notify_url": "not a url"},
        {"fail_next_captures": -1},
        {"fail_next_refunds": 1.5},
        {"notify_delay_ms": -1},
        {"hmac_key": "00"},
        {"error_rate": 0.5},
    ):
        response = client.post("/admin/config", json=bad)
        assert (response.status_code, error_code(response)) == (422, "validation_error"), bad
    response = client.post("/admin/config", content=b"{")
    assert (response.status_code, error_code(response)) == (400, "invalid_json")
    assert client.get("/admin/config").json() == changed


# --- settings and the card number's absence ------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TESSERA_PSP_B_HOST": "0.0.0.0",
        "TESSERA_PSP_B_PORT": "9998",
        "TESSERA_PSP_B_API_KEY": "k_2",
        "TESSERA_PSP_B_HMAC_KEY": "ab" * 32,
        "TESSERA_PSP_B_NOTIFY_URL": "http://127.0.0.1:8000/v1/notifications/psp_b",
        "TESSERA_PSP_B_LATENCY_MS": "25",
        "TESSERA_PSP_B_JITTER_MS": "5.5",
        "TESSERA_PSP_B_SLOW_SECONDS": "3",
        "TESSERA_PSP_B_NOTIFY_DELAY_MS": "10",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (settings.host, settings.port, settings.api_key) == ("0.0.0.0", 9998, "k_2")
    assert settings.hmac_key == b"\xab" * 32
    assert settings.config == Config(
        latency_ms=25,
        jitter_ms=5.5,
        slow_seconds=3,
        notify_delay_ms=10,
        notify_url="http://127.0.0.1:8000/v1/notifications/psp_b",
    )


def test_the_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TESSERA_PSP_B_"):
            monkeypatch.delenv(name)
    settings = Settings.from_env()
    assert (settings.host, settings.port, settings.api_key) == (
        "127.0.0.1",
        8202,
        "psp_b_test_key",
    )
    assert settings.hmac_key == bytes.fromhex(DEFAULT_HMAC_KEY)
    assert len(settings.hmac_key) == 32
    assert settings.config == Config(notify_url="", notify_delay_ms=200, slow_seconds=12)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TESSERA_PSP_B_PORT", "http"),
        ("TESSERA_PSP_B_PORT", "0"),
        ("TESSERA_PSP_B_API_KEY", ""),
        ("TESSERA_PSP_B_API_KEY", "two words"),
        ("TESSERA_PSP_B_HMAC_KEY", "not-hex"),
        ("TESSERA_PSP_B_HMAC_KEY", "abcd"),
        ("TESSERA_PSP_B_NOTIFY_URL", "merchant.example/hook"),
        ("TESSERA_PSP_B_LATENCY_MS", "-1"),
        ("TESSERA_PSP_B_NOTIFY_DELAY_MS", "soon"),
        ("TESSERA_PSP_B_SLOW_SECONDS", "nan"),
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
        [sys.executable, "-m", "sandbox.psp_b"],
        env={**os.environ, "TESSERA_PSP_B_HMAC_KEY": "zz", "TESSERA_PSP_B_PORT": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "TESSERA_PSP_B_HMAC_KEY" in result.stderr


def test_no_card_number_ever_appears_in_the_process_output_or_a_notification(
    client: httpx.Client,
    psp: ServiceProcess,
    receiver: Receiver,
    configure: Callable[..., dict[str, Any]],
) -> None:
    configure(slow_seconds=0, late_seconds=0)
    made = [pay(client, number).json() for number in PANS]
    for answer in made:
        if "pspReference" in answer:
            receiver.item(answer["pspReference"])  # checks the notification for card numbers
    notes = client.get("/admin/notifications").json()  # the hook checks this listing too
    assert notes["notifications"]
    output = psp.output()
    assert "psp_b: listening on" in output, "the output is captured (the check means something)"
    assert_no_pan(output, "the process output")
