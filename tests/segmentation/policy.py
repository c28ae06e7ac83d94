"""flows.yaml as the router's nftables ruleset: one counted accept rule per flow, default drop.

Each rule names both ends by interface *and* address, so a host can neither use another
segment's link nor speak from another segment's address. Answers to an accepted connection are
accepted by connection tracking (established, related), which is why no flow needs a reverse rule.
"""

from __future__ import annotations

from collections.abc import Mapping

from tests.segmentation.model import Flow, FlowModel
from tests.segmentation.netns import Link

TABLE = "tessera_segmentation"


def rule_comment(flow: Flow) -> str:
    """What identifies a flow's rule in the ruleset and in its counters."""
    return f"{flow.source} -> {flow.destination} {flow.service}"


def _rule(flow: Flow, links: Mapping[str, Link]) -> str:
    source, destination = links[flow.source], links[flow.destination]
    return (
        f'iifname "{source.router_if}" ip saddr {source.address} '
        f'oifname "{destination.router_if}" ip daddr {destination.address} '
        f"{flow.protocol} dport {flow.port} counter accept "
        f'comment "{rule_comment(flow)}"'
    )


#: The last rules of the forward chain under the policy: what is about to be dropped is counted,
#: and its (source, destination, port) kept, so a service that tries a flow the file does not
#: list is seen, not just silently stalled.
DENIED = "denied"
_TRACK_DENIED = [
    f"meta nfproto ipv4 meta l4proto {{ tcp, udp }} add @{DENIED} "
    "{ ip saddr . ip daddr . th dport }",
    f'counter comment "{DENIED}"',
]


def _ruleset(forward_policy: str, rules: list[str]) -> str:
    body = "\n".join(f"        {rule}" for rule in rules)
    return f"""flush ruleset
table inet {TABLE} {{
    set {DENIED} {{
        type ipv4_addr . ipv4_addr . inet_service
        flags dynamic
    }}
    chain forward {{
        type filter hook forward priority filter; policy {forward_policy};
        ct state established,related accept
        ct state invalid drop
{body}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
    }}
}}
"""


def render(model: FlowModel, links: Mapping[str, Link]) -> str:
    """The policy: exactly the flows of `model`; everything else is dropped."""
    return _ruleset("drop", [*(_rule(flow, links) for flow in model.flows), *_TRACK_DENIED])


def render_open() -> str:
    """The negative control: the policy off, every forward accepted."""
    return _ruleset("accept", [])
