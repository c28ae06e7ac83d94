"""The API on a three-node Redis Cluster, through redis-py's cluster client (`redis+cluster://`).

Every Redis key the API writes carries a hash tag: `{mer_…}` for what belongs to a merchant (the
idempotency replay cache), `{psp_a}` for what belongs to a processor (its breaker, its auth-rate
buckets). Every pipeline and multi-key command touches one tag, hence one slot, so the cluster
needs no change to the code. Here the real API processes, the real vault and PSP simulators run
against a real cluster: replays, concurrent duplicates, a breaker one process opens and another
obeys, and a replay after the node that held the cached answer was replaced by an empty one
(Postgres decides, so it is still the same payment and one charge).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from api.services.breaker import CircuitBreaker
from api.services.routing import OutcomeStats
from api.settings import ApiSettings
from api.storage.idempotency import ReplayCache, StoredResponse
from api.storage.redis_gate import RedisGate
from tessera.runtime.redis_client import cluster_url_problem, connect, is_cluster_url
from tests.conftest import ApiMerchant, create_merchant, start_service
from tests.support.payments import (
    configure_routing,
    new_key,
    pay,
    post,
    psp_authorizations,
    tokenize,
    wait_for,
)
from tests.support.processes import ServiceProcess
from tests.support.redis_cluster import ClusterNode, LocalRedisCluster

SECRET = "s" * 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    started = LocalRedisCluster().start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cluster_vault(
    vault_env: dict[str, str],
    cluster: LocalRedisCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    """A vault on the cluster too: the CVCs it holds for one authorization live there."""
    extra = {"TESSERA_VAULT_REDIS_URL": cluster.url}
    process = start_service("vault", vault_env, tmp_path_factory.mktemp("rc-vault"), extra)
    yield process
    process.stop()


def cluster_api_env(
    api_env: dict[str, str], cluster: LocalRedisCluster, vault: ServiceProcess
) -> dict[str, str]:
    return {"TESSERA_API_REDIS_URL": cluster.url, "TESSERA_API_VAULT_URL": vault.url}


@pytest.fixture(scope="module")
def cluster_api(
    api_env: dict[str, str],
    cluster: LocalRedisCluster,
    cluster_vault: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    extra = cluster_api_env(api_env, cluster, cluster_vault)
    process = start_service("api", api_env, tmp_path_factory.mktemp("rc-api"), extra)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shop(
    api_env: dict[str, str], cluster_vault: ServiceProcess, tokens: dict[str, str]
) -> ApiMerchant:
    return create_merchant(api_env, cluster_vault, tokens["admin"], "Cluster shop")


@pytest.fixture(autouse=True)
def fresh_cluster_routing(cluster: LocalRedisCluster) -> None:
    """As conftest's `fresh_routing_state`, on the cluster: no breaker or auth rate carried
    from one test to the next."""
    for node in cluster.nodes:
        with node.client() as client:
            for pattern in ("route:*", "breaker:*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                for key in keys:  # one DEL per key: a node refuses keys of several slots
                    client.delete(key)


def idempotency_key_name(merchant_id: str, key: str) -> str:
    return ReplayCache._key(merchant_id, key)


def holders(cluster: LocalRedisCluster, key: str) -> list[ClusterNode]:
    """The nodes whose own keyspace (SCAN, node-local) has `key`."""
    return [node for node in cluster.nodes if key.encode() in node.stored_keys()]


# -- the key scheme ------------------------------------------------------------------------------


def test_every_key_of_one_merchant_or_processor_maps_to_one_slot() -> None:
    merchant = "mer_01HZX3Q7K2"
    idem = {key_slot(ReplayCache._key(merchant, k).encode()) for k in ("a", "b{x}", "}{", "")}
    assert idem == {key_slot(b"{mer_01HZX3Q7K2}")}, "a key's own braces never move it"
    breaker = CircuitBreaker._key
    stats = OutcomeStats._key
    psp_a = {
        key_slot(k.encode())
        for k in (
            breaker("psp_a", "open_until"),
            breaker("psp_a", "probe:12"),
            breaker("psp_a", "calls:99"),
            stats("psp_a", "visa", "EUR", 7),
            stats("psp_a", "mastercard", "USD", 8),
        )
    }
    assert psp_a == {key_slot(b"psp_a")}
    assert key_slot(breaker("psp_b", "open_until").encode()) != key_slot(b"psp_a")


def test_a_cluster_url_selects_the_cluster_client_and_only_database_zero() -> None:
    assert isinstance(connect("redis+cluster://127.0.0.1:7000"), RedisCluster)
    assert not isinstance(connect("redis://127.0.0.1:6379/0"), RedisCluster)
    assert is_cluster_url("rediss+cluster://memorystore.internal:6379")
    assert cluster_url_problem("redis+cluster://127.0.0.1:7000/0") is None
    assert cluster_url_problem("redis+cluster://127.0.0.1:7000/3") is not None
    ok = ApiSettings(vault_service_token=SECRET, redis_url="redis+cluster://10.0.0.5:6379")
    assert ok.redis_url.startswith("redis+cluster://")
    with pytest.raises(ValueError, match="TESSERA_API_REDIS_URL: a Redis Cluster has only"):
        ApiSettings(vault_service_token=SECRET, redis_url="redis+cluster://10.0.0.5:6379/2")


# -- the cluster itself ----------------------------------------------------------------------------


async def test_two_merchants_can_live_on_different_nodes_each_on_one_slot(
    cluster: LocalRedisCluster,
) -> None:
    """The point of tagging by merchant: one merchant's keys are together (one slot, one node),
    different merchants spread over the nodes."""
    rng = random.Random(11)
    merchants = [f"mer_{rng.getrandbits(64):016x}" for _ in range(40)]
    by_node: dict[int, str] = {}
    for merchant in merchants:
        by_node.setdefault(cluster.node_for_key("{" + merchant + "}").port, merchant)
    assert len(by_node) == 3, "40 merchants over 3 nodes: each node serves some"
    first, second = list(by_node.values())[:2]
    client = connect(cluster.url, socket_timeout=2)
    assert isinstance(client, RedisCluster)
    cache = ReplayCache(client, 60, RedisGate())
    try:
        for merchant in (first, second):
            for key in ("order-1", "order-2", "a{b}c"):
                await cache.put(merchant, key, b"h", StoredResponse(201, b"{}"))
        for merchant in (first, second):
            names = [idempotency_key_name(merchant, k) for k in ("order-1", "order-2", "a{b}c")]
            assert len({cluster.slot_of(name) for name in names}) == 1
            nodes = {holders(cluster, name)[0].port for name in names}
            assert nodes == {cluster.node_for_key(names[0]).port}
            assert (await cache.get(merchant, "a{b}c")) == (b"h", StoredResponse(201, b"{}"))
        assert cluster.node_for_key("{" + first + "}") is not cluster.node_for_key(
            "{" + second + "}"
        )
    finally:
        await client.aclose()


async def test_a_breaker_on_the_cluster_opens_half_opens_and_closes(
    cluster: LocalRedisCluster,
) -> None:
    """The breaker's pipelines and its multi-key DEL through the cluster client (one slot)."""
    client = connect(cluster.url, socket_timeout=2)
    now = [1_000_000.0]
    breaker = CircuitBreaker(client, open_seconds=10, clock=lambda: now[0])
    try:
        for _ in range(10):
            await breaker.record("psp_a", ok=False)
        assert await breaker.is_open("psp_a") is True
        assert await breaker.state("psp_a") == "open"
        node = cluster.node_for_key("breaker:{psp_a}:open_until")
        assert holders(cluster, "breaker:{psp_a}:open_until") == [node]
        now[0] += 11
        assert await breaker.is_open("psp_a") is False  # the probe
        assert await breaker.is_open("psp_a") is True  # one probe a second
        await breaker.record("psp_a", ok=True)
        assert await breaker.state("psp_a") == "closed"
        assert not [k for k in node.stored_keys() if k.startswith(b"breaker:{psp_a}:calls:")]
    finally:
        await client.aclose()


# -- the API on the cluster ------------------------------------------------------------------------


def test_a_replay_through_the_cluster_returns_the_same_payment_from_the_merchants_node(
    cluster: LocalRedisCluster,
    cluster_api: ServiceProcess,
    cluster_vault: ServiceProcess,
    shop: ApiMerchant,
    psp_a: ServiceProcess,
) -> None:
    token = tokenize(cluster_vault, shop)
    cvc = f"vault:cvc:{token}"
    assert holders(cluster, cvc) == [cluster.node_for_key(cvc)], "the vault holds the CVC there"
    key = new_key()
    body = {"amount": 1234, "currency": "EUR", "token": token}
    first = post(cluster_api, shop, "/v1/payments", body, key)
    assert first.status_code == 201, first.text
    assert holders(cluster, cvc) == [], "the CVC was taken by the authorization"
    cached = idempotency_key_name(shop.id, key)
    assert holders(cluster, cached) == [cluster.node_for_key(cached)]
    assert cluster.slot_of(cached) == cluster.slot_of("{" + shop.id + "}")
    again = post(cluster_api, shop, "/v1/payments", body, key)
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert len(psp_authorizations(psp_a, f"{first.json()['id']}_1")) == 1


async def test_concurrent_duplicates_through_the_cluster_charge_once(
    cluster_api: ServiceProcess,
    cluster_vault: ServiceProcess,
    shop: ApiMerchant,
    psp_a: ServiceProcess,
) -> None:
    token = tokenize(cluster_vault, shop)
    body = {"amount": 4321, "currency": "EUR", "token": token}
    headers = {**shop.auth, "idempotency-key": new_key()}
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(cluster_api.url + "/v1/payments", json=body, headers=headers)
                for _ in range(20)
            )
        )
    assert {r.status_code for r in responses} <= {201, 409}
    created = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == 1
    payment_id = created.pop()
    assert len(psp_authorizations(psp_a, f"{payment_id}_1")) == 1
    final = httpx.post(cluster_api.url + "/v1/payments", json=body, headers=headers, timeout=30)
    assert final.status_code == 201
    assert final.json()["id"] == payment_id


def test_a_replay_after_the_node_holding_the_key_came_back_empty_is_the_same_payment(
    cluster: LocalRedisCluster,
    cluster_api: ServiceProcess,
    cluster_vault: ServiceProcess,
    shop: ApiMerchant,
    psp_a: ServiceProcess,
) -> None:
    key = new_key()
    token = tokenize(cluster_vault, shop)
    body = {"amount": 2500, "currency": "EUR", "token": token}
    first = post(cluster_api, shop, "/v1/payments", body, key)
    assert first.status_code == 201, first.text
    payment_id = first.json()["id"]
    cached = idempotency_key_name(shop.id, key)
    node = cluster.node_for_key(cached)
    assert holders(cluster, cached) == [node], "the replay cache holds it on the merchant's node"
    old_id = node.node_id()

    during: list[httpx.Response] = []
    seconds: list[float] = []

    survivor = next(other for other in cluster.nodes if other is not node)

    def replay_while_down() -> None:
        # Past the node time-out the survivors call the cluster down (no replica to promote):
        # every slot answers CLUSTERDOWN, not only the dead node's.
        wait_for(lambda: survivor.info()["cluster_state"] == "fail", 10)
        for _ in range(2):
            started = time.monotonic()
            during.append(post(cluster_api, shop, "/v1/payments", body, key))
            seconds.append(time.monotonic() - started)

    cluster.restart_empty(node, while_down=replay_while_down)
    assert node.node_id() != old_id, "a new node, not the old one restarted with its state"
    assert node.stored_keys() == [], "and empty"
    assert cluster.node_for_key(cached) is node, "serving the slots the dead one served"
    # While the cluster was down the cache could not answer: Postgres did, the same payment;
    # the first replay waited out the cluster client's retries, the next skipped Redis.
    for response in during:
        assert response.status_code == 201, response.text
        assert response.content == first.content
    assert seconds[0] < 10
    assert seconds[1] < 1

    def replayed() -> httpx.Response:
        return post(cluster_api, shop, "/v1/payments", body, key)

    # The client learns the new node (its breaker on CLUSTERDOWN may skip Redis a few seconds).
    after = replayed()
    assert after.status_code == 201, after.text
    assert after.content == first.content
    assert after.headers["idempotent-replayed"] == "true"
    assert len(psp_authorizations(psp_a, f"{payment_id}_1")) == 1, "one charge"
    wait_for(lambda: replayed().status_code == 201 and bool(holders(cluster, cached)), 20)
    assert holders(cluster, cached) == [node], "the answer from Postgres was cached again"


@pytest.fixture
def two_processors(
    api_env: dict[str, str], cluster_vault: ServiceProcess, tokens: dict[str, str]
) -> ApiMerchant:
    """PSP A and PSP B, B at 90 % of the amount so A ranks first (as in test_api_failover)."""
    merchant = create_merchant(api_env, cluster_vault, tokens["admin"], "Cluster, two PSPs")
    configure_routing(api_env, merchant, "--processors", "psp_a,psp_b", "--fee", "psp_b=0+9000")
    return merchant


def test_a_breaker_one_api_process_opens_is_obeyed_by_another_through_the_cluster(
    cluster: LocalRedisCluster,
    cluster_api: ServiceProcess,
    cluster_vault: ServiceProcess,
    api_env: dict[str, str],
    psp_a: ServiceProcess,
    two_processors: ApiMerchant,
    tmp_path: Path,
) -> None:
    extra = cluster_api_env(api_env, cluster, cluster_vault)
    second = start_service("api", api_env, tmp_path, extra)
    config = psp_a.url + "/admin/config"
    try:
        httpx.post(config, json={"fail_all_5xx": True}).raise_for_status()
        try:
            routes = []
            for _ in range(12):
                payment = pay(cluster_api, cluster_vault, two_processors, capture=False).json()
                routes.append([a["processor"] for a in payment["attempts"]])
            assert routes[0] == ["psp_a", "psp_b"]
            assert routes[-1] == ["psp_b"], routes
            breaker = "breaker:{psp_a}:open_until"
            assert holders(cluster, breaker) == [cluster.node_for_key(breaker)]
            # The other process never saw PSP A fail: it skips A because the cluster says so.
            other = pay(second, cluster_vault, two_processors, capture=False).json()
            assert [a["processor"] for a in other["attempts"]] == ["psp_b"]
        finally:
            httpx.post(config, json={"fail_all_5xx": False}).raise_for_status()
        time.sleep(10.5)  # the open period; then one probe may go to PSP A

        def a_is_back() -> bool:
            payment = pay(second, cluster_vault, two_processors, capture=False).json()
            return [a["processor"] for a in payment["attempts"]] == ["psp_a"]

        wait_for(a_is_back, seconds=10)
        back = pay(cluster_api, cluster_vault, two_processors, capture=False).json()
        assert [a["processor"] for a in back["attempts"]] == ["psp_a"], "closed for both"
    finally:
        second.stop()
