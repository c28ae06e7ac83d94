"""The segments as Linux network namespaces: one per segment, each wired by a veth pair to one
router namespace, whose nftables `forward` chain is the policy (rendered by `policy.py`).

Names are unique per run (`tseg-<pid>-<random>-<host>`) and live only inside the run's own
namespaces, so two runs never collide and nothing is added to the machine's own network. Every
namespace is deleted at the end, after the processes left in it are killed; a run killed before
it could clean up is swept by the next one (its pid is in the names).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
NAME_PREFIX = "tseg"
_RUN_NAME = re.compile(rf"^{NAME_PREFIX}-(\d+)-[0-9a-f]{{4}}-")

#: Segments that share a namespace (a host): the PSP simulators answer on a processor's card
#: endpoint and on its operations endpoint, so those two segments are two addresses (two links)
#: of one host. The first listed carries the host's default route (PSP B's notifications leave
#: from the operations endpoint).
SHARED_HOSTS: dict[str, tuple[str, ...]] = {"psp": ("psp-api", "psp-card")}


def run(
    argv: Sequence[str], *, stdin: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Link:
    """A segment's veth pair: `s<i>` in the router (10.77.<i>.1), `e<i>` in its host (.2)."""

    segment: str
    index: int
    host: str

    @property
    def router_if(self) -> str:
        return f"s{self.index}"

    @property
    def host_if(self) -> str:
        return f"e{self.index}"

    @property
    def router_ip(self) -> str:
        return f"10.77.{self.index}.1"

    @property
    def address(self) -> str:
        """The segment's address: where its services listen and its probes come from."""
        return f"10.77.{self.index}.2"


@dataclass
class Network:
    segments: Sequence[str]
    run_id: str = field(
        default_factory=lambda: f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
    )
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.segments) > 250:
            raise ValueError("at most 250 segments (one /24 each in 10.77.0.0/16)")
        host_of = {seg: host for host, segs in SHARED_HOSTS.items() for seg in segs}
        self.links = {
            segment: Link(segment, index, host_of.get(segment, segment))
            for index, segment in enumerate(self.segments, start=1)
        }
        self.hosts = list(dict.fromkeys(link.host for link in self.links.values()))

    def ns(self, host: str) -> str:
        return f"{self.run_id}-{host}"

    @property
    def router(self) -> str:
        return self.ns("router")

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    # --- life cycle -----------------------------------------------------------------------

    def create(self) -> None:
        for name in [self.router, *map(self.ns, self.hosts)]:
            run(["ip", "netns", "add", name])
            self.created.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        # Forwarding on; strict reverse-path filtering: a host cannot speak from another
        # segment's address (the policy matches interfaces and addresses as well).
        sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=1"]
        run(["ip", "netns", "exec", self.router, "sysctl", "-qw", *sysctls])
        for host in self.hosts:
            # Every probe of a closed UDP port gets its ICMP answer, however many at once.
            run(self.exec_argv(host, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]))
        router = ["ip", "-n", self.router]
        for link in self.links.values():
            inside = ["ip", "-n", self.ns(link.host)]
            peer = ["peer", "name", link.host_if, "netns", self.ns(link.host)]
            run([*router, "link", "add", link.router_if, "type", "veth", *peer])
            run([*router, "addr", "add", f"{link.router_ip}/24", "dev", link.router_if])
            run([*router, "link", "set", link.router_if, "up"])
            run([*inside, "addr", "add", f"{link.address}/24", "dev", link.host_if])
            run([*inside, "link", "set", link.host_if, "up"])
        for host in self.hosts:
            order = SHARED_HOSTS.get(host, ())
            links = sorted(
                (link for link in self.links.values() if link.host == host),
                key=lambda link: order.index(link.segment) if link.segment in order else 0,
            )
            inside = ["ip", "-n", self.ns(host)]
            run([*inside, "route", "add", "default", "via", links[0].router_ip])
            if len(links) > 1:  # answers leave by the link of the address they come from
                for link in links:
                    table = ["table", str(100 + link.index)]
                    run([*inside, "rule", "add", "from", link.address, *table])
                    via = ["via", link.router_ip, "dev", link.host_if]
                    run([*inside, "route", "add", "default", *via, *table])

    def destroy(self) -> None:
        for name in reversed(self.created):
            delete_namespace(name)
        self.created.clear()

    # --- the policy -----------------------------------------------------------------------

    def apply(self, ruleset: str) -> None:
        """Replace the router's whole ruleset (its counters start from zero)."""
        run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], stdin=ruleset)

    def counters(self) -> dict[str, int]:
        """Packets each commented rule of the router has accepted, by comment."""
        listing = run(["ip", "netns", "exec", self.router, "nft", "-j", "list", "ruleset"])
        packets: dict[str, int] = {}
        for item in json.loads(listing.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expression in rule["expr"]:
                if "counter" in expression:
                    packets[rule["comment"]] = int(expression["counter"]["packets"])
        return packets

    def dropped(self, table: str, set_name: str) -> list[tuple[str, str, int]]:
        """(source, destination, port) of what the router dropped, from the policy's set."""
        nft = ["ip", "netns", "exec", self.router, "nft", "-j"]
        listing = run([*nft, "list", "set", "inet", table, set_name])
        found = []
        for item in json.loads(listing.stdout)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                value = element["elem"]["val"] if "elem" in element else element
                source, destination, port = value["concat"]
                found.append((str(source), str(destination), int(port)))
        return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(name: str) -> None:
    """Kill what still runs in one of our namespaces (only our processes can be there), then
    delete it; its veths go with it."""
    listed = run(["ip", "netns", "pids", name], check=False)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def sweep_stale() -> list[str]:
    """Delete what earlier runs killed before cleaning up left behind (their pid is gone): their
    namespaces, with what still runs inside, and their Postgres data (their logs stay)."""
    listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    swept = []
    for line in listed:
        name = line.split(" ")[0]
        found = _RUN_NAME.match(name)
        if found and not _pid_alive(int(found.group(1))):
            delete_namespace(name)
            swept.append(name)
    for work in Path(tempfile.gettempdir()).glob(f"{NAME_PREFIX}-*"):
        found = _RUN_NAME.match(work.name + "-")
        if found and not _pid_alive(int(found.group(1))):
            for data in work.glob("*/data"):
                shutil.rmtree(data, ignore_errors=True)
    return swept


@dataclass
class NsProcess:
    """A process started in a namespace (`ip netns exec` execs, so the pid is the program's)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: Postgres's fast shutdown is SIGINT (its SIGTERM waits for clients to leave).
    stop_signal: int = signal.SIGTERM

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        log: Path,
        stop_signal: int = signal.SIGTERM,
    ) -> NsProcess:
        handle: IO[bytes] = log.open("ab")
        popen = subprocess.Popen(
            argv, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )
        handle.close()
        return cls(name, popen, log, stop_signal)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check()` until true; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")
