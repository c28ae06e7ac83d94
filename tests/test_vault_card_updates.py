"""Card updates (issue 13): the simulators announce a card's new expiry or number, the vault
fetches the new card itself and replaces the card record under the same token.

Against the session's vault and simulators (real processes), its databases as the owner (to
look at what is stored) and as the runtime role (to see what the trigger lets it do)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import VaultMerchant, dsn, register_vault_merchant
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import (
    acting_for,
    assert_error,
    far_year,
    luhn_complete,
    tokenize,
)

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
DISCOVER = "6011111111111117"
PSP_A_KEY = {"authorization": "Bearer psp_a_test_key"}
PSP_B_KEY = {"x-api-key": "psp_b_test_key"}


@pytest.fixture(scope="module")
def shop(vault: ServiceProcess, tokens: dict[str, str]) -> VaultMerchant:
    return register_vault_merchant(vault, tokens["admin"])


@pytest.fixture
async def owner(databases: dict[str, ServiceDatabase]) -> AsyncIterator[asyncpg.Connection]:
    db = databases["vault"]
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    yield conn
    await conn.close()


def announce(psp: ServiceProcess, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(psp.url + "/admin/account_updates", json=body)
    assert response.status_code == 201, response.text
    announced: dict[str, Any] = response.json()
    return announced


def random_card() -> str:
    """A Visa number no other test uses (not in the simulators' card table: approved)."""
    return luhn_complete("4" + "".join(secrets.choice("0123456789") for _ in range(14)))


def from_psp_a(update: str, path: str = "/v1/account_updates/card") -> dict[str, Any]:
    """The payment API's request for an update PSP A announced."""
    return {
        "destination": "psp_a",
        "update": update,
        "path": path,
        "body": {"update": update, "number": "{{card.number}}"},
        "headers": PSP_A_KEY,
    }


def from_psp_b(update: str) -> dict[str, Any]:
    return {
        "destination": "psp_b",
        "update": update,
        "path": "/v1/cardUpdates/details",
        "body": {"updateId": update, "cardNumber": "{{card.number}}"},
        "headers": {"X-Api-Key": PSP_B_KEY["x-api-key"]},
        "fields": {"number": "cardNumber", "exp_month": "expiryMonth", "exp_year": "expiryYear"},
    }


def apply(
    vault: ServiceProcess, service: str, shop: VaultMerchant, token: str, body: dict[str, Any]
) -> httpx.Response:
    return httpx.post(
        f"{vault.url}/v1/tokens/{token}/card_updates",
        json=body,
        headers=acting_for(service, shop),
        timeout=10,
    )


def metadata(vault: ServiceProcess, service: str, shop: VaultMerchant, token: str) -> Any:
    response = httpx.get(f"{vault.url}/v1/tokens/{token}", headers=acting_for(service, shop))
    assert response.status_code == 200, response.text
    return response.json()


async def stored(owner: asyncpg.Connection, token: str) -> asyncpg.Record:
    row = await owner.fetchrow("SELECT * FROM tokens WHERE id = $1", token)
    assert row is not None
    return row


async def audited(owner: asyncpg.Connection, update: str) -> list[tuple[str, str, Any]]:
    rows = await owner.fetch(
        "SELECT actor, action, outcome, detail FROM audit_log WHERE detail->>'update' = $1 "
        "ORDER BY occurred_at, seq",
        update,
    )
    return [(r["action"], r["outcome"], r["detail"]) for r in rows]


# --- the simulators ----------------------------------------------------------------------------


def test_psp_a_lists_updates_masked_after_a_cursor_and_gives_the_card_only_for_the_old_number(
    psp_a: ServiceProcess,
) -> None:
    first = announce(psp_a, {"number": VISA, "new_exp_month": 1, "new_exp_year": far_year()})
    second = announce(
        psp_a,
        {"number": VISA, "new_number": DISCOVER, "new_exp_month": 2, "new_exp_year": 2040},
    )
    assert (first["kind"], second["kind"]) == ("expiry", "number")
    assert second["old_card"] == {"bin": "424242", "last4": "4242"}
    assert second["new_card"] == {
        "brand": "discover", "bin": "601111", "last4": "1117", "exp_month": 2, "exp_year": 2040,
    }  # fmt: skip
    assert httpx.get(psp_a.url + "/v1/account_updates").status_code == 401
    listed = httpx.get(
        psp_a.url + "/v1/account_updates", params={"after": first["id"]}, headers=PSP_A_KEY
    )
    assert listed.status_code == 200, listed.text
    assert [u["id"] for u in listed.json()["data"]] == [second["id"]]
    assert VISA not in listed.text
    assert DISCOVER not in listed.text
    card = psp_a.url + "/v1/account_updates/card"
    wrong = httpx.post(card, json={"update": second["id"], "number": MASTERCARD}, headers=PSP_A_KEY)
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (404, "not_found")
    right = httpx.post(card, json={"update": second["id"], "number": VISA}, headers=PSP_A_KEY)
    assert right.json() == {
        "update": second["id"], "number": DISCOVER, "exp_month": 2, "exp_year": 2040,
    }  # fmt: skip
    unknown = httpx.get(psp_a.url + "/v1/account_updates?after=au_nothing", headers=PSP_A_KEY)
    assert unknown.json()["error"]["code"] == "invalid_cursor"


def test_psp_b_lists_updates_in_its_dialect_with_a_cursor(psp_b: ServiceProcess) -> None:
    update = announce(
        psp_b,
        {"number": VISA, "new_number": MASTERCARD, "new_exp_month": 5, "new_exp_year": 2039},
    )
    assert update["type"] == "PAN_UPDATE"
    assert update["card"]["lastFour"] == "4444"
    assert update["previousCard"]["lastFour"] == "4242"
    listed = httpx.get(psp_b.url + "/v1/cardUpdates", headers=PSP_B_KEY).json()
    assert listed["updates"][-1]["updateId"] == update["updateId"] == listed["cursor"]
    after = httpx.get(
        psp_b.url + "/v1/cardUpdates", params={"cursor": listed["cursor"]}, headers=PSP_B_KEY
    ).json()
    assert after == {"updates": [], "cursor": listed["cursor"], "hasMore": False}
    assert MASTERCARD not in str(listed)


def test_an_update_announced_with_decline_old_closes_the_old_card_at_both_simulators(
    psp_a: ServiceProcess, psp_b: ServiceProcess
) -> None:
    """What makes "a renewal after an update succeeds where the old card was declined" testable.
    Each simulator gets a card number of its own, so no other test's card is closed."""
    year = far_year()
    old_a, old_b = random_card(), random_card()
    for psp, number in ((psp_a, old_a), (psp_b, old_b)):
        body = {"number": number, "new_exp_month": 3, "new_exp_year": year + 2, "decline_old": True}
        announce(psp, body)

    def at_a(exp_year: int) -> Any:
        body = {
            "reference": secrets.token_hex(8),
            "amount": 100,
            "currency": "EUR",
            "capture": False,
            "card": {"number": old_a, "exp_month": 3, "exp_year": exp_year},
        }
        return httpx.post(psp_a.url + "/v1/authorizations", json=body, headers=PSP_A_KEY).json()

    def at_b(exp_year: int) -> Any:
        body = {
            "merchantReference": secrets.token_hex(8),
            "amount": {"value": 100, "currency": "EUR"},
            "paymentMethod": {"number": old_b, "expiryMonth": 3, "expiryYear": exp_year},
        }
        return httpx.post(psp_b.url + "/v1/payments", json=body, headers=PSP_B_KEY).json()

    assert at_a(year)["decline_code"] == "expired_card"
    assert at_a(year + 2)["status"] == "approved"
    assert at_b(year)["refusalReason"] == "Expired Card"
    assert at_b(year + 2)["resultCode"] == "Authorised"


# --- the vault --------------------------------------------------------------------------------


async def test_an_expiry_update_replaces_the_card_under_the_same_token_audited_once(
    vault: ServiceProcess,
    tokens: dict[str, str],
    shop: VaultMerchant,
    psp_a: ServiceProcess,
    owner: asyncpg.Connection,
) -> None:
    service = tokens["service"]
    token = tokenize(vault, shop, VISA, cvc="123")["id"]
    before = await stored(owner, token)
    new_year = far_year() + 3
    update = announce(psp_a, {"number": VISA, "new_exp_month": 9, "new_exp_year": new_year})["id"]

    response = apply(vault, service, shop, token, from_psp_a(update))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["outcome"], answer["number_changed"], answer["expiry_changed"]) == (
        "replaced",
        False,
        True,
    )
    assert answer["token"]["id"] == token
    assert VISA not in response.text
    card = metadata(vault, service, shop, token)["card"]
    assert (card["exp_month"], card["exp_year"], card["last4"]) == (9, new_year, "4242")
    assert card["fingerprint"] == before["fingerprint"][:16].hex()  # the same number

    after = await stored(owner, token)
    assert after["ciphertext"] != before["ciphertext"]
    assert after["nonce"] != before["nonce"]
    assert await owner.fetchval(
        "SELECT count(*) FROM tokens WHERE ciphertext = $1", before["ciphertext"]
    ) == 0  # fmt: skip
    assert after["card_update"] == f"psp_a:{update}"
    assert after["card_updated_at"] is not None
    assert not after["cvc_provided"]  # the old card's CVC is not the new card's
    assert (after["last_used_at"], after["created_at"]) == (
        before["last_used_at"],
        before["created_at"],
    )
    assert [(a, o) for a, o, _ in await audited(owner, update)] == [
        ("token.update", "started"),
        ("token.update", "replaced"),
    ]

    # Asked again (an answer lost on the way back): nothing is sent, nothing is written.
    requests = httpx.get(psp_a.url + "/admin/stats").json()
    again = apply(vault, service, shop, token, from_psp_a(update))
    assert again.status_code == 200, again.text
    assert again.json()["outcome"] == "already_applied"
    assert httpx.get(psp_a.url + "/admin/stats").json() == requests
    assert (await stored(owner, token))["ciphertext"] == after["ciphertext"]
    assert [o for _, o, _ in await audited(owner, update)][-1] == "already_applied"


async def test_a_number_update_from_psp_b_makes_a_forward_send_the_new_number(
    vault: ServiceProcess,
    tokens: dict[str, str],
    shop: VaultMerchant,
    psp_b: ServiceProcess,
    psp_echo: EchoServer,
    owner: asyncpg.Connection,
) -> None:
    service = tokens["service"]
    token = tokenize(vault, shop, VISA)["id"]
    before = await stored(owner, token)
    announced = announce(
        psp_b,
        {"number": VISA, "new_number": MASTERCARD, "new_exp_month": 4, "new_exp_year": 2041},
    )
    response = apply(vault, service, shop, token, from_psp_b(announced["updateId"]))
    assert response.status_code == 200, response.text
    assert response.json()["number_changed"] is True
    card = metadata(vault, service, shop, token)["card"]
    assert (card["brand"], card["bin"], card["last4"], card["exp_year"]) == (
        "mastercard",
        "555555",
        "4444",
        2041,
    )
    assert card["fingerprint"] != before["fingerprint"][:16].hex()
    assert MASTERCARD not in response.text

    psp_echo.reset()
    forwarded = httpx.post(
        vault.url + "/v1/forward",
        json={
            "destination": "echo",
            "path": "/v1/authorizations",
            "token": token,
            "body": {"number": "{{card.number}}", "exp_year": "{{card.exp_year}}"},
        },
        headers=acting_for(service, shop),
    )
    assert forwarded.status_code == 200, forwarded.text
    [sent] = psp_echo.received
    assert MASTERCARD in sent.body.decode()
    assert VISA not in sent.body.decode()
    psp_echo.reset()


async def test_an_update_for_another_card_or_an_expired_one_changes_nothing(
    vault: ServiceProcess,
    tokens: dict[str, str],
    shop: VaultMerchant,
    psp_a: ServiceProcess,
    owner: asyncpg.Connection,
) -> None:
    service = tokens["service"]
    token = tokenize(vault, shop, VISA)["id"]
    before = await stored(owner, token)
    theirs = announce(
        psp_a, {"number": DISCOVER, "new_exp_month": 1, "new_exp_year": far_year() + 1}
    )["id"]
    refused = apply(vault, service, shop, token, from_psp_a(theirs))
    assert_error(refused, 409, "invalid_request_error", "card_update_not_applicable")
    assert [o for _, o, _ in await audited(owner, theirs)] == [
        "started",
        "card_update_not_applicable",
    ]
    expired = announce(psp_a, {"number": VISA, "new_exp_month": 1, "new_exp_year": 2020})["id"]
    invalid = apply(vault, service, shop, token, from_psp_a(expired))
    assert_error(invalid, 502, "api_error", "card_update_invalid")
    assert dict(await stored(owner, token)) == dict(before)


def test_card_update_paths_and_forward_paths_are_kept_apart(
    vault: ServiceProcess, tokens: dict[str, str], shop: VaultMerchant
) -> None:
    """A forward's answer goes back to the API (masked); a card update's stays in the vault:
    neither path may be used for the other."""
    service = tokens["service"]
    token = tokenize(vault, shop, VISA)["id"]
    as_update = apply(vault, service, shop, token, from_psp_a("au_x", path="/v1/authorizations"))
    assert_error(as_update, 400, "invalid_request_error", "path_not_allowed")
    as_forward = httpx.post(
        vault.url + "/v1/forward",
        json={
            "destination": "psp_a",
            "path": "/v1/account_updates/card",
            "token": token,
            "body": {"update": "au_x", "number": "{{card.number}}"},
        },
        headers=acting_for(service, shop),
    )
    assert_error(as_forward, 400, "invalid_request_error", "path_not_allowed")
    missing = apply(vault, service, shop, "tok_" + "0" * 26, from_psp_a("au_x"))
    assert missing.status_code == 404


# --- the runtime role ------------------------------------------------------------------------


async def test_the_runtime_role_may_replace_a_live_card_and_do_nothing_else(
    vault: ServiceProcess,
    shop: VaultMerchant,
    databases: dict[str, ServiceDatabase],
    owner: asyncpg.Connection,
) -> None:
    token = tokenize(vault, shop, VISA)["id"]
    row = await stored(owner, token)
    fingerprint_key = await owner.fetchval(
        "SELECT id FROM data_keys WHERE purpose = 'fingerprint' LIMIT 1"
    )
    db = databases["vault"]
    runtime = await asyncpg.connect(dsn(db.runtime, db.database))

    async def update(assignments: str, *args: Any) -> str:
        status: str = await runtime.execute(
            f"UPDATE tokens SET {assignments} WHERE id = $1", token, *args
        )
        return status

    new = "nonce = $2, ciphertext = $3, last4 = '4444', card_update = 'psp_a:au_test'"
    fresh = (os.urandom(12), os.urandom(40))
    try:
        for refused, args in (
            ("nonce = nonce", ()),  # a no-op rewrite
            ("ciphertext = ciphertext, last4 = last4", ()),
            ("last4 = '4444'", ()),
            ("ciphertext = $2, card_update = 'psp_a:au_test'", (os.urandom(40),)),  # old nonce
            ("nonce = $2, ciphertext = $3, last4 = '4444'", fresh),  # no update named
            (new + ", cvc_provided = true", fresh),
            (new + ", last_used_at = now()", fresh),
            (new + ", data_key_id = $4", (*fresh, fingerprint_key)),  # not a card key
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await update(refused, *args)
        for forbidden in ("merchant_id = merchant_id", "created_at = now()", "id = id"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await update(forbidden)
        assert await update(new + ", card_updated_at = '2000-01-01'", *fresh) == "UPDATE 1"
        replaced = await stored(owner, token)
        assert replaced["card_updated_at"].year > 2000  # the trigger's now(), not the caller's
        assert (replaced["nonce"], replaced["last4"]) == (fresh[0], "4444")
        with pytest.raises(asyncpg.CheckViolationError):  # the same update once more
            await update("nonce = $2, ciphertext = $3", os.urandom(12), os.urandom(40))
        assert await update("deleted_at = now(), nonce = NULL, ciphertext = NULL, "
                            "data_key_id = NULL") == "UPDATE 1"  # fmt: skip
        with pytest.raises(asyncpg.CheckViolationError):  # a tombstone never changes
            await update(new.replace("au_test", "au_other"), *fresh)
    finally:
        await runtime.close()
    assert row["card_update"] is None


async def test_an_update_to_the_same_card_writes_nothing_and_racing_requests_write_once(
    vault: ServiceProcess,
    tokens: dict[str, str],
    shop: VaultMerchant,
    psp_a: ServiceProcess,
    owner: asyncpg.Connection,
) -> None:
    service = tokens["service"]
    token = tokenize(vault, shop, VISA)["id"]
    before = await stored(owner, token)
    same = announce(psp_a, {"number": VISA, "new_exp_month": 12, "new_exp_year": far_year()})
    unchanged = apply(vault, service, shop, token, from_psp_a(same["id"]))
    assert unchanged.json()["outcome"] == "unchanged", unchanged.text
    assert dict(await stored(owner, token)) == dict(before)

    update = announce(psp_a, {"number": VISA, "new_exp_month": 6, "new_exp_year": 2042})["id"]
    async with httpx.AsyncClient(timeout=10) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    f"{vault.url}/v1/tokens/{token}/card_updates",
                    json=from_psp_a(update),
                    headers=acting_for(service, shop),
                )
                for _ in range(4)
            )
        )
    outcomes = sorted(
        r.json()["outcome"] if r.status_code == 200 else r.json()["error"]["code"] for r in answers
    )
    assert outcomes.count("replaced") == 1, outcomes
    assert set(outcomes) <= {"replaced", "already_applied", "token_changed"}, outcomes
    replaced = [o for _, o, _ in await audited(owner, update)].count("replaced")
    assert replaced == 1
    assert metadata(vault, service, shop, token)["card"]["exp_year"] == 2042
