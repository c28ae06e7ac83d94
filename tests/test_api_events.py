"""Events: one exactly when a state changes, carrying the object after the change and the
idempotency key of the request that caused it; none when the change rolls back; listed with
cursors and filters; and the ledger behind `GET /v1/balance`."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest

from api.services.events import Cause, EventData, Publisher
from core import ledger
from tests.conftest import ApiMerchant, create_merchant, dsn
from tests.support.payments import (
    DECLINED,
    configure_routing,
    new_key,
    pay,
    post,
    tokenize,
)
from tests.support.processes import ServiceProcess


@pytest.fixture
def shop(api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]) -> ApiMerchant:
    return create_merchant(api_env, vault, tokens["admin"], "Events shop")


def events(api: ServiceProcess, merchant: ApiMerchant, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{api.url}/v1/events", params=params, headers=merchant.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["data"]
    return found


def test_each_change_writes_exactly_one_event_with_the_object_after_it(
    api: ServiceProcess, vault: ServiceProcess, shop: ApiMerchant
) -> None:
    key = new_key()
    body = {"amount": 5000, "currency": "EUR", "token": tokenize(vault, shop), "capture": False}
    created = post(api, shop, "/v1/payments", body, key)
    payment = created.json()
    [authorized] = events(api, shop, object=payment["id"])
    assert authorized["type"] == "payment.authorized"
    assert authorized["data"]["object"] == payment
    assert authorized["request"]["idempotency_key"] == key
    assert authorized["id"].startswith("evt_")

    post(api, shop, "/v1/payments", body, key)  # a replay changes nothing
    refused = post(api, shop, f"/v1/payments/{payment['id']}/capture", {"amount": 9999})
    assert refused.status_code == 409  # nor does a refused operation
    assert len(events(api, shop, object=payment["id"])) == 1

    capture_key = new_key()
    captured = post(
        api, shop, f"/v1/payments/{payment['id']}/capture", {"amount": 3000}, capture_key
    )
    refund = post(api, shop, f"/v1/payments/{payment['id']}/refunds", {"amount": 500}).json()
    newest_first = events(api, shop, object=payment["id"])
    assert [e["type"] for e in newest_first] == ["payment.captured", "payment.authorized"]
    assert newest_first[0]["data"]["object"] == captured.json()
    assert newest_first[0]["request"]["idempotency_key"] == capture_key
    [refunded] = events(api, shop, object=refund["id"])
    assert refunded["type"] == "refund.succeeded"
    assert refunded["data"]["object"] == refund


@pytest.mark.parametrize(("number", "code"), sorted(DECLINED.items())[:1])
def test_a_decline_and_a_cancel_are_events_too(
    api: ServiceProcess, vault: ServiceProcess, shop: ApiMerchant, number: str, code: str
) -> None:
    declined = pay(api, vault, shop, number=number).json()["error"]
    [event] = events(api, shop, object=declined["payment"])
    assert (event["type"], event["data"]["object"]["decline_code"]) == ("payment.declined", code)
    held = pay(api, vault, shop, capture=False).json()
    post(api, shop, f"/v1/payments/{held['id']}/cancel")
    assert [e["type"] for e in events(api, shop, object=held["id"])] == [
        "payment.canceled",
        "payment.authorized",
    ]


def test_events_are_listed_with_cursors_and_filters_and_only_to_their_merchant(
    api: ServiceProcess, vault: ServiceProcess, shop: ApiMerchant, other_merchant: ApiMerchant
) -> None:
    for _ in range(3):
        pay(api, vault, shop)
    pay(api, vault, shop, capture=False)
    everything = events(api, shop, limit=100)
    assert len(everything) == 4
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)
    first = httpx.get(f"{api.url}/v1/events", params={"limit": 2}, headers=shop.auth).json()
    assert first["has_more"] is True
    rest = events(api, shop, limit=10, starting_after=first["data"][-1]["id"])
    assert [e["id"] for e in first["data"] + rest] == [e["id"] for e in everything]
    back = events(api, shop, limit=10, ending_before=rest[0]["id"])
    assert [e["id"] for e in back] == [e["id"] for e in first["data"]]
    assert len(events(api, shop, type="payment.captured")) == 3
    assert len(events(api, shop, type="payment.authorized")) == 1

    one = everything[0]
    read = httpx.get(f"{api.url}/v1/events/{one['id']}", headers=shop.auth)
    assert read.json() == one
    foreign = httpx.get(f"{api.url}/v1/events/{one['id']}", headers=other_merchant.auth)
    assert foreign.status_code == 404
    assert one["id"] not in {e["id"] for e in events(api, other_merchant, limit=100)}


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"type": "payment.exploded"}, 400),
        ({"limit": 0}, 400),
        ({"limit": "many"}, 400),
        ({"starting_after": "pay_123"}, 400),
        ({"object": "nope"}, 400),
        ({"starting_after": "evt_" + "0" * 26, "ending_before": "evt_" + "1" * 26}, 400),
    ],
)
def test_bad_list_parameters_get_a_400(
    api: ServiceProcess, shop: ApiMerchant, params: dict[str, Any], status: int
) -> None:
    response = httpx.get(f"{api.url}/v1/events", params=params, headers=shop.auth)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_and_malformed_event_ids_are_404(api: ServiceProcess, shop: ApiMerchant) -> None:
    for event_id in ("evt_" + "0" * 26, "evt_bad", "pay_" + "0" * 26):
        assert httpx.get(f"{api.url}/v1/events/{event_id}", headers=shop.auth).status_code == 404
        deliveries = httpx.get(f"{api.url}/v1/events/{event_id}/deliveries", headers=shop.auth)
        assert deliveries.status_code == 404


def test_no_event_and_no_posting_survive_a_rolled_back_transaction(
    api: ServiceProcess, vault: ServiceProcess, shop: ApiMerchant, api_env: dict[str, str]
) -> None:
    """The publisher writes into the caller's transaction: when it rolls back, so do they."""
    payment = pay(api, vault, shop, capture=False).json()

    async def change_that_fails(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await Publisher().publish(
                conn,
                shop.id,
                "payment.canceled",
                payment["id"],
                EventData({"id": payment["id"]}),
                Cause(),
                payment_id=payment["id"],
                postings=ledger.release("EUR", 1050),
            )
            raise RuntimeError("the change failed after the event was written")

    async def run() -> tuple[int, int]:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            with pytest.raises(RuntimeError):
                await change_that_fails(conn)
            releases = await conn.fetchval(
                "SELECT count(*) FROM ledger_postings WHERE payment_id = $1 AND kind = 'release'",
                payment["id"],
            )
            count = await conn.fetchval(
                "SELECT count(*) FROM events WHERE object_id = $1", payment["id"]
            )
            return int(count), int(releases)
        finally:
            await conn.close()

    assert asyncio.run(run()) == (1, 0)  # only the authorization's event; no release
    assert [e["type"] for e in events(api, shop, object=payment["id"])] == ["payment.authorized"]


async def post_entries(
    conn: asyncpg.Connection, payment: Any, entries: list[tuple[str, str, int]]
) -> None:
    """One posting with these (account, currency, amount) entries, committed."""
    async with conn.transaction():
        posting = await conn.fetchval(
            "INSERT INTO ledger_postings (merchant_id, payment_id, kind) "
            "VALUES ($1, $2, 'capture') RETURNING id",
            payment["merchant_id"],
            payment["id"],
        )
        for account, currency, amount in entries:
            await conn.execute(
                "INSERT INTO ledger_entries (posting_id, merchant_id, account, currency, amount) "
                "VALUES ($1, $2, $3, $4, $5)",
                posting,
                payment["merchant_id"],
                account,
                currency,
                amount,
            )


def test_an_unbalanced_posting_is_refused_by_the_database(api_env: dict[str, str]) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            payment = await conn.fetchrow("SELECT merchant_id, id FROM payments LIMIT 1")
            assert payment is not None, "the session has made payments by now"
            before = await conn.fetchval("SELECT count(*) FROM ledger_postings")
            off_by_one = [("psp_clearing", "EUR", 100), ("merchant_balance", "EUR", -99)]
            with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
                await post_entries(conn, payment, off_by_one)
            with pytest.raises(asyncpg.CheckViolationError, match="no entries"):
                await post_entries(conn, payment, [])
            # Each currency must balance on its own, not just the sum.
            two_currencies = [("psp_clearing", "EUR", 100), ("merchant_balance", "USD", -100)]
            with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
                await post_entries(conn, payment, two_currencies)
            assert await conn.fetchval("SELECT count(*) FROM ledger_postings") == before
        finally:
            await conn.close()

    asyncio.run(run())


def test_ledger_entries_can_be_neither_changed_nor_deleted(
    api_env: dict[str, str], databases: Any
) -> None:
    async def run() -> None:
        runtime = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        db = databases["api"]
        owner = await asyncpg.connect(dsn(db.owner, db.database))
        try:
            for conn, error in (
                (runtime, asyncpg.InsufficientPrivilegeError),
                (owner, asyncpg.InsufficientPrivilegeError),
            ):
                with pytest.raises(error):
                    await conn.execute("UPDATE ledger_entries SET amount = amount * 2")
                with pytest.raises(error):
                    await conn.execute("DELETE FROM ledger_entries")
                with pytest.raises(error):
                    await conn.execute("DELETE FROM ledger_postings")
        finally:
            await runtime.close()
            await owner.close()

    asyncio.run(run())


def test_the_balance_is_derived_from_the_ledger(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    tokens: dict[str, str],
) -> None:
    merchant = create_merchant(api_env, vault, tokens["admin"], "Balance shop")
    configure_routing(api_env, merchant, "--fee", "psp_a=30+100")  # 0.30 + 1 %
    assert httpx.get(f"{api.url}/v1/balance", headers=merchant.auth).json() == {
        "available": [],
        "pending": [],
        "object": "balance",
    }
    captured = pay(api, vault, merchant, amount=10_000).json()
    held = pay(api, vault, merchant, amount=7_000, capture=False).json()
    assert held["status"] == "authorized"  # held money is no balance
    post(api, merchant, f"/v1/payments/{captured['id']}/refunds", {"amount": 2_500})
    balance = httpx.get(f"{api.url}/v1/balance", headers=merchant.auth).json()
    # Captures (net of the 130 fee) settle after 2 days; the refund is taken at once.
    assert balance["pending"] == [{"amount": 10_000 - 130, "currency": "EUR"}]
    assert balance["available"] == [{"amount": -2_500, "currency": "EUR"}]


def test_the_ledger_check_finds_a_payment_the_ledger_disagrees_with(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    api_env: dict[str, str],
    databases: Any,
) -> None:
    import json
    import os
    import subprocess
    import sys

    payment = pay(api, vault, shop, amount=4_000).json()

    def check() -> tuple[int, dict[str, Any]]:
        result = subprocess.run(
            [sys.executable, "-m", "tessera.cli", "ledger", "check"],
            env={**os.environ, **api_env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, json.loads(result.stdout)

    code, report = check()
    assert code == 0, report
    db = databases["api"]

    async def tamper(amount: int) -> None:
        conn = await asyncpg.connect(dsn(db.owner, db.database))
        try:
            await conn.execute(
                "UPDATE payments SET amount_captured = $3 WHERE merchant_id = $1 AND id = $2",
                shop.id,
                payment["id"],
                amount,
            )
        finally:
            await conn.close()

    asyncio.run(tamper(3_999))
    try:
        code, report = check()
    finally:
        asyncio.run(tamper(4_000))
    assert code == 1
    assert report["mismatches"] == [
        {
            "merchant": shop.id,
            "payment": payment["id"],
            "status": "captured",
            "field": "amount_captured",
            "payments_table": 3_999,
            "ledger": 4_000,
        }
    ]


async def test_the_fee_is_read_on_the_callers_connection_inside_its_transaction(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    """The fee lookup runs inside a result's transaction. It once took a second connection
    from the pool: with the merchant's routing not cached and every connection so held, each
    request waited for another connection for ever (the load test found 8 stuck that way).
    Here the pool has one connection, held by the caller: only its own connection can answer."""
    from api.services.routing import processing_fee
    from api.storage.routing import RoutingRepository

    merchant = create_merchant(api_env, vault, tokens["admin"], "Fee shop")
    configure_routing(api_env, merchant, "--fee", "psp_a=10+50")  # 0.10 + 0.5 %
    payment = {"merchant_id": merchant.id, "processor": "psp_a", "card_brand": "visa"}
    pool = await asyncpg.create_pool(api_env["TESSERA_API_DATABASE_URL"], min_size=1, max_size=1)
    try:
        routing = RoutingRepository(pool)  # a cold cache
        async with pool.acquire() as conn, conn.transaction():
            fee = await asyncio.wait_for(processing_fee(routing, conn, payment, 1000), 5)
    finally:
        await pool.close()
    assert fee == 15
