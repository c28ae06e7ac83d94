"""Network segmentation (PCI DSS 11.4.5): deploy/flows.yaml is well-formed and says what PCI
needs, and the namespace model built from it (tests/segmentation/) behaves exactly as it says.

The campaign needs root (network namespaces, nftables): CI runs as root. Elsewhere the test
fails with how to run it (`sudo make segmentation`), it is never skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import textwrap
from pathlib import Path

import pytest

from tessera.pci.checks import segmentation as segmentation_check
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.model import ControlResult, Status
from tests.segmentation import policy
from tests.segmentation.campaign import (
    PrerequisiteError,
    render_report,
    run_campaign,
    write_result,
)
from tests.segmentation.model import Flow, FlowModel, FlowsError, Probe, Service, load, parse
from tests.segmentation.netns import Network
from tests.support.processes import ROOT

#: The vault's three listeners, each for one kind of caller (vault/listeners.py).
VAULT_PUBLIC = Service(8100, "tcp")
VAULT_SERVICE = Service(8101, "tcp")
VAULT_ADMIN = Service(8102, "tcp")
VAULT_LISTENER_OF = {"browser": VAULT_PUBLIC, "app": VAULT_SERVICE, "admin": VAULT_ADMIN}


def pci_violations(model: FlowModel) -> list[str]:
    """What flows.yaml must never allow, whatever else changes in it."""
    problems = []
    for flow in model.flows:
        source = model.segments[flow.source]
        destination = model.segments[flow.destination]
        if flow.destination in ("kms", "psp-card") and flow.source != "cde":
            problems.append(f"{flow}: only the vault reaches the KMS and the card endpoints")
        if flow.destination in ("vault-db", "vault-redis") and flow.source != "cde":
            problems.append(f"{flow}: only the vault reaches its database and Redis")
        if flow.destination == "api-redis" and flow.source != "app":
            problems.append(f"{flow}: only the API reaches its Redis")
        if flow.destination == "api-db" and flow.source not in ("app", "admin"):
            problems.append(f"{flow}: only the API and operators' commands reach its database")
        if (
            destination.zone == "cde"
            and source.zone != "cde"
            and (flow.destination != "cde" or flow.service != VAULT_LISTENER_OF.get(flow.source))
        ):
            problems.append(
                f"{flow}: from outside the CDE, only the vault's listener for the caller's kind"
            )
        if (
            source.zone == "cde"
            and destination.zone == "internet"
            and flow.destination != "psp-card"
        ):
            problems.append(f"{flow}: the CDE sends to the internet only card endpoints")
    return problems


# --- flows.yaml ---------------------------------------------------------------------------


def test_flows_yaml_is_well_formed_and_lists_every_flow_the_deployment_needs() -> None:
    model = load()  # every flow has source, destination, port, protocol, why; segments known
    assert all(flow.why.strip() for flow in model.flows)
    listed = {(f.source, f.destination, f.service) for f in model.flows}
    needed = {
        ("browser", "cde", VAULT_PUBLIC),  # hosted fields and tokens
        ("app", "cde", VAULT_SERVICE),  # the vault's service listener
        ("app", "api-db", Service(5432, "tcp")),
        ("app", "api-redis", Service(6379, "tcp")),
        ("cde", "vault-db", Service(5432, "tcp")),
        ("cde", "kms", Service(443, "tcp")),
        ("cde", "psp-card", Service(8201, "tcp")),
        ("app", "psp-api", Service(8201, "tcp")),  # capture, refund, void
        ("admin", "cde", VAULT_ADMIN),
        ("app", "dns", Service(53, "udp")),
        ("cde", "dns", Service(53, "udp")),
    }
    assert needed <= listed, needed - listed


def test_flows_yaml_never_lets_anything_but_the_vault_near_card_data() -> None:
    model = load()
    assert pci_violations(model) == []
    assert not model.allows(Probe("app", "vault-db", Service(5432, "tcp")))
    assert not model.allows(Probe("app", "psp-card", Service(8201, "tcp")))


@pytest.mark.parametrize(
    "flow",
    [
        Flow("app", "vault-db", 5432, "tcp", "the API reading the vault's database"),
        Flow("app", "kms", 443, "tcp", "the API calling the KMS"),
        Flow("app", "psp-card", 8201, "tcp", "the API posting to a card endpoint"),
        Flow("admin", "vault-db", 5432, "tcp", "an administrator in the card database"),
        Flow("app", "cde", 22, "tcp", "ssh into the vault"),
        Flow("app", "cde", 8102, "tcp", "the API on the vault's admin listener"),
        Flow("browser", "cde", 8101, "tcp", "browsers on the vault's service listener"),
        Flow("merchant", "cde", 8100, "tcp", "merchants' servers posting cards to the vault"),
        Flow("cde", "merchant", 443, "tcp", "the vault calling out to the internet"),
        Flow("merchant", "api-db", 5432, "tcp", "the internet in the API's database"),
    ],
    ids=str,
)
def test_the_pci_checks_catch_a_flow_that_must_never_exist(flow: Flow) -> None:
    assert pci_violations(load().plus(flow)) != []


GOOD = """
version: 1
segments:
  app: {zone: internal, description: the API}
  cde: {zone: cde, description: the vault}
flows:
  - {source: app, destination: cde, port: 8100, protocol: tcp, why: the vault's service port}
"""


@pytest.mark.parametrize(
    ("original", "replacement", "message"),
    [
        (", why: the vault's service port", "", "missing required field `why`"),
        (", protocol: tcp", "", "missing required field `protocol`"),
        ("protocol: tcp", "protocol: icmp", "invalid enum value 'icmp' - at `$.flows[0].protocol`"),
        ("port: 8100", "port: 70000", "port must be 1-65535"),
        ("port: 8100", "port: http", "expected `int`, got `str` - at `$.flows[0].port`"),
        ("destination: cde", "destination: vault", "unknown segment 'vault'"),
        ("source: app", "source: cde", "a flow must cross a segment boundary"),
        ("why: the vault's service port", "why: because", "`why` must say why"),
        ("zone: cde", "zone: dmz", "invalid enum value 'dmz'"),
        ("app: {zone", "App: {zone", "segment name 'App'"),
        ("version: 1", "version: 2", "invalid enum value 2"),
    ],
    ids=[
        "no why",
        "no protocol",
        "bad protocol",
        "port out of range",
        "port not a number",
        "unknown segment",
        "same segment",
        "empty why",
        "unknown zone",
        "bad segment name",
        "unknown version",
    ],
)
def test_the_loader_refuses_a_malformed_flows_file(
    original: str, replacement: str, message: str
) -> None:
    assert parse(GOOD).flows  # the unchanged file is fine
    assert original in GOOD
    with pytest.raises(FlowsError) as raised:
        parse(GOOD.replace(original, replacement, 1))
    assert message.lower() in str(raised.value).lower(), str(raised.value)


def test_the_loader_refuses_a_key_given_twice_and_a_flow_listed_twice() -> None:
    twice = GOOD.replace(
        "  cde: {zone: cde", "  app: {zone: internal, description: x}\n  cde: {zone: cde"
    )
    with pytest.raises(FlowsError, match="'app' is given twice"):
        parse(twice)
    flow = GOOD.strip().splitlines()[-1]
    with pytest.raises(FlowsError, match="listed twice"):
        parse(GOOD + flow + "\n")
    with pytest.raises(FlowsError, match="unknown field"):
        parse(GOOD.replace("why:", "reason: x, why:"))


# --- the policy rendered from it ------------------------------------------------------------


def test_the_policy_is_one_counted_accept_rule_per_flow_and_drops_everything_else() -> None:
    model = load()
    net = Network(list(model.segments))  # names and addresses only: nothing is created
    ruleset = policy.render(model, net.links)
    assert "type filter hook forward priority filter; policy drop;" in ruleset
    accepts = [line.strip() for line in ruleset.splitlines() if " accept comment " in line]
    assert len(accepts) == len(model.flows)
    for flow in model.flows:
        source, destination = net.links[flow.source], net.links[flow.destination]
        expected = (
            f'iifname "{source.router_if}" ip saddr {source.address} '
            f'oifname "{destination.router_if}" ip daddr {destination.address} '
            f"{flow.protocol} dport {flow.port} counter accept "
            f'comment "{policy.rule_comment(flow)}"'
        )
        assert expected in accepts
    assert ruleset.index(accepts[-1]) < ruleset.index('counter comment "denied"')
    assert "policy accept" in policy.render_open()
    assert "accept comment" not in policy.render_open()


# --- the model, run -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_namespace_model_matches_flows_yaml_end_to_end(tmp_path: Path) -> None:
    """The whole campaign (what `make segmentation` prints): about 30-50 s. Its result, written
    as `make segmentation` writes it, is what the assessor's kit's `segmentation` control
    passes on (the kit's own stack test cannot afford a second campaign)."""
    if os.geteuid() != 0:
        pytest.fail(
            "the segmentation test needs root (network namespaces, nftables): run it as root, "
            "e.g. `sudo make segmentation` or `sudo .venv/bin/pytest tests/test_segmentation.py`"
        )
    try:
        report = run_campaign(install=True)
    except PrerequisiteError as exc:
        pytest.fail(str(exc))
    text = render_report(report)
    print(text)
    assert not report.failures, textwrap.indent(text, "  ")
    names = [check.name for check in report.checks]
    for part in (
        "policy: the probe matrix equals flows.yaml",
        "every flow to a real service carried the services' own traffic",
        "the services tried no flow that flows.yaml does not list (nothing dropped yet)",
        "PSP B -> API: its signed notification confirmed the refund",
        "negative control: with the policy off, every denied probe gets through",
    ):
        assert part in names, names
    assert sum(name.startswith("bite:") for name in names) == 2
    matrix = report.rounds["policy"].results
    assert matrix[Probe("app", "cde", VAULT_SERVICE)] == "open"
    assert matrix[Probe("app", "cde", VAULT_ADMIN)] == "filtered"
    assert matrix[Probe("browser", "cde", VAULT_SERVICE)] == "filtered"
    assert "browser -> vault public listener: an admin route answers 404" in names
    assert matrix[Probe("app", "vault-db", Service(5432, "tcp"))] == "filtered"
    assert matrix[Probe("app", "psp-card", Service(8201, "tcp"))] == "filtered"
    assert report.rounds["open"].results[Probe("app", "vault-db", Service(5432, "tcp"))] == "open"
    result = write_result(report, tmp_path / "latest.json")
    control = asyncio.run(judge_with_the_kit(result))
    assert control.status == Status.PASSED, control.summary


async def judge_with_the_kit(result: Path) -> ControlResult:
    settings = EvidenceSettings(segmentation_result=str(result))
    ctx = EvidenceContext(settings, datetime.datetime.now(datetime.UTC), ROOT, result.parent)
    try:
        return await segmentation_check.run(ctx)
    finally:
        await ctx.close()
