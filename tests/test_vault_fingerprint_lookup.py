"""The vault's fingerprint lookup (`POST /v1/fingerprints/lookup`, admin only): does the vault
hold these cards, for any merchant? Against the session's vault, with card numbers made for
this module (so the counts are exactly this module's tokens)."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from core.cards import luhn_valid
from core.ids import new_id
from tessera.dbsetup import ServiceDatabase
from tests.conftest import VaultMerchant, dsn
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import acting_for, assert_error, bearer, tokenize
from vault.fingerprints import MAX_NUMBERS, NUMBERS_PER_HOUR, lookup_counter

LOOKUP = "/v1/fingerprints/lookup"


def new_pan(prefix: str, length: int) -> str:
    """A Luhn-valid number nobody else in the session tokenized."""
    body = prefix + "".join(secrets.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def sibling(pan: str) -> str:
    """Another Luhn-valid number with the same BIN and last four."""
    while True:
        middle = "".join(secrets.choice("0123456789") for _ in range(len(pan) - 10))
        other = pan[:6] + middle + pan[-4:]
        if other != pan and luhn_valid(other):
            return other


def grouped(pan: str) -> str:
    return " ".join(pan[i : i + 4] for i in range(0, len(pan), 4))


def lookup(
    vault: ServiceProcess, admin: str, numbers: list[str], request_id: str | None = None
) -> httpx.Response:
    headers = bearer(admin) | ({"request-id": request_id} if request_id else {})
    return httpx.post(vault.url + LOOKUP, json={"numbers": numbers}, headers=headers)


def audit_records(vault_db: ServiceDatabase, request_id: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn(vault_db.owner, vault_db.database))
        try:
            rows = await conn.fetch(
                "SELECT actor, action, outcome, detail::text AS detail, token_hmac "
                "FROM audit_log WHERE request_id = $1",
                request_id,
            )
        finally:
            await conn.close()
        return [dict(row) for row in rows]

    return asyncio.run(fetch())


def data_key_count(vault_db: ServiceDatabase) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn(vault_db.owner, vault_db.database))
        try:
            n: int = await conn.fetchval("SELECT count(*) FROM data_keys")
        finally:
            await conn.close()
        return n

    return asyncio.run(count())


def test_each_number_is_answered_in_order_with_live_tokens_of_any_merchant_and_no_digits(
    vault: ServiceProcess,
    shop: VaultMerchant,
    other_shop: VaultMerchant,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
) -> None:
    twice = new_pan("4", 16)  # at two merchants
    deleted = new_pan("51", 16)  # tokenized, then deleted: crypto-shredded, not held
    never = new_pan("37", 15)  # never tokenized
    same_bin_last4 = sibling(twice)  # its merchants' keys are used, its fingerprint differs
    tokenize(vault, shop, twice)
    tokenize(vault, other_shop, twice)
    gone = tokenize(vault, shop, deleted)["id"]
    removed = httpx.delete(
        f"{vault.url}/v1/tokens/{gone}", headers=acting_for(tokens["service"], shop)
    )
    assert removed.status_code == 200, removed.text
    keys_before = data_key_count(databases["vault"])

    request_id = new_id("req")
    asked = [grouped(twice), deleted, never, same_bin_last4, twice]
    response = lookup(vault, tokens["admin"], asked, request_id)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "fingerprint_lookup",
        "results": [
            {"stored": True, "tokens": 2},
            {"stored": False, "tokens": 0},
            {"stored": False, "tokens": 0},
            {"stored": False, "tokens": 0},
            {"stored": True, "tokens": 2},
        ],
    }
    assert re.search(r"[0-9]{2}", response.text) is None, "no digits of any number come back"
    # A lookup makes no key (a merchant without a matching token is never asked about).
    assert data_key_count(databases["vault"]) == keys_before
    (audited,) = audit_records(databases["vault"], request_id)
    assert (audited["actor"], audited["action"], audited["outcome"]) == (
        "admin",
        "fingerprint.lookup",
        "success",
    )
    assert json.loads(audited["detail"]) == {"numbers": 5, "stored": 2}
    assert audited["token_hmac"] is None


def test_a_number_that_is_not_a_card_is_refused_with_its_index_and_audited(
    vault: ServiceProcess, tokens: dict[str, str], databases: dict[str, ServiceDatabase]
) -> None:
    good = new_pan("4", 16)
    not_luhn = good[:-1] + str((int(good[-1]) + 1) % 10)
    request_id = new_id("req")
    response = lookup(vault, tokens["admin"], [good, not_luhn], request_id)
    error = assert_error(response, 400, "invalid_request_error", "invalid_number", "numbers[1]")
    assert re.search(r"[0-9]{4}", error["message"]) is None
    (audited,) = audit_records(databases["vault"], request_id)
    assert (audited["action"], audited["outcome"]) == ("fingerprint.lookup", "invalid_number")
    assert json.loads(audited["detail"]) == {}

    letters = lookup(vault, tokens["admin"], ["tok_not_a_card_number"])
    assert_error(letters, 400, "invalid_request_error", "invalid_number", "numbers[0]")
    too_many = lookup(vault, tokens["admin"], [good] * (MAX_NUMBERS + 1))
    assert_error(too_many, 400, "invalid_request_error", "parameter_invalid")
    empty = lookup(vault, tokens["admin"], [])
    assert_error(empty, 400, "invalid_request_error", "parameter_invalid")


@pytest.fixture
def hour_budget_spent(redis_urls: dict[str, str]) -> Any:
    """This hour's (and the next one's, should the clock turn meanwhile) budget used up in the
    vault's real Redis, then given back."""
    client = redis.Redis.from_url(redis_urls["vault"])
    now = datetime.datetime.now(datetime.UTC)
    counters = [lookup_counter(now), lookup_counter(now + datetime.timedelta(hours=1))]
    for counter in counters:
        client.set(counter, NUMBERS_PER_HOUR, ex=600)
    try:
        yield
    finally:
        client.delete(*counters)
        client.close()


def test_past_the_hourly_budget_a_lookup_is_refused_and_the_refusal_audited(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    hour_budget_spent: None,
) -> None:
    request_id = new_id("req")
    response = lookup(vault, tokens["admin"], [new_pan("4", 16)], request_id)
    assert_error(response, 429, "rate_limit_error", "rate_limited")
    (audited,) = audit_records(databases["vault"], request_id)
    assert (audited["action"], audited["outcome"]) == ("fingerprint.lookup", "rate_limited")
    assert json.loads(audited["detail"]) == {"numbers": 1}


def test_only_an_administrator_may_look_up(
    vault: ServiceProcess, shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    body = {"numbers": [new_pan("4", 16)]}
    service = httpx.post(vault.url + LOOKUP, json=body, headers=acting_for(tokens["service"], shop))
    assert_error(service, 403, "permission_error", "forbidden")
    merchant = httpx.post(vault.url + LOOKUP, json=body, headers=bearer(shop.publishable_key))
    assert_error(merchant, 403, "permission_error", "forbidden")
