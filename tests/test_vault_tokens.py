"""The vault's tokens, through the real vault process: tokenization and its errors, origins and
CORS, metadata reads, crypto-shredding, fingerprints, random token ids, the CVC's single use and
expiry, and no card data in the database, in Redis, in an error body or in a log line."""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis

from core.ids import new_id
from tessera.dbsetup import ServiceDatabase
from tests.conftest import VaultMerchant, dsn, start_service
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import (
    TEST_CARDS,
    acting_for,
    assert_error,
    bearer,
    card,
    far_year,
    luhn_complete,
    tokenize,
)

TODAY = datetime.datetime.now(datetime.UTC).date()  # the vault judges expiry in UTC
TOKEN_ID = re.compile(r"tok_[0-9a-z]{26}")
FINGERPRINT = re.compile(r"[0-9a-f]{32,64}")
MISSING = object()
AMEX = "378282246310005"

#: Card numbers that pass the Luhn check but are refused (wrong length for their brand).
LUHN_VALID_REFUSED = (
    luhn_complete("42424242424242"),  # visa, 15 digits
    luhn_complete("378282246310005"),  # amex, 16 digits
    luhn_complete("5555555555554444"),  # mastercard, 17 digits
)
#: Every card number this module sends; none may ever come back or reach the vault's log.
PANS_SENT = (*(number for number, _, _ in TEST_CARDS), *LUHN_VALID_REFUSED)


def with_fields(**changes: Any) -> dict[str, Any]:
    """A valid tokenization body with some fields changed (or removed, with MISSING)."""
    body = card("4242424242424242", cvc="123")
    for name, value in changes.items():
        if value is MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def past_month() -> tuple[int, int, str]:
    """An expired (month, year) and the field the vault must blame."""
    if TODAY.month > 1:
        return TODAY.month - 1, TODAY.year, "exp_month"
    return 12, TODAY.year - 1, "exp_year"  # in January, last month was last year


def post_token(
    vault: ServiceProcess,
    merchant: VaultMerchant,
    body: Any,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.post(
        vault.url + "/v1/tokens",
        json=body,
        headers={**bearer(merchant.publishable_key), **(headers or {})},
    )


def assert_no_pan(text: str) -> None:
    for pan in PANS_SENT:
        assert pan not in text
        assert " ".join(pan[i : i + 4] for i in range(0, len(pan), 4)) not in text


async def owner_connection(databases: dict[str, ServiceDatabase]) -> asyncpg.Connection:
    db = databases["vault"]
    return await asyncpg.connect(dsn(db.owner, db.database))


async def runtime_connection(databases: dict[str, ServiceDatabase]) -> asyncpg.Connection:
    db = databases["vault"]
    return await asyncpg.connect(dsn(db.runtime, db.database))


async def count_tokens(databases: dict[str, ServiceDatabase], merchant: VaultMerchant) -> int:
    conn = await owner_connection(databases)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM tokens WHERE merchant_id = $1", merchant.id
        )
        return count
    finally:
        await conn.close()


def forward_cvc_and_pan(
    vault: ServiceProcess, service_token: str, merchant: VaultMerchant, token_id: str
) -> httpx.Response:
    return httpx.post(
        vault.url + "/v1/forward",
        json={
            "destination": "echo",
            "path": "/v1/authorizations",
            "token": token_id,
            "body": {"cvc": "{{card.cvc}}", "pan": "{{card.number}}"},
        },
        headers=acting_for(service_token, merchant),
    )


def last_psp_body(psp_echo: EchoServer) -> dict[str, Any]:
    assert psp_echo.received, "the PSP received nothing"
    body: dict[str, Any] = json.loads(psp_echo.received[-1].body)
    return body


@pytest.fixture
def echo(psp_echo: EchoServer) -> Iterator[EchoServer]:
    psp_echo.reset()
    yield psp_echo
    psp_echo.reset()


@pytest.fixture(scope="module")
def vault_redis(redis_urls: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_urls["vault"])
    yield client
    client.close()


# --- POST /v1/tokens ------------------------------------------------------------------------


def test_a_card_is_tokenized_with_the_publishable_key_into_the_documented_shape(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    before = int(time.time())
    response = post_token(vault, shop, card("4242424242424242", cvc="123", name="Ada Shape"))
    after = int(time.time())

    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "access-control-allow-origin" not in response.headers  # no Origin, no CORS
    body = response.json()
    assert body.keys() == {"id", "object", "card", "cvc_provided", "created"}
    assert TOKEN_ID.fullmatch(body["id"])
    assert body["object"] == "token"
    assert body["card"].keys() == {"brand", "last4", "bin", "exp_month", "exp_year", "fingerprint"}
    fingerprint = body["card"].pop("fingerprint")
    assert isinstance(fingerprint, str)
    assert FINGERPRINT.fullmatch(fingerprint)
    assert body["card"] == {
        "brand": "visa",
        "last4": "4242",
        "bin": "424242",
        "exp_month": 12,
        "exp_year": far_year(),
    }
    assert body["cvc_provided"] is True
    assert isinstance(body["created"], int)
    assert before - 1 <= body["created"] <= after + 1
    assert_no_pan(response.text)
    assert "Ada Shape" not in response.text


@pytest.mark.parametrize(("number", "brand", "cvc"), TEST_CARDS, ids=[c[1] for c in TEST_CARDS])
def test_every_test_card_is_tokenized_with_its_brand_bin_and_last4(
    vault: ServiceProcess, shop: VaultMerchant, number: str, brand: str, cvc: str
) -> None:
    body = tokenize(vault, shop, number, cvc=cvc)
    assert body["card"]["brand"] == brand
    assert body["card"]["bin"] == number[:6]
    assert body["card"]["last4"] == number[-4:]
    assert body["cvc_provided"] is True


def test_a_card_without_a_cvc_says_so(vault: ServiceProcess, shop: VaultMerchant) -> None:
    assert tokenize(vault, shop)["cvc_provided"] is False


@pytest.mark.parametrize(
    "typed",
    ["4242 4242 4242 4242", "4242-4242-4242-4242", "4242 4242-4242 4242", " 4242424242424242 "],
)
def test_spaces_and_dashes_in_the_number_are_accepted_and_ignored(
    vault: ServiceProcess, shop: VaultMerchant, typed: str
) -> None:
    plain = tokenize(vault, shop, "4242424242424242")
    body = tokenize(vault, shop, typed)
    assert (body["card"]["bin"], body["card"]["last4"]) == ("424242", "4242")
    assert body["card"]["fingerprint"] == plain["card"]["fingerprint"]


def test_a_card_expiring_this_month_is_still_valid(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    body = tokenize(vault, shop, exp_month=TODAY.month, exp_year=TODAY.year)
    assert (body["card"]["exp_month"], body["card"]["exp_year"]) == (TODAY.month, TODAY.year)


def test_a_two_digit_year_and_text_digits_are_read_as_printed_on_the_card(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    year = far_year()
    body = tokenize(vault, shop, exp_month="07", exp_year=str(year % 100))
    assert (body["card"]["exp_month"], body["card"]["exp_year"]) == (7, year)


EXPIRED_MONTH, EXPIRED_MONTH_YEAR, EXPIRED_MONTH_PARAM = past_month()

REFUSED_CARDS = [
    pytest.param(with_fields(number="4242abcd42424242"), "invalid_number", "number", id="letters"),
    pytest.param(with_fields(number="4242.4242.4242.4242"), "invalid_number", "number", id="dots"),
    pytest.param(with_fields(number=""), "invalid_number", "number", id="empty"),
    pytest.param(with_fields(number=" - "), "invalid_number", "number", id="only-separators"),
    pytest.param(with_fields(number="424242424242"), "invalid_number", "number", id="visa-12"),
    pytest.param(
        with_fields(number=LUHN_VALID_REFUSED[0]), "invalid_number", "number", id="visa-15-luhn-ok"
    ),
    pytest.param(
        with_fields(number=LUHN_VALID_REFUSED[1], cvc="1234"),
        "invalid_number",
        "number",
        id="amex-16-luhn-ok",
    ),
    pytest.param(
        with_fields(number=LUHN_VALID_REFUSED[2]), "invalid_number", "number", id="mc-17-luhn-ok"
    ),
    pytest.param(with_fields(number="4" * 20), "invalid_number", "number", id="20-digits"),
    pytest.param(with_fields(number="4242424242424241"), "invalid_number", "number", id="luhn"),
    pytest.param(with_fields(exp_month=0), "invalid_expiry_month", "exp_month", id="month-0"),
    pytest.param(with_fields(exp_month=13), "invalid_expiry_month", "exp_month", id="month-13"),
    pytest.param(with_fields(exp_month="ab"), "invalid_expiry_month", "exp_month", id="month-ab"),
    pytest.param(with_fields(exp_year=1999), "invalid_expiry_year", "exp_year", id="year-1999"),
    pytest.param(
        with_fields(exp_year=TODAY.year + 51), "invalid_expiry_year", "exp_year", id="year-far"
    ),
    pytest.param(
        with_fields(exp_year="203"), "invalid_expiry_year", "exp_year", id="year-3-digits"
    ),
    pytest.param(
        with_fields(exp_month=EXPIRED_MONTH, exp_year=EXPIRED_MONTH_YEAR),
        "expired_card",
        EXPIRED_MONTH_PARAM,
        id="past-month-this-year",
    ),
    pytest.param(
        with_fields(exp_month=12, exp_year=TODAY.year - 1),
        "expired_card",
        "exp_year",
        id="past-year",
    ),
    pytest.param(with_fields(cvc="12"), "invalid_cvc", "cvc", id="cvc-2-digits"),
    pytest.param(with_fields(cvc="1234"), "invalid_cvc", "cvc", id="cvc-4-digits-visa"),
    pytest.param(with_fields(number=AMEX, cvc="123"), "invalid_cvc", "cvc", id="cvc-3-digits-amex"),
    pytest.param(with_fields(cvc="12a"), "invalid_cvc", "cvc", id="cvc-letters"),
    pytest.param(with_fields(color="red"), "parameter_unknown", "color", id="unknown-field"),
    pytest.param(
        with_fields(number=4242424242424242), "parameter_invalid", "number", id="number-int"
    ),
    pytest.param(with_fields(exp_month=[12]), "parameter_invalid", "exp_month", id="month-list"),
    pytest.param(with_fields(exp_month=True), "parameter_invalid", "exp_month", id="month-bool"),
    pytest.param(with_fields(exp_year=20.5), "parameter_invalid", "exp_year", id="year-float"),
    pytest.param(with_fields(cvc=123), "parameter_invalid", "cvc", id="cvc-int"),
    pytest.param(with_fields(name={"first": "Ada"}), "parameter_invalid", "name", id="name-obj"),
    pytest.param(with_fields(name="x" * 101), "parameter_invalid", "name", id="name-101"),
    pytest.param(with_fields(number=MISSING), "parameter_missing", "number", id="no-number"),
    pytest.param(with_fields(exp_year=MISSING), "parameter_missing", "exp_year", id="no-year"),
]


@pytest.mark.parametrize(("body", "code", "param"), REFUSED_CARDS)
def test_a_refused_card_is_a_400_naming_the_code_and_the_parameter(
    vault: ServiceProcess,
    shop: VaultMerchant,
    body: dict[str, Any],
    code: str,
    param: str,
) -> None:
    response = post_token(vault, shop, body)
    assert_error(response, 400, "invalid_request_error", code, param)
    assert_no_pan(response.text)
    cvc = str(body.get("cvc"))
    assert len(cvc) < 3 or cvc not in response.json()["error"]["message"]


def test_a_body_that_is_not_an_object_is_refused(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    response = post_token(vault, shop, ["4242424242424242", 12, 2040])
    assert_error(response, 400, "invalid_request_error", "parameter_invalid")
    assert_no_pan(response.text)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"number": "4242424242424242", ',
        b"number=4242424242424242",
        b'{"number": 4242424242424242x}',
    ],
    ids=["truncated", "form-encoded", "garbage"],
)
def test_malformed_json_is_refused_without_echoing_it(
    vault: ServiceProcess, shop: VaultMerchant, raw: bytes
) -> None:
    response = httpx.post(
        vault.url + "/v1/tokens",
        content=raw,
        headers={**bearer(shop.publishable_key), "content-type": "application/json"},
    )
    assert_error(response, 400, "invalid_request_error", "invalid_json")
    assert_no_pan(response.text)


def body_of_size(size: int) -> bytes:
    padding = size - len(json.dumps(card(name="")).encode())
    body = json.dumps(card(name="x" * padding)).encode()
    assert len(body) == size
    return body


def test_a_body_of_8_kib_is_read_and_one_byte_more_is_a_413(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    headers = {**bearer(shop.publishable_key), "content-type": "application/json"}
    at_limit = httpx.post(vault.url + "/v1/tokens", content=body_of_size(8192), headers=headers)
    # Read and judged on its merits: the name is too long, but the size is fine.
    assert_error(at_limit, 400, "invalid_request_error", "parameter_invalid", "name")
    over = httpx.post(vault.url + "/v1/tokens", content=body_of_size(8193), headers=headers)
    assert_error(over, 413, "invalid_request_error", "body_too_large")
    assert_no_pan(over.text)


def test_a_chunked_body_over_8_kib_is_a_413_too(vault: ServiceProcess, shop: VaultMerchant) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "name": "'
        for _ in range(9):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(
        vault.url + "/v1/tokens",
        content=chunks(),
        headers={**bearer(shop.publishable_key), "content-type": "application/json"},
    )
    assert_error(response, 413, "invalid_request_error", "body_too_large")


def test_an_unknown_field_named_like_a_card_number_is_not_echoed_back(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    """A confused client may send the PAN as a key; the error must not repeat it."""
    response = post_token(vault, shop, with_fields(**{"4242424242424242": "card"}))
    assert_error(response, 400, "invalid_request_error", "parameter_unknown")
    assert_no_pan(response.text)


def test_a_card_number_in_the_url_is_not_echoed_back(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    """A client that confuses the PAN with a token id gets an error that does not repeat it,
    with or without the Tessera-Merchant header."""
    url = vault.url + "/v1/tokens/4242424242424242"
    found = httpx.get(url, headers=acting_for(tokens["service"], shop))
    assert_error(found, 404, "invalid_request_error", "resource_missing")
    assert_no_pan(found.text)
    no_merchant = httpx.get(url, headers=bearer(tokens["service"]))
    assert no_merchant.status_code == 400, no_merchant.text
    assert_no_pan(no_merchant.text)


# --- origins and CORS -----------------------------------------------------------------------


def test_a_post_from_a_registered_origin_gets_that_origin_back(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    response = post_token(vault, shop, card(), {"origin": "https://shop.example"})
    assert response.status_code == 201, response.text
    assert response.headers["access-control-allow-origin"] == "https://shop.example"
    assert "origin" in response.headers.get("vary", "").lower()


@pytest.mark.parametrize(
    "origin",
    [
        "https://other.example",  # registered, by another merchant
        "https://evil.example",  # registered by nobody
        "http://shop.example",  # the merchant's host, another scheme
        "https://shop.example:8443",  # ... another port
        "https://shop.example.evil.example",  # ... a suffix
        "null",  # a sandboxed iframe or a file: page
    ],
)
async def test_a_post_from_an_origin_the_merchant_did_not_register_is_refused_and_stores_nothing(
    vault: ServiceProcess,
    shop: VaultMerchant,
    databases: dict[str, ServiceDatabase],
    origin: str,
) -> None:
    before = await count_tokens(databases, shop)
    response = post_token(vault, shop, card(cvc="123"), {"origin": origin})
    assert_error(response, 403, "permission_error", "origin_not_allowed")
    assert "access-control-allow-origin" not in response.headers
    assert await count_tokens(databases, shop) == before


async def test_a_post_without_origin_is_allowed_a_native_app_or_a_server(
    vault: ServiceProcess, shop: VaultMerchant, databases: dict[str, ServiceDatabase]
) -> None:
    before = await count_tokens(databases, shop)
    response = post_token(vault, shop, card())
    assert response.status_code == 201, response.text
    assert await count_tokens(databases, shop) == before + 1


def preflight(vault: ServiceProcess, origin: str | None) -> httpx.Response:
    headers = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    if origin is not None:
        headers["origin"] = origin
    return httpx.options(vault.url + "/v1/tokens", headers=headers)


@pytest.mark.parametrize("origin", ["https://shop.example", "https://other.example"])
def test_a_preflight_from_an_origin_some_merchant_registered_is_answered(
    vault: ServiceProcess, shop: VaultMerchant, other_shop: VaultMerchant, origin: str
) -> None:
    response = preflight(vault, origin)  # no key: a browser sends none on a preflight
    assert response.status_code == 204, response.text
    assert response.headers.get("access-control-allow-origin") == origin
    methods = response.headers.get("access-control-allow-methods", "")
    assert "POST" in [m.strip().upper() for m in methods.split(",")]
    allowed = [
        h.strip().lower()
        for h in response.headers.get("access-control-allow-headers", "").split(",")
    ]
    assert {"authorization", "content-type"} <= set(allowed)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None])
def test_a_preflight_from_an_unregistered_origin_is_refused(
    vault: ServiceProcess, shop: VaultMerchant, origin: str | None
) -> None:
    response = preflight(vault, origin)
    assert response.status_code == 403, (response.status_code, dict(response.headers))
    assert "access-control-allow-origin" not in response.headers


# --- GET /v1/tokens/{id} --------------------------------------------------------------------


def read_token(
    vault: ServiceProcess, service_token: str, merchant: VaultMerchant, token_id: str
) -> httpx.Response:
    return httpx.get(
        f"{vault.url}/v1/tokens/{token_id}", headers=acting_for(service_token, merchant)
    )


def test_the_service_reads_a_tokens_metadata_and_never_its_number(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    created = tokenize(vault, shop, AMEX, cvc="4321", name="Grace Metadata")
    response = read_token(vault, tokens["service"], shop, created["id"])
    assert response.status_code == 200, response.text
    assert response.json() == created
    assert AMEX not in response.text
    assert "4321" not in response.text
    assert "Grace Metadata" not in response.text


def test_unknown_foreign_deleted_and_malformed_tokens_all_answer_the_same_404(
    vault: ServiceProcess,
    shop: VaultMerchant,
    other_shop: VaultMerchant,
    tokens: dict[str, str],
) -> None:
    mine = tokenize(vault, shop)["id"]
    foreign = tokenize(vault, other_shop)["id"]
    deleted = tokenize(vault, shop)["id"]
    response = httpx.delete(
        f"{vault.url}/v1/tokens/{deleted}", headers=acting_for(tokens["service"], shop)
    )
    assert response.status_code == 200, response.text

    bodies = []
    for token_id in (
        foreign,
        deleted,
        new_id("tok"),  # well-formed, unknown
        "tok_123",
        mine.upper(),
        mine + "0",
        "pm_" + mine[4:],
        "tok_" + "!" * 26,
    ):
        response = read_token(vault, tokens["service"], shop, token_id)
        error = assert_error(response, 404, "invalid_request_error", "resource_missing")
        bodies.append({k: v for k, v in error.items() if k != "request_id"})
    assert all(body == bodies[0] for body in bodies), bodies
    assert read_token(vault, tokens["service"], shop, mine).status_code == 200


def test_a_read_without_the_merchant_header_is_a_400(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    token_id = tokenize(vault, shop)["id"]
    url = f"{vault.url}/v1/tokens/{token_id}"
    missing = httpx.get(url, headers=bearer(tokens["service"]))
    assert_error(missing, 400, "invalid_request_error", missing.json()["error"]["code"])
    assert missing.json()["error"]["code"] in {"parameter_missing", "parameter_invalid"}
    malformed = httpx.get(url, headers={**bearer(tokens["service"]), "tessera-merchant": "shop"})
    assert_error(malformed, 400, "invalid_request_error", "parameter_invalid")


# --- DELETE /v1/tokens/{id}: crypto-shredding -----------------------------------------------


async def test_a_deleted_token_is_crypto_shredded_and_can_never_be_used_again(
    vault: ServiceProcess,
    shop: VaultMerchant,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    vault_redis: redis.Redis,
    echo: EchoServer,
) -> None:
    token_id = tokenize(vault, shop, cvc="123")["id"]
    assert vault_redis.exists(f"vault:cvc:{token_id}")
    headers = acting_for(tokens["service"], shop)
    url = f"{vault.url}/v1/tokens/{token_id}"

    response = httpx.delete(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": token_id, "object": "token", "deleted": True}

    owner = await owner_connection(databases)
    try:
        row = await owner.fetchrow("SELECT * FROM tokens WHERE id = $1", token_id)
    finally:
        await owner.close()
    assert row is not None, "the tombstone must stay for the audit trail"
    assert row["deleted_at"] is not None
    assert (row["ciphertext"], row["nonce"], row["data_key_id"]) == (None, None, None)
    assert (row["merchant_id"], row["last4"]) == (shop.id, "4242")
    assert not vault_redis.exists(f"vault:cvc:{token_id}"), "the held CVC goes with the token"

    assert_error(httpx.get(url, headers=headers), 404, "invalid_request_error", "resource_missing")
    forwarded = forward_cvc_and_pan(vault, tokens["service"], shop, token_id)
    assert_error(forwarded, 404, "invalid_request_error", "resource_missing")
    assert echo.received == [], "nothing may reach the PSP for a deleted token"
    again = httpx.delete(url, headers=headers)
    assert_error(again, 404, "invalid_request_error", "resource_missing")


def test_only_the_owning_merchant_can_delete_a_token(
    vault: ServiceProcess, shop: VaultMerchant, other_shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    token_id = tokenize(vault, shop)["id"]
    response = httpx.delete(
        f"{vault.url}/v1/tokens/{token_id}", headers=acting_for(tokens["service"], other_shop)
    )
    assert_error(response, 404, "invalid_request_error", "resource_missing")
    assert read_token(vault, tokens["service"], shop, token_id).status_code == 200


async def test_the_runtime_role_cannot_bring_a_shredded_token_back(
    vault: ServiceProcess,
    shop: VaultMerchant,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
) -> None:
    donor = tokenize(vault, shop)["id"]
    token_id = tokenize(vault, shop)["id"]
    response = httpx.delete(
        f"{vault.url}/v1/tokens/{token_id}", headers=acting_for(tokens["service"], shop)
    )
    assert response.status_code == 200, response.text

    conn = await runtime_connection(databases)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE tokens SET ciphertext = d.ciphertext, nonce = d.nonce, "
                "data_key_id = d.data_key_id, deleted_at = NULL "
                "FROM tokens d WHERE tokens.id = $1 AND d.id = $2",
                token_id,
                donor,
            )
        with pytest.raises(asyncpg.CheckViolationError):  # not even to re-shred it
            await conn.execute("UPDATE tokens SET deleted_at = now() WHERE id = $1", token_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # nor erase the tombstone
            await conn.execute("DELETE FROM tokens WHERE id = $1", token_id)
    finally:
        await conn.close()
    assert read_token(vault, tokens["service"], shop, token_id).status_code == 404


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprints_are_per_card_and_per_merchant_while_tokens_are_per_tokenization(
    vault: ServiceProcess, shop: VaultMerchant, other_shop: VaultMerchant
) -> None:
    first = tokenize(vault, shop, "5555555555554444")
    second = tokenize(vault, shop, "5555 5555 5555 4444", exp_month=1, exp_year=far_year() + 1)
    elsewhere = tokenize(vault, other_shop, "5555555555554444")
    other_card = tokenize(vault, shop, "2223003122003222")

    assert first["id"] != second["id"]
    assert first["card"]["fingerprint"] == second["card"]["fingerprint"]
    assert elsewhere["card"]["fingerprint"] != first["card"]["fingerprint"]
    assert other_card["card"]["fingerprint"] != first["card"]["fingerprint"]
    fingerprints = {
        tokenize(vault, shop, number)["card"]["fingerprint"] for number, _, _ in TEST_CARDS
    }
    assert len(fingerprints) == len(TEST_CARDS)


# --- token ids are random -------------------------------------------------------------------


@pytest.fixture(scope="module")
def thousand_tokens(vault: ServiceProcess, shop: VaultMerchant) -> list[str]:
    """1,000 tokenizations of one card, over one pooled connection."""
    with httpx.Client(headers=bearer(shop.publishable_key), timeout=10) as client:
        return [tokenize(vault, shop, client=client)["id"] for _ in range(1000)]


def test_a_thousand_tokenizations_of_one_card_give_a_thousand_unrelated_ids(
    thousand_tokens: list[str],
) -> None:
    pan = "4242424242424242"
    assert len(set(thousand_tokens)) == 1000
    runs = {pan[i : i + 6] for i in range(len(pan) - 5)}
    for token_id in thousand_tokens:
        assert TOKEN_ID.fullmatch(token_id)
        assert not any(run in token_id for run in runs), token_id


def test_token_ids_carry_at_least_128_random_bits(thousand_tokens: list[str]) -> None:
    """The issue: tokens are random (>= 128 bits). Each of the 26 base-32 characters that is
    random shows (nearly) all 32 symbols over 1,000 ids made within a second or two; characters
    that encode a clock barely change. Summing log2(distinct symbols) per position estimates the
    random bits (a fully random 26-character id scores about 126 + 3)."""
    bodies = [token_id.removeprefix("tok_") for token_id in thousand_tokens]
    bits = sum(math.log2(len({body[i] for body in bodies})) for i in range(26))
    assert bits >= 120, f"about {bits:.0f} bits vary; the rest is predictable (a timestamp?)"


# --- the CVC: used at most once, held briefly, never in Postgres ----------------------------


def test_the_cvc_goes_to_the_psp_once_and_the_second_forward_goes_without_it(
    vault: ServiceProcess,
    shop: VaultMerchant,
    tokens: dict[str, str],
    vault_redis: redis.Redis,
    echo: EchoServer,
) -> None:
    token_id = tokenize(vault, shop, "6011111111111117", cvc="987")["id"]

    first = forward_cvc_and_pan(vault, tokens["service"], shop, token_id)
    assert first.status_code == 200, first.text
    assert last_psp_body(echo) == {"cvc": "987", "pan": "6011111111111117"}
    assert not vault_redis.exists(f"vault:cvc:{token_id}"), "taken on first use"
    assert "6011111111111117" not in first.text  # what the PSP echoed comes back masked

    second = forward_cvc_and_pan(vault, tokens["service"], shop, token_id)
    assert second.status_code == 200, second.text
    assert len(echo.received) == 2
    assert last_psp_body(echo) == {"pan": "6011111111111117"}  # no "cvc" key at all
    # The token itself stays reusable (a renewal is charged without the CVC).
    assert read_token(vault, tokens["service"], shop, token_id).json()["cvc_provided"] is True


def test_a_cvc_is_used_once_even_when_the_psp_refuses_the_first_request(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str], echo: EchoServer
) -> None:
    token_id = tokenize(vault, shop, cvc="246")["id"]
    echo.status = 402
    first = forward_cvc_and_pan(vault, tokens["service"], shop, token_id)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == 402
    assert last_psp_body(echo)["cvc"] == "246"
    echo.status = 200
    forward_cvc_and_pan(vault, tokens["service"], shop, token_id)
    assert "cvc" not in last_psp_body(echo)


def test_a_held_cvc_expires_after_its_ttl(
    vault_env: dict[str, str],
    shop: VaultMerchant,
    tokens: dict[str, str],
    vault_redis: redis.Redis,
    echo: EchoServer,
    tmp_path: Path,
) -> None:
    short = start_service("vault", {**vault_env, "TESSERA_VAULT_CVC_TTL_SECONDS": "1"}, tmp_path)
    try:
        token_id = tokenize(short, shop, cvc="135")["id"]
        assert 0 < vault_redis.pttl(f"vault:cvc:{token_id}") <= 1000
        time.sleep(1.5)
        response = forward_cvc_and_pan(short, tokens["service"], shop, token_id)
        assert response.status_code == 200, response.text
        assert last_psp_body(echo) == {"pan": "4242424242424242"}
    finally:
        short.stop()


def test_a_held_cvc_is_sealed_in_redis_with_a_ttl_of_at_most_an_hour(
    vault: ServiceProcess, shop: VaultMerchant, vault_redis: redis.Redis
) -> None:
    for number, _, cvc in TEST_CARDS:
        token_id = tokenize(vault, shop, number, cvc=cvc)["id"]
        key = f"vault:cvc:{token_id}"
        assert 0 < vault_redis.ttl(key) <= 3600
        raw = vault_redis.get(key)
        assert isinstance(raw, bytes)
        data_key_id, nonce, sealed = msgspec.msgpack.decode(raw, type=tuple[str, bytes, bytes])
        assert re.fullmatch(r"dek_[0-9a-z]{26}", data_key_id)
        assert len(nonce) == 12
        assert len(sealed) == len(cvc) + 16, "AES-GCM: the CVC's length plus a 16-byte tag"
        assert cvc.encode() not in nonce + sealed
        assert number.encode() not in raw


def encodings(secret: str) -> dict[str, bytes]:
    """The forms a secret could take in a dump: clear, hex (both cases), and base64 at each of
    the three alignments (the stable inner characters only)."""
    raw = secret.encode()
    forms = {"clear": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}
    for shift in range(3):
        encoded = base64.b64encode(b"x" * shift + raw)
        inner = encoded[4 if shift else 0 : -4]  # drop groups holding the prefix or padding
        assert len(inner) >= 12
        forms[f"base64+{shift}"] = inner
    return forms


def find_leaks(haystack: bytes, secrets_: dict[str, str]) -> list[str]:
    found = []
    for label, secret in secrets_.items():
        for form, needle in encodings(secret).items():
            if needle in haystack:
                found.append(f"{label} ({form})")
    return found


def pg_dump_binary() -> str:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_dump"), key=lambda p: int(p.parts[-3])
    )
    if candidates:
        return str(candidates[-1])
    found = shutil.which("pg_dump")
    assert found, "pg_dump is needed (apt-get install postgresql-client)"
    return found


def test_no_card_number_name_or_cvc_is_in_the_database_dump_or_in_redis(
    vault: ServiceProcess,
    shop: VaultMerchant,
    other_shop: VaultMerchant,
    databases: dict[str, ServiceDatabase],
    vault_redis: redis.Redis,
) -> None:
    suffix = secrets.token_hex(4)
    cards: dict[str, str] = {}
    names: dict[str, str] = {}
    amex_cvcs: list[str] = []
    for index, (number, brand, cvc) in enumerate(TEST_CARDS):
        name = f"Cardholder {brand} Quixotic-{suffix}-{index}"
        if brand == "amex":
            cvc = f"{secrets.randbelow(9000) + 1000}"
            amex_cvcs.append(cvc)
        for merchant in (shop, other_shop):
            tokenize(vault, merchant, number, cvc=cvc, name=name)
        cards[f"PAN {brand} {number[-4:]}"] = number
        names[f"name {index}"] = name

    db = databases["vault"]
    dump = subprocess.run(
        [pg_dump_binary(), "--no-password", dsn(db.owner, db.database)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert b"COPY public.tokens" in dump
    assert b"COPY public.data_keys" in dump
    assert dump.count(shop.id.encode()) > 1, "the dump holds this test's rows"
    assert find_leaks(dump, {**cards, **names}) == []
    for cvc in amex_cvcs:  # four digits standing alone as a value
        assert not re.search(
            rb"(?<![0-9A-Za-z.:+-])" + cvc.encode() + rb"(?![0-9A-Za-z.:+-])", dump
        )

    everything = b""
    for key in vault_redis.scan_iter(count=1000):
        if vault_redis.type(key) == b"string":
            value = vault_redis.get(key)
            everything += key + b"\n" + (value if isinstance(value, bytes) else b"") + b"\n"
    assert b"vault:cvc:" in everything, "held CVCs are in Redis, sealed"
    assert find_leaks(everything, {**cards, **names}) == []


# --- last: nothing this module sent reached the vault's log ---------------------------------


def test_no_card_number_this_module_sent_is_in_the_vault_log(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    # Every number once more, through refusals that might be tempted to quote it.
    for pan in PANS_SENT:
        for body in (
            with_fields(number=pan, exp_month=13),
            with_fields(number=pan, cvc="1"),
            with_fields(number=pan, exp_year=TODAY.year - 1),
            with_fields(number=pan, surprise=True),
        ):
            response = post_token(vault, shop, body)
            assert response.status_code == 400, response.text
            assert_no_pan(response.text)
    marker = post_token(vault, shop, with_fields(exp_month=0)).headers["request-id"]
    deadline = time.monotonic() + 5
    while marker not in vault.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    output = vault.output()
    assert marker in output, "the vault's access log lines are in its output"
    assert_no_pan(output)
    assert not re.search(r"\b(cvc|name)\b\"?\s*[:=]\s*\"?[0-9]{3,4}\b", output)
