"""Recovering declined renewals (issue 13): each decline class handled as its table says, retries
as new attempts on the same payment, the schemes' caps under a clock moved through 30 days, a
recovered renewal's ledger, the worker and the merchant racing, two workers, a retry that waits
for a card update, and the merchant's switches and endpoints.

Real API, vault, both PSP simulators (their scripted issuer: a card's next answers) and
Postgres. The schedule's days are moved through by the worker's own code run in-process with an
injected clock (`services.recovery.clock`), against the same database and simulators; the
customer-facing calls go over HTTP to the API process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from api.settings import ApiSettings
from api.storage.worker import WorkerRepository
from api.wiring import Services, open_services
from api.worker import reconcile
from tessera.runtime.db import create_pool
from tessera.runtime.redis_client import connect as connect_redis
from tessera.runtime.settings import load_settings
from tests.conftest import ApiMerchant
from tests.support.payments import (
    new_key,
    pay,
    post,
    psp_authorizations,
    psp_b_payments,
    wait_for,
)
from tests.support.processes import ServiceProcess
from tests.support.subscriptions import (
    authorizations_and_captures,
    get,
    renew,
    setup_payment,
    shop_at,
    unused_mastercard,
    unused_visa,
)

FUNDS = {"decline_code": "insufficient_funds"}
APPROVE = {"approve": True}


def script(psp: ServiceProcess, number: str, *answers: dict[str, Any]) -> None:
    """The card's next answers at `psp` (sandbox/issuer.py), then its table again."""
    body = {"number": number, "outcomes": list(answers)}
    response = httpx.post(psp.url + "/admin/issuer_script", json=body, timeout=10)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def shops(
    api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]
) -> dict[str, ApiMerchant]:
    """Recovery on, one merchant per processor; and one with recovery off."""
    return {
        "psp_a": shop_at(api_env, vault, tokens["admin"], "Recovery", "psp_a", "--recovery"),
        "psp_b": shop_at(api_env, vault, tokens["admin"], "Recovery", "psp_b", "--recovery"),
        "off": shop_at(api_env, vault, tokens["admin"], "Recovery", "psp_a"),
    }


@pytest.fixture(autouse=True)
def no_recovery_left_behind(api: ServiceProcess, shops: dict[str, ApiMerchant]) -> Iterator[None]:
    """Each test's worker runs at its own clock; what an earlier test left scheduled would be
    retried too. So each test cancels, through the API, the recoveries it leaves scheduled."""
    yield
    for shop in shops.values():
        for found in get(api, shop, "/v1/payments", limit=100).json()["data"]:
            if (found["recovery"] or {}).get("status") == "scheduled":
                canceled = post(api, shop, f"/v1/payments/{found['id']}/cancel")
                assert canceled.status_code == 200, canceled.text


@asynccontextmanager
async def worker_services(
    api_env: dict[str, str], vault: ServiceProcess, **env: str
) -> AsyncIterator[Services]:
    """The worker's services, in this process: its recovery run with a clock the test sets."""
    settings = load_settings(ApiSettings, {**api_env, "TESSERA_API_VAULT_URL": vault.url, **env})
    pool = await create_pool(settings.database_url, min_size=1, max_size=4, wait_seconds=10)
    redis = connect_redis(settings.redis_url, socket_timeout=2)
    try:
        async with open_services(settings, pool, redis) as services:
            yield services
    finally:
        await redis.aclose()
        await pool.close()


def at(services: Services, moment: datetime) -> None:
    services.recovery.clock = lambda: moment


async def run_until_idle(services: Services) -> None:
    """The worker's recovery turns at the services' clock, until nothing more is due."""
    for _ in range(20):
        if await services.recovery.run_due(500) == 0:
            return


def payment(api: ServiceProcess, shop: ApiMerchant, payment_id: str) -> dict[str, Any]:
    response = get(api, shop, f"/v1/payments/{payment_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def event_types(api: ServiceProcess, shop: ApiMerchant, payment_id: str) -> list[str]:
    events = get(api, shop, "/v1/events", object=payment_id, limit=100).json()["data"]
    return [e["type"] for e in reversed(events)]  # oldest first


def declined_renewal(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    psp: ServiceProcess,
    number: str,
    *answers: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """A payment method on `number`, then a renewal the scripted issuer declines."""
    method = setup_payment(api, vault, shop, number)["payment_method"]
    script(psp, number, *answers)
    body = {
        "amount": 1200,
        "currency": "EUR",
        "payment_method": method,
        "off_session": True,
        "mit_reason": "recurring",
        **extra,
    }
    response = post(api, shop, "/v1/payments", body)
    assert response.status_code == 402, response.text
    return payment(api, shop, response.json()["error"]["payment"])


def authorizations_at(
    psp_a: ServiceProcess, psp_b: ServiceProcess, processor: str, reference: str
) -> list[dict[str, Any]]:
    if processor == "psp_a":
        return psp_authorizations(psp_a, reference)
    return psp_b_payments(psp_b, reference)


def retry(api: ServiceProcess, shop: ApiMerchant, payment_id: str, **kw: Any) -> httpx.Response:
    return post(api, shop, f"/v1/payments/{payment_id}/retry", **kw)


def recovery_times(api_env: dict[str, str], payment_id: str) -> tuple[Any, Any]:
    """When the worker looks at the payment next, and its next retry (read-only)."""

    async def read() -> tuple[Any, Any]:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            row = await conn.fetchrow(
                "SELECT recovery_due_at, recovery_next_attempt_at FROM payments WHERE id = $1",
                payment_id,
            )
        finally:
            await conn.close()
        assert row is not None
        return row["recovery_due_at"], row["recovery_next_attempt_at"]

    return asyncio.run(read())


def attempt_times(api_env: dict[str, str], payment_ids: list[str]) -> list[datetime]:
    async def read() -> list[datetime]:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            rows = await conn.fetch(
                "SELECT started_at FROM payment_attempts WHERE payment_id = ANY($1) "
                "AND retry_by IS NOT NULL ORDER BY started_at",
                payment_ids,
            )
        finally:
            await conn.close()
        return [r["started_at"] for r in rows]

    return asyncio.run(read())


# --- a renewal recovered --------------------------------------------------------------------


@pytest.mark.parametrize("processor", ["psp_a", "psp_b"])
def test_a_renewal_declined_for_funds_is_recovered_by_a_scheduled_retry_with_one_charge(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    shops: dict[str, ApiMerchant],
    processor: str,
) -> None:
    shop, psp = shops[processor], (psp_a if processor == "psp_a" else psp_b)
    number = unused_visa()
    declined = declined_renewal(api, vault, shop, psp, number, FUNDS, APPROVE)
    assert declined["status"] == "declined"
    assert declined["decline"]["retryable"] == "later"
    recovery = declined["recovery"]
    assert (recovery["status"], recovery["attempts"]) == ("scheduled", 0)
    # The fixed schedule (too little history to learn from here): day 1 after the decline.
    due = datetime.fromtimestamp(recovery["next_attempt_at"], UTC)
    assert timedelta(hours=23) < due - datetime.now(UTC) <= timedelta(days=1)
    assert event_types(api, shop, declined["id"]) == [
        "payment.declined",
        "payment.retry_scheduled",
    ]

    async def worker() -> None:
        async with worker_services(api_env, vault) as services:
            at(services, due - timedelta(minutes=1))  # not yet: nothing is sent
            await run_until_idle(services)
            assert payment(api, shop, declined["id"])["status"] == "declined"
            at(services, due + timedelta(seconds=1))
            await run_until_idle(services)

    asyncio.run(worker())
    recovered = payment(api, shop, declined["id"])
    assert recovered["status"] == "captured"
    assert recovered["recovery"]["status"] == "recovered"
    assert recovered["recovery"]["attempts"] == 1
    assert recovered["recovery"]["next_attempt_at"] is None
    assert [(a["outcome"], a["retry"]) for a in recovered["attempts"]] == [
        ("declined", None),
        ("approved", "schedule"),
    ]
    assert recovered["decline"] is None
    # One authorization at the processor per attempt; one approved.
    assert len(authorizations_at(psp_a, psp_b, processor, f"{declined['id']}_1")) == 1
    assert len(authorizations_at(psp_a, psp_b, processor, f"{declined['id']}_2")) == 1
    # Exactly one authorization and one capture in the ledger.
    assert authorizations_and_captures(api_env, declined["id"]) == (1, 1)
    assert event_types(api, shop, declined["id"]) == [
        "payment.declined",
        "payment.retry_scheduled",
        "payment.captured",
        "payment.recovered",
    ]


# --- each decline class ---------------------------------------------------------------------

HARD = [
    ("visa", {"decline_code": "stop_recurring", "visa_category": 1}),
    ("visa", {"decline_code": "lost_card"}),
    ("mastercard", {"decline_code": "do_not_honor", "advice_code": "03"}),
    ("mastercard", {"decline_code": "insufficient_funds", "advice_code": "21"}),
]


@pytest.mark.parametrize(("brand", "answer"), HARD)
def test_a_hard_decline_is_never_retried_by_any_path(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    shops: dict[str, ApiMerchant],
    brand: str,
    answer: dict[str, Any],
) -> None:
    shop = shops["psp_a"]
    number = unused_visa() if brand == "visa" else unused_mastercard()
    declined = declined_renewal(api, vault, shop, psp_a, number, answer, APPROVE)
    assert declined["decline"]["retryable"] == "never"
    assert declined["recovery"] is None
    refused = retry(api, shop, declined["id"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "decline_not_retryable"

    async def worker() -> None:
        async with worker_services(api_env, vault) as services:
            for days in (1, 3, 8, 31):
                at(services, datetime.now(UTC) + timedelta(days=days))
                await run_until_idle(services)

    asyncio.run(worker())
    after = payment(api, shop, declined["id"])
    assert after["status"] == "declined"
    assert [a["retry"] for a in after["attempts"]] == [None]  # zero retries
    assert psp_authorizations(psp_a, f"{declined['id']}_2") == []
    assert event_types(api, shop, declined["id"]) == ["payment.declined"]


def test_a_soft_decline_with_the_issuers_wait_is_retried_no_sooner_than_it_asked(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    """Mastercard MAC 24: retry after an hour. The merchant's retry now is refused until then."""
    shop = shops["psp_a"]
    answer = {"decline_code": "insufficient_funds", "advice_code": "24"}
    declined = declined_renewal(api, vault, shop, psp_a, unused_mastercard(), answer, APPROVE)
    assert declined["decline"]["retryable"] == "later"
    assert declined["recovery"]["status"] == "scheduled"
    refused = retry(api, shop, declined["id"])
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "retry_not_allowed_yet"
    wait = int(error["next_attempt_at"]) - datetime.now(UTC).timestamp()
    assert 3500 < wait <= 3600
    assert psp_authorizations(psp_a, f"{declined['id']}_2") == []


@pytest.mark.parametrize("processor", ["psp_a", "psp_b"])
def test_an_expired_card_waits_for_its_update_and_is_retried_as_soon_as_it_lands(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
    processor: str,
) -> None:
    shop, psp = shops[processor], (psp_a if processor == "psp_a" else psp_b)
    number = unused_visa()
    method = setup_payment(api, vault, shop, number)["payment_method"]
    update = {"number": number, "new_exp_month": 4, "new_exp_year": 2043, "decline_old": True}
    response = httpx.post(psp.url + "/admin/account_updates", json=update, timeout=10)
    assert response.status_code == 201, response.text
    declined = renew(api, shop, method)
    assert declined.status_code == 402, declined.text
    first = payment(api, shop, declined.json()["error"]["payment"])
    assert first["decline"]["retryable"] == "after_update"
    assert first["recovery"] == {
        "status": "scheduled",
        "attempts": 0,
        "next_attempt_at": None,
        "reason": "awaiting_update",
    }
    refused = retry(api, shop, first["id"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "awaiting_card_update"

    workers()  # the real worker: it applies the update, then the waiting retry goes at once
    wait_for(lambda: payment(api, shop, first["id"])["status"] == "captured", seconds=30)
    recovered = payment(api, shop, first["id"])
    assert recovered["recovery"]["status"] == "recovered"
    assert [(a["outcome"], a["retry"]) for a in recovered["attempts"]] == [
        ("declined", None),
        ("approved", "schedule"),
    ]
    assert len(authorizations_at(psp_a, psp_b, processor, f"{first['id']}_2")) == 1
    assert event_types(api, shop, first["id"])[-2:] == ["payment.captured", "payment.recovered"]
    assert authorizations_and_captures(api_env, first["id"]) == (1, 1)


# --- caps -----------------------------------------------------------------------------------


def test_caps_hold_under_a_clock_moved_through_30_days(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    """Three renewals of one card, declined every time; caps set lower than Visa's: 3 retries a
    payment, 5 a card in any 30 days. The worker runs every 6 hours of a 35-day clock."""
    shop = shops["psp_a"]
    number = unused_visa()
    method = setup_payment(api, vault, shop, number)["payment_method"]
    script(psp_a, number, *[FUNDS] * 40)
    ids = []
    for _ in range(3):
        response = renew(api, shop, method)
        assert response.status_code == 402, response.text
        ids.append(response.json()["error"]["payment"])
    start = datetime.now(UTC)
    caps = json.dumps({"visa": {"per_payment": 3, "per_card": 5}})

    async def worker() -> list[int]:
        statuses = []
        async with worker_services(api_env, vault, TESSERA_API_RECOVERY_CAPS=caps) as services:
            for step in range(35 * 4):
                at(services, start + timedelta(hours=6 * step))
                await run_until_idle(services)
            # The merchant's own retry, at the end of it all, under the same caps.
            for payment_id in ids:
                handled = await services.recovery.retry(
                    shop.id,
                    payment_id,
                    idempotency_key=new_key(),
                    method="POST",
                    path=f"/v1/payments/{payment_id}/retry",
                    raw_body=b"",
                    request_id="req_test",
                )
                statuses.append(handled.status)
                assert json.loads(handled.body)["error"]["code"] in (
                    "recovery_exhausted",
                    "retry_not_allowed_yet",
                ), handled.body
        return statuses

    assert asyncio.run(worker()) == [409, 409, 409]
    times = attempt_times(api_env, ids)
    assert len(times) == 5  # the card's cap binds before the payments' (3 x 3)
    for moment in times:
        inside = [t for t in times if moment - timedelta(days=30) < t <= moment]
        assert len(inside) <= 5
    for payment_id in ids:
        found = payment(api, shop, payment_id)
        assert found["status"] == "declined"
        assert found["recovery"]["attempts"] <= 3
        assert found["recovery"]["status"] == "exhausted", found["recovery"]
        assert event_types(api, shop, payment_id)[-1] == "payment.recovery_exhausted"
    assert sum(len(psp_authorizations(psp_a, f"{p}_{n}")) for p in ids for n in (2, 3, 4, 5)) == 5


# --- races ----------------------------------------------------------------------------------


def test_the_worker_and_the_merchants_retry_racing_never_charge_twice(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    ids = [
        declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, APPROVE, APPROVE)["id"]
        for _ in range(4)
    ]
    httpx.post(psp_a.url + "/admin/config", json={"latency_ms": 300}).raise_for_status()
    try:

        async def race() -> list[int]:
            async with worker_services(api_env, vault) as services:
                at(services, datetime.now(UTC) + timedelta(days=1, minutes=1))
                answers = []
                for payment_id in ids:
                    merchant = asyncio.to_thread(retry, api, shop, payment_id)
                    answer, _ = await asyncio.gather(merchant, services.recovery.run_due(500))
                    answers.append(answer.status_code)
                await run_until_idle(services)
                return answers

        statuses = asyncio.run(race())
    finally:
        httpx.post(psp_a.url + "/admin/config", json={"latency_ms": 0}).raise_for_status()
    assert set(statuses) <= {200, 409}, statuses
    for payment_id in ids:
        found = payment(api, shop, payment_id)
        assert found["status"] == "captured"
        approved = [a for a in found["attempts"] if a["outcome"] == "approved"]
        assert len(approved) == 1, found["attempts"]
        charges = [
            auth
            for n in range(2, 5)
            for auth in psp_authorizations(psp_a, f"{payment_id}_{n}")
            if auth["status"] in ("approved", "captured")
        ]
        assert len(charges) == 1
        assert authorizations_and_captures(api_env, payment_id) == (1, 1)


def test_two_workers_never_run_the_same_retry(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    ids = [
        declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, FUNDS, FUNDS)["id"]
        for _ in range(6)
    ]
    moment = datetime.now(UTC) + timedelta(days=1, minutes=1)

    async def two_workers() -> None:
        async with (
            worker_services(api_env, vault) as one,
            worker_services(api_env, vault) as two,
        ):
            at(one, moment)
            at(two, moment)
            await asyncio.gather(*(w.recovery.run_due(500) for w in (one, two, one, two)))

    asyncio.run(two_workers())
    for payment_id in ids:
        found = payment(api, shop, payment_id)
        assert [a["retry"] for a in found["attempts"]] == [None, "schedule"], found["attempts"]
        assert len(psp_authorizations(psp_a, f"{payment_id}_2")) == 1
        assert psp_authorizations(psp_a, f"{payment_id}_3") == []
        # Declined again: the next retry is scheduled (day 3 of the fixed schedule).
        assert found["recovery"]["status"] == "scheduled"
        assert found["recovery"]["attempts"] == 1


# --- the merchant's switches and endpoints --------------------------------------------------


def test_recovery_is_off_for_a_merchant_that_did_not_switch_it_on_and_for_a_payment_that_opted_out(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    off = declined_renewal(api, vault, shops["off"], psp_a, unused_visa(), FUNDS, APPROVE)
    assert off["recovery"] is None
    opted_out = declined_renewal(
        api, vault, shops["psp_a"], psp_a, unused_visa(), FUNDS, APPROVE, recovery=False
    )
    assert opted_out["recovery"] is None

    async def worker() -> None:
        async with worker_services(api_env, vault) as services:
            at(services, datetime.now(UTC) + timedelta(days=8))
            await run_until_idle(services)

    asyncio.run(worker())
    assert payment(api, shops["off"], off["id"])["status"] == "declined"
    assert payment(api, shops["psp_a"], opted_out["id"])["status"] == "declined"
    # The merchant's own retry still may: under the same classification and caps.
    key = new_key()
    first = retry(api, shops["off"], off["id"], key=key)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "captured"
    assert first.json()["recovery"]["status"] == "recovered"
    assert first.json()["attempts"][-1]["retry"] == "merchant"
    again = retry(api, shops["off"], off["id"], key=key)  # the same key: the same answer
    assert (again.status_code, again.json()) == (200, first.json())
    assert len(psp_authorizations(psp_a, f"{off['id']}_2")) == 1
    assert psp_authorizations(psp_a, f"{off['id']}_3") == []
    assert event_types(api, shops["off"], off["id"])[-2:] == [
        "payment.captured",
        "payment.recovered",
    ]


def test_a_merchants_retry_declined_again_answers_402_and_keeps_the_recovery_going(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    declined = declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, FUNDS, APPROVE)
    again = retry(api, shop, declined["id"])
    assert again.status_code == 402, again.text
    assert again.json()["error"]["decline_code"] == "insufficient_funds"
    found = payment(api, shop, declined["id"])
    assert found["recovery"]["status"] == "scheduled"
    assert found["recovery"]["attempts"] == 1
    assert [a["retry"] for a in found["attempts"]] == [None, "merchant"]


def test_cancel_stops_a_scheduled_recovery(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    declined = declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, APPROVE)
    canceled = post(api, shop, f"/v1/payments/{declined['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "declined"
    assert canceled.json()["recovery"]["status"] == "canceled"
    assert canceled.json()["recovery"]["next_attempt_at"] is None

    async def worker() -> None:
        async with worker_services(api_env, vault) as services:
            at(services, datetime.now(UTC) + timedelta(days=8))
            await run_until_idle(services)

    asyncio.run(worker())
    assert psp_authorizations(psp_a, f"{declined['id']}_2") == []
    assert payment(api, shop, declined["id"])["recovery"]["status"] == "canceled"
    # Canceling again: the payment is declined and not under recovery, so nothing to cancel.
    twice = post(api, shop, f"/v1/payments/{declined['id']}/cancel")
    assert twice.status_code == 409, twice.text
    assert twice.json()["error"]["code"] == "payment_not_cancelable"


def test_the_retry_endpoint_refuses_what_it_cannot_retry_with_a_documented_error(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
    other_merchant: ApiMerchant,
) -> None:
    shop = shops["psp_a"]
    customer_present = pay(api, vault, shop, number="4000000000000002")  # do_not_honor
    assert customer_present.status_code == 402
    cit = customer_present.json()["error"]["payment"]
    cases = [
        (cit, None, 409, "payment_not_retryable"),
        (pay(api, vault, shop).json()["id"], None, 409, "payment_not_retryable"),
        ("pay_" + "0" * 26, None, 404, "resource_missing"),
        ("not-a-payment", None, 404, "resource_missing"),
        (cit, {"amount": 5}, 400, None),
    ]
    for payment_id, body, status, code in cases:
        response = retry(api, shop, payment_id, body=body)
        assert response.status_code == status, (payment_id, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code
    declined = declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, APPROVE)
    foreign = retry(api, other_merchant, declined["id"])
    assert foreign.status_code == 404, foreign.text
    assert payment(api, shop, declined["id"])["attempts"][-1]["retry"] is None
    assert psp_authorizations(psp_a, f"{declined['id']}_2") == []
    missing_key = httpx.post(
        f"{api.url}/v1/payments/{declined['id']}/retry", headers=shop.auth, timeout=10
    )
    assert missing_key.status_code == 400
    assert missing_key.json()["error"]["code"] == "idempotency_key_missing"
    token_payment = post(
        api,
        shop,
        "/v1/payments",
        {"amount": 100, "currency": "EUR", "token": "tok_" + "0" * 26, "recovery": False},
    )
    assert token_payment.status_code == 400, token_payment.text
    assert token_payment.json()["error"]["param"] == "recovery"


def test_the_learned_schedule_learns_from_the_retries_tessera_made(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    """Its counts come from the database (every retry's outcome), not from one process's
    memory: a worker started afresh knows what the others learned."""
    shop = shops["psp_a"]
    ids = [
        declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, answer)["id"]
        for answer in (APPROVE, APPROVE, FUNDS)
    ]
    key = "later:insufficient_funds"

    async def learned() -> tuple[list[int], list[int]]:
        async with worker_services(api_env, vault) as first:
            await first.recovery.run_due(0)  # loads what is in the database now
            before = list(first.recovery.stats.totals.get(key, [0, 0]))
            at(first, datetime.now(UTC) + timedelta(days=1, minutes=1))
            await first.recovery.run_due(500)
        async with worker_services(api_env, vault) as fresh:
            await fresh.recovery.run_due(0)
            after = list(fresh.recovery.stats.totals.get(key, [0, 0]))
        return before, after

    before, after = asyncio.run(learned())
    statuses = [payment(api, shop, p)["status"] for p in ids]
    assert statuses == ["captured", "captured", "declined"]
    # Three more retries of this kind, two of them approved.
    assert (after[0] - before[0], after[1] - before[1]) == (2, 3)


def set_faults(psp: ServiceProcess, **config: Any) -> None:
    httpx.post(psp.url + "/admin/config", json=config, timeout=10).raise_for_status()


def test_a_retry_the_processor_failed_waits_an_hour_and_is_not_a_decline(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    shop = shops["psp_a"]
    declined = declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, APPROVE)
    due = datetime.fromtimestamp(declined["recovery"]["next_attempt_at"], UTC)

    async def worker() -> dict[str, Any]:
        async with worker_services(api_env, vault) as services:
            at(services, due + timedelta(seconds=1))
            set_faults(psp_a, fail_all_5xx=True)
            try:
                await run_until_idle(services)
            finally:
                set_faults(psp_a, fail_all_5xx=False)
            failed = payment(api, shop, declined["id"])
            at(services, due + timedelta(minutes=59))  # within the hour: nothing goes
            await run_until_idle(services)
            assert len(payment(api, shop, declined["id"])["attempts"]) == 2
            at(services, due + timedelta(hours=1, minutes=1))
            await run_until_idle(services)
            return failed

    failed = asyncio.run(worker())
    assert [(a["outcome"], a["retry"]) for a in failed["attempts"]] == [
        ("declined", None),
        ("failed", "schedule"),
    ]
    assert failed["status"] == "declined"
    assert failed["decline"]["code"] == "insufficient_funds"  # the issuer's answer still stands
    assert failed["recovery"]["status"] == "scheduled"
    wait = datetime.fromtimestamp(failed["recovery"]["next_attempt_at"], UTC) - due
    assert wait >= timedelta(hours=1)
    recovered = payment(api, shop, declined["id"])
    assert recovered["status"] == "captured"
    assert [a["outcome"] for a in recovered["attempts"]] == ["declined", "failed", "approved"]
    assert authorizations_and_captures(api_env, declined["id"]) == (1, 1)


def test_a_retry_whose_answer_was_lost_is_settled_by_the_reconciler_once(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
) -> None:
    """The processor approves the retry but its answer comes after the worker gave up: the
    attempt is unknown, nothing else is sent, and the reconciler's inquiry records it."""
    shop = shops["psp_a"]
    declined = declined_renewal(api, vault, shop, psp_a, unused_visa(), FUNDS, APPROVE, APPROVE)
    due = datetime.fromtimestamp(declined["recovery"]["next_attempt_at"], UTC)

    async def worker() -> dict[str, Any]:
        impatient = {"TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "0.5"}
        async with worker_services(api_env, vault, **impatient) as services:
            at(services, due + timedelta(seconds=1))
            set_faults(psp_a, timeout_rate=1.0, timeout_seconds=2.0)
            try:
                await services.recovery.run_due(500)
            finally:
                set_faults(psp_a, timeout_rate=0.0)
            lost = payment(api, shop, declined["id"])
            at(services, due + timedelta(days=2))  # the worker looks again: nothing is sent
            await run_until_idle(services)
            assert psp_authorizations(psp_a, f"{declined['id']}_3") == []
            work = WorkerRepository(services.payments.pool)
            settings = load_settings(ApiSettings, {**api_env, "TESSERA_API_VAULT_URL": vault.url})
            await asyncio.sleep(2.5)  # the held answer is out; the inquiry is due
            for _ in range(10):
                await reconcile(services, work, settings)
                if payment(api, shop, declined["id"])["status"] != "declined":
                    break
                await asyncio.sleep(0.5)
            return lost

    lost = asyncio.run(worker())
    assert [(a["outcome"], a["retry"]) for a in lost["attempts"]] == [
        ("declined", None),
        ("unknown", "schedule"),
    ]
    assert lost["status"] == "declined"
    settled = payment(api, shop, declined["id"])
    assert settled["status"] == "captured"
    assert settled["recovery"]["status"] == "recovered"
    assert [a["outcome"] for a in settled["attempts"]] == ["declined", "approved"]
    assert len(psp_authorizations(psp_a, f"{declined['id']}_2")) == 1
    assert authorizations_and_captures(api_env, declined["id"]) == (1, 1)


def test_a_card_update_leaves_a_funds_retry_where_it_was_and_sends_no_second_event(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    shops: dict[str, ApiMerchant],
    workers: Callable[..., ServiceProcess],
) -> None:
    """An update makes the payment method's recoveries due at once; a decline for funds is
    decided again to the same day-1 retry: no retry now, no new event."""
    shop = shops["psp_a"]
    number = unused_visa()
    declined = declined_renewal(api, vault, shop, psp_a, number, FUNDS, APPROVE)
    update = {"number": number, "new_exp_month": 6, "new_exp_year": 2044}
    response = httpx.post(psp_a.url + "/admin/account_updates", json=update, timeout=10)
    assert response.status_code == 201, response.text
    workers()
    method = declined["payment_method"]

    def updated() -> bool:
        card = get(api, shop, f"/v1/payment_methods/{method}").json()["card"]
        return bool(card["exp_year"] == 2044)

    wait_for(updated, seconds=30)

    def decided_again() -> bool:
        """The update made it due at once; the worker's decision puts it back to its time."""
        due, next_at = recovery_times(api_env, declined["id"])
        return bool(due == next_at)

    wait_for(decided_again, seconds=15)
    time_after = payment(api, shop, declined["id"])
    assert time_after["recovery"] == declined["recovery"]
    assert [a["retry"] for a in time_after["attempts"]] == [None]
    assert event_types(api, shop, declined["id"]) == [
        "payment.declined",
        "payment.retry_scheduled",
    ]
