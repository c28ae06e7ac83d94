"""What the vault's token and caller tests share: credentials as headers, tokenizing a card,
checking an error body, and the test cards."""

from __future__ import annotations

import datetime
from typing import Any

import httpx

from tests.conftest import VaultMerchant
from tests.support.processes import ServiceProcess

ERROR_KEYS = {"type", "code", "message", "request_id"}

#: Every test card the vault must recognise: (number, brand, CVC of the right length).
TEST_CARDS: tuple[tuple[str, str, str], ...] = (
    ("4242424242424242", "visa", "123"),
    ("5555555555554444", "mastercard", "456"),
    ("2223003122003222", "mastercard", "789"),
    ("378282246310005", "amex", "4321"),
    ("6011111111111117", "discover", "321"),
    ("3566002020360505", "jcb", "654"),
)


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


def acting_for(service_token: str, merchant: VaultMerchant) -> dict[str, str]:
    """The payment API's headers when it acts for `merchant`."""
    return {**bearer(service_token), "tessera-merchant": merchant.id}


def far_year() -> int:
    return datetime.datetime.now(datetime.UTC).year + 5


def card(number: str = "4242424242424242", **fields: Any) -> dict[str, Any]:
    """A tokenization body: a valid, unexpired card unless `fields` say otherwise."""
    return {"number": number, "exp_month": 12, "exp_year": far_year(), **fields}


def tokenize(
    vault: ServiceProcess,
    merchant: VaultMerchant,
    number: str = "4242424242424242",
    client: httpx.Client | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """POST /v1/tokens with the merchant's publishable key; the 201 body."""
    post = client.post if client is not None else httpx.post
    response = post(
        vault.url + "/v1/tokens",
        json=card(number, **fields),
        headers=bearer(merchant.publishable_key),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(
    response: httpx.Response, status: int, type_: str, code: str, param: str | None = None
) -> dict[str, Any]:
    """The response is the vault's JSON error body with this status, type, code (and param)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error.keys() >= ERROR_KEYS
    assert (error["type"], error["code"]) == (type_, code), error
    assert error["request_id"] == response.headers["request-id"]
    if param is not None:
        assert error.get("param") == param, error
    assert "Traceback" not in response.text
    return error


def luhn_complete(prefix: str) -> str:
    """`prefix` followed by the check digit that makes it Luhn-valid."""
    total = 0
    for index, char in enumerate(reversed(prefix)):
        value = int(char)
        if index % 2 == 0:  # these positions are doubled once the check digit is appended
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return prefix + str((10 - total % 10) % 10)
