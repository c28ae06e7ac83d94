"""Failures of the vault's critical controls raise a metric and a log event (PCI DSS 10.7.2).

One vault of this module's own (its own database, the Cloud KMS stand-in, gauges refreshed every
0.1 s), and its worker run once per case as `python -m vault worker --once`. Each fault is real:
a KMS that stops answering, the runtime role's INSERT on audit_log revoked by the table's owner,
an audit record edited by the owner, a payment-page script altered by a compromised edge. Each
is read back from the vault's /metrics and from the log files, and each clears with its fault.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.ids import new_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import PG_ADMIN_URL, dsn, register_vault_merchant, start_service
from tests.support.fake_kms import FakeKms
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tampering_edge import SKIMMER, TamperingEdge
from tests.support.vault_helpers import bearer, card, tokenize
from vault import monitoring
from vault.elements.inventory import committed, sri

GCP_KEY = "projects/p/locations/l/keyRings/alarms/cryptoKeys/k"


@dataclass
class Alarmed:
    """This module's vault, its database and KMS, and ways to read its metrics and logs."""

    process: ServiceProcess
    db: ServiceDatabase
    env: dict[str, str]
    kms: FakeKms
    admin: str
    work: Path

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.process.url + "/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]

    def settle(self, name: str, wanted: float) -> float:
        """The gauge once it shows `wanted` (copied from Redis every 0.1 s), or after 10 s."""
        deadline = time.monotonic() + 10
        while (found := self.value(name)) != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def events(self, message: str, log: Path | None = None) -> list[dict[str, Any]]:
        text = (log or self.process.log_path).read_text(errors="replace")
        found = []
        for line in text.splitlines():
            if line.startswith("{") and f'"{message}"' in line:
                event = json.loads(line)
                if event.get("message") == message:
                    found.append(event)
        return found

    def worker(self, job: str, **extra: str) -> tuple[int, Path]:
        """`python -m vault worker --once JOB`; its exit status and log file."""
        log = self.work / f"worker-{job}-{secrets.token_hex(3)}.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [sys.executable, "-m", "vault", "worker", "--once", job],
                env={**os.environ, **self.env, **extra},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                timeout=60,
                check=False,
            )
        return done.returncode, log

    async def owner(self) -> asyncpg.Connection:
        return await asyncpg.connect(dsn(self.db.owner, self.db.database))


@pytest.fixture(scope="module")
async def alarm_db() -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_alarms_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(scope="module")
def alarmed(
    vault_env: dict[str, str],
    redis_urls: dict[str, str],
    tokens: dict[str, str],
    alarm_db: ServiceDatabase,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Alarmed]:
    work = tmp_path_factory.mktemp("alarms")
    with FakeKms.start(GCP_KEY) as fake:
        env = {
            **vault_env,
            "TESSERA_VAULT_DATABASE_URL": dsn(alarm_db.runtime, alarm_db.database),
            "TESSERA_VAULT_MIGRATION_URL": dsn(alarm_db.owner, alarm_db.database),
            # Not the session vault's Redis database: this module's gauges must not be its.
            # The API's database holds no vault:* key.
            "TESSERA_VAULT_REDIS_URL": redis_urls["api"],
            "TESSERA_VAULT_KMS_PROVIDER": "gcp",
            "TESSERA_VAULT_GCP_KMS_KEY_NAME": GCP_KEY,
            "TESSERA_VAULT_GCP_KMS_ENDPOINT": fake.address,
            "TESSERA_VAULT_MONITOR_REFRESH_SECONDS": "0.1",
        }
        process = start_service("vault", env, work)
        env["TESSERA_VAULT_PORT"] = str(process.port)
        try:
            yield Alarmed(process, alarm_db, env, fake, tokens["admin"], work)
        finally:
            process.stop()


def test_every_alarm_is_on_the_metrics_page_from_the_start(alarmed: Alarmed) -> None:
    metrics = alarmed.metrics()
    names = {name for name, _ in metrics}
    assert set(monitoring.METRICS) <= names
    kms = {labels for name, labels in metrics if name == monitoring.KMS_FAILURES}
    assert len(kms) == len(monitoring.KMS_OPERATIONS) * len(monitoring.KMS_REASONS)  # bounded
    assert alarmed.value(monitoring.AUDIT_WRITE_FAILURES) == 0


def test_a_kms_that_stops_answering_is_counted_and_logged(alarmed: Alarmed) -> None:
    merchant = register_vault_merchant(alarmed.process, alarmed.admin)
    tokenize(alarmed.process, merchant)  # the audit key and this merchant's keys exist now
    before = alarmed.value(monitoring.KMS_FAILURES, operation="wrap", reason="unavailable")
    alarmed.kms.fail_next(50, grpc.StatusCode.UNAVAILABLE)
    try:
        newcomer = register_vault_merchant(alarmed.process, alarmed.admin)
        refused = httpx.post(
            alarmed.process.url + "/v1/tokens",
            json=card(),
            headers=bearer(newcomer.publishable_key),  # its fingerprint key must be wrapped
        )
    finally:
        alarmed.kms.reset_faults()

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "kms_unavailable"
    after = alarmed.value(monitoring.KMS_FAILURES, operation="wrap", reason="unavailable")
    assert after == before + 1
    events = alarmed.events("kms.failed")
    assert events[-1]["operation"] == "wrap"
    assert events[-1]["reason"] == "unavailable"
    assert events[-1]["level"] == "error"
    assert "4242424242424242" not in alarmed.process.output()
    tokenize(alarmed.process, newcomer)  # the KMS is back: so is tokenization


async def test_an_audit_record_that_cannot_be_written_is_counted_and_logged(
    alarmed: Alarmed,
) -> None:
    before = alarmed.value(monitoring.AUDIT_WRITE_FAILURES)
    owner = await alarmed.owner()
    try:
        await owner.execute("REVOKE INSERT ON audit_log FROM tessera_vault")
        try:
            refused = await asyncio.to_thread(
                httpx.post,
                alarmed.process.url + "/v1/merchants",
                json={
                    "id": new_id("mer"),
                    "publishable_key": f"pk_test_{secrets.token_hex(24)}",
                },
                headers=bearer(alarmed.admin),
            )
        finally:
            await owner.execute("GRANT INSERT ON audit_log TO tessera_vault")
    finally:
        await owner.close()

    assert refused.status_code == 503, refused.text  # fail closed: nothing registered
    assert alarmed.value(monitoring.AUDIT_WRITE_FAILURES) == before + 1
    event = alarmed.events("audit.write_failed")[-1]
    assert (event["action"], event["error"]) == (
        "merchant.register",
        "InsufficientPrivilegeError",
    )


async def test_a_broken_audit_chain_sets_the_gauge_from_the_admin_check_and_the_worker(
    alarmed: Alarmed,
) -> None:
    register_vault_merchant(alarmed.process, alarmed.admin)  # at least one record
    owner = await alarmed.owner()
    try:
        first = await owner.fetchrow(
            "SELECT chain_id, seq, outcome FROM audit_log ORDER BY occurred_at LIMIT 1"
        )
        assert first is not None
        where = "WHERE chain_id = $1 AND seq = $2"
        await owner.execute(
            f"UPDATE audit_log SET outcome = 'tampered' {where}", first["chain_id"], first["seq"]
        )
        try:
            verified = httpx.get(
                alarmed.process.url + "/v1/audit/verify", headers=bearer(alarmed.admin)
            )
            assert verified.json()["ok"] is False
            assert alarmed.value(monitoring.AUDIT_CHAIN_BROKEN) == 1  # at once, in this process
            status, log = alarmed.worker("audit_verify")
            assert status == 0, log.read_text()
            worker_event = alarmed.events("audit.chain_broken", log)[-1]
        finally:
            await owner.execute(
                f"UPDATE audit_log SET outcome = $3 {where}",
                first["chain_id"],
                first["seq"],
                first["outcome"],
            )
        record = await owner.fetchrow(
            "SELECT outcome, detail::text AS detail FROM audit_log "
            "WHERE actor = 'worker:audit_verify' ORDER BY occurred_at DESC LIMIT 1"
        )
    finally:
        await owner.close()

    event = alarmed.events("audit.chain_broken")[-1]
    assert event["by"] == "admin"
    assert event["broken"][0]["chain_id"] == first["chain_id"]
    assert event["broken"][0]["problem"] == "hash_mismatch"
    assert worker_event["by"] == "worker"
    assert record is not None
    assert record["outcome"] == "broken"
    assert json.loads(record["detail"])["interval_seconds"] == 3600
    # Restored: the worker's next walk clears the alarm in the vault's gauge.
    status, log = alarmed.worker("audit_verify")
    assert status == 0, log.read_text()
    assert alarmed.settle(monitoring.AUDIT_CHAIN_BROKEN, 0) == 0
    assert alarmed.value(monitoring.AUDIT_CHAIN_VERIFIED_AT) > time.time() - 60


@pytest.fixture
def edge(alarmed: Alarmed) -> Iterator[TamperingEdge]:
    proxy = TamperingEdge(alarmed.process.url).start()
    yield proxy
    proxy.stop()


async def test_a_script_altered_at_the_edge_is_an_alarm_until_it_is_served_as_reviewed(
    alarmed: Alarmed, edge: TamperingEdge
) -> None:
    origin = "https://monitored.example"
    merchant = register_vault_merchant(alarmed.process, alarmed.admin, (origin,))
    through_edge = {
        "TESSERA_VAULT_PUBLIC_ORIGIN": edge.url,
        "TESSERA_VAULT_SCRIPTS_CHECK_PUBLISHABLE_KEY": merchant.publishable_key,
        "TESSERA_VAULT_SCRIPTS_CHECK_ORIGIN": origin,
    }
    original = httpx.get(alarmed.process.url + "/elements/v1/tessera.js").content
    edge.tamper = {"/elements/v1/tessera.js": SKIMMER}

    status, log = alarmed.worker("scripts", **through_edge)

    assert status == 0, log.read_text()
    mismatch = alarmed.events("script_inventory.mismatch", log)
    assert [(e["asset"], e["kind"]) for e in mismatch] == [("tessera.js", "hash_mismatch")]
    reviewed = committed().asset("tessera.js")
    assert reviewed is not None
    assert mismatch[0]["expected"] == reviewed.integrity
    assert mismatch[0]["served"] == sri(original + SKIMMER)
    assert alarmed.settle(monitoring.SCRIPT_MISMATCHES, 1) == 1
    owner = await alarmed.owner()
    try:
        record = await owner.fetchrow(
            "SELECT outcome, detail::text AS detail FROM audit_log "
            "WHERE actor = 'worker:scripts' ORDER BY occurred_at DESC LIMIT 1"
        )
    finally:
        await owner.close()
    assert record is not None
    assert record["outcome"] == "mismatch"
    detail = json.loads(record["detail"])
    assert (detail["asset"], detail["served"]) == ("tessera.js", sri(original + SKIMMER))
    assert any(path.startswith("/elements/v1/card.html?key=") for path in edge.seen)

    edge.tamper = {}
    status, log = alarmed.worker("scripts", **through_edge)
    assert status == 0, log.read_text()
    assert alarmed.events("script_inventory.mismatch", log) == []
    assert alarmed.settle(monitoring.SCRIPT_MISMATCHES, 0) == 0
