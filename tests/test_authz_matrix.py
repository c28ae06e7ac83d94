"""Issue 9, campaign 8: the authorization matrix, docs/authz_matrix.yaml, walked cell by cell.

Every route both services register, times every kind of caller (no credential, an invalid one,
another merchant's secret key, a publishable key, another merchant's, the vault's service and
admin credentials, the merchant's own secret key), against real processes. Each cell must get
exactly its status, with the error object for a refusal; a refused call must change nothing of
the merchant's; no answer to another merchant shows the merchant's ids; no answer but the
break-glass one carries the card number. A second test fails on a registered route without a
row (or a row without a route), so a new route cannot go unlisted.

The API's rows run against the session's API and vault, for two merchants of this module's own
(their payments and webhook endpoints are nobody else's). The vault's rows run against a vault
of this module's own (database, keyring, a high break-glass limit): they rotate the KEK, which
the session's vault must not see.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from api.app import create_app as create_api
from api.services.notifications import signing_string
from api.settings import ApiSettings
from core.ids import new_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.pci import authz
from tessera.runtime.migrations import migrate
from tessera.runtime.settings import load_settings
from tests.conftest import (
    PG_ADMIN_URL,
    ApiMerchant,
    VaultMerchant,
    create_merchant,
    dsn,
    register_vault_merchant,
    start_service,
)
from tests.support import payments
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import bearer, card
from vault.app import create_app as create_vault
from vault.settings import VaultSettings

ROOT = Path(__file__).resolve().parents[1]
MATRIX: dict[str, Any] = authz.load_matrix(ROOT)
COLUMNS: list[str] = MATRIX["columns"]
CARD = "4242424242424242"
ORIGIN = "https://matrix.example"
#: Callers whose 2xx may change the merchant's objects; the others' never may.
RIGHTFUL = {"owner", "publishable", "service", "admin"}
#: Routes no Litestar handler serves: the vault answers CORS preflights before routing.
BEFORE_ROUTING = {("vault", "OPTIONS /v1/tokens")}
#: Statuses seen per service and expectation, printed at the end of the module.
TALLY: Counter[str] = Counter()


def cells() -> list[tuple[str, str, str, int]]:
    """The matrix read as the assessor's kit reads it (tessera.pci.authz)."""
    return [(c.service, c.row, c.caller, c.status) for c in authz.cells(MATRIX)]


route_of = authz.route_of


@dataclass
class Call:
    """One prepared request; `state` reads what of the merchant's the request could change
    (compared before and after it), `private_ids` what no other caller may see."""

    method: str
    path: str
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    state: Callable[[], object] | None = None
    private_ids: tuple[str, ...] = ()


@dataclass
class World:
    api: ServiceProcess
    session_vault: ServiceProcess
    vault: ServiceProcess  # this module's own
    vault_db: ServiceDatabase
    keyring: Path
    owner: ApiMerchant
    other: ApiMerchant
    shop: VaultMerchant  # the vault's merchant (publishable)
    rival: VaultMerchant  # another (other_publishable)
    tokens: dict[str, str]
    echo: EchoServer
    psp_b_key: bytes
    #: One client (one connection pool) for the module's thousand-odd requests.
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))
    shared: dict[str, Call] = field(default_factory=dict)
    owned: dict[str, str] = field(default_factory=dict)
    #: The PSP A simulator the vault's `psp_a` destination names (its account updater).
    psp_a_url: str = ""

    def url(self, service: str) -> str:
        return (self.api if service == "api" else self.vault).url

    def credentials(self, service: str, caller: str) -> list[dict[str, str]]:
        """Each caller kind as request headers; `invalid` has one entry per variant."""
        if caller == "none":
            return [{}]
        if caller == "invalid":
            return authz.invalid_credentials()
        vault_side = service == "vault"
        credential = {
            "other_secret": self.other.secret_key,
            "publishable": self.shop.publishable_key if vault_side else self.owner.publishable_key,
            "other_publishable": (
                self.rival.publishable_key if vault_side else self.other.publishable_key
            ),
            "service": self.tokens["service"],
            "admin": self.tokens["admin"],
            "owner": self.owner.secret_key,
        }[caller]
        return [bearer(credential)]

    # --- the API's objects, each made as its merchant makes them ---------------------------

    def payment(self, capture: bool = True) -> dict[str, Any]:
        response = payments.pay(self.api, self.session_vault, self.owner, capture=capture)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def payment_method(self) -> str:
        """A stored credential: the id an approved setup payment names."""
        token = payments.tokenize(self.session_vault, self.owner)
        body = {"amount": 1250, "currency": "EUR", "token": token}
        response = payments.post(
            self.api, self.owner, "/v1/payments", {**body, "setup_future_usage": "off_session"}
        )
        assert response.status_code == 201, response.text
        method: str = response.json()["payment_method"]
        return method

    def read(self, path: str) -> dict[str, Any]:
        response = self.http.get(self.api.url + path, headers=self.owner.auth)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def endpoint(self) -> str:
        body = {"url": "http://127.0.0.1:9/matrix", "events": ["*"]}
        response = self.http.post(
            self.api.url + "/v1/webhook_endpoints", json=body, headers=self.owner.auth
        )
        assert response.status_code == 201, response.text
        endpoint_id: str = response.json()["id"]
        return endpoint_id

    def endpoint_ids(self) -> set[str]:
        return {e["id"] for e in self.read("/v1/webhook_endpoints")["data"]}

    def latest_payment(self, merchant: ApiMerchant) -> str | None:
        page = self.http.get(self.api.url + "/v1/payments?limit=1", headers=merchant.auth).json()
        return page["data"][0]["id"] if page["data"] else None

    def notification(self, signed: bool) -> bytes:
        item: dict[str, Any] = {
            "pspReference": f"matrix{secrets.token_hex(8)}",
            "merchantReference": "matrix",
            "eventCode": "AUTHORISATION",
            "success": "true",
            "amount": {"value": 100, "currency": "EUR"},
        }
        digest = hmac.new(self.psp_b_key, signing_string(item).encode(), hashlib.sha256).digest()
        signature = base64.b64encode(digest).decode() if signed else "bm90IGEgc2lnbmF0dXJl"
        item["additionalData"] = {"hmacSignature": signature}
        return json.dumps({"notificationItems": [{"NotificationRequestItem": item}]}).encode()

    # --- the vault's ------------------------------------------------------------------------

    def token(self) -> str:
        response = self.http.post(
            self.vault.url + "/v1/tokens",
            json=card(CARD, cvc="123"),
            headers=bearer(self.shop.publishable_key),
        )
        assert response.status_code == 201, response.text
        token_id: str = response.json()["id"]
        return token_id

    def token_is_live(self, token_id: str) -> bool:
        response = self.http.get(
            f"{self.vault.url}/v1/tokens/{token_id}",
            headers={**bearer(self.tokens["service"]), "tessera-merchant": self.shop.id},
        )
        return response.status_code == 200

    def shop_tokens(self) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(dsn(self.vault_db.owner, self.vault_db.database))
            try:
                found: int = await conn.fetchval(
                    "SELECT count(*) FROM tokens WHERE merchant_id = $1", self.shop.id
                )
                return found
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:  # not on the session's event loop
            return pool.submit(asyncio.run, count()).result()

    def primary_kek(self) -> str:
        version: str = json.loads(self.keyring.read_text())["primary"]
        return version


# --- what each row sends: fresh objects for a call that may change them ------------------------

Prepare = Callable[[World], Call]


def _key() -> dict[str, str]:
    return {"idempotency-key": payments.new_key()}


def create_payment(w: World) -> Call:
    token = payments.tokenize(w.session_vault, w.owner)
    return Call(
        "POST",
        "/v1/payments",
        {"amount": 1250, "currency": "EUR", "token": token},
        headers=_key(),
        state=lambda: (w.latest_payment(w.owner), w.latest_payment(w.other)),
    )


def on_payment(operation: str, capture: bool, body: Any) -> Prepare:
    def prepare(w: World) -> Call:
        payment = w.payment(capture=capture)

        def amounts() -> object:
            now = w.read(f"/v1/payments/{payment['id']}")
            return now["status"], now["amount_captured"], now["amount_refunded"]

        return Call(
            "POST",
            f"/v1/payments/{payment['id']}/{operation}",
            body,
            headers=_key(),
            state=amounts,
        )

    return prepare


def detach_payment_method(w: World) -> Call:
    method = w.payment_method()
    return Call(
        "POST",
        f"/v1/payment_methods/{method}/detach",
        headers=_key(),
        state=lambda: w.read(f"/v1/payment_methods/{method}")["detached_at"],
    )


def reading(template: str, *names: str) -> Prepare:
    """A read of the merchant's own objects (`names` fill the template, in order)."""

    def prepare(w: World) -> Call:
        path = template.format(*(w.owned[name] for name in names))
        return Call("GET", path, private_ids=tuple(w.owned.values()))

    return prepare


def create_endpoint(w: World) -> Call:
    body = {"url": "http://127.0.0.1:9/matrix", "events": ["payment.captured"]}
    return Call(
        "POST",
        "/v1/webhook_endpoints",
        body,
        state=w.endpoint_ids,
        private_ids=tuple(w.owned.values()),
    )


def delete_endpoint(w: World) -> Call:
    endpoint = w.endpoint()
    return Call(
        "DELETE",
        f"/v1/webhook_endpoints/{endpoint}",
        state=lambda: endpoint in w.endpoint_ids(),
    )


def roll_secret(w: World) -> Call:
    return Call("POST", f"/v1/webhook_endpoints/{w.endpoint()}/roll_secret", {})


def notification(signed: bool) -> Prepare:
    def prepare(w: World) -> Call:
        return Call("POST", "/v1/notifications/psp_b", w.notification(signed))

    return prepare


def read_token(w: World) -> Call:
    return Call("GET", f"/v1/tokens/{w.owned['token']}", headers={"tessera-merchant": w.shop.id})


def create_token(w: World) -> Call:
    return Call("POST", "/v1/tokens", card(CARD), state=w.shop_tokens)


def delete_token(w: World) -> Call:
    token_id = w.token()
    return Call(
        "DELETE",
        f"/v1/tokens/{token_id}",
        headers={"tessera-merchant": w.shop.id},
        state=lambda: w.token_is_live(token_id),
    )


def forward(w: World) -> Call:
    body = {
        "destination": "echo",
        "path": "/v1/authorizations",
        "token": w.token(),
        "body": {"pan": "{{card.number}}", "cvc": "{{card.cvc}}"},
    }
    return Call(
        "POST",
        "/v1/forward",
        body,
        headers={"tessera-merchant": w.shop.id},
        state=lambda: len(w.echo.received),
    )


def card_update(w: World) -> Call:
    """A fresh token and a new expiry announced for its card at PSP A: only the service's call
    fetches it and changes the token's expiry."""
    token_id = w.token()
    announced = w.http.post(
        w.psp_a_url + "/admin/account_updates",
        json={"number": CARD, "new_exp_month": 7, "new_exp_year": 2040},
    )
    assert announced.status_code == 201, announced.text
    update = announced.json()["id"]
    body = {
        "destination": "psp_a",
        "update": update,
        "path": "/v1/account_updates/card",
        "body": {"update": update, "number": "{{card.number}}"},
        "headers": {"authorization": "Bearer psp_a_test_key"},
    }

    def expiry() -> Any:
        response = w.http.get(
            f"{w.vault.url}/v1/tokens/{token_id}",
            headers={**bearer(w.tokens["service"]), "tessera-merchant": w.shop.id},
        )
        return response.json()["card"]["exp_year"]

    return Call(
        "POST",
        f"/v1/tokens/{token_id}/card_updates",
        body,
        headers={"tessera-merchant": w.shop.id},
        state=expiry,
    )


def detokenize(w: World) -> Call:
    return Call("POST", "/v1/detokenize", {"token": w.token(), "reason": "authorization matrix"})


def lookup_fingerprints(w: World) -> Call:
    return Call("POST", "/v1/fingerprints/lookup", {"numbers": [CARD]})


def register_merchant(w: World) -> Call:
    key = f"pk_test_{secrets.token_hex(24)}"
    body = {"id": new_id("mer"), "publishable_key": key, "allowed_origins": []}

    def registered() -> bool:
        probe = w.http.post(w.vault.url + "/v1/tokens", json=card(CARD), headers=bearer(key))
        return probe.status_code == 201

    return Call("POST", "/v1/merchants", body, state=registered)


def rotate(w: World) -> Call:
    return Call("POST", "/v1/keys/rotate", state=w.primary_kek)


def preflight(w: World) -> Call:
    return Call("OPTIONS", "/v1/tokens", headers={"origin": ORIGIN})


def card_fields(w: World) -> Call:
    params = {"key": w.shop.publishable_key, "origin": ORIGIN}
    return Call("GET", "/elements/v1/card.html", params=params)


def fixed(method: str, path: str) -> Prepare:
    def prepare(w: World) -> Call:
        return Call(method, path)

    return prepare


PREPARE: dict[tuple[str, str], Prepare] = {
    ("api", "GET /schema/{path}"): fixed("GET", "/schema/nothing-here"),
    ("api", "POST /v1/payments"): create_payment,
    ("api", "GET /v1/payments"): reading("/v1/payments"),
    ("api", "GET /v1/payments/{payment}"): reading("/v1/payments/{}", "payment"),
    ("api", "POST /v1/payments/{payment}/capture"): on_payment("capture", False, None),
    ("api", "POST /v1/payments/{payment}/cancel"): on_payment("cancel", False, None),
    ("api", "POST /v1/payments/{payment}/refunds"): on_payment("refunds", True, {"amount": 50}),
    ("api", "POST /v1/payments/{payment}/retry"): on_payment("retry", True, None),
    ("api", "GET /v1/refunds/{refund}"): reading("/v1/refunds/{}", "refund"),
    ("api", "GET /v1/payment_methods"): reading("/v1/payment_methods"),
    ("api", "GET /v1/payment_methods/{payment_method}"): reading(
        "/v1/payment_methods/{}", "payment_method"
    ),
    ("api", "POST /v1/payment_methods/{payment_method}/detach"): detach_payment_method,
    ("api", "GET /v1/events"): reading("/v1/events"),
    ("api", "GET /v1/events/{event}"): reading("/v1/events/{}", "event"),
    ("api", "GET /v1/events/{event}/deliveries"): reading("/v1/events/{}/deliveries", "event"),
    ("api", "POST /v1/webhook_endpoints"): create_endpoint,
    ("api", "GET /v1/webhook_endpoints"): reading("/v1/webhook_endpoints"),
    ("api", "GET /v1/webhook_endpoints/{endpoint}"): reading(
        "/v1/webhook_endpoints/{}", "endpoint"
    ),
    ("api", "DELETE /v1/webhook_endpoints/{endpoint}"): delete_endpoint,
    ("api", "POST /v1/webhook_endpoints/{endpoint}/roll_secret"): roll_secret,
    ("api", "GET /v1/balance"): reading("/v1/balance"),
    ("api", "POST /v1/notifications/psp_b"): notification(signed=True),
    ("api", "POST /v1/notifications/psp_b (unsigned)"): notification(signed=False),
    ("vault", "GET /schema/{path}"): fixed("GET", "/schema/nothing-here"),
    ("vault", "GET /elements/v1/{name}"): fixed("GET", "/elements/v1/tessera.js"),
    ("vault", "GET /elements/v1/card.html"): card_fields,
    ("vault", "OPTIONS /v1/tokens"): preflight,
    ("vault", "POST /v1/tokens"): create_token,
    ("vault", "GET /v1/tokens/{token_id}"): read_token,
    ("vault", "DELETE /v1/tokens/{token_id}"): delete_token,
    ("vault", "POST /v1/forward"): forward,
    ("vault", "POST /v1/tokens/{token_id}/card_updates"): card_update,
    ("vault", "POST /v1/detokenize"): detokenize,
    ("vault", "POST /v1/merchants"): register_merchant,
    ("vault", "POST /v1/fingerprints/lookup"): lookup_fingerprints,
    ("vault", "POST /v1/keys/rotate"): rotate,
}


def prepare_for(service: str, row: str) -> Prepare:
    """The row's own preparation, or a plain request for a route without parameters."""
    if (service, row) in PREPARE:
        return PREPARE[(service, row)]
    method, path = row.split(" ", 1)
    assert "{" not in path, f"{service} {row}: a route with parameters needs a PREPARE entry"
    return fixed(method, path)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def private_vault_db() -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_authz_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(scope="module")
def world(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    vault_env: dict[str, str],
    tokens: dict[str, str],
    psp_echo: EchoServer,
    psp_a: ServiceProcess,
    private_vault_db: ServiceDatabase,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[World]:
    from vault.kms.local import LocalKms

    directory = tmp_path_factory.mktemp("authz")
    keyring = directory / "keyring.json"
    LocalKms.create_keyring(keyring)
    env = {
        **vault_env,
        "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring),
        "TESSERA_VAULT_DATABASE_URL": dsn(private_vault_db.runtime, private_vault_db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(private_vault_db.owner, private_vault_db.database),
        "TESSERA_VAULT_DETOKENIZE_PER_MINUTE": "1000",
    }
    own_vault = start_service("vault", env, directory)
    owner = create_merchant(api_env, vault, tokens["admin"], "Matrix owner")
    other = create_merchant(api_env, vault, tokens["admin"], "Matrix other")
    psp_b_key = bytes.fromhex(load_settings(ApiSettings, api_env).psp_b_hmac_key)
    w = World(
        api,
        vault,
        own_vault,
        private_vault_db,
        keyring,
        owner,
        other,
        register_vault_merchant(own_vault, tokens["admin"], (ORIGIN,)),
        register_vault_merchant(own_vault, tokens["admin"], ("https://rival.example",)),
        tokens,
        psp_echo,
        psp_b_key,
        psp_a_url=psp_a.url,
    )
    try:
        payment = w.payment()
        refund = payments.post(api, owner, f"/v1/payments/{payment['id']}/refunds", {"amount": 1})
        assert refund.status_code == 201, refund.text
        event = w.read(f"/v1/events?limit=1&object={payment['id']}")["data"][0]
        w.owned.update(
            payment=payment["id"],
            refund=refund.json()["id"],
            event=event["id"],
            endpoint=w.endpoint(),
            token=w.token(),
            payment_method=w.payment_method(),
        )
        yield w
    finally:
        psp_echo.reset()
        for merchant in (owner, other):  # their endpoints (port 9) would be retried for days
            for endpoint in httpx.get(
                api.url + "/v1/webhook_endpoints", headers=merchant.auth
            ).json()["data"]:
                httpx.delete(
                    f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=merchant.auth
                )
        own_vault.stop()
        w.http.close()
        print_tally(request)


def print_tally(request: pytest.FixtureRequest) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or capture is None or not TALLY:
        return
    rows = {service: len(MATRIX[service]) for service in ("api", "vault")}
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_sep(
            "-",
            f"authorization matrix: {rows['api']} API rows, {rows['vault']} vault rows x "
            f"{len(COLUMNS)} callers = {len(cells())} cells, {TALLY['requests']} requests",
        )
        for key, count in sorted(TALLY.items()):
            if key != "requests":
                reporter.write_line(f"{count:6d}  {key}")


# --- the tests --------------------------------------------------------------------------------


#: The error each refusal must be: type, and the codes it may carry.
REFUSALS = {
    401: ("authentication_error", {"invalid_credentials", "signature_invalid"}),
    403: ("permission_error", {"forbidden"}),
}


def check_refusal(response: httpx.Response, expected: int) -> None:
    if expected not in REFUSALS or response.request.method == "OPTIONS":
        return  # (the CORS preflight refuses with an empty body)
    error = response.json()["error"]
    assert error["request_id"] == response.headers["request-id"]
    kind, codes = REFUSALS[expected]
    assert error["type"] == kind, error
    assert error["code"] in codes, error


@pytest.mark.parametrize(
    ("service", "row", "caller", "expected"),
    cells(),
    ids=[f"{s} {r} <- {c}" for s, r, c, _ in cells()],
)
def test_each_caller_gets_exactly_the_status_the_matrix_says(
    world: World, service: str, row: str, caller: str, expected: int
) -> None:
    allowed = 200 <= expected < 300
    may_change = allowed and caller in RIGHTFUL
    prepare = prepare_for(service, row)
    for headers in world.credentials(service, caller):
        # A call that may change something gets objects of its own; refusals share them.
        if may_change:
            call = prepare(world)
        else:
            call = world.shared.get(f"{service} {row}") or prepare(world)
            world.shared[f"{service} {row}"] = call
        body = call.body if isinstance(call.body, bytes) else None
        before = call.state() if call.state is not None else None
        response = world.http.request(
            call.method,
            world.url(service) + call.path,
            json=None if body is not None else call.body,
            content=body,
            params=call.params,
            headers={**headers, **call.headers},
        )
        TALLY["requests"] += 1
        TALLY[f"{service} {response.status_code} {'allowed' if allowed else 'refused'}"] += 1
        assert response.status_code == expected, response.text[:500]
        check_refusal(response, expected)
        if call.state is not None:
            changed = call.state() != before
            assert changed == may_change, "a refused call changed the merchant's data"
        if allowed and caller not in RIGHTFUL:
            for private in call.private_ids:
                assert private not in response.text, f"another caller saw {private}"
        if not (row == "POST /v1/detokenize" and allowed):
            assert CARD not in response.text


def registered_routes(service: str, app: Litestar) -> set[tuple[str, str]]:
    return {
        (service, f"{method} {route.path_format}")
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        if handler.handler_name != "options_handler"  # Litestar's own, for every route
        for method in handler.http_methods
    }


def test_the_matrix_lists_every_route_the_services_register_and_nothing_else() -> None:
    secret = "matrix-coverage-" + "x" * 32  # pragma: allowlist secret
    apps = {
        "api": create_api(load_settings(ApiSettings, {"TESSERA_API_VAULT_SERVICE_TOKEN": secret})),
        "vault": create_vault(
            load_settings(
                VaultSettings,
                {"TESSERA_VAULT_SERVICE_TOKEN": secret, "TESSERA_VAULT_ADMIN_TOKEN": secret + "!"},
            )
        ),
    }
    registered = set().union(*(registered_routes(name, app) for name, app in apps.items()))
    listed = {(service, route_of(row)) for service, row, _caller, _status in cells()}
    assert registered - listed == set(), "registered routes without a row in the matrix"
    assert listed - registered == BEFORE_ROUTING, "rows for routes nobody serves"
    for service in ("api", "vault"):
        for row, statuses in MATRIX[service].items():
            assert len(statuses) == len(COLUMNS), row
            prepare_for(service, row)  # a route with parameters has its preparation
