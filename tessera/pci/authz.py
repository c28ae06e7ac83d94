"""docs/authz_matrix.yaml, read once for everyone, and walked live by the assessor's kit.

The matrix's header says what it is: every route of both services, every kind of caller, the
status each gets. tests/test_authz_matrix.py walks every cell with objects of its own; the kit
(control `least-privilege`) walks what it can without changing anything and holding only the
vault's admin credential: the columns `none`, `invalid` and `admin`.

How the kit stays read-only:

- Path parameters are well-formed ids that do not exist (`pay_…`, `tok_…`, fresh each run).
- A non-GET request always carries a body the route refuses after authorization (`{}`), so
  even a route whose authorization were broken could create nothing. Where the matrix expects
  2xx for such a cell (the administrator's `POST /v1/detokenize`, `POST /v1/merchants`), a
  400 or 422 therefore means "authorization passed" and counts as the expected status.
- Cells no request can prove without acting are listed as not walked, with why: the
  administrator's `POST /v1/keys/rotate` and `/rewrap` (they take no body: an authorized call
  rotates), and PSP B's signed notifications (their credential is an HMAC with PSP B's key,
  which the kit does not hold; their unsigned twin is walked).
- The administrator's `GET` routes are real reads, audited by the vault as any administrator's
  access is (`keys.inventory`), except `GET /v1/audit/verify`: the vault publishes its outcome
  (a metric the alerts read), so the kit verifies the chains itself instead, read-only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from core.ids import new_id

MATRIX_FILE = Path("docs") / "authz_matrix.yaml"
#: The columns the kit can walk: it holds no merchant's keys, only the administrator's.
KIT_COLUMNS = ("none", "invalid", "admin")
#: Path parameters, filled with well-formed ids nobody has (fresh for each walk).
ID_PREFIXES = {
    "payment": "pay",
    "refund": "re",
    "event": "evt",
    "endpoint": "we",
    "token_id": "tok",
    "payment_method": "pm",
}
#: Path parameters that name a file or document, not an object.
FIXED_PARAMETERS = {"path": "nothing-here", "name": "tessera.js"}
#: Cells the kit does not walk, and why (service, row, caller; "*" for every caller).
NOT_WALKED: dict[tuple[str, str, str], str] = {
    ("api", "POST /v1/notifications/psp_b", "*"): (
        "its credential is an HMAC with PSP B's key, which the kit does not hold "
        "(the unsigned row is walked)"
    ),
    ("vault", "GET /v1/audit/verify", "admin"): (
        "an authorized call verifies the chains and the vault publishes the outcome (its "
        "metric, an audit record): the kit verifies them itself, read-only (control audit-log)"
    ),
    ("vault", "POST /v1/keys/rotate", "admin"): (
        "the route takes no body: an authorized call would rotate the KEK"
    ),
    ("vault", "POST /v1/keys/rewrap", "admin"): (
        "the route takes no body: an authorized call would rewrap the data keys"
    ),
}
#: With 2xx expected on a non-GET route, the kit's refused body answers one of these.
REFUSED_BODY = frozenset({400, 422})
_PARAMETER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Cell:
    service: str
    row: str
    caller: str
    status: int

    @property
    def route(self) -> str:
        return route_of(self.row)

    @property
    def method(self) -> str:
        return self.route.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.route.split(" ", 1)[1]


def route_of(row: str) -> str:
    """`POST /v1/notifications/psp_b (unsigned)` is the route `POST /v1/notifications/psp_b`."""
    return row.split(" (")[0]


def load_matrix(root: Path) -> dict[str, Any]:
    matrix: dict[str, Any] = yaml.safe_load((root / MATRIX_FILE).read_text())
    return matrix


def cells(matrix: Mapping[str, Any]) -> list[Cell]:
    """Every (service, row, caller) of the matrix with the status it must get."""
    columns: list[str] = matrix["columns"]
    return [
        Cell(service, row, caller, int(status))
        for service in ("api", "vault")
        for row, statuses in matrix[service].items()
        for caller, status in zip(columns, statuses, strict=True)
    ]


def invalid_credentials() -> list[dict[str, str]]:
    """The `invalid` column's variants: credentials nobody was given (each must get the
    status): a random `sk_…` key, a random bearer token, an unregistered `pk_…` key, and a mesh
    identity header the vault does not trust."""
    identity = "spiffe://cluster.local/ns/tessera-app/sa/tessera-api"
    return [
        {"authorization": f"Bearer sk_test_{secrets.token_hex(24)}"},
        {"authorization": f"Bearer {secrets.token_urlsafe(32)}"},
        {"authorization": f"Bearer pk_test_{secrets.token_hex(24)}"},
        {"x-forwarded-client-cert": f"By=spiffe://x/vault;Hash=ab;URI={identity}"},
    ]


def not_walked(cell: Cell) -> str | None:
    for caller in (cell.caller, "*"):
        reason = NOT_WALKED.get((cell.service, cell.row, caller))
        if reason:
            return reason
    return None


def fill_path(path: str) -> str:
    """The route's path with each parameter a well-formed id that names nothing."""

    def fill(found: re.Match[str]) -> str:
        name = found.group(1)
        if name in FIXED_PARAMETERS:
            return FIXED_PARAMETERS[name]
        if name not in ID_PREFIXES:
            raise ValueError(f"no harmless value known for the path parameter {{{name}}}")
        return new_id(ID_PREFIXES[name])

    return _PARAMETER.sub(fill, path)


def matches(cell: Cell, observed: int) -> bool:
    """Whether `observed` is the matrix's status for the cell, as the kit's requests get it."""
    if observed == cell.status:
        return True
    refused_after_authorization = cell.method not in ("GET", "OPTIONS") and observed in REFUSED_BODY
    return 200 <= cell.status < 300 and refused_after_authorization


@dataclass
class Targets:
    """Where each service's routes are asked, and what a few routes need to be asked at all."""

    api_url: str
    #: The vault's listener URLs by name (`public`, `service`, `admin`).
    vault_urls: dict[str, str]
    admin_token: str
    #: A merchant's publishable key and registered origin (the card fields, the preflight);
    #: empty: those cells are not walked.
    publishable_key: str = ""
    checkout_origin: str = ""
    #: The vault route's listeners (`vault.listeners.listeners_of`), when they differ by port.
    vault_listeners: dict[str, frozenset[str]] = field(default_factory=dict)

    def url(self, cell: Cell) -> str:
        """The API's URL, or the vault listener that serves the route (a route outside the
        vault's router, the CORS preflight, is answered on the public one)."""
        if cell.service == "api":
            return self.api_url
        served = self.vault_listeners.get(cell.route, frozenset({"public"}))
        listener = next(name for name in ("public", "service", "admin") if name in served)
        return self.vault_urls[listener]


def vault_route_listeners() -> dict[str, frozenset[str]]:
    """Each vault route's listeners, from the vault's own app (built with throwaway settings,
    never served): used when the vault's listeners are on different ports."""
    from litestar.routes import HTTPRoute

    from tessera.runtime.settings import load_settings
    from vault.app import create_app
    from vault.listeners import listeners_of
    from vault.settings import VaultSettings

    throwaway = secrets.token_urlsafe(32)
    app = create_app(
        load_settings(
            VaultSettings,
            {
                "TESSERA_VAULT_SERVICE_TOKEN": throwaway,
                "TESSERA_VAULT_ADMIN_TOKEN": throwaway + "-admin",
            },
        )
    )
    routes: dict[str, frozenset[str]] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.handler_name == "options_handler":
                continue  # Litestar's own; the vault answers preflights before routing
            for method in handler.http_methods:
                routes[f"{method} {route.path_format}"] = frozenset(
                    listeners_of(handler, route.path_format)
                )
    return routes


@dataclass(frozen=True)
class Request:
    cell: Cell
    method: str
    url: str
    headers: dict[str, str]
    params: dict[str, str]
    body: bytes | None


def _unsigned_notification() -> bytes:
    item = {
        "pspReference": f"pcikit{secrets.token_hex(8)}",
        "merchantReference": "pci-kit",
        "eventCode": "AUTHORISATION",
        "success": "true",
        "amount": {"value": 100, "currency": "EUR"},
        "additionalData": {"hmacSignature": "bm90IGEgc2lnbmF0dXJl"},
    }
    return json.dumps({"notificationItems": [{"NotificationRequestItem": item}]}).encode()


def public(matrix: Mapping[str, Any], service: str) -> frozenset[str]:
    """Rows every caller gets the same 2xx for (probes, documents, the card fields' files)."""
    return frozenset(
        row
        for row, statuses in matrix[service].items()
        if len(set(statuses)) == 1 and 200 <= int(statuses[0]) < 300
    )


def requests_for(
    cell: Cell, targets: Targets, public_rows: frozenset[str] = frozenset()
) -> list[Request] | str:
    """The requests that walk one cell, or why it is not walked."""
    reason = not_walked(cell)
    if reason:
        return reason
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    body: bytes | None = None
    if cell.method not in ("GET", "OPTIONS", "HEAD"):
        body = _unsigned_notification() if cell.row.endswith("(unsigned)") else b"{}"
        headers["content-type"] = "application/json"
    if cell.route == "OPTIONS /v1/tokens":
        if not targets.checkout_origin:
            return "no registered origin configured (TESSERA_PCI_CHECKOUT_ORIGIN)"
        headers |= {"origin": targets.checkout_origin, "access-control-request-method": "POST"}
    if cell.route == "GET /elements/v1/card.html":
        if not (targets.publishable_key and targets.checkout_origin):
            return "no merchant key and origin configured (TESSERA_PCI_PUBLISHABLE_KEY, _ORIGIN)"
        params = {"key": targets.publishable_key, "origin": targets.checkout_origin}
    url = targets.url(cell) + fill_path(cell.path)
    if cell.caller == "none":
        variants: list[dict[str, str]] = [{}]
    elif cell.caller == "invalid":
        # A public route answers every credential alike: one variant shows it.
        variants = invalid_credentials()[:1] if cell.row in public_rows else invalid_credentials()
    elif cell.caller == "admin":
        variants = [{"authorization": f"Bearer {targets.admin_token}"}]
    else:
        return f"the kit holds no {cell.caller} credential"
    return [Request(cell, cell.method, url, headers | v, params, body) for v in variants]


@dataclass
class Walk:
    cells: int = 0
    requests: int = 0
    matched: int = 0
    passed_by_refused_body: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    not_walked: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells_walked": self.cells,
            "requests": self.requests,
            "requests_matching": self.matched,
            "authorization_passed_body_refused": self.passed_by_refused_body,
            "mismatches": self.mismatches,
            "not_walked": self.not_walked,
        }


async def walk(
    http: httpx.AsyncClient,
    matrix: Mapping[str, Any],
    targets: Targets,
    *,
    columns: Iterable[str] = KIT_COLUMNS,
    concurrency: int = 8,
) -> Walk:
    """Send every request of every walkable cell; tally what matched the matrix."""
    wanted = set(columns)
    result = Walk()
    planned: list[Request] = []
    public_rows = {service: public(matrix, service) for service in ("api", "vault")}
    for cell in cells(matrix):
        if cell.caller not in wanted:
            continue
        prepared = requests_for(cell, targets, public_rows[cell.service])
        if isinstance(prepared, str):
            result.not_walked.append(
                {"service": cell.service, "row": cell.row, "caller": cell.caller, "why": prepared}
            )
            continue
        result.cells += 1
        planned += prepared
    gate = asyncio.Semaphore(concurrency)

    async def send(request: Request) -> tuple[Request, httpx.Response]:
        async with gate:
            response = await http.request(
                request.method,
                request.url,
                headers=request.headers,
                params=request.params,
                content=request.body,
            )
            return request, response

    for request, response in await asyncio.gather(*(send(r) for r in planned)):
        result.requests += 1
        cell = request.cell
        if matches(cell, response.status_code):
            result.matched += 1
            if response.status_code != cell.status:
                result.passed_by_refused_body += 1
            continue
        result.mismatches.append(
            {
                "service": cell.service,
                "row": cell.row,
                "caller": cell.caller,
                "credential": _credential_kind(request.headers, targets.admin_token),
                "expected": cell.status,
                "got": response.status_code,
                "answer": response.text[:200],
            }
        )
    return result


def _credential_kind(headers: Mapping[str, str], admin_token: str) -> str:
    """What was sent, without the secret itself."""
    value = headers.get("authorization", "")
    if admin_token and hmac.compare_digest(value.encode(), f"Bearer {admin_token}".encode()):
        return "the admin credential"
    if value.startswith("Bearer sk_"):
        return "an unknown sk_ key"
    if value.startswith("Bearer pk_"):
        return "an unknown pk_ key"
    if "x-forwarded-client-cert" in headers:
        return "an untrusted mesh identity"
    return "a bearer token" if value else "none"
