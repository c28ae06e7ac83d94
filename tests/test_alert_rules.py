"""The PCI alert rules (deploy/prometheus/pci-alerts.yaml, PCI DSS 10.7.2) are valid, fire on
their faults and only then, cover every kind of control failure the vault measures, read only
metrics the vault exports, and are what GKE's Managed Prometheus deploys.

promtool is Debian's `prometheus` package (`make promtool` installs it as root): without it this
test fails, with the instruction, rather than skipping.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tessera.pci.checks import critical_alerts
from tests.deploy import alert_rules
from tests.support.processes import ServiceProcess
from vault import monitoring

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make promtool` installs Debian's prometheus package as root, "
            "or run `sudo apt-get install prometheus`. This test never skips the alert rules."
        )
    return found


def test_promtool_checks_the_rules(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "check", "rules", str(critical_alerts.RULES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_each_alert_fires_on_its_fault_and_not_on_a_healthy_vault(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "test", "rules", str(critical_alerts.RULE_TESTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((ROOT / critical_alerts.RULE_TESTS).read_text())["tests"]
    alerts = {rule["alert"] for rule in critical_alerts.load_alerts(ROOT)}
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for case in tests[0]["alert_rule_test"]  # the healthy vault
        if not case["exp_alerts"]
    }
    assert fired == alerts, "every alert has a test that makes it fire"
    assert quiet == alerts, "and a healthy vault raises none of them"


def test_every_failure_kind_has_an_alert_and_every_metric_is_the_vaults() -> None:
    alerts = critical_alerts.load_alerts(ROOT)
    assert critical_alerts.uncovered_kinds(alerts) == []
    assert critical_alerts.metrics_of(alerts) == set(monitoring.METRICS)
    assert critical_alerts.staleness(alerts) == {
        monitoring.SCRIPTS_CHECKED_AT: 600.0,
        monitoring.AUDIT_CHAIN_VERIFIED_AT: 7200.0,
    }
    without_kms = [a for a in alerts if monitoring.KMS_FAILURES not in a["expr"]]
    assert critical_alerts.uncovered_kinds(without_kms) == ["kms"]
    for alert in alerts:
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["pci_dss"] == "10.7.2"


def test_gke_deploys_the_same_rule_groups() -> None:
    resource = yaml.safe_load(alert_rules.RESOURCE.read_text())
    assert resource["kind"] == "Rules"
    assert resource["spec"]["groups"] == alert_rules.plain_groups()
    assert alert_rules.RESOURCE.read_text() == alert_rules.resource_text(), (
        f"run `{alert_rules.WRITE_COMMAND}`"
    )
    kustomization = yaml.safe_load((alert_rules.RESOURCE.parent / "kustomization.yaml").read_text())
    assert alert_rules.RESOURCE.name in kustomization["resources"]


def test_the_running_vault_exports_every_metric_the_rules_read(vault: ServiceProcess) -> None:
    samples = critical_alerts.scrape(httpx.get(vault.url + "/metrics").text)
    wanted = critical_alerts.metrics_of(critical_alerts.load_alerts(ROOT))
    assert wanted <= set(samples)
    assert all(s["value"] == 0 for s in samples[monitoring.AUDIT_CHAIN_BROKEN])
