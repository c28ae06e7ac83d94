"""Read replicas for list queries only (issue 11, "Past one machine" (2)), on real streaming
replication: a private primary, a `pg_basebackup -R` standby, and the API started with
`TESSERA_API_DATABASE_URL` on the primary and `TESSERA_API_READ_DATABASE_URL` on the standby.

With the standby's replay paused, the payments list (served by the replica) lags, while
everything that decides money answers from the primary: the payment by id, a replayed POST
(same payment, no second authorization at the processor), a capture and a refund, the balance.
Without the read URL every read is the primary's, which the rest of the suite runs on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from api.settings import ApiSettings
from api.storage.ledger import LedgerRepository
from tessera.dbsetup import service_dsn
from tessera.runtime.settings import SettingsError, load_settings
from tests.support.chaos_stack import Shop, open_shop, private_env
from tests.support.pgcluster import API_DB, VAULT_DB, PgCluster, prepare_databases, service_env
from tests.support.processes import ServiceProcess, free_port
from tests.support.stack import Stack, start_stack


class Replication:
    """A primary with both services' databases, migrated, and a streaming standby of it."""

    def __init__(self) -> None:
        self.primary = PgCluster.initialise("rr-primary").start()
        self.standby: PgCluster | None = None
        prepare_databases(self.primary, [API_DB, VAULT_DB])
        self.standby = self.primary.standby("rr_standby").start()
        self.primary.wait_for_standby("rr_standby")

    @property
    def replica(self) -> PgCluster:
        assert self.standby is not None
        return self.standby

    def replica_dsn(self) -> str:
        return service_dsn(self.replica.admin_url, API_DB.runtime, API_DB.database)

    def wait_for_replay(self, timeout: float = 10) -> float:
        """Until the standby has replayed everything the primary has written; the seconds."""
        started = time.monotonic()
        target = self.primary.sql("SELECT pg_current_wal_lsn() AS lsn")[0]["lsn"]
        while time.monotonic() - started < timeout:
            rows = self.replica.sql("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn AS done", target)
            if rows[0]["done"]:
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"standby did not replay {target} in {timeout}s")

    def pause_replay(self) -> None:
        self.replica.sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = self.replica.sql("SELECT pg_get_wal_replay_pause_state() AS s")[0]["s"]
            if state == "paused":
                return
            time.sleep(0.02)
        raise AssertionError("standby replay did not pause")

    def resume_replay(self) -> None:
        self.replica.sql("SELECT pg_wal_replay_resume()")

    def close(self) -> None:
        for cluster in (self.standby, self.primary):
            if cluster is not None:
                cluster.remove()


@pytest.fixture(scope="module")
def replication() -> Iterator[Replication]:
    replication = Replication()
    yield replication
    replication.close()


@pytest.fixture(scope="module")
def stack(
    replication: Replication,
    redis_urls: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    work = Path(tmp_path_factory.mktemp("read-replica"))
    env = private_env(
        work, service_env(replication.primary.admin_url), redis_urls["api"], redis_urls["vault"]
    )
    stack = start_stack(
        env, work, extra={"TESSERA_API_READ_DATABASE_URL": replication.replica_dsn()}
    )
    yield stack
    stack.stop()


def _pay(http: httpx.Client, shop: Shop, key: str, amount: int, capture: bool) -> httpx.Response:
    body = {"amount": amount, "currency": "EUR", "token": shop.tokens[0], "capture": capture}
    return http.post("/v1/payments", json=body, headers={**shop.auth, "idempotency-key": key})


def _listed(http: httpx.Client, shop: Shop) -> list[str]:
    response = http.get("/v1/payments", params={"limit": 100}, headers=shop.auth)
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["data"]]


def _authorizations(stack: Stack, payment_id: str) -> int:
    response = httpx.get(
        stack.urls["psp_a"] + "/admin/authorizations", params={"reference": f"{payment_id}_1"}
    )
    return len(response.json()["authorizations"])


def _pending_eur(balance: dict[str, Any]) -> int:
    return sum(a["amount"] for a in balance["pending"] if a["currency"] == "EUR")


def _ledger_pending_eur(dsn: str, merchant_id: str) -> int:
    """The balance query itself, run on one server: what that copy would have answered."""

    async def read() -> int:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await LedgerRepository(conn).balance(merchant_id)
        finally:
            await conn.close()
        return sum(int(r["pending"]) for r in rows if r["currency"] == "EUR")

    return asyncio.run(read())


def test_lists_read_the_replica_and_money_reads_the_primary(
    replication: Replication, stack: Stack
) -> None:
    shop = open_shop(stack, "Replica reader", cards=("4242424242424242",))
    primary_dsn = stack.env["TESSERA_API_DATABASE_URL"]
    with httpx.Client(base_url=stack.urls["api"], timeout=15) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "read_database": "ok"}

        # Replay running: a payment reaches the replica, and the list (from it) shows it.
        first = _pay(http, shop, "rr-first", 1000, capture=True)
        assert first.status_code == 201, first.text
        first_id = first.json()["id"]
        lag = replication.wait_for_replay()
        assert _listed(http, shop) == [first_id]
        balance_before = http.get("/v1/balance", headers=shop.auth).json()
        assert _pending_eur(balance_before) > 0

        # Replay paused: the replica stops where it is; the primary goes on.
        replication.pause_replay()
        try:
            second = _pay(http, shop, "rr-second", 2500, capture=False)
            assert second.status_code == 201, second.text
            second_id = second.json()["id"]
            assert second.json()["status"] == "authorized"

            # The list is the replica's: the new payment is not in it yet.
            assert _listed(http, shop) == [first_id]
            events = http.get("/v1/events", params={"limit": 100}, headers=shop.auth)
            assert events.status_code == 200
            assert second_id not in {e["data"]["object"]["id"] for e in events.json()["data"]}

            # Read-your-writes: the payment by id comes from the primary.
            read = http.get(f"/v1/payments/{second_id}", headers=shop.auth)
            assert read.status_code == 200, read.text
            assert read.json()["status"] == "authorized"

            # A retry with the same key finds its key on the primary: the same payment, and
            # still one authorization at the processor.
            assert _authorizations(stack, second_id) == 1
            again = _pay(http, shop, "rr-second", 2500, capture=False)
            assert again.status_code == 201, again.text
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json()["id"] == second_id
            assert _authorizations(stack, second_id) == 1

            # State changes decide against the primary's row (the replica has no such payment).
            captured = http.post(
                f"/v1/payments/{second_id}/capture",
                headers={**shop.auth, "idempotency-key": "rr-capture"},
            )
            assert captured.status_code == 200, captured.text
            assert captured.json()["amount_captured"] == 2500
            refunded = http.post(
                f"/v1/payments/{second_id}/refunds",
                json={"amount": 400},
                headers={**shop.auth, "idempotency-key": "rr-refund"},
            )
            assert refunded.status_code == 201, refunded.text
            assert refunded.json()["status"] == "succeeded"

            # The balance is the primary's, not the paused replica's older one.
            balance = http.get("/v1/balance", headers=shop.auth)
            assert balance.status_code == 200
            pending = _pending_eur(balance.json())
            on_replica = _ledger_pending_eur(replication.replica_dsn(), shop.merchant_id)
            assert on_replica == _pending_eur(balance_before)
            assert pending == _ledger_pending_eur(primary_dsn, shop.merchant_id)
            assert pending != on_replica

            # The deliveries of an event the replica has not replayed: asked again on the
            # primary, not a false 404.
            events = http.get(
                "/v1/events", params={"object": second_id}, headers=shop.auth
            )  # from the replica: nothing yet
            assert events.json()["data"] == []
            event_id = _event_ids_on_primary(primary_dsn, second_id)[0]
            deliveries = http.get(f"/v1/events/{event_id}/deliveries", headers=shop.auth)
            assert deliveries.status_code == 200, deliveries.text
            assert deliveries.json()["data"] == []  # no webhook endpoint: none to deliver

            assert _listed(http, shop) == [first_id], "the replica moved while paused"
        finally:
            replication.resume_replay()

        # Replay resumed: the list catches up.
        caught_up = replication.wait_for_replay()
        assert _listed(http, shop) == [second_id, first_id]
        listed = http.get("/v1/payments", headers=shop.auth).json()["data"][0]
        assert listed["amount_captured"] == 2500
        assert listed["amount_refunded"] == 400

    print(
        f"\n  replay lag before the pause {lag * 1000:.0f} ms; caught up {caught_up * 1000:.0f} ms "
        "after resuming"
    )


def test_readiness_reports_the_replica_and_writes_go_on_without_it(
    replication: Replication, stack: Stack
) -> None:
    """Last in the module: the standby is stopped. `/readyz` names it but stays 200
    (`degraded`): a load balancer must not take the API out for a replica only lists use; the
    primary's work (a new payment) goes on, and the list answers a retryable 503."""
    shop = open_shop(stack, "Replica gone", cards=("4242424242424242",))
    replication.replica.stop("immediate")
    with httpx.Client(base_url=stack.urls["api"], timeout=15) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        checks = ready.json()["checks"]
        assert checks["database"] == "ok"
        assert checks["read_database"].startswith("unavailable")
        assert str(replication.replica.port) not in ready.text
        paid = _pay(http, shop, "rr-without-replica", 700, capture=True)
        assert paid.status_code == 201, paid.text
        assert http.get(f"/v1/payments/{paid.json()['id']}", headers=shop.auth).status_code == 200
        assert http.get("/v1/balance", headers=shop.auth).status_code == 200
        listed = http.get("/v1/payments", headers=shop.auth)
        assert listed.status_code == 503, listed.text
    # An API process started while the replica is down starts, ready (degraded), and pays.
    late = ServiceProcess(
        "api", {**stack.env, "TESSERA_API_PORT": str(port := free_port())}, port,
        stack.processes["api"].log_path.with_name("api-late.log"),
    ).start()  # fmt: skip
    try:
        with httpx.Client(base_url=late.url, timeout=15) as http:
            assert http.get("/readyz").json()["status"] == "degraded"
            paid = _pay(http, shop, "rr-started-without-replica", 800, capture=True)
            assert paid.status_code == 201, paid.text
    finally:
        late.stop()


def _event_ids_on_primary(dsn: str, object_id: str) -> list[str]:
    async def read() -> list[str]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT id FROM events WHERE object_id = $1 ORDER BY id", object_id
            )
        finally:
            await conn.close()
        return [r["id"] for r in rows]

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        ("postgresql://tessera_api@10.0.0.7:5432/tessera_api", True),
        ("postgres://tessera_api@replica/tessera_api", True),
        ("mysql://tessera_api@replica/tessera_api", False),
        ("replica:5432", False),
    ],
)
def test_the_read_url_is_validated_like_the_primarys(value: str, accepted: bool) -> None:
    env = {"TESSERA_API_VAULT_SERVICE_TOKEN": "s" * 40, "TESSERA_API_READ_DATABASE_URL": value}
    if accepted:
        assert load_settings(ApiSettings, env).read_database_url == value
    else:
        with pytest.raises(SettingsError, match="TESSERA_API_READ_DATABASE_URL: expected a URL"):
            load_settings(ApiSettings, env)
