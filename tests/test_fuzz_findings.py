"""What Schemathesis found (tests/test_fuzz_schemathesis.py, `make fuzz`), one request each,
pinned: each was a 500, a wrong `Allow` header or a write that failed half-way, and is now a
precise answer. Each test failed before its fix."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ApiMerchant
from tests.support.processes import ServiceProcess

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
