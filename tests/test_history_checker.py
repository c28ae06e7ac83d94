"""Campaign 5 (issue 9): the history checker (`tests/support/history.py`) catches what it is
for. A short scripted history is made through the session's real API, vault and simulators;
the checker must pass it, and must flag every violation planted afterwards: fabricated histories
(an ok capture that never happened, a failed one that did, an acknowledged payment that is
missing) and rows planted in the real database or at the real simulator (a second ledger
posting, an unbalanced posting, two payments for one key, a refund applied twice, a capture the
simulator has and Tessera has not). Planted rows are removed again, so the session's closing
`tessera ledger check` still sees the true ledger. No database or HTTP peer is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from core.ids import new_id
from tests.conftest import API_DB, ApiMerchant, create_merchant
from tests.support.history import (
    CheckResult,
    Client,
    History,
    Kind,
    Operation,
    Result,
    Sources,
    check,
)
from tests.support.payments import tokenize
from tests.support.processes import ServiceProcess


@dataclass
class Recorded:
    history: History
    sources: Sources
    merchant: ApiMerchant
    #: payment ids by role: "refunded" (captured in part, refunded in part), "canceled",
    #: "declined", "captured" (at once), "authorized" (left so)
    payments: dict[str, str]


@pytest.fixture(scope="module")
def recorded(
    api: ServiceProcess,
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    tokens: dict[str, str],
) -> Recorded:
    """A scripted history through the real stack, every outcome known beforehand."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "History checker")
    approved = tokenize(vault, merchant)
    declined = tokenize(vault, merchant, "4000000000000002")
    history = History()

    async def script() -> dict[str, str]:
        async with httpx.AsyncClient(base_url=api.url) as http:
            client = Client(http, history, merchant.auth)
            refunded = await client.authorize(approved, 3000, capture=False)
            assert refunded.payment is not None
            await client.capture(refunded.payment, 2000)
            await client.refund(refunded.payment, 500)
            await client.refund(refunded.payment, 2000)  # more than is left: refused
            canceled = await client.authorize(approved, 1500, capture=False)
            assert canceled.payment is not None
            await client.cancel(canceled.payment)
            await client.capture(canceled.payment)  # canceled: refused
            refused = await client.authorize(declined, 800, capture=True)
            captured = await client.authorize(approved, 1200, capture=True)
            authorized = await client.authorize(approved, 1000, capture=False)
            found = {
                "refunded": refunded.payment,
                "canceled": canceled.payment,
                "declined": refused.payment,
                "captured": captured.payment,
                "authorized": authorized.payment,
            }
            return {role: payment for role, payment in found.items() if payment}

    payments = asyncio.run(script())
    sources = Sources(
        api.url, merchant.auth, merchant.id, api_env["TESSERA_API_DATABASE_URL"], psp_a.url
    )
    return Recorded(history, sources, merchant, payments)


def test_the_true_history_passes(recorded: Recorded) -> None:
    result = check(recorded.history, recorded.sources)
    result.print("the scripted history")
    assert result.ok, result.summary()
    assert result.counts == {
        "authorize": {"ok": 4, "failed": 1},
        "capture": {"ok": 1, "failed": 1},
        "refund": {"ok": 1, "failed": 1},
        "cancel": {"ok": 1},
    }
    assert result.statuses == {
        "partially_refunded": 1,
        "canceled": 1,
        "declined": 1,
        "captured": 1,
        "authorized": 1,
    }


def _fabricated(history: History, *changes: tuple[int, dict[str, Any]]) -> History:
    """A copy of the history with some operations' fields changed."""
    copy = History()
    copy.operations = [dataclasses.replace(op) for op in history.operations]
    copy.calls = list(history.calls)
    for index, fields in changes:
        copy.operations[index] = dataclasses.replace(copy.operations[index], **fields)
    return copy


def _find(history: History, kind: Kind, payment: str, result: Result) -> Operation:
    return next(
        op
        for op in history.operations
        if op.kind is kind and op.result is result and (op.payment == payment)
    )


def _flagged(result: CheckResult, *fragments: str) -> None:
    result.print("planted")
    assert not result.ok
    for fragment in fragments:
        assert any(fragment in v for v in result.violations), (fragment, result.violations)


def test_an_ok_capture_that_was_not_applied_is_caught(recorded: Recorded) -> None:
    """The history says a capture of the authorized payment succeeded; it never happened."""
    history = _fabricated(recorded.history)
    payment = recorded.payments["authorized"]
    ghost = history.invoke(Kind.CAPTURE, "never-applied", payment=payment, amount=1000)
    history.complete(ghost, Result.OK)
    _flagged(check(history, recorded.sources), f"{payment}: capture ok for 1000, captured 0")


def test_a_failed_operation_that_was_applied_is_caught(recorded: Recorded) -> None:
    """The history says the capture and the refund failed; both happened."""
    payment = recorded.payments["refunded"]
    capture = _find(recorded.history, Kind.CAPTURE, payment, Result.OK)
    refund = _find(recorded.history, Kind.REFUND, payment, Result.OK)
    history = _fabricated(
        recorded.history,
        (capture.index, {"result": Result.FAILED}),
        (refund.index, {"result": Result.FAILED}),
    )
    _flagged(
        check(history, recorded.sources),
        f"{payment}: captured 2000, but no capture was ok or unknown",
        f"{payment}: refunds {{500: 1}} applied that no ok or unknown refund asked for",
    )


def test_an_acknowledged_payment_that_is_missing_is_caught(recorded: Recorded) -> None:
    history = _fabricated(recorded.history)
    missing = new_id("pay")
    lost = history.invoke(Kind.AUTHORIZE, "lost-key", amount=900)
    history.complete(lost, Result.OK, payment=missing, acknowledged=True, status=201)
    result = check(history, recorded.sources)
    _flagged(result, f"{missing}: acknowledged (201) but missing", "lost-key: ok but no payment")
    assert result.lost == [missing]


@asynccontextmanager
async def _admin(pg_admin_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A superuser connection to the session's API database (planting needs one)."""
    conn = await asyncpg.connect(pg_admin_url, database=API_DB.database)
    try:
        yield conn
    finally:
        await conn.close()


async def _remove_postings(pg_admin_url: str, posting_ids: list[int]) -> None:
    """Planted postings out again: the ledger refuses deletes, so its triggers are switched
    off for this session only."""
    async with _admin(pg_admin_url) as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("DELETE FROM ledger_entries WHERE posting_id = ANY($1)", posting_ids)
        await conn.execute("DELETE FROM ledger_postings WHERE id = ANY($1)", posting_ids)


def test_a_capture_booked_twice_is_caught(recorded: Recorded, pg_admin_url: str) -> None:
    """A second capture posting for the captured payment, balanced: what a late, unfenced
    write would leave (tests/test_chaos_leases.py)."""
    payment = recorded.payments["refunded"]

    async def plant() -> int:
        async with _admin(pg_admin_url) as conn, conn.transaction():
            original = await conn.fetchval(
                "SELECT id FROM ledger_postings WHERE payment_id = $1 AND kind = 'capture'",
                payment,
            )
            copy: int = await conn.fetchval(
                "INSERT INTO ledger_postings (merchant_id, payment_id, kind) "
                "SELECT merchant_id, payment_id, kind FROM ledger_postings WHERE id = $1 "
                "RETURNING id",
                original,
            )
            await conn.execute(
                "INSERT INTO ledger_entries (posting_id, merchant_id, account, currency, amount, "
                "available_on) SELECT $2, merchant_id, account, currency, amount, available_on "
                "FROM ledger_entries WHERE posting_id = $1",
                original,
                copy,
            )
            return copy

    planted = asyncio.run(plant())
    try:
        result = check(recorded.history, recorded.sources)
    finally:
        asyncio.run(_remove_postings(pg_admin_url, [planted]))
    _flagged(
        result,
        f"{payment}: ledger captured: table 2000, ledger 4000",
        f"{payment}: 2 capture postings",
    )


def test_an_unbalanced_posting_is_caught(recorded: Recorded, pg_admin_url: str) -> None:
    """A posting whose entries do not sum to zero (the database refuses one; planted past its
    check)."""
    payment = recorded.payments["captured"]

    async def plant() -> int:
        async with _admin(pg_admin_url) as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            posting: int = await conn.fetchval(
                "INSERT INTO ledger_postings (merchant_id, payment_id, kind) "
                "VALUES ($1, $2, 'fee') RETURNING id",
                recorded.merchant.id,
                payment,
            )
            await conn.execute(
                "INSERT INTO ledger_entries (posting_id, merchant_id, account, currency, amount) "
                "VALUES ($1, $2, 'fees', 'EUR', 7)",
                posting,
                recorded.merchant.id,
            )
            return posting

    planted = asyncio.run(plant())
    try:
        result = check(recorded.history, recorded.sources)
    finally:
        asyncio.run(_remove_postings(pg_admin_url, [planted]))
    _flagged(result, f"ledger: posting {planted} sums to 7 EUR")


@pytest.fixture
def planted_rows(pg_admin_url: str) -> Iterator[list[tuple[str, str]]]:
    """(table, id) of rows a test planted; removed after it."""
    rows: list[tuple[str, str]] = []
    yield rows

    async def remove() -> None:
        async with _admin(pg_admin_url) as conn:
            for table, row_id in reversed(rows):
                await conn.execute(f"DELETE FROM {table} WHERE id = $1", row_id)

    asyncio.run(remove())


def test_two_payments_for_one_key_are_caught(
    recorded: Recorded, pg_admin_url: str, planted_rows: list[tuple[str, str]]
) -> None:
    """A second payment row with the first one's reference (the key it was made with): what a
    key claimed twice would leave."""
    payment = recorded.payments["captured"]
    twin = new_id("pay")

    async def plant() -> None:
        async with _admin(pg_admin_url) as conn:
            await conn.execute(
                "INSERT INTO payments SELECT (jsonb_populate_record(NULL::payments, "
                "to_jsonb(p) || jsonb_build_object('id', $2::text))).* FROM payments p "
                "WHERE id = $1",
                payment,
                twin,
            )

    asyncio.run(plant())
    planted_rows.append(("payments", twin))
    key = next(op.key for op in recorded.history.operations if op.payment == payment)
    _flagged(check(recorded.history, recorded.sources), f"key {key}: 2 payments")


def test_a_refund_applied_twice_is_caught(
    recorded: Recorded, pg_admin_url: str, planted_rows: list[tuple[str, str]]
) -> None:
    """The refund's answer was lost (unknown: it may have happened once), and the world shows
    it twice: a second succeeded refund row of the same amount."""
    payment = recorded.payments["refunded"]
    refund = _find(recorded.history, Kind.REFUND, payment, Result.OK)
    history = _fabricated(recorded.history, (refund.index, {"result": Result.UNKNOWN}))
    twin = new_id("re")

    async def plant() -> None:
        async with _admin(pg_admin_url) as conn:
            await conn.execute(
                "INSERT INTO refunds (merchant_id, id, payment_id, amount, reason, status) "
                "SELECT merchant_id, $2, payment_id, amount, reason, status FROM refunds "
                "WHERE id = $1",
                refund.refund,
                twin,
            )

    asyncio.run(plant())
    planted_rows.append(("refunds", twin))
    _flagged(
        check(history, recorded.sources),
        f"{payment}: refunds {{500: 1}} applied that no ok or unknown refund asked for",
        f"{payment}: refunds add up to 1000, payment says 500",
    )


def test_a_simulator_that_disagrees_is_caught(recorded: Recorded, psp_a: ServiceProcess) -> None:
    """PSP A captures the authorized payment behind Tessera's back. (Last: it stays so.)"""
    payment = recorded.payments["authorized"]
    auth = httpx.get(
        psp_a.url + "/admin/authorizations", params={"reference": f"{payment}_1"}
    ).json()["authorizations"][0]
    captured = httpx.post(
        f"{psp_a.url}/v1/authorizations/{auth['id']}/capture",
        json={"amount": 1000},
        headers={"authorization": "Bearer psp_a_test_key"},
    )
    assert captured.status_code == 200, captured.text
    _flagged(check(recorded.history, recorded.sources), f"{payment}: captured 0, the PSP 1000")
