"""The forwarding proxy (`POST /v1/forward`), against real vault processes and real HTTP
destinations that record exactly what left the vault.

The session's echo PSP (`psp_echo`, destination `echo`) serves the happy paths; a vault of this
module's own (`edge`) is configured with destinations that misbehave on purpose: a closed port,
a redirect, an untrusted certificate, an answer trickled past the time-out, a text answer and a
header carrying a card number.
"""

from __future__ import annotations

import datetime
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.cards import luhn_valid
from core.ids import new_random_id
from tests.conftest import VaultMerchant, start_service
from tests.support.echo_server import EchoServer, Received
from tests.support.processes import ServiceProcess, free_port

PATH = "/v1/authorizations"
EXP_MONTH, EXP_YEAR = 7, datetime.date.today().year + 3
#: The only response headers the vault hands back (vault/forward.py RETURNED_HEADERS).
RETURNED_HEADERS = {"content-type", "request-id", "x-request-id", "idempotency-key", "retry-after"}
#: The vault's forward time-out in the session's settings (conftest: 2 seconds).
TIMEOUT = 2.0
#: A card number the misbehaving destinations put in their answers.
LEAKY_PAN = "4000056655665556"


# --- helpers ---------------------------------------------------------------------------------


def random_pan() -> str:
    """A random Luhn-valid Visa number, so each test's card is told apart from every other."""
    body = "4" + "".join(secrets.choice("0123456789") for _ in range(14))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def masked(pan: str) -> str:
    return f"[REDACTED PAN ****{pan[-4:]}]"


def tokenize(
    vault: ServiceProcess,
    merchant: VaultMerchant,
    pan: str,
    *,
    cvc: str | None = None,
    name: str | None = None,
) -> str:
    card: dict[str, Any] = {"number": pan, "exp_month": EXP_MONTH, "exp_year": EXP_YEAR}
    if cvc is not None:
        card["cvc"] = cvc
    if name is not None:
        card["name"] = name
    response = httpx.post(
        vault.url + "/v1/tokens",
        json=card,
        headers={"authorization": f"Bearer {merchant.publishable_key}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def template(token: str, **changes: Any) -> dict[str, Any]:
    """A charge as the payment API sends it: card data only as placeholders in the body."""
    request: dict[str, Any] = {
        "destination": "echo",
        "method": "POST",
        "path": PATH,
        "headers": {"Idempotency-Key": f"idem-{secrets.token_hex(4)}"},
        "token": token,
        "body": {
            "amount": 1999,
            "card": {
                "number": "{{card.number}}",
                "exp_month": "{{card.exp_month}}",
                "exp_year": "{{card.exp_year}}",
                "cvc": "{{card.cvc}}",
            },
        },
    }
    request.update(changes)
    return request


def forward(
    vault: ServiceProcess, service_token: str, merchant_id: str, request: dict[str, Any]
) -> httpx.Response:
    return httpx.post(
        vault.url + "/v1/forward",
        json=request,
        headers={"authorization": f"Bearer {service_token}", "tessera-merchant": merchant_id},
        timeout=15,
    )


def sent(received: Received) -> Any:
    return json.loads(received.body)


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["request-id"]
    assert "Traceback" not in response.text
    return error


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class ScriptedServer:
    """A destination that records what reaches it and answers as scripted: a status, headers,
    and a body written in `chunks` pieces `chunk_delay` seconds apart; optionally over TLS with
    a self-signed certificate (which the vault must not trust)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"{}"
    content_type: str = "application/json"
    chunks: int = 1
    chunk_delay: float = 0.0
    tls_dir: Path | None = None
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls_dir else 'http'}://{host!s}:{port}"

    def start(self) -> ScriptedServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                owner.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                self.send_response(owner.status)
                self.send_header("content-type", owner.content_type)
                for name, value in owner.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(owner.body)))
                self.end_headers()
                size = -(-len(owner.body) // owner.chunks)
                try:
                    for start in range(0, len(owner.body), size):
                        if start:
                            time.sleep(owner.chunk_delay)
                        self.wfile.write(owner.body[start : start + size])
                        self.wfile.flush()
                except OSError:
                    return  # the vault gave up on us

            do_POST = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        if self.tls_dir is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self_signed_certificate(self.tls_dir))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_echo(psp_echo: EchoServer) -> Iterator[EchoServer]:
    """The session's echo PSP is shared: each test starts and ends with a quiet one."""
    psp_echo.reset()
    yield psp_echo
    psp_echo.reset()


@pytest.fixture
def service(tokens: dict[str, str]) -> str:
    return tokens["service"]


@dataclass
class Edge:
    """A vault whose destinations misbehave, and the servers behind them."""

    vault: ServiceProcess
    redirector: ScriptedServer
    redirect_target: EchoServer
    untrusted: ScriptedServer
    trickle: ScriptedServer
    text: ScriptedServer
    leaky_header: ScriptedServer


@pytest.fixture(scope="module")
def edge(vault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    target = EchoServer().start()
    servers = {
        "redirector": ScriptedServer(status=302, headers={"Location": target.url + PATH}),
        "untrusted": ScriptedServer(tls_dir=tmp_path_factory.mktemp("tls")),
        # 6 pieces 0.8 s apart: each read is quick, the whole answer takes 4 s, twice TIMEOUT.
        "trickle": ScriptedServer(body=b'{"result": "approved"}', chunks=6, chunk_delay=0.8),
        "text": ScriptedServer(
            body=f"declined: card {LEAKY_PAN} is blocked".encode(), content_type="text/plain"
        ),
        "leaky_header": ScriptedServer(headers={"X-Request-Id": f"psp-{LEAKY_PAN}"}),
    }
    for server in servers.values():
        server.start()
    destinations = {name: {"url": server.url, "paths": [PATH]} for name, server in servers.items()}
    destinations["closed"] = {"url": f"http://127.0.0.1:{free_port()}", "paths": [PATH]}
    extra = {"TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations)}
    process = start_service("vault", vault_env, tmp_path_factory.mktemp("edge"), extra)
    try:
        yield Edge(process, redirect_target=target, **servers)
    finally:
        process.stop()
        for server in servers.values():
            server.stop()
        target.stop()


# --- substitution ----------------------------------------------------------------------------


def test_card_fields_are_filled_into_the_body_with_their_types(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    pan = random_pan()
    token = tokenize(vault, shop, pan, cvc="314", name="Ada Lovelace")
    body = {
        "amount": 1999,
        "card": {
            "number": "{{card.number}}",
            "exp_month": "{{card.exp_month}}",
            "exp_year": "{{ card.exp_year }}",
            "expiry": "{{card.exp_month}}/{{card.exp_year}}",
            "holder": "{{card.name}}",
            "cvc": "{{card.cvc}}",
        },
        "descriptor": "Order 42 for {{card.name}}",
        "checks": ["{{card.number}}", 3, True, None],
        "metadata": {"order": "42"},
    }
    headers = {"Idempotency-Key": "order-42-attempt-1", "Authorization": "Bearer psp_key_1"}

    response = forward(vault, service, shop.id, template(token, body=body, headers=headers))

    assert response.status_code == 200, response.text
    [request] = psp_echo.received
    assert (request.method, request.path) == ("POST", PATH)
    assert sent(request) == {
        "amount": 1999,
        "card": {
            "number": pan,
            "exp_month": EXP_MONTH,
            "exp_year": EXP_YEAR,
            "expiry": f"{EXP_MONTH}/{EXP_YEAR}",
            "holder": "Ada Lovelace",
            "cvc": "314",
        },
        "descriptor": "Order 42 for Ada Lovelace",
        "checks": [pan, 3, True, None],
        "metadata": {"order": "42"},
    }
    received_headers = lower_keys(request.headers)
    assert received_headers["idempotency-key"] == "order-42-attempt-1"
    assert received_headers["authorization"] == "Bearer psp_key_1"  # the PSP's, not the vault's
    assert received_headers["content-type"] == "application/json"
    assert "tessera-merchant" not in received_headers
    assert service not in request.body.decode() + json.dumps(received_headers)


def test_a_field_the_card_does_not_have_is_left_out_or_empty(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    token = tokenize(vault, shop, random_pan())  # no CVC, no name
    body = {"cvc": "{{card.cvc}}", "holder": "{{card.name}}", "note": "[{{card.name}}]"}

    response = forward(vault, service, shop.id, template(token, body=body))

    assert response.status_code == 200, response.text
    assert sent(psp_echo.received[0]) == {"note": "[]"}


# --- the answer ------------------------------------------------------------------------------


def test_the_answer_is_status_allowlisted_headers_and_the_body_with_card_numbers_masked(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    pan = random_pan()
    token = tokenize(vault, shop, pan)
    psp_echo.reply = {
        "id": "auth_123",
        "card": pan,
        "card_as_number": int(pan),
        "nested": {"attempts": [{"pan": pan, "last4": pan[-4:]}]},
        "message": f"card {pan} approved",
        pan: "as a key",
    }

    response = forward(vault, service, shop.id, template(token))

    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"status", "headers", "body"}
    assert answer["status"] == 200
    assert answer["headers"] == {"content-type": "application/json"}
    assert "x-secret-header" not in response.headers
    assert answer["body"] == {
        "id": "auth_123",
        "card": masked(pan),
        "card_as_number": masked(pan),
        "nested": {"attempts": [{"pan": masked(pan), "last4": pan[-4:]}]},
        "message": f"card {masked(pan)} approved",
        masked(pan): "as a key",
    }
    assert pan not in response.text


def test_a_processor_reference_with_a_card_like_digit_run_comes_back_intact(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    """PSP A's ids are 24 hex characters: about one in 300 holds a Luhn-valid run of 13+ digits.
    Masked, the API would store a reference the processor does not know (a capture got 404)."""
    run = next(r for r in (f"530263738127{d}" for d in range(10)) if luhn_valid(r))
    reference = f"auth_e404eb{run}fec2"
    other = next(p for p in (f"601100099990001{d}" for d in range(10)) if luhn_valid(p))
    pan = random_pan()
    token = tokenize(vault, shop, pan)
    psp_echo.reply = {"id": reference, "note": f"card {other} refused", "card": pan}

    response = forward(vault, service, shop.id, template(token))

    body = response.json()["body"]
    assert body["id"] == reference  # digits inside an identifier are the identifier's
    assert body["note"] == f"card {masked(other)} refused"  # a card number standing alone
    assert body["card"] == masked(pan)  # this card, wherever it is


def test_the_echoed_request_comes_back_with_the_card_number_masked(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    pan = random_pan()
    token = tokenize(vault, shop, pan)

    response = forward(vault, service, shop.id, template(token))  # echo: {"echo": <what it got>}

    assert response.status_code == 200, response.text
    assert pan in psp_echo.received[0].body.decode()
    assert pan not in response.text
    assert masked(pan) in response.json()["body"]["echo"]


@pytest.mark.parametrize("echoed", ["737", 737], ids=["as text", "as a number"])
def test_a_cvc_the_destination_echoes_as_a_value_is_replaced(
    vault: ServiceProcess,
    shop: VaultMerchant,
    service: str,
    psp_echo: EchoServer,
    echoed: str | int,
) -> None:
    token = tokenize(vault, shop, random_pan(), cvc="737")
    psp_echo.reply = {"cvc": echoed, "checks": {"cvc": echoed}, "cvc_result": "M"}

    response = forward(vault, service, shop.id, template(token))

    assert response.status_code == 200, response.text
    assert sent(psp_echo.received[0])["card"]["cvc"] == "737"
    assert response.json()["body"] == {"cvc": "***", "checks": {"cvc": "***"}, "cvc_result": "M"}


@pytest.mark.parametrize("status", [402, 500, 502, 503])
def test_the_destination_status_is_passed_through_in_a_200_answer(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer, status: int
) -> None:
    token = tokenize(vault, shop, random_pan())
    psp_echo.status = status
    psp_echo.reply = {"error": {"code": "processor_unavailable"}}

    response = forward(vault, service, shop.id, template(token))

    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": status,
        "headers": {"content-type": "application/json"},
        "body": {"error": {"code": "processor_unavailable"}},
    }
    assert len(psp_echo.received) == 1


# --- refusals --------------------------------------------------------------------------------

PLACEHOLDER_NOT_ALLOWED, HEADER_NOT_ALLOWED = "placeholder_not_allowed", "header_not_allowed"
REFUSED = [
    pytest.param({"destination": "attacker"}, "destination_not_allowed", id="unlisted destination"),
    pytest.param({"path": "/v1/refunds"}, "path_not_allowed", id="unlisted path"),
    pytest.param({"path": PATH + "/../admin"}, "path_not_allowed", id="path below a listed one"),
    pytest.param({"path": PATH + "/{{card.number}}"}, PLACEHOLDER_NOT_ALLOWED, id="in the path"),
    pytest.param({"path": PATH + "?n={{card.number}}"}, PLACEHOLDER_NOT_ALLOWED, id="in the query"),
    pytest.param(
        {"headers": {"X-Pan": "{{card.number}}"}}, PLACEHOLDER_NOT_ALLOWED, id="in a header"
    ),
    pytest.param(
        {"headers": {"{{card.cvc}}": "1"}}, PLACEHOLDER_NOT_ALLOWED, id="as a header name"
    ),
    pytest.param({"body": {"{{card.number}}": "x"}}, PLACEHOLDER_NOT_ALLOWED, id="as a body key"),
    pytest.param(
        {"body": {"c": [{"{{card.cvc}}": 1}]}}, PLACEHOLDER_NOT_ALLOWED, id="as a deep key"
    ),
    pytest.param(
        {"body": {"pin": "{{card.pin}}"}}, "placeholder_unknown", id="unknown placeholder"
    ),
    pytest.param(
        {"body": {"n": "{{card.number}} {{merchant.key}}"}},
        "placeholder_unknown",
        id="unknown placeholder in text",
    ),
    pytest.param({"headers": {"Host": "attacker.example"}}, HEADER_NOT_ALLOWED, id="Host"),
    pytest.param({"headers": {"cookie": "session=1"}}, HEADER_NOT_ALLOWED, id="Cookie"),
    pytest.param({"headers": {"Transfer-Encoding": "chunked"}}, HEADER_NOT_ALLOWED, id="TE"),
    pytest.param({"headers": {"Content-Length": "0"}}, HEADER_NOT_ALLOWED, id="Content-Length"),
    pytest.param({"headers": {"X Pan": "1"}}, HEADER_NOT_ALLOWED, id="malformed header name"),
    pytest.param({"method": "GET"}, "parameter_invalid", id="GET"),
    pytest.param({"method": "DELETE"}, "parameter_invalid", id="DELETE"),
]


@pytest.mark.parametrize(("changes", "code"), REFUSED)
def test_a_refused_template_sends_nothing_and_leaves_the_cvc_in_place(
    vault: ServiceProcess,
    shop: VaultMerchant,
    service: str,
    psp_echo: EchoServer,
    changes: dict[str, Any],
    code: str,
) -> None:
    token = tokenize(vault, shop, random_pan(), cvc="271")

    response = forward(vault, service, shop.id, template(token, **changes))

    error = assert_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert psp_echo.received == []
    # Refused before the card was touched: the held CVC is still there for the real charge.
    assert forward(vault, service, shop.id, template(token)).status_code == 200
    assert sent(psp_echo.received[0])["card"]["cvc"] == "271"


def test_another_merchants_token_is_not_found_and_nothing_is_sent(
    vault: ServiceProcess,
    shop: VaultMerchant,
    other_shop: VaultMerchant,
    service: str,
    psp_echo: EchoServer,
) -> None:
    token = tokenize(vault, shop, random_pan(), cvc="161")

    response = forward(vault, service, other_shop.id, template(token))

    error = assert_error(response, 404, "resource_missing")
    assert error["param"] == "token"
    assert psp_echo.received == []
    assert forward(vault, service, shop.id, template(token)).status_code == 200
    assert sent(psp_echo.received[0])["card"]["cvc"] == "161"


@pytest.mark.parametrize("which", ["unknown", "malformed", "deleted"])
def test_a_token_that_is_not_live_is_not_found_and_nothing_is_sent(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer, which: str
) -> None:
    if which == "unknown":
        token = new_random_id("tok")
    elif which == "malformed":
        token = "tok_4242424242424242"
    else:
        token = tokenize(vault, shop, random_pan())
        deleted = httpx.delete(
            f"{vault.url}/v1/tokens/{token}",
            headers={"authorization": f"Bearer {service}", "tessera-merchant": shop.id},
        )
        assert deleted.status_code == 200, deleted.text

    response = forward(vault, service, shop.id, template(token))

    assert_error(response, 404, "resource_missing")
    assert psp_echo.received == []


# --- when the destination fails ---------------------------------------------------------------


def test_a_destination_slower_than_the_timeout_is_a_504_that_may_have_been_sent(
    vault: ServiceProcess, shop: VaultMerchant, service: str, psp_echo: EchoServer
) -> None:
    token = tokenize(vault, shop, random_pan(), cvc="828")
    psp_echo.delay_seconds = 3

    started = time.monotonic()
    response = forward(vault, service, shop.id, template(token))
    elapsed = time.monotonic() - started

    error = assert_error(response, 504, "destination_timeout")
    assert error["sent"] == "unknown"
    assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + 1.2
    assert len(psp_echo.received) == 1  # it did arrive: a blind retry could charge twice
    # The CVC was used up by that attempt, whatever came of it.
    psp_echo.delay_seconds = 0
    assert forward(vault, service, shop.id, template(token)).status_code == 200
    assert "cvc" not in sent(psp_echo.received[1])["card"]


def test_a_destination_that_trickles_its_answer_is_cut_off_at_the_total_timeout(
    edge: Edge, shop: VaultMerchant, service: str
) -> None:
    """docs/vault.md: time-outs are "connect ≤ 3 s, total TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS".
    A destination that answers a few bytes at a time must not hold a forward past that."""
    token = tokenize(edge.vault, shop, random_pan())

    started = time.monotonic()
    response = forward(edge.vault, service, shop.id, template(token, destination="trickle"))
    elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT + 1.2, f"the forward took {elapsed:.1f}s ({response.status_code})"
    error = assert_error(response, 504, "destination_timeout")
    assert error["sent"] == "unknown"


def test_a_closed_port_is_a_502_that_was_certainly_not_sent(
    edge: Edge, shop: VaultMerchant, service: str
) -> None:
    token = tokenize(edge.vault, shop, random_pan())

    response = forward(edge.vault, service, shop.id, template(token, destination="closed"))

    error = assert_error(response, 502, "destination_unreachable")
    assert (error["type"], error["sent"]) == ("api_error", "false")


def test_a_destination_with_an_untrusted_certificate_receives_nothing(
    edge: Edge, shop: VaultMerchant, service: str
) -> None:
    token = tokenize(edge.vault, shop, random_pan())

    response = forward(edge.vault, service, shop.id, template(token, destination="untrusted"))

    error = assert_error(response, 502, "destination_unreachable")
    assert error["sent"] == "false"
    assert edge.untrusted.received == []


def test_a_redirect_is_returned_not_followed(edge: Edge, shop: VaultMerchant, service: str) -> None:
    pan = random_pan()
    token = tokenize(edge.vault, shop, pan)

    response = forward(edge.vault, service, shop.id, template(token, destination="redirector"))

    assert response.status_code == 200, response.text
    assert response.json()["status"] == 302
    assert "location" not in response.json()["headers"]
    assert sent(edge.redirector.received[-1])["card"]["number"] == pan
    assert edge.redirect_target.received == []


def test_a_text_answer_is_masked_as_well(edge: Edge, shop: VaultMerchant, service: str) -> None:
    token = tokenize(edge.vault, shop, random_pan())

    response = forward(edge.vault, service, shop.id, template(token, destination="text"))

    assert response.status_code == 200, response.text
    assert response.json()["body"] == f"declined: card {masked(LEAKY_PAN)} is blocked"
    assert LEAKY_PAN not in response.text


def test_a_card_number_in_a_returned_header_is_masked_too(
    edge: Edge, shop: VaultMerchant, service: str
) -> None:
    """The issue: the destination's answer comes back "with any PAN in it masked"."""
    token = tokenize(edge.vault, shop, random_pan())

    response = forward(edge.vault, service, shop.id, template(token, destination="leaky_header"))

    assert response.status_code == 200, response.text
    assert set(response.json()["headers"]) <= RETURNED_HEADERS
    assert LEAKY_PAN not in response.text
