"""`deploy/flows.yaml`, loaded and checked, and asked which (source, destination, port) it allows.

The file is the single source of truth: the namespace model's nftables policy is rendered from
it and the probe matrix's expectations come from it, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

ROOT = Path(__file__).resolve().parents[2]
FLOWS_PATH = ROOT / "deploy" / "flows.yaml"

Zone = Literal["cde", "internal", "internet"]
Protocol = Literal["tcp", "udp"]
_SEGMENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")


class FlowsError(ValueError):
    """flows.yaml is malformed; the message says where."""


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    zone: Zone
    description: str


class Flow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str
    destination: str
    port: int
    protocol: Protocol
    why: str
    #: What the flow carries (pan, tokens, ...): the cardholder-data view, tessera/pci/dataflow.py.
    data: tuple[str, ...] = ()

    @property
    def service(self) -> Service:
        return Service(self.port, self.protocol)

    def __str__(self) -> str:
        return f"{self.source} -> {self.destination} {self.service}"


class FlowsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    segments: dict[str, Segment]
    flows: list[Flow]


@dataclass(frozen=True, order=True)
class Service:
    """A destination port and its protocol."""

    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Probe:
    """One cell of the matrix: can `source` open `service` on `destination`?"""

    source: str
    destination: str
    service: Service

    def __str__(self) -> str:
        return f"{self.source} -> {self.destination} {self.service}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a policy file must not lose one."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    for key in keys:
        if keys.count(key) > 1:
            raise FlowsError(f"line {node.start_mark.line + 1}: {key!r} is given twice")
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


@dataclass(frozen=True)
class FlowModel:
    segments: dict[str, Segment]
    flows: tuple[Flow, ...]

    def allows(self, probe: Probe) -> bool:
        return any(
            (f.source, f.destination, f.service) == (probe.source, probe.destination, probe.service)
            for f in self.flows
        )

    def services(self) -> list[Service]:
        """Every destination port the model names: each is probed at every destination."""
        return sorted({flow.service for flow in self.flows})

    def probes(self) -> list[Probe]:
        """All (source, destination, port) triples, allowed or not, except those between two
        internet segments (that traffic never crosses our network)."""
        return [
            Probe(source, destination, service)
            for source in self.segments
            for destination in self.segments
            if source != destination
            and not (
                self.segments[source].zone == "internet"
                and self.segments[destination].zone == "internet"
            )
            for service in self.services()
        ]

    def without(self, flow: Flow) -> FlowModel:
        return FlowModel(self.segments, tuple(f for f in self.flows if f != flow))

    def plus(self, flow: Flow) -> FlowModel:
        return FlowModel(self.segments, (*self.flows, flow))


def parse(text: str, where: str = "flows.yaml") -> FlowModel:
    """Parse and check; raises FlowsError naming what is wrong."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
        document = msgspec.convert(raw, FlowsFile)
    except FlowsError as exc:
        raise FlowsError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise FlowsError(f"{where}: not YAML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise FlowsError(f"{where}: {exc}") from None
    problems = []
    for name, segment in document.segments.items():
        if not _SEGMENT_NAME.fullmatch(name):
            problems.append(f"segment name {name!r}: lower-case letters, digits and '-'")
        if not segment.description.strip():
            problems.append(f"segment {name}: empty description")
    seen: set[tuple[str, str, Service]] = set()
    for number, flow in enumerate(document.flows, start=1):
        here = f"flow {number} ({flow})"
        for end in (flow.source, flow.destination):
            if end not in document.segments:
                problems.append(f"{here}: unknown segment {end!r}")
        if flow.source == flow.destination:
            problems.append(f"{here}: a flow must cross a segment boundary")
        if not 1 <= flow.port <= 65535:
            problems.append(f"{here}: port must be 1-65535")
        if len(flow.why.split()) < 3:
            problems.append(f"{here}: `why` must say why (a few words at least)")
        key = (flow.source, flow.destination, flow.service)
        if key in seen:
            problems.append(f"{here}: listed twice")
        seen.add(key)
    if not document.flows:
        problems.append("no flows: everything would be denied")
    if problems:
        raise FlowsError(f"{where}: " + "; ".join(problems))
    return FlowModel(dict(document.segments), tuple(document.flows))


def load(path: Path = FLOWS_PATH) -> FlowModel:
    return parse(
        path.read_text(), str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    )
