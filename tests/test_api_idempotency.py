"""Stripe-grade idempotency: replays, reuse, concurrency, a lost cache, a crash mid-payment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import redis

from tests.conftest import ApiMerchant, start_service
from tests.support.payments import new_key, pay, post, psp_authorizations, tokenize
from tests.support.processes import ServiceProcess


def test_the_same_request_with_the_same_key_replays_the_first_response(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant, psp_a: ServiceProcess
) -> None:
    token = tokenize(vault, merchant)
    key = new_key()
    body = {"amount": 700, "currency": "EUR", "token": token}
    first = post(api, merchant, "/v1/payments", body, key)
    reordered = {"token": token, "currency": "EUR", "amount": 700}
    second = post(api, merchant, "/v1/payments", reordered, key)
    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(psp_authorizations(psp_a, f"{first.json()['id']}_1")) == 1


def test_a_declined_outcome_is_replayed_too(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    token = tokenize(vault, merchant, "4000000000000002")
    key = new_key()
    body = {"amount": 1050, "currency": "EUR", "token": token}
    first = post(api, merchant, "/v1/payments", body, key)
    again = post(api, merchant, "/v1/payments", body, key)
    assert first.status_code == again.status_code == 402
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"


def test_the_same_key_with_another_body_is_refused_and_nothing_runs(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    token = tokenize(vault, merchant)
    key = new_key()
    post(api, merchant, "/v1/payments", {"amount": 100, "currency": "EUR", "token": token}, key)
    changed = post(
        api, merchant, "/v1/payments", {"amount": 200, "currency": "EUR", "token": token}, key
    )
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    other_path = post(api, merchant, "/v1/payments/pay_" + "0" * 26 + "/capture", {}, key)
    assert other_path.status_code == 422


def test_a_post_without_a_key_is_refused(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    body = {"amount": 100, "currency": "EUR", "token": tokenize(vault, merchant)}
    response = httpx.post(api.url + "/v1/payments", json=body, headers=merchant.auth)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "idempotency_key_missing"


def test_validation_failures_are_not_stored_against_the_key(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    key = new_key()
    token = tokenize(vault, merchant)
    bad = post(api, merchant, "/v1/payments", {"amount": 0, "currency": "EUR", "token": token}, key)
    assert bad.status_code == 400
    good = post(
        api, merchant, "/v1/payments", {"amount": 5, "currency": "EUR", "token": token}, key
    )
    assert good.status_code == 201


async def test_fifty_concurrent_requests_with_one_key_make_one_payment(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant, psp_a: ServiceProcess
) -> None:
    token = tokenize(vault, merchant)
    key = new_key()
    body = {"amount": 4200, "currency": "EUR", "token": token}
    headers = {**merchant.auth, "idempotency-key": key}
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(client.post(api.url + "/v1/payments", json=body, headers=headers) for _ in range(50))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}, statuses
    created = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == 1
    for response in responses:
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "idempotency_key_in_use"
    payment_id = created.pop()
    assert len(psp_authorizations(psp_a, f"{payment_id}_1")) == 1
    final = httpx.post(api.url + "/v1/payments", json=body, headers=headers)
    assert final.status_code == 201
    assert final.json()["id"] == payment_id


def test_with_redis_flushed_the_replay_comes_from_postgres(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant, redis_urls: dict[str, str]
) -> None:
    token = tokenize(vault, merchant)
    key = new_key()
    body = {"amount": 300, "currency": "EUR", "token": token}
    first = post(api, merchant, "/v1/payments", body, key)
    client = redis.Redis.from_url(redis_urls["api"])
    client.flushdb()
    client.close()
    second = post(api, merchant, "/v1/payments", body, key)
    assert second.status_code == 201
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"


def test_twenty_concurrent_refunds_never_exceed_the_capture(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    payment = pay(api, vault, merchant, amount=1000).json()

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{api.url}/v1/payments/{payment['id']}/refunds",
                        json={"amount": 70},
                        headers={**merchant.auth, "idempotency-key": new_key()},
                    )
                    for _ in range(20)
                )
            )

    responses = asyncio.run(storm())
    ok = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code == 409]
    assert len(ok) + len(refused) == 20, [r.text for r in responses]
    assert len(ok) == 14  # 14 * 70 = 980 <= 1000 < 15 * 70
    final = httpx.get(f"{api.url}/v1/payments/{payment['id']}", headers=merchant.auth).json()
    assert final["amount_refunded"] == 980
    assert sum(r["amount"] for r in final["refunds"]) == 980


def test_two_concurrent_captures_capture_once(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    payment = pay(api, vault, merchant, amount=900, capture=False).json()

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{api.url}/v1/payments/{payment['id']}/capture",
                        json={},
                        headers={**merchant.auth, "idempotency-key": new_key()},
                    )
                    for _ in range(2)
                )
            )

    statuses = sorted(r.status_code for r in asyncio.run(both()))
    assert statuses == [200, 409]


def test_a_crash_between_the_processor_and_the_record_never_authorizes_twice(
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    tmp_path: Path,
) -> None:
    extra = {
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "0.5",
        "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": "6",
    }
    doomed = start_service(
        "api", api_env, tmp_path, {**extra, "TESSERA_FAILPOINTS": "after_processor_call"}
    )
    # The survivor is up before the crash, so the 409 below never depends on how long a
    # process takes to start on a busy machine (the lease is 6 s from the crash).
    survivor = start_service("api", api_env, tmp_path, extra)
    token = tokenize(vault, merchant)
    key = new_key()
    body = {"amount": 1234, "currency": "EUR", "token": token}
    try:
        try:
            post(api=doomed, merchant=merchant, path="/v1/payments", body=body, key=key)
            raise AssertionError("the process should have died at the failpoint")
        except httpx.HTTPError:
            pass
        assert doomed.process is not None
        assert doomed.process.wait(timeout=10) == -9
        in_use = post(survivor, merchant, "/v1/payments", body, key)
        assert in_use.status_code == 409  # the lease still runs
        deadline = time.monotonic() + 30
        retried = in_use
        while retried.status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.5)  # until the crashed request's lease runs out
            retried = post(survivor, merchant, "/v1/payments", body, key)
        assert retried.status_code == 201, retried.text
        payment = retried.json()
        assert payment["status"] == "captured"
        assert len(psp_authorizations(psp_a, f"{payment['id']}_1")) == 1
        replay = post(survivor, merchant, "/v1/payments", body, key)
        assert replay.content == retried.content
    finally:
        survivor.stop()


def test_a_crash_after_the_processor_captured_is_finished_by_a_retry_with_the_same_key(
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    merchant: ApiMerchant,
    tmp_path: Path,
) -> None:
    extra = {
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_API_PSP_A_URL": psp_a.url,
        "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "0.5",
        "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": "6",
    }
    armed = {**extra, "TESSERA_FAILPOINTS": "after_operation_call"}
    doomed = start_service("api", api_env, tmp_path, armed)
    payment = pay(doomed, vault, merchant, amount=800, capture=False).json()
    key = new_key()
    try:
        post(doomed, merchant, f"/v1/payments/{payment['id']}/capture", {"amount": 500}, key)
        raise AssertionError("the process should have died at the failpoint")
    except httpx.HTTPError:
        pass
    assert doomed.process is not None
    assert doomed.process.wait(timeout=10) == -9
    survivor = start_service("api", api_env, tmp_path, extra)
    try:
        time.sleep(6.2)  # the key's lease (and the payment's) run out
        retried = post(
            survivor, merchant, f"/v1/payments/{payment['id']}/capture", {"amount": 500}, key
        )
        assert retried.status_code == 200, retried.text
        assert (retried.json()["status"], retried.json()["amount_captured"]) == ("captured", 500)
        [authorization] = psp_authorizations(psp_a, f"{payment['id']}_1")
        assert authorization["status"] == "captured"
        assert authorization["amount_captured"] == 500
    finally:
        survivor.stop()


def test_a_deleted_token_is_refused(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant, tokens: dict[str, str]
) -> None:
    token = tokenize(vault, merchant)
    deleted = httpx.delete(
        f"{vault.url}/v1/tokens/{token}",
        headers={"authorization": f"Bearer {tokens['service']}", "tessera-merchant": merchant.id},
    )
    assert deleted.status_code == 200
    response = post(
        api, merchant, "/v1/payments", {"amount": 100, "currency": "EUR", "token": token}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "token"
