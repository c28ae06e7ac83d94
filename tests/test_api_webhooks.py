"""Webhooks: endpoints, signed at-least-once delivery by the worker through failures, time-outs
and recovery, secret rolling, the SSRF policy, and two workers that never send one event to one
endpoint at the same time. The receiver is a real HTTP server (tests/support/webhook_receiver)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api.services.events import Publisher
from api.services.webhooks import (
    SecretBox,
    WebhookDeliverer,
    destination_problem,
    retry_delay,
    signature_header,
)
from tests.conftest import ApiMerchant, create_merchant
from tests.support.payments import pay, post, wait_for
from tests.support.processes import ServiceProcess
from tests.support.webhook_receiver import Delivery, WebhookReceiver, verify_signature

#: Workers that retry within a fraction of a second and give up on a receiver after 1 s.
FAST = {
    "TESSERA_API_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "TESSERA_API_WEBHOOK_TIMEOUT_SECONDS": "1",
}


@pytest.fixture
def shop(api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]) -> ApiMerchant:
    """A merchant of its own, so no other test's events reach this test's endpoints."""
    return create_merchant(api_env, vault, tokens["admin"], "Webhook shop")


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


def create_endpoint(
    api: ServiceProcess, merchant: ApiMerchant, url: str, events: list[str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{api.url}/v1/webhook_endpoints",
        json={"url": url, "events": events or ["*"]},
        headers=merchant.auth,
    )


def events_of(api: ServiceProcess, merchant: ApiMerchant) -> list[dict[str, Any]]:
    response = httpx.get(f"{api.url}/v1/events", params={"limit": 100}, headers=merchant.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["data"]
    return found


@asynccontextmanager
async def delivery_queue(api_env: dict[str, str], size: int = 2) -> AsyncIterator[Any]:
    """The worker's queue on its own pool of the API's runtime role, as the worker has it."""
    import asyncpg

    from api.storage.webhooks import DeliveryQueue

    pool = await asyncpg.create_pool(api_env["TESSERA_API_DATABASE_URL"], min_size=1, max_size=size)
    try:
        yield DeliveryQueue(pool)
    finally:
        await pool.close()


# --- endpoints ---------------------------------------------------------------------------------


def test_an_endpoint_is_created_with_a_secret_shown_only_once(
    api: ServiceProcess, shop: ApiMerchant, other_merchant: ApiMerchant, receiver: WebhookReceiver
) -> None:
    created = create_endpoint(api, shop, receiver.url, ["payment.captured", "refund.succeeded"])
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["id"].startswith("we_")
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["events"] == ["payment.captured", "refund.succeeded"]
    assert endpoint["status"] == "enabled"
    read = httpx.get(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=shop.auth)
    assert read.status_code == 200
    assert "secret" not in read.json()
    listed = httpx.get(f"{api.url}/v1/webhook_endpoints", headers=shop.auth).json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]]
    assert all("secret" not in e for e in listed)
    foreign = httpx.get(
        f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=other_merchant.auth
    )
    assert foreign.status_code == 404
    deleted = httpx.delete(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=shop.auth)
    assert deleted.json() == {"id": endpoint["id"], "deleted": True, "object": "webhook_endpoint"}
    gone = httpx.get(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=shop.auth)
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"url": "http://127.0.0.1:9/x", "events": ["payment.exploded"]}, "event_type_invalid"),
        ({"url": "http://10.1.2.3/x", "events": ["*"]}, "url_invalid"),
        ({"url": "ftp://127.0.0.1/x", "events": ["*"]}, "url_invalid"),
        ({"url": "http://user:pw@127.0.0.1/x", "events": ["*"]}, "url_invalid"),
        ({"url": "http://127.0.0.1/x", "events": []}, None),
        ({"url": "http://127.0.0.1/x", "events": ["*"], "extra": 1}, None),
        ({"url": 5, "events": ["*"]}, None),
    ],
)
def test_a_bad_endpoint_is_refused_with_a_precise_error_and_nothing_is_created(
    api: ServiceProcess, shop: ApiMerchant, body: dict[str, Any], code: str | None
) -> None:
    response = httpx.post(f"{api.url}/v1/webhook_endpoints", json=body, headers=shop.auth)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert httpx.get(f"{api.url}/v1/webhook_endpoints", headers=shop.auth).json()["data"] == []


def test_malformed_json_and_unknown_ids_get_clear_errors(
    api: ServiceProcess, shop: ApiMerchant
) -> None:
    broken = httpx.post(
        f"{api.url}/v1/webhook_endpoints",
        content=b'{"url": ',
        headers={**shop.auth, "content-type": "application/json"},
    )
    assert broken.status_code == 400
    for path in ("/v1/webhook_endpoints/we_nope", "/v1/webhook_endpoints/" + "we_" + "0" * 26):
        assert httpx.get(api.url + path, headers=shop.auth).status_code == 404
        assert httpx.delete(api.url + path, headers=shop.auth).status_code == 404


# --- the SSRF policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/hooks",  # public, but plain http
        "https://127.0.0.1/hooks",
        "https://localhost/hooks",
        "https://10.0.0.7/hooks",
        "https://172.16.5.4/hooks",
        "https://192.168.1.1/hooks",
        "https://169.254.169.254/latest/meta-data",  # the cloud metadata service
        "https://[::1]/hooks",
        "https://[fe80::1]/hooks",
        "https://[::ffff:10.0.0.1]/hooks",
        "https://0.0.0.0/hooks",
    ],
)
async def test_production_refuses_private_loopback_and_link_local_destinations(url: str) -> None:
    assert await destination_problem(url, production=True) is not None


async def test_production_accepts_https_to_a_public_address() -> None:
    assert await destination_problem("https://93.184.216.34/hooks", production=True) is None


async def test_development_allows_http_to_loopback_only() -> None:
    assert await destination_problem("http://127.0.0.1:8300/hooks", production=False) is None
    assert await destination_problem("http://10.0.0.7/hooks", production=False) is not None
    assert await destination_problem("https://10.0.0.7/hooks", production=False) is None


async def test_a_production_worker_never_sends_to_a_private_address(
    receiver: WebhookReceiver,
) -> None:
    """Checked again before each send: a name can resolve elsewhere after the endpoint was
    created. Nothing leaves; the delivery fails and is retried as any failure."""
    deliverer = WebhookDeliverer(
        pool=None,
        box=SecretBox(b"k" * 32),
        publisher=Publisher(),
        production=True,
    )
    try:
        status, error = await deliverer._send(receiver.url, b"{}", ["whsec_x"], "evt_x")
    finally:
        await deliverer.close()
    assert (status, error) == (None, "blocked_destination")
    assert receiver.deliveries == []


# --- signatures and retries -----------------------------------------------------------------


def test_the_signature_verifies_the_way_a_merchant_checks_it() -> None:
    body = b'{"id": "evt_1"}'
    now = int(time.time())
    header = signature_header(["whsec_new", "whsec_old"], now, body)
    assert verify_signature(header, body, "whsec_new")
    assert verify_signature(header, body, "whsec_old")
    assert not verify_signature(header, body, "whsec_other")
    assert not verify_signature(header, body + b" ", "whsec_new")
    assert not verify_signature(header, body, "whsec_new", now=now + 301)  # replayed later
    assert verify_signature(header, body, "whsec_new", now=now + 299)


def test_retries_back_off_exponentially_with_jitter_up_to_six_hours() -> None:
    import random

    rng = random.Random(7)
    delays = [retry_delay(n, 1.0, rng) for n in range(1, 30)]
    assert 0.75 <= delays[0] <= 1.25
    assert 1.5 <= delays[1] <= 2.5
    assert all(d <= 6 * 3600 * 1.25 for d in delays)
    assert delays[-1] >= 6 * 3600 * 0.75
    assert len({round(d, 6) for d in delays[-5:]}) == 5, "jitter spreads the retries"


def test_every_event_arrives_signed_through_failures_time_outs_and_recovery(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    workers: Callable[..., ServiceProcess],
) -> None:
    calls = itertools.count()

    def outage(delivery: Delivery) -> tuple[int, float]:
        n = next(calls)
        if n < 3:
            return 500, 0.0  # failing
        if n < 5:
            return 200, 2.5  # answers after the worker's 1 s time-out: not a success
        return 200, 0.0  # recovered

    receiver.behaviour = outage
    endpoint = create_endpoint(api, shop, receiver.url).json()
    payments = [pay(api, vault, shop, capture=False).json() for _ in range(2)]
    captured = post(api, shop, f"/v1/payments/{payments[0]['id']}/capture")
    assert captured.status_code == 200
    refund = post(api, shop, f"/v1/payments/{payments[0]['id']}/refunds", {"amount": 100})
    assert refund.status_code == 201
    expected = {e["id"] for e in events_of(api, shop)}
    assert len(expected) == 4  # two authorized, one captured, one refund

    workers(**FAST)
    wait_for(lambda: receiver.accepted_event_ids() >= expected, seconds=45)
    assert receiver.accepted_event_ids() == expected
    for delivery in receiver.deliveries:
        event = delivery.event
        assert verify_signature(
            delivery.headers["tessera-signature"], delivery.body, endpoint["secret"]
        )
        assert delivery.headers["tessera-event-id"] == event["id"]  # the receiver's dedupe id
        assert event["object"] == "event"
    assert any(d.status == 500 for d in receiver.deliveries)
    listed = httpx.get(
        f"{api.url}/v1/events/{sorted(expected)[0]}/deliveries", headers=shop.auth
    ).json()["data"]
    assert [(d["endpoint"], d["status"]) for d in listed] == [(endpoint["id"], "succeeded")]


def test_a_rolled_secret_signs_alongside_the_old_one_for_the_grace_period(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    workers: Callable[..., ServiceProcess],
) -> None:
    endpoint = create_endpoint(api, shop, receiver.url, ["payment.captured"]).json()
    rolled = httpx.post(
        f"{api.url}/v1/webhook_endpoints/{endpoint['id']}/roll_secret",
        json={"grace_seconds": 3600},
        headers=shop.auth,
    )
    assert rolled.status_code == 200, rolled.text
    new_secret = rolled.json()["secret"]
    assert new_secret != endpoint["secret"]
    workers(**FAST)
    pay(api, vault, shop)
    wait_for(lambda: len(receiver.accepted_event_ids()) == 1)
    [first] = receiver.deliveries
    assert first.headers["tessera-signature"].count("v1=") == 2
    assert verify_signature(first.headers["tessera-signature"], first.body, new_secret)
    assert verify_signature(first.headers["tessera-signature"], first.body, endpoint["secret"])

    at_once = httpx.post(
        f"{api.url}/v1/webhook_endpoints/{endpoint['id']}/roll_secret",
        json={"grace_seconds": 0},
        headers=shop.auth,
    ).json()["secret"]
    pay(api, vault, shop)
    wait_for(lambda: len(receiver.accepted_event_ids()) == 2)
    second = receiver.deliveries[-1]
    assert second.headers["tessera-signature"].count("v1=") == 1
    assert verify_signature(second.headers["tessera-signature"], second.body, at_once)
    assert not verify_signature(second.headers["tessera-signature"], second.body, new_secret)


def test_two_workers_never_send_one_event_to_one_endpoint_at_the_same_time(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    workers: Callable[..., ServiceProcess],
) -> None:
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def slow_and_flaky(delivery: Delivery) -> tuple[int, float]:
        with lock:
            seen = attempts.get(delivery.event["id"], 0)
            attempts[delivery.event["id"]] = seen + 1
        return (500 if seen < 2 else 200), 0.3

    receiver.behaviour = slow_and_flaky
    create_endpoint(api, shop, receiver.url)
    for _ in range(6):
        pay(api, vault, shop)
    expected = {e["id"] for e in events_of(api, shop)}
    workers(**FAST, TESSERA_API_WEBHOOK_ENDPOINT_CONCURRENCY="3")
    workers(**FAST, TESSERA_API_WEBHOOK_ENDPOINT_CONCURRENCY="3")
    wait_for(lambda: receiver.accepted_event_ids() >= expected, seconds=60)

    by_event: dict[str, list[Delivery]] = {}
    for delivery in receiver.deliveries:
        by_event.setdefault(delivery.event["id"], []).append(delivery)
    for event_id, sends in by_event.items():
        sends.sort(key=lambda d: d.arrived)
        for earlier, later in itertools.pairwise(sends):
            assert later.arrived >= earlier.answered, f"{event_id} was sent twice at once"
    assert receiver.max_in_flight <= 2 * 3, "at most 3 in flight per endpoint per worker"
    assert receiver.max_in_flight > 1, "the deliveries of one endpoint run concurrently"


def test_a_slow_endpoint_does_not_delay_another(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    workers: Callable[..., ServiceProcess],
) -> None:
    slow = WebhookReceiver(behaviour=lambda d: (200, 5.0)).start()
    fast = WebhookReceiver().start()
    try:
        create_endpoint(api, shop, slow.url)
        create_endpoint(api, shop, fast.url)
        workers(TESSERA_API_WEBHOOK_TIMEOUT_SECONDS="10")
        for _ in range(8):
            pay(api, vault, shop)
        started = time.monotonic()
        wait_for(lambda: len(fast.accepted_event_ids()) == 8, seconds=20)
        assert time.monotonic() - started < 4, "the fast endpoint waited for the slow one"
        assert slow.accepted_event_ids() == set(), "still held by the slow endpoint"
    finally:
        slow.stop()
        fast.stop()


def test_an_endpoint_that_keeps_failing_is_disabled_and_its_owner_told(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    workers: Callable[..., ServiceProcess],
) -> None:
    receiver.behaviour = lambda d: (503, 0.0)
    endpoint = create_endpoint(api, shop, receiver.url, ["payment.captured"]).json()
    payment = pay(api, vault, shop).json()
    workers(**FAST, TESSERA_API_WEBHOOK_DISABLE_AFTER_SECONDS="1")

    def disabled() -> bool:
        read = httpx.get(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=shop.auth)
        return bool(read.json()["status"] == "disabled")

    # The worker's housekeeping (disabling) runs once a minute, and first at start-up.
    wait_for(lambda: len(receiver.deliveries) >= 2, seconds=20)
    workers(**FAST, TESSERA_API_WEBHOOK_DISABLE_AFTER_SECONDS="1")
    wait_for(disabled, seconds=20)
    notices = httpx.get(
        f"{api.url}/v1/events",
        params={"type": "webhook_endpoint.disabled"},
        headers=shop.auth,
    ).json()["data"]
    assert [n["data"]["object"]["id"] for n in notices] == [endpoint["id"]]
    [captured] = httpx.get(
        f"{api.url}/v1/events",
        params={"type": "payment.captured", "object": payment["id"]},
        headers=shop.auth,
    ).json()["data"]
    [delivery] = httpx.get(
        f"{api.url}/v1/events/{captured['id']}/deliveries", headers=shop.auth
    ).json()["data"]
    assert delivery["status"] == "failed"
    assert delivery["attempts"] >= 2
    assert delivery["last_status"] == 503


def test_the_delivery_queue_claim_is_exclusive_under_concurrency(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    api_env: dict[str, str],
) -> None:
    """Eight claims at once on the real database: each due delivery goes to one claimer."""
    endpoint = create_endpoint(api, shop, receiver.url).json()
    for _ in range(5):
        pay(api, vault, shop)

    async def run() -> list[list[Any]]:
        async with delivery_queue(api_env, size=8) as queue:
            return list(await asyncio.gather(*(queue.claim(100, 100, 2) for _ in range(8))))

    claimed = [
        row["event_id"]
        for rows in asyncio.run(run())
        for row in rows
        if row["endpoint_id"] == endpoint["id"]
    ]
    assert len(claimed) == 5
    assert len(set(claimed)) == 5


def test_a_send_in_flight_when_its_endpoint_is_disabled_ends_failed_not_pending(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    api_env: dict[str, str],
) -> None:
    """The CI race: disabling marks pending deliveries failed while one is being sent; the
    send's 503 must not put it back to pending, where no worker would ever take it again."""
    endpoint = create_endpoint(api, shop, receiver.url, ["payment.captured"]).json()
    pay(api, vault, shop)

    async def run() -> tuple[list[str], str, str | None]:
        async with delivery_queue(api_env) as queue:
            pool = queue.pool
            [claimed] = [
                r for r in await queue.claim(100, 100, 60) if r["endpoint_id"] == endpoint["id"]
            ]
            await pool.execute(
                "UPDATE webhook_endpoints SET failing_since = now() - interval '1 hour' "
                "WHERE id = $1",
                endpoint["id"],
            )
            async with pool.acquire() as conn, conn.transaction():
                disabled = [r["id"] for r in await queue.failing_endpoints(conn, 60)]
            outcome = await queue.retry_or_fail(
                shop.id,
                claimed["event_id"],
                endpoint["id"],
                status=503,
                error="http_503",
                delay_seconds=1,
                window_seconds=3600,
            )
            status = await pool.fetchval(
                "SELECT status FROM webhook_deliveries WHERE event_id = $1 AND endpoint_id = $2",
                claimed["event_id"],
                endpoint["id"],
            )
            return disabled, outcome, status

    disabled, outcome, status = asyncio.run(run())
    assert endpoint["id"] in disabled
    assert (outcome, status) == ("failed", "failed")


def test_a_delivery_never_accepted_within_the_retry_window_is_marked_failed(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    receiver: WebhookReceiver,
    workers: Callable[..., ServiceProcess],
) -> None:
    receiver.behaviour = lambda d: (500, 0.0)
    endpoint = create_endpoint(api, shop, receiver.url, ["payment.captured"]).json()
    # The window counts from the event; on a loaded machine a worker that has just started can
    # take seconds to make its first attempt, and a 3 s window then left room for no retry.
    workers(**FAST, TESSERA_API_WEBHOOK_RETRY_WINDOW_SECONDS="8")
    payment = pay(api, vault, shop).json()
    [captured] = events_of(api, shop)
    assert captured["data"]["object"]["id"] == payment["id"]

    def delivery() -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(
            f"{api.url}/v1/events/{captured['id']}/deliveries", headers=shop.auth
        ).json()["data"][0]
        return found

    wait_for(lambda: delivery()["status"] == "failed", seconds=30)
    final = delivery()
    assert final["attempts"] >= 2, "retried before giving up"
    assert (final["last_status"], final["last_error"]) == (500, "http_500")
    assert len(receiver.deliveries) == final["attempts"]
    read = httpx.get(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=shop.auth)
    assert read.json()["status"] == "enabled"  # failing for seconds, not for days


def test_expired_events_are_purged_in_batches_and_recent_ones_kept(
    api: ServiceProcess,
    vault: ServiceProcess,
    shop: ApiMerchant,
    api_env: dict[str, str],
) -> None:
    """Events are kept 30 days: the worker's purge deletes what is older, however much there
    is (in batches), and nothing newer."""
    import asyncpg

    from core.ids import new_id

    payment = pay(api, vault, shop).json()

    async def run() -> tuple[int, int, int]:
        owner = await asyncpg.connect(api_env["TESSERA_API_MIGRATION_URL"])
        try:
            await owner.executemany(
                "INSERT INTO events (merchant_id, id, type, object_id, data, created_at) "
                "VALUES ($1, $2, 'payment.captured', $3, '{}', now() - interval '31 days')",
                [(shop.id, new_id("evt"), payment["id"]) for _ in range(7)],
            )
            async with delivery_queue(api_env) as queue:
                deleted = await queue.purge_expired_events(30, batch=2, max_batches=10)
            old = await owner.fetchval(
                "SELECT count(*) FROM events WHERE merchant_id = $1 "
                "AND created_at < now() - interval '30 days'",
                shop.id,
            )
            recent = await owner.fetchval(
                "SELECT count(*) FROM events WHERE merchant_id = $1 AND object_id = $2",
                shop.id,
                payment["id"],
            )
            return deleted, old, recent
        finally:
            await owner.close()

    deleted, old, recent = asyncio.run(run())
    assert deleted >= 7  # other tests' expired events, if any, go too
    assert old == 0
    assert recent >= 1  # the payment's own event, written just now, stays
