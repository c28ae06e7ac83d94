"""The kit's `payment-page-scripts` (6.4.3, 11.6.1) and `critical-alerts` (10.7.2) controls,
against the session's vault after its worker's two watch jobs ran once (`python -m vault worker
--once scripts,audit_verify`, as the schedule runs them).

Each verdict is checked both ways: a pass on the vault as it is, and a failure that names what
it found when the clock moves past the worker's intervals, when a compromised edge alters a
script on the way (the planted fault of issue 12: evidence names the asset and both hashes), or
"not checked" when promtool is missing.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tessera.dbsetup import AUDITOR_ROLE, ServiceDatabase
from tessera.pci.context import EvidenceSettings
from tessera.pci.evidence import evidence
from tests.conftest import VaultMerchant, dsn
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tampering_edge import SKIMMER, TamperingEdge
from vault import monitoring
from vault.elements.inventory import committed, sri

ORIGIN = "https://shop.example"  # the session's `shop` fixture registers it
CONTROLS = ("payment-page-scripts", "critical-alerts")


@pytest.fixture(scope="module")
def watched(
    vault: ServiceProcess,
    vault_env: dict[str, str],
    shop: VaultMerchant,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServiceProcess:
    """The session's vault once its worker has checked the page and walked the chains, and its
    gauges show it (each vault process copies them from Redis every few seconds)."""
    log = tmp_path_factory.mktemp("watch") / "vault-worker.log"
    env = {
        **vault_env,
        "TESSERA_VAULT_PORT": str(vault.port),
        "TESSERA_VAULT_SCRIPTS_CHECK_PUBLISHABLE_KEY": shop.publishable_key,
        "TESSERA_VAULT_SCRIPTS_CHECK_ORIGIN": ORIGIN,
    }
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "vault", "worker", "--once", "scripts,audit_verify"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, log.read_text()
    started = time.time() - 60
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(vault.url + "/metrics").text
        shown = [
            line
            for line in text.splitlines()
            if line.startswith((monitoring.SCRIPTS_CHECKED_AT, monitoring.AUDIT_CHAIN_VERIFIED_AT))
        ]
        if len(shown) == 2 and all(float(line.split()[-1]) > started for line in shown):
            break
        time.sleep(0.1)
    return vault


@pytest.fixture(scope="module")
def settings(
    watched: ServiceProcess,
    databases: dict[str, ServiceDatabase],
    tokens: dict[str, str],
    shop: VaultMerchant,
) -> EvidenceSettings:
    return EvidenceSettings(
        vault_url=watched.url,
        vault_admin_token=tokens["admin"],
        api_database_url=dsn(AUDITOR_ROLE, databases["api"].database),
        vault_database_url=dsn(AUDITOR_ROLE, databases["vault"].database),
        publishable_key=shop.publishable_key,
        checkout_origin=ORIGIN,
    )


async def kit(
    settings: EvidenceSettings, out: Path, now: datetime.datetime | None = None
) -> dict[str, dict[str, Any]]:
    data = await evidence(settings, out, now=now, only=CONTROLS, root=ROOT)
    assert json.loads((out / "report.json").read_text())["controls"] == data["controls"]
    return {c["control"]: c for c in data["controls"]}


async def test_both_controls_pass_on_a_watched_vault(
    settings: EvidenceSettings, tmp_path: Path
) -> None:
    found = await kit(settings, tmp_path)

    page, alerts = found["payment-page-scripts"], found["critical-alerts"]
    assert page["status"] == "pass", page["summary"]
    assert alerts["status"] == "pass", alerts["summary"]
    assert "card.html's CSP, scripts, integrity and template match" in page["summary"]
    assert page["evidence"]["worker"]["record"]["outcome"] == "ok"
    assert page["evidence"]["served"]["card_page"]["template"]["match"] is True
    assert alerts["evidence"]["live"]["missing"] == []
    assert set(alerts["evidence"]["failure_kinds"]) == set(monitoring.FAILURE_METRICS)
    assert [run["exit"] for run in alerts["evidence"]["promtool"]] == [0, 0]


async def test_without_a_merchant_key_the_iframe_page_is_not_checked_and_the_rest_is(
    settings: EvidenceSettings, tmp_path: Path
) -> None:
    bare = msgspec.structs.replace(settings, publishable_key="", checkout_origin="")

    page = (await kit(bare, tmp_path))["payment-page-scripts"]

    assert page["status"] == "pass", page["summary"]
    assert "not checked: no merchant publishable key" in page["summary"]
    assert page["evidence"]["served"]["card_page"] is None
    assert page["evidence"]["served"]["refusal"]["status"] == 403


async def test_a_worker_that_stopped_checking_fails_both_controls(
    settings: EvidenceSettings, tmp_path: Path
) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=3)

    found = await kit(settings, tmp_path, now=later)

    page, alerts = found["payment-page-scripts"], found["critical-alerts"]
    assert page["status"] == "fail"
    assert "more than two of its intervals (600 s)" in page["summary"]
    assert alerts["status"] == "fail"
    assert monitoring.SCRIPTS_CHECKED_AT in alerts["summary"]
    assert monitoring.AUDIT_CHAIN_VERIFIED_AT in alerts["summary"]


@pytest.fixture
def edge(watched: ServiceProcess) -> Iterator[TamperingEdge]:
    proxy = TamperingEdge(watched.url).start()
    yield proxy
    proxy.stop()


async def test_a_script_altered_at_the_edge_fails_only_the_page_control_naming_both_hashes(
    settings: EvidenceSettings, edge: TamperingEdge, watched: ServiceProcess, tmp_path: Path
) -> None:
    edge.tamper = {"/elements/v1/tessera.js": SKIMMER}
    served = sri(httpx.get(watched.url + "/elements/v1/tessera.js").content + SKIMMER)
    reviewed = committed().asset("tessera.js")
    assert reviewed is not None

    found = await kit(msgspec.structs.replace(settings, vault_url=edge.url), tmp_path)

    page, alerts = found["payment-page-scripts"], found["critical-alerts"]
    assert page["status"] == "fail"
    assert alerts["status"] == "pass", alerts["summary"]  # the vault's own state is healthy
    assert "tessera.js" in page["summary"]
    assert reviewed.integrity in page["summary"]
    assert served in page["summary"]
    (mismatch,) = [p for p in page["evidence"]["served"]["problems"] if p["asset"] == "tessera.js"]
    assert (mismatch["expected"], mismatch["served"]) == (reviewed.integrity, served)
    report = (tmp_path / "report.md").read_text()
    assert served in report


async def test_without_promtool_the_alerts_control_is_not_checked(
    settings: EvidenceSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no promtool on it

    alerts = (await kit(settings, tmp_path))["critical-alerts"]

    assert alerts["status"] == "not_checked"
    assert "promtool is missing" in alerts["summary"]
    assert "apt-get install prometheus" in alerts["summary"]
