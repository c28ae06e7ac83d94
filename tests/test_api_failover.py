"""Two processors: failover after a definite failure only, soft-decline cascading on request,
and PSP B's asynchronous operations confirmed by signed notifications."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from tessera.dbsetup import ServiceDatabase
from tests.conftest import ApiMerchant, create_merchant, dsn
from tests.support.payments import (
    SLOW,
    configure_routing,
    pay,
    post,
    psp_authorizations,
    psp_b_payments,
    wait_for,
)
from tests.support.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
DEV_HMAC_KEY = bytes.fromhex("E92EF49F9B36436D3A9FBEFC305A24593559B43D854C8151FC9E242818957599")


@pytest.fixture(scope="module")
def a_then_b(api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]) -> ApiMerchant:
    """Both processors; PSP B costs 90 % of the amount, so PSP A ranks first (exploration
    would need a draw of A's auth rate under 10 %: about one in ten million)."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "Two processors")
    configure_routing(api_env, merchant, "--processors", "psp_a,psp_b", "--fee", "psp_b=0+9000")
    return merchant


@pytest.fixture(scope="module")
def only_b(api_env: dict[str, str], vault: ServiceProcess, tokens: dict[str, str]) -> ApiMerchant:
    merchant = create_merchant(api_env, vault, tokens["admin"], "PSP B only")
    configure_routing(api_env, merchant, "--processors", "psp_b")
    return merchant


def test_a_definite_failure_fails_over_to_the_next_processor(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    a_then_b: ApiMerchant,
) -> None:
    response = pay(api, vault, a_then_b, number="4000000000000119")  # 5xx at A, approved at B
    assert response.status_code == 201, response.text
    payment = response.json()
    assert payment["processor"] == "psp_b"
    attempts = payment["attempts"]
    assert [(a["processor"], a["outcome"]) for a in attempts] == [
        ("psp_a", "failed"),
        ("psp_b", "approved"),
    ]
    assert [a["reference"] for a in attempts] == [f"{payment['id']}_1", f"{payment['id']}_2"]
    assert psp_authorizations(psp_a, f"{payment['id']}_1") == []
    assert len(psp_b_payments(psp_b, f"{payment['id']}_2")) == 1


def test_an_unknown_outcome_never_fails_over(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    a_then_b: ApiMerchant,
) -> None:
    response = pay(api, vault, a_then_b, number=SLOW)
    assert response.status_code == 202, response.text
    payment = response.json()
    assert [a["processor"] for a in payment["attempts"]] == ["psp_a"]
    assert payment["attempts"][0]["outcome"] == "unknown"
    assert psp_b_payments(psp_b, f"{payment['id']}_2") == []
    assert len(psp_authorizations(psp_a, f"{payment['id']}_1")) == 1


def test_a_soft_decline_cascades_only_when_the_merchant_switched_it_on(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    redis_urls: dict[str, str],
    a_then_b: ApiMerchant,
) -> None:
    declined = pay(api, vault, a_then_b, number="4000000000003220")  # do_not_honor at A only
    assert declined.status_code == 402
    assert declined.json()["error"]["decline_code"] == "do_not_honor"
    configure_routing(api_env, a_then_b, "--cascade-soft-declines")
    time.sleep(5.1)  # the API reads routing through a 5-second cache
    try:
        cascaded = pay(api, vault, a_then_b, number="4000000000003220")
        assert cascaded.status_code == 201, cascaded.text
        attempts = [(a["processor"], a["outcome"]) for a in cascaded.json()["attempts"]]
        # On a mismatch, show what the router judged on (CI saw psp_b ranked first once).
        assert attempts == [("psp_a", "declined"), ("psp_b", "approved")], routing_state(
            redis_urls["api"]
        )
        hard = pay(api, vault, a_then_b, number="4000000000009995")  # insufficient funds: hard
        assert hard.status_code == 402
    finally:
        configure_routing(api_env, a_then_b, "--no-cascade-soft-declines")


def routing_state(url: str) -> dict[str, Any]:
    """The auth-rate buckets and breaker keys in the API's Redis, for a failure message."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        state: dict[str, Any] = {}
        for pattern in ("route:*", "breaker:*"):
            for key in client.scan_iter(match=pattern):
                kind = client.type(key)
                state[key] = client.hgetall(key) if kind == "hash" else client.get(key)
        return state
    finally:
        client.close()


def test_a_refund_at_psp_b_is_pending_until_its_notification_confirms_it(
    api: ServiceProcess, vault: ServiceProcess, only_b: ApiMerchant
) -> None:
    payment = pay(api, vault, only_b, amount=1000).json()
    assert payment["processor"] == "psp_b"
    response = post(api, only_b, f"/v1/payments/{payment['id']}/refunds", {"amount": 400})
    assert response.status_code == 201, response.text
    refund = response.json()
    assert refund["status"] == "pending"
    during = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=only_b.auth).json()
    assert during["amount_refunded"] == 400  # counted while in flight: no over-refund possible

    def succeeded() -> bool:
        read = httpx.get(f"{api.url}/v1/refunds/{refund['id']}", headers=only_b.auth).json()
        return bool(read["status"] == "succeeded")

    wait_for(succeeded)
    refund_events = httpx.get(
        f"{api.url}/v1/events", params={"object": refund["id"]}, headers=only_b.auth
    ).json()["data"]
    assert [e["type"] for e in refund_events] == ["refund.succeeded", "refund.pending"]
    assert refund_events[1]["request"] is not None  # the client's request
    assert refund_events[0]["request"] is None  # PSP B's notification
    assert refund_events[0]["data"]["object"]["status"] == "succeeded"


def test_a_refund_psp_b_reports_failed_is_reversed_visibly(
    api: ServiceProcess, vault: ServiceProcess, psp_b: ServiceProcess, only_b: ApiMerchant
) -> None:
    payment = pay(api, vault, only_b, amount=1000).json()
    httpx.post(psp_b.url + "/admin/config", json={"fail_next_refunds": 1}).raise_for_status()
    refund = post(api, only_b, f"/v1/payments/{payment['id']}/refunds", {"amount": 300}).json()

    def failed() -> bool:
        read = httpx.get(f"{api.url}/v1/refunds/{refund['id']}", headers=only_b.auth).json()
        return bool(read["status"] == "failed")

    wait_for(failed)
    after = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=only_b.auth).json()
    assert (after["status"], after["amount_refunded"]) == ("captured", 0)
    refund_events = httpx.get(
        f"{api.url}/v1/events", params={"object": refund["id"]}, headers=only_b.auth
    ).json()["data"]
    assert [e["type"] for e in refund_events] == ["refund.failed", "refund.pending"]
    balance = httpx.get(f"{api.url}/v1/balance", headers=only_b.auth).json()
    pending_refunds = -sum(a["amount"] for a in balance["available"])
    assert pending_refunds == sum(  # the failed refund was given back to the merchant
        r["amount"]
        for p in httpx.get(
            f"{api.url}/v1/payments", params={"limit": 100}, headers=only_b.auth
        ).json()["data"]
        for r in p["refunds"]
        if r["status"] != "failed"
    )


def test_a_capture_psp_b_reports_failed_is_an_event_and_books_nothing(
    api: ServiceProcess, vault: ServiceProcess, psp_b: ServiceProcess, only_b: ApiMerchant
) -> None:
    payment = pay(api, vault, only_b, amount=1200, capture=False).json()
    httpx.post(psp_b.url + "/admin/config", json={"fail_next_captures": 1}).raise_for_status()
    captured = post(api, only_b, f"/v1/payments/{payment['id']}/capture")
    assert captured.status_code == 200, captured.text

    def types() -> list[str]:
        return [
            e["type"]
            for e in httpx.get(
                f"{api.url}/v1/events", params={"object": payment["id"]}, headers=only_b.auth
            ).json()["data"]
        ]

    wait_for(lambda: types()[0] == "payment.capture_failed")
    assert types() == ["payment.capture_failed", "payment.authorized"]
    after = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=only_b.auth).json()
    assert (after["status"], after["amount_captured"]) == ("authorized", 0)


def signed_item(**fields: Any) -> dict[str, Any]:
    item = {"merchantAccountCode": "TesseraSandbox", "success": "true", **fields}
    amount = item.get("amount") or {}
    payload = ":".join(
        str(p)
        for p in (
            item.get("pspReference", ""),
            item.get("originalReference", ""),
            item["merchantAccountCode"],
            item.get("merchantReference", ""),
            amount.get("value", ""),
            amount.get("currency", ""),
            item.get("eventCode", ""),
            item["success"],
        )
    )
    signature = base64.b64encode(hmac.new(DEV_HMAC_KEY, payload.encode(), hashlib.sha256).digest())
    item["additionalData"] = {"hmacSignature": signature.decode()}
    return item


def notify(api: ServiceProcess, *items: dict[str, Any]) -> httpx.Response:
    body = {"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    return httpx.post(api.url + "/v1/notifications/psp_b", content=json.dumps(body))


def test_a_notification_with_a_bad_signature_is_refused_and_changes_nothing(
    api: ServiceProcess, vault: ServiceProcess, psp_b: ServiceProcess, only_b: ApiMerchant
) -> None:
    payment = pay(api, vault, only_b, amount=1000).json()
    httpx.post(psp_b.url + "/admin/config", json={"notify_delay_ms": 3000}).raise_for_status()
    try:
        refund = post(api, only_b, f"/v1/payments/{payment['id']}/refunds", {"amount": 100})
        reference = httpx.get(
            psp_b.url + "/admin/payments", params={"merchantReference": f"{payment['id']}_1"}
        ).json()
        del reference
        forged = signed_item(pspReference="X" * 16, eventCode="REFUND", success="false")
        forged["additionalData"]["hmacSignature"] = base64.b64encode(b"\0" * 32).decode()
        response = notify(api, forged)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "signature_invalid"
        assert refund.json()["status"] == "pending"
    finally:
        httpx.post(psp_b.url + "/admin/config", json={"notify_delay_ms": 200}).raise_for_status()


async def test_a_replayed_notification_has_no_second_effect(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_b: ServiceProcess,
    only_b: ApiMerchant,
    databases: dict[str, ServiceDatabase],
) -> None:
    payment = pay(api, vault, only_b, amount=1000).json()
    refund = post(api, only_b, f"/v1/payments/{payment['id']}/refunds", {"amount": 250}).json()

    def settled() -> bool:
        read = httpx.get(f"{api.url}/v1/refunds/{refund['id']}", headers=only_b.auth).json()
        return bool(read["status"] == "succeeded")

    wait_for(settled)
    conn = await asyncpg.connect(dsn("tessera_api_owner", databases["api"].database))
    try:
        reference = await conn.fetchval(
            "SELECT processor_reference FROM refunds WHERE id = $1", refund["id"]
        )
        replay = httpx.post(
            psp_b.url + "/admin/notifications/replay", json={"pspReference": reference}
        )
        assert replay.status_code == 200, replay.text

        # PSP B re-sent it byte for byte and the API acknowledged it (200 "[accepted]").
        assert replay.json()["status"] == 200
        applied = await conn.fetchval(
            "SELECT count(*) FROM processed_notifications WHERE psp_reference = $1", reference
        )
        assert applied == 1
    finally:
        await conn.close()
    after = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=only_b.auth).json()
    assert after["amount_refunded"] == 250
    assert [r["status"] for r in after["refunds"]] == ["succeeded"]


def test_the_breaker_takes_a_failing_processor_out_and_lets_it_back_after_recovery(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    a_then_b: ApiMerchant,
) -> None:
    config = psp_a.url + "/admin/config"
    httpx.post(config, json={"fail_all_5xx": True}).raise_for_status()
    try:
        routes = []
        for _ in range(16):
            payment = pay(api, vault, a_then_b).json()
            routes.append([a["processor"] for a in payment["attempts"]])
        # First each payment tries PSP A and fails over; once A has failed 10 times the breaker
        # opens and payments go straight to PSP B.
        assert routes[0] == ["psp_a", "psp_b"]
        assert routes[-1] == ["psp_b"]
        assert ["psp_b"] in routes[10:]
    finally:
        httpx.post(config, json={"fail_all_5xx": False}).raise_for_status()
    time.sleep(10.5)  # the breaker's open period; then one probe may go to PSP A

    def a_is_back() -> bool:
        payment = pay(api, vault, a_then_b).json()
        return [a["processor"] for a in payment["attempts"]] == ["psp_a"]

    wait_for(a_is_back, seconds=10)
    assert a_is_back()  # closed: not just the probe


def test_an_unknown_outcome_is_settled_with_the_processor_that_approved_it(
    api: ServiceProcess,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    a_then_b: ApiMerchant,
    api_env: dict[str, str],
    tmp_path: Path,
) -> None:
    payment = pay(api, vault, a_then_b, number=SLOW).json()
    assert payment["status"] == "processing"
    env = {
        **api_env,
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.2",
    }
    worker = ServiceProcess("api", env, 0, tmp_path / "worker.log", args=["worker"])
    worker.start(ready_path="")
    try:

        def settled() -> bool:
            read = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=a_then_b.auth)
            return bool(read.json()["status"] == "captured")

        wait_for(settled, seconds=20)
    finally:
        worker.stop()
    final = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=a_then_b.auth).json()
    assert final["processor"] == "psp_a"
    assert [a["outcome"] for a in final["attempts"]] == ["approved"]
    assert len(psp_authorizations(psp_a, f"{payment['id']}_1")) == 1
    assert psp_b_payments(psp_b, f"{payment['id']}_2") == []


def test_a_country_rule_sends_each_card_to_the_processor_allowed_for_its_country(
    api: ServiceProcess, vault: ServiceProcess, api_env: dict[str, str], tokens: dict[str, str]
) -> None:
    merchant = create_merchant(api_env, vault, tokens["admin"], "By country")
    configure_routing(
        api_env,
        merchant,
        "--processors",
        "psp_a,psp_b",
        "--fee",
        "psp_b=0+9000",
        "--rule",
        "psp_a:country=US",
    )
    us = pay(api, vault, merchant, number="4242424242424242").json()
    japan = pay(api, vault, merchant, number="3566002020360505").json()
    assert (us["processor"], japan["processor"]) == ("psp_a", "psp_b")
