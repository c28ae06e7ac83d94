"""`critical-alerts` (PCI DSS 10.7.2; 10.3.4 for the audit chain): a failure of a critical
security control is an alert.

Judged on:

- the committed rules, deploy/prometheus/pci-alerts.yaml: `promtool check rules`, and
  `promtool test rules` of pci-alerts.test.yaml (each alert fires on its fault and stays silent on
  a healthy vault). Without promtool that part is not checked, and the control with it;
- each of the four failure kinds the vault measures (vault.monitoring.FAILURE_METRICS: audit
  writes, the KMS, the audit chain, the payment-page scripts) has an alert rule on its metric,
  and GKE's Managed Prometheus `Rules` resource (deploy/k8s/base/cde/alert-rules.yaml) carries
  the same groups;
- the live vault: every metric the rules read is on its /metrics (served on the service and
  admin listeners, to no credential at all: the kit reads the admin one), and it is healthy now:
  no script mismatch, no broken chain, and both verifications younger than the rules' staleness
  thresholds (the worker runs them).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult
from vault import monitoring

CONTROL = Control(
    "critical-alerts",
    "Failures of critical security controls raise alerts",
    ("10.3.4", "10.7.2"),
)
RULES = Path("deploy/prometheus/pci-alerts.yaml")
RULE_TESTS = Path("deploy/prometheus/pci-alerts.test.yaml")
MANAGED_RULES = Path("deploy/k8s/base/cde/alert-rules.yaml")
INSTALL_PROMTOOL = (
    "promtool is missing: install Debian's prometheus package (`apt-get install prometheus`, "
    "which carries promtool), or Prometheus's release tarball"
)
_METRIC = re.compile(r"\btessera_vault_[a-z0-9_]+")
# `time() - max(METRIC) > 2 * 300`: the age beyond which a verification counts as not made.
_STALENESS = re.compile(r"time\(\)\s*-\s*max\((\w+)\)\s*>\s*([\d\s*.]+)$")


def load_alerts(root: Path) -> list[dict[str, Any]]:
    groups = yaml.safe_load((root / RULES).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def metrics_of(alerts: list[dict[str, Any]]) -> set[str]:
    return {name for rule in alerts for name in _METRIC.findall(str(rule["expr"]))}


def staleness(alerts: list[dict[str, Any]]) -> dict[str, float]:
    """Per timestamp metric, the age (seconds) past which its rule alerts."""
    found = {}
    for rule in alerts:
        match = _STALENESS.search(str(rule["expr"]).strip())
        if match:
            seconds = 1.0
            for factor in match[2].split("*"):
                seconds *= float(factor)
            found[match[1]] = seconds
    return found


def uncovered_kinds(alerts: list[dict[str, Any]]) -> list[str]:
    """Failure kinds no alert rule reads the metric of."""
    used = metrics_of(alerts)
    return [kind for kind, metric in monitoring.FAILURE_METRICS.items() if metric not in used]


async def promtool(root: Path, *args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "promtool",
        *args,
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    return {
        "command": "promtool " + " ".join(args),
        "exit": process.returncode,
        "output": out.decode(errors="replace")[-4000:],
    }


def scrape(text: str) -> dict[str, list[dict[str, Any]]]:
    """Every sample on a /metrics page, by name: its labels and value."""
    samples: dict[str, list[dict[str, Any]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(
                {"labels": dict(sample.labels), "value": sample.value}
            )
    return samples


async def run(ctx: EvidenceContext) -> ControlResult:
    failures: list[str] = []
    evidence: dict[str, Any] = {"rules": str(RULES), "tests": str(RULE_TESTS)}
    alerts = load_alerts(ctx.root)
    evidence["alerts"] = {rule["alert"]: rule["expr"] for rule in alerts}

    tool = shutil.which("promtool")
    if tool is not None:
        checked = await promtool(ctx.root, "check", "rules", str(RULES))
        tested = await promtool(ctx.root, "test", "rules", str(RULE_TESTS))
        evidence["promtool"] = [checked, tested]
        for run_ in (checked, tested):
            if run_["exit"] != 0:
                failures.append(f"`{run_['command']}` failed (exit {run_['exit']})")

    kinds = uncovered_kinds(alerts)
    evidence["failure_kinds"] = {
        kind: [r["alert"] for r in alerts if metric in str(r["expr"])]
        for kind, metric in monitoring.FAILURE_METRICS.items()
    }
    failures += [
        f"no alert rule on the {kind} failures ({monitoring.FAILURE_METRICS[kind]})"
        for kind in kinds
    ]
    managed = yaml.safe_load((ctx.root / MANAGED_RULES).read_text())
    plain = yaml.safe_load((ctx.root / RULES).read_text())
    evidence["managed_prometheus_rules"] = {
        "file": str(MANAGED_RULES),
        "same_groups": managed.get("spec", {}).get("groups") == plain["groups"],
    }
    if not evidence["managed_prometheus_rules"]["same_groups"]:
        failures.append(f"{MANAGED_RULES} does not carry the groups of {RULES}")

    url = ctx.settings.admin_url.rstrip("/") + "/metrics"
    response = await ctx.http.get(url)
    samples = scrape(response.text) if response.status_code == 200 else {}
    wanted = sorted(metrics_of(alerts))
    missing = [name for name in wanted if name not in samples]
    evidence["live"] = {
        "url": url,
        "status": response.status_code,
        "samples": {name: samples.get(name, []) for name in wanted},
        "missing": missing,
    }
    if response.status_code != 200:
        failures.append(f"the vault's /metrics answered {response.status_code}")
    elif missing:
        failures.append(f"the vault does not export {', '.join(missing)}, which the rules read")
    else:
        failures += _unhealthy(samples, staleness(alerts), ctx.now.timestamp(), evidence)

    if failures:
        return CONTROL.failed("; ".join(failures), evidence)
    if tool is None:
        return CONTROL.not_checked(
            f"{INSTALL_PROMTOOL}: the rules could not be checked or unit-tested (the rest "
            "passed: every failure kind has a rule and the live vault exports its metrics)",
            evidence,
        )
    return CONTROL.passed(
        f"{len(alerts)} alert rules pass promtool check and their unit tests; audit writes, the "
        "KMS, the audit chain and the payment-page scripts each have a rule; the live vault "
        "exports every metric they read and is healthy",
        evidence,
    )


def _unhealthy(
    samples: dict[str, list[dict[str, Any]]],
    stale_after: dict[str, float],
    now: float,
    evidence: dict[str, Any],
) -> list[str]:
    problems = []
    for name, what in (
        (monitoring.SCRIPT_MISMATCHES, "the payment page differs from the script inventory"),
        (monitoring.AUDIT_CHAIN_BROKEN, "the audit chain is broken"),
    ):
        if max(s["value"] for s in samples[name]) > 0:
            problems.append(f"{what} ({name} > 0)")
    ages = {}
    for name, limit in stale_after.items():
        age = now - max(s["value"] for s in samples[name])
        ages[name] = {"age_seconds": round(age), "alert_after_seconds": limit}
        if age > limit:
            problems.append(f"{name} is {round(age)} s old, past the rule's {round(limit)} s")
    evidence["verification_ages"] = ages
    return problems
