"""The cardholder-data flow diagram (PCI DSS 1.2.4, 12.5.2), drawn from deploy/flows.yaml.

deploy/flows.yaml is the list of network flows the deployment allows (its NetworkPolicies, the
segmentation test and docs/img/segments.svg are all checked against it); every flow there also
says what data it carries (`data`). This module reads that file, and deploy/k8s/segments.yaml for
the one hop flows.yaml leaves out (internet parties reach the cluster `through` the edge gateway,
which terminates their TLS), and draws which flows carry card data and which only tokens.

A segment is in the cardholder-data environment when flows.yaml puts it in the `cde` zone or when
a flow that carries account data starts or ends there: the admin toolbox (where break-glass
detokenization answers) and the edge gateway (where browsers' TLS ends) are in scope because of
what crosses them, not because of where they sit on the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

ROOT = Path(__file__).resolve().parents[2]
FLOWS_PATH = ROOT / "deploy" / "flows.yaml"
SEGMENTS_PATH = ROOT / "deploy" / "k8s" / "segments.yaml"
DOT_PATH = ROOT / "docs" / "pci" / "img" / "cardholder-data-flow.dot"
SVG_PATH = ROOT / "docs" / "pci" / "img" / "cardholder-data-flow.svg"

Zone = Literal["cde", "internal", "internet"]
#: What a flow carries, in either direction (flows.yaml's `data`).
DataClass = Literal["pan", "cvc", "pan-encrypted", "cvc-sealed", "keys", "tokens", "none"]
DATA_LABELS: dict[str, str] = {
    "pan": "PAN",
    "cvc": "CVC",
    "pan-encrypted": "PAN (encrypted)",
    "cvc-sealed": "CVC (sealed)",
    "keys": "data keys",
    "tokens": "tokens only",
    "none": "no card data",
}
#: Card data in clear (inside TLS): these flows put both ends in scope.
CLEAR = frozenset({"pan", "cvc"})
#: Account data in any form, encrypted included: storing it is in scope too.
ACCOUNT_DATA = CLEAR | {"pan-encrypted", "cvc-sealed"}
#: Only where PCI scope is decided: the vault and the parties that hand it card data.
VAULT = "cde"


class DataflowError(ValueError):
    """flows.yaml or segments.yaml cannot be drawn; the message says where."""


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    zone: Zone
    description: str


class Flow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str
    destination: str
    port: int
    protocol: Literal["tcp", "udp"]
    why: str
    data: tuple[DataClass, ...] = ()

    def __str__(self) -> str:
        return f"{self.source} -> {self.destination} {self.port}/{self.protocol}"

    @property
    def carries_account_data(self) -> bool:
        return bool(ACCOUNT_DATA & set(self.data))


class FlowsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    segments: dict[str, Segment]
    flows: tuple[Flow, ...]


@dataclass(frozen=True)
class DataflowModel:
    segments: dict[str, Segment]
    flows: tuple[Flow, ...]
    #: Internet segment -> the cluster segment it enters through (segments.yaml `through`).
    through: dict[str, str]

    def in_cde(self, name: str) -> bool:
        """In the cardholder-data environment: the CDE zone, or an end of an account-data flow
        that Tessera runs (parties on the internet are not Tessera's system components)."""
        zone = self.segments[name].zone if name in self.segments else "internal"
        if zone != "internal":
            return zone == "cde"
        return any(
            name in (hop_source, hop_destination)
            for flow in self.flows
            if flow.carries_account_data
            for hop_source, hop_destination in self.hops(flow)
        )

    def hops(self, flow: Flow) -> list[tuple[str, str]]:
        """The flow as drawn: source -> destination, or source -> gateway -> destination."""
        gateway = self.through.get(flow.source)
        if gateway is None:
            return [(flow.source, flow.destination)]
        return [(flow.source, gateway), (gateway, flow.destination)]


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataflowError(f"{_where(path)}: not YAML: {exc}") from None


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def parse(flows: Any, segments: Any, where: str = "deploy/flows.yaml") -> DataflowModel:
    """flows.yaml's content (and segments.yaml's) as a model; every flow must name its data."""
    try:
        document = msgspec.convert(flows, FlowsFile)
    except msgspec.ValidationError as exc:
        raise DataflowError(f"{where}: {exc}") from None
    problems = []
    for number, flow in enumerate(document.flows, start=1):
        here = f"{where}: flow {number} ({flow})"
        if not flow.data:
            problems.append(
                f"{here}: `data` must say what it carries "
                f"({', '.join(DATA_LABELS)}; a list, e.g. [tokens])"
            )
        elif "none" in flow.data and len(flow.data) > 1:
            problems.append(f"{here}: `none` cannot be listed with other data")
        for end in (flow.source, flow.destination):
            if end not in document.segments:
                problems.append(f"{here}: unknown segment {end!r}")
    through: dict[str, str] = {}
    k8s = segments if isinstance(segments, dict) else {}
    gateways = set(k8s.get("kubernetes_segments") or {})
    for name, segment in (k8s.get("segments") or {}).items():
        if isinstance(segment, dict) and "through" in segment:
            gateway = str(segment["through"])
            if gateway not in gateways:
                problems.append(
                    f"deploy/k8s/segments.yaml: {name} goes through {gateway!r}, "
                    "which is not one of its kubernetes_segments"
                )
            through[str(name)] = gateway
    if problems:
        raise DataflowError("; ".join(problems))
    return DataflowModel(dict(document.segments), document.flows, through)


def load(flows_path: Path = FLOWS_PATH, segments_path: Path = SEGMENTS_PATH) -> DataflowModel:
    return parse(_load_yaml(flows_path), _load_yaml(segments_path), _where(flows_path))


def card_data_violations(model: DataflowModel) -> list[str]:
    """What the data view must never show, whatever else changes in flows.yaml: account data
    moves only to or from the vault, and nothing outside the CDE zone stores it."""
    problems = []
    for flow in model.flows:
        data = set(flow.data)
        if data & ACCOUNT_DATA and VAULT not in (flow.source, flow.destination):
            problems.append(
                f"{flow}: account data ({', '.join(sorted(data))}) not to or from the vault"
            )
        if (
            data & {"pan-encrypted", "cvc-sealed"}
            and model.segments[flow.destination].zone != "cde"
        ):
            problems.append(f"{flow}: stored account data outside the CDE zone")
        other = flow.destination if flow.source == VAULT else flow.source
        if "keys" in data and (
            VAULT not in (flow.source, flow.destination) or model.segments[other].zone != "cde"
        ):
            problems.append(f"{flow}: data keys move only between the vault and the CDE zone")
    return problems


# --- the diagram -------------------------------------------------------------------------

CLUSTERS = {
    "cde": ("Cardholder data environment: stores, processes or transmits account data", "#fbe9e7"),
    "connected": ("Connected to the CDE: tokens and masked data only", "#e8f0fb"),
    "outside": ("a party Tessera does not run", "#f2f2f2"),
}
#: Edge style by the most sensitive data a hop carries.
STYLES: list[tuple[frozenset[str], str, str]] = [
    (CLEAR, "#c62828", "bold"),
    (frozenset({"pan-encrypted", "cvc-sealed"}), "#ef6c00", "dashed"),
    (frozenset({"keys"}), "#6a1b9a", "dashed"),
    (frozenset({"tokens"}), "#1565c0", "solid"),
    (frozenset({"none"}), "#9e9e9e", "dotted"),
]
GATEWAY_DESCRIPTIONS = {
    "edge": "The edge gateway (tessera-edge): terminates browsers' and merchants' TLS.",
}
#: What a reader sees on a box (the segment name is the node's id, and its title in the SVG).
NODE_LABELS = {
    "cde": "vault (segment cde)\nlisteners: public 8100,\nservice 8101, admin 8102",
    "vault-db": "vault-db\nPostgres tessera_vault",
    "vault-redis": "vault-redis\nRedis, no persistence",
    "kms": "kms\nCloud KMS (HSM key)",
    "admin": "admin toolbox\n(break-glass answers here)",
    "edge": "edge gateway\n(TLS ends here)",
    "app": "app\npayment API and worker",
    "api-db": "api-db\nPostgres tessera_api",
    "api-redis": "api-redis\nRedis",
}


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _cluster_of(model: DataflowModel, name: str) -> str:
    if name in model.segments and model.segments[name].zone == "internet":
        return "outside"
    return "cde" if model.in_cde(name) else "connected"


def _style(data: Iterable[str]) -> tuple[str, str]:
    carried = set(data)
    for classes, colour, style in STYLES:
        if carried & classes:
            return colour, style
    return "#555555", "solid"


def _ordered(data: Iterable[str]) -> list[str]:
    carried = set(data)
    if len(carried) > 1:
        carried.discard("none")
    if carried & ACCOUNT_DATA:
        carried.discard("tokens")
    return [name for name in DATA_LABELS if name in carried]


def _node(model: DataflowModel, name: str, *, outside: bool = False) -> str:
    description = (
        model.segments[name].description
        if name in model.segments
        else GATEWAY_DESCRIPTIONS.get(name, name)
    )
    label = NODE_LABELS.get(name, name)
    extra = ""
    if outside:
        label += "\n(" + CLUSTERS["outside"][0] + ")"
        extra = f', style="rounded,dashed,filled", fillcolor={_quote(CLUSTERS["outside"][1])}'
    return (
        f"  {_quote(name)} [label={_quote(label)}{extra}, "
        f"tooltip={_quote(' '.join(description.split()))}];"
    )


def render_dot(model: DataflowModel) -> str:
    nodes = list(model.segments)
    for gateway in dict.fromkeys(model.through.values()):
        if any(model.through.get(f.source) == gateway for f in model.flows):
            nodes.append(gateway)
    lines = [
        "// Generated by `python -m tessera.pci.controls` from deploy/flows.yaml (`data` of each",
        "// flow) and deploy/k8s/segments.yaml (`through`): do not edit.",
        "digraph cardholder_data {",
        "  graph [rankdir=LR, fontname=Helvetica, fontsize=11, nodesep=0.35, ranksep=1.0];",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, '
        "fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=9];",
    ]
    for cluster, (title, colour) in CLUSTERS.items():
        members = [n for n in nodes if _cluster_of(model, n) == cluster]
        if cluster == "outside":
            # Not a cluster: clients stay on the left, the parties Tessera calls on the right.
            lines.extend(_node(model, name, outside=True) for name in members)
            continue
        lines.append(f"  subgraph cluster_{cluster} {{")
        lines.append(f"    label={_quote(title)}; style=filled; color={_quote(colour)};")
        lines.extend("  " + _node(model, name) for name in members)
        lines.append("  }")
    hops: dict[tuple[str, str], tuple[list[str], set[str]]] = {}
    for flow in model.flows:
        for source, destination in model.hops(flow):
            ports, data = hops.setdefault((source, destination), ([], set()))
            service = (
                "HTTPS"
                if destination in model.through.values() and source == flow.source
                else f"{flow.port}/{flow.protocol}"
            )
            if service not in ports:
                ports.append(service)
            data.update(flow.data)
    called = {f.destination for f in model.flows}
    for (source, destination), (ports, data) in hops.items():
        colour, style = _style(data)
        outside = model.segments.get(source)
        placed = outside is not None and outside.zone == "internet" and source in called
        label = ", ".join(ports) + "\n" + ", ".join(DATA_LABELS[d] for d in _ordered(data))
        lines.append(
            f"  {_quote(source)} -> {_quote(destination)} [label={_quote(label)}, "
            f"color={_quote(colour)}, fontcolor={_quote(colour)}, style={style}"
            + (", constraint=false" if placed else "")
            + "];"
        )
    lines += [
        "  legend [shape=plaintext, style=solid, fontsize=9, label=<"
        '<table border="0" cellborder="0" cellspacing="2">'
        '<tr><td align="left"><b>Edge colour: the most sensitive data the hop carries</b></td></tr>'
        '<tr><td align="left"><font color="#c62828">red, bold: PAN or CVC in clear inside TLS'
        "</font></td></tr>"
        '<tr><td align="left"><font color="#ef6c00">orange, dashed: PAN encrypted, CVC sealed '
        "(stored)</font></td></tr>"
        '<tr><td align="left"><font color="#6a1b9a">purple, dashed: data keys (wrapped or '
        "unwrapped)</font></td></tr>"
        '<tr><td align="left"><font color="#1565c0">blue: tokens, masked cards, processor '
        "references only</font></td></tr>"
        '<tr><td align="left"><font color="#9e9e9e">grey, dotted: no card data</font></td></tr>'
        "</table>>];",
        "}",
    ]
    return "\n".join(lines) + "\n"
