"""What Schemathesis found (tests/test_fuzz_schemathesis.py, `make fuzz`), one request each,
pinned: each was a 500, a wrong `Allow` header or a write that failed half-way, and is now a
precise answer. Each test failed before its fix."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ApiMerchant, VaultMerchant, register_vault_merchant
from tests.support import payments
from tests.support.echo_server import EchoServer
from tests.support.payments import pay, post
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import acting_for, assert_error, bearer, card, tokenize

NUL = "\x00"


def methods(header: str) -> set[str]:
    return {method.strip() for method in header.split(",")}


# --- Allow ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "path", "allowed"),
    [
        ("api", "/v1/payments", {"GET", "POST", "OPTIONS"}),
        ("api", "/v1/webhook_endpoints/we_x", {"GET", "DELETE", "OPTIONS"}),
        ("vault", "/v1/tokens/tok_x", {"GET", "DELETE", "OPTIONS"}),
    ],
)
def test_a_method_the_url_does_not_have_is_405_naming_the_ones_it_has(
    api: ServiceProcess, vault: ServiceProcess, service: str, path: str, allowed: set[str]
) -> None:
    url = (api if service == "api" else vault).url + path
    response = httpx.request("TRACE", url)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert methods(response.headers["allow"]) == allowed  # RFC 9110: required on a 405


@pytest.mark.parametrize(
    ("service", "path", "allowed"),
    [
        # Litestar's own OPTIONS answer listed only the first handler's methods: "OPTIONS, POST".
        ("api", "/v1/payments", {"GET", "POST", "OPTIONS"}),
        ("api", "/v1/webhook_endpoints", {"GET", "POST", "OPTIONS"}),
        ("api", "/v1/webhook_endpoints/we_x", {"GET", "DELETE", "OPTIONS"}),
        ("vault", "/v1/tokens/tok_x", {"GET", "DELETE", "OPTIONS"}),
    ],
)
def test_options_lists_every_method_of_the_url(
    api: ServiceProcess,
    vault: ServiceProcess,
    merchant: ApiMerchant,
    service: str,
    path: str,
    allowed: set[str],
) -> None:
    url, headers = (api.url, merchant.auth) if service == "api" else (vault.url, {})
    response = httpx.options(url + path, headers=headers)  # the API's guards apply to OPTIONS
    assert response.status_code == 204
    assert methods(response.headers["allow"]) == allowed


@pytest.mark.parametrize(
    ("service", "method", "path"),
    [("vault", "POST", "/v1/keys/rotate"), ("vault", "GET", "/v1/audit/verify"),
     ("api", "GET", "/v1/balance"), ("api", "GET", "/healthz")],
)  # fmt: skip
def test_a_malformed_host_header_is_a_documented_400_even_without_parameters(
    api: ServiceProcess, vault: ServiceProcess, service: str, method: str, path: str
) -> None:
    """Litestar's router refuses such a Host (400) before any handler; the documents listed
    400 only for operations with parameters or a body (found by `make fuzz`)."""
    process = api if service == "api" else vault
    response = httpx.request(method, process.url + path, headers={"host": '[/?"Bk1z5u'})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    document = httpx.get(process.url + "/schema/openapi.json").json()
    assert "400" in document["paths"][path][method.lower()]["responses"]


@pytest.mark.parametrize("service", ["api", "vault"])
def test_a_request_the_http_server_cannot_parse_is_a_documented_plain_text_400(
    api: ServiceProcess, vault: ServiceProcess, service: str
) -> None:
    """uvicorn answers it before the app, in plain text; the documents said 400 was only JSON
    (found by `make fuzz`: a `Content-Length: z` header)."""
    process = api if service == "api" else vault
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: z\r\n\r\n")
        answer = connection.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 400"), answer
    assert "content-type: text/plain" in answer.lower()
    document = httpx.get(process.url + "/schema/openapi.json").json()
    assert "text/plain" in document["paths"]["/healthz"]["get"]["responses"]["400"]["content"]


# --- a body field named like one of the API's services ----------------------------------------


@pytest.mark.parametrize("events", [{}, "*", None, True, 1])
def test_a_webhook_endpoint_whose_events_are_not_a_list_is_a_400(
    api: ServiceProcess, merchant: ApiMerchant, events: object
) -> None:
    """Litestar decoded the body before the handler did, and a failure on a field named like
    a dependency (`events`, the event service) was taken for a server fault: 500."""
    body = {"url": "https://hooks.example/tessera", "events": events}
    response = httpx.post(api.url + "/v1/webhook_endpoints", json=body, headers=merchant.auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "events"


# --- NUL characters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("description", f"a{NUL}b"),
        ("reference", NUL),
        ("metadata", {"order": f"1{NUL}"}),
        ("metadata", {f"k{NUL}": "v"}),
    ],
)
def test_text_with_a_nul_character_is_a_400_and_no_payment(
    api: ServiceProcess,
    vault: ServiceProcess,
    merchant: ApiMerchant,
    field: str,
    value: object,
) -> None:
    """Postgres cannot store NUL in text or JSONB: the insert failed after the key was claimed
    and the request answered 500."""
    before = httpx.get(api.url + "/v1/payments?limit=1", headers=merchant.auth).json()["data"]
    token = payments.tokenize(vault, merchant)
    body = {"amount": 500, "currency": "EUR", "token": token, field: value}
    response = post(api, merchant, "/v1/payments", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == field
    after = httpx.get(api.url + "/v1/payments?limit=1", headers=merchant.auth).json()["data"]
    assert after == before


def test_the_document_says_text_has_no_nul_character(api: ServiceProcess) -> None:
    """So that Schemathesis sends such text as invalid data, never as valid."""
    document = httpx.get(api.url + "/schema/openapi.json").json()
    create = document["components"]["schemas"]["CreatePayment"]["properties"]
    assert create["description"]["anyOf"][0]["pattern"] == "^[^\\x00]*$"
    assert create["metadata"]["propertyNames"]["pattern"] == "^[^\\x00]*$"


def test_a_refund_reason_with_a_nul_character_is_a_400_and_no_refund(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    payment = pay(api, vault, merchant).json()
    response = post(api, merchant, f"/v1/payments/{payment['id']}/refunds", {"reason": NUL})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "reason"
    again = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=merchant.auth).json()
    assert again["amount_refunded"] == 0
    assert again["refunds"] == []


def test_a_break_glass_reason_with_a_nul_character_is_a_400(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    token = tokenize(vault, shop)["id"]
    body = {"token": token, "reason": f"chargeback {NUL} review"}
    response = httpx.post(vault.url + "/v1/detokenize", json=body, headers=bearer(tokens["admin"]))
    assert_error(response, 400, "invalid_request_error", "parameter_invalid", "reason")


# --- origins that urlsplit cannot read ----------------------------------------------------------

#: A port out of range, a port that is no number, an unclosed IPv6 bracket.
BAD_ORIGINS = ["https://shop.example:99999", "https://shop.example:port", "https://[::1"]


@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_a_token_request_from_an_unreadable_origin_is_refused(
    vault: ServiceProcess, shop: VaultMerchant, origin: str
) -> None:
    """`urlsplit(...).port` raises ValueError for a port out of range: 500 on a public
    endpoint, for anyone holding a publishable key (they are public)."""
    headers = {**bearer(shop.publishable_key), "origin": origin}
    response = httpx.post(vault.url + "/v1/tokens", json=card(), headers=headers)
    assert_error(response, 403, "permission_error", "origin_not_allowed")


@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_a_preflight_or_card_fields_for_an_unreadable_origin_are_refused(
    vault: ServiceProcess, shop: VaultMerchant, origin: str
) -> None:
    preflight = httpx.options(vault.url + "/v1/tokens", headers={"origin": origin})
    assert preflight.status_code == 403
    fields = httpx.get(
        vault.url + "/elements/v1/card.html", params={"key": shop.publishable_key, "origin": origin}
    )
    assert fields.status_code == 403


@pytest.mark.parametrize("origin", [*BAD_ORIGINS, f"https://shop{NUL}.example"])
def test_a_merchant_with_an_unreadable_origin_is_not_registered(
    vault: ServiceProcess, tokens: dict[str, str], origin: str
) -> None:
    with pytest.raises(AssertionError, match="invalid_origin"):
        register_vault_merchant(vault, tokens["admin"], (origin,))


# --- forwarded headers ------------------------------------------------------------------------


@pytest.fixture
def quiet_echo(psp_echo: EchoServer) -> Iterator[EchoServer]:
    psp_echo.reset()
    yield psp_echo
    psp_echo.reset()


@pytest.mark.parametrize("value", ["a\x1ab", "line\r\nX-Injected: 1", NUL])
def test_a_forwarded_header_an_http_request_cannot_carry_is_a_400_and_nothing_is_sent(
    vault: ServiceProcess,
    shop: VaultMerchant,
    tokens: dict[str, str],
    quiet_echo: EchoServer,
    value: str,
) -> None:
    """The HTTP client refused the header after the card had been read and the audit record
    written: 500, and an `error` outcome in the audit log."""
    body = {
        "destination": "echo",
        "path": "/v1/authorizations",
        "token": tokenize(vault, shop, cvc="123")["id"],
        "headers": {"X-Note": value},
        "body": {"pan": "{{card.number}}"},
    }
    response = httpx.post(
        vault.url + "/v1/forward", json=body, headers=acting_for(tokens["service"], shop)
    )
    assert_error(response, 400, "invalid_request_error", "parameter_invalid", "headers")
    assert quiet_echo.received == []
