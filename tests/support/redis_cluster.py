"""A three-node Redis Cluster on loopback ports, from the machine's `redis-server`.

Each node runs with `--cluster-enabled yes` and no persistence (`--save ""`, no AOF), so a killed
node loses every key, as a cache node's death does; the nodes are joined with
`redis-cli --cluster create … --cluster-replicas 0`. Ports (client and cluster bus) are found by
binding port 0, so it never touches the shared Redis on 6379.

`restart_empty` replaces a node as a cloud provider replaces a dead one: the process is killed and
its directory wiped (its keys and `nodes.conf`, so it comes back as a *new* node, with a new id and
no slots). The cluster does not take such a node back by itself: the survivors still map its
slots to the dead id. So the survivors `CLUSTER FORGET` the dead id (which also frees its slots
in their tables), the new node is introduced with `CLUSTER MEET` and claims the dead node's slots
with `CLUSTER ADDSLOTSRANGE`, and `CLUSTER BUMPEPOCH` gives its claim a fresh config epoch so
every node accepts it. (`redis-cli --cluster fix` would also cover the slots, but it picks the
node that gets them itself; a test that asserts which node held a key wants them back on the
same address.)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support.redis_server import RedisServer

SLOTS = 16384


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports, all held until all are found."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found (Debian: apt-get install redis-server redis-tools)")
    return path


@dataclass
class ClusterNode(RedisServer):
    """One node: a private redis-server (tests/support/redis_server.py) with its cluster options."""

    bus_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        return [
            "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.base / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip

    def command(self, *args: str | int) -> str:
        """A CLUSTER command's raw text answer, decoded."""
        with redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True
        ) as client:
            conn = client.connection_pool.get_connection()
            try:
                conn.send_command(*args)
                answer = conn.read_response()
            finally:
                client.connection_pool.release(conn)
        return answer if isinstance(answer, str) else str(answer)

    def node_id(self) -> str:
        return self.command("CLUSTER", "MYID")

    def info(self) -> dict[str, str]:
        text = self.command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def slot_table(self) -> dict[str, tuple[str, list[tuple[int, int]]]]:
        """This node's view: node id -> (address, slot ranges it serves)."""
        table = {}
        for line in self.command("CLUSTER", "NODES").splitlines():
            fields = line.split()
            ranges = []
            for spec in fields[8:]:
                if spec.startswith("["):  # a slot being migrated or imported
                    continue
                first, _, last = spec.partition("-")
                ranges.append((int(first), int(last or first)))
            table[fields[0]] = (fields[1].split("@")[0], ranges)
        return table

    def stored_keys(self) -> list[bytes]:
        with self.client() as client:
            return list(client.scan_iter(count=1000))


@dataclass
class LocalRedisCluster:
    size: int = 3
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tessera-rc-")))
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What `TESSERA_API_REDIS_URL` says for this cluster: any one node is enough."""
        return f"redis+cluster://{self.nodes[0].address}"

    def start(self, timeout: float = 30) -> LocalRedisCluster:
        ports = _free_ports(2 * self.size)
        self.nodes = [
            ClusterNode(port=ports[2 * i], bus_port=ports[2 * i + 1], base=self.base / f"node{i}")
            for i in range(self.size)
        ]
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [
                _binary("redis-cli"), "--cluster", "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok with all slots served, and all agree on who
        serves what."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                infos = [node.info() for node in self.nodes]
                views = [self._owners(node) for node in self.nodes]
                ok = all(
                    i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == str(SLOTS)
                    for i in infos
                )
                if ok and all(view == views[0] for view in views):
                    return
                last = infos
            except redis.exceptions.ConnectionError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"the cluster is not ok after {timeout}s: {last}")

    @staticmethod
    def _owners(node: ClusterNode) -> list[tuple[int, int, str]]:
        return sorted(
            (first, last, address)
            for address, ranges in node.slot_table().values()
            for first, last in ranges
        )

    def slot_of(self, key: str) -> int:
        """CLUSTER KEYSLOT, asked of the cluster itself (and checked against redis-py's)."""
        slot = int(self.nodes[0].command("CLUSTER", "KEYSLOT", key))
        assert slot == key_slot(key.encode())
        return slot

    def node_for_slot(self, slot: int) -> ClusterNode:
        for _, (address, ranges) in self.nodes[0].slot_table().items():
            if any(first <= slot <= last for first, last in ranges):
                return next(node for node in self.nodes if node.address == address)
        raise LookupError(f"no node serves slot {slot}")

    def node_for_key(self, key: str) -> ClusterNode:
        return self.node_for_slot(self.slot_of(key))

    def restart_empty(
        self,
        node: ClusterNode,
        timeout: float = 30,
        while_down: Callable[[], object] | None = None,
    ) -> None:
        """Kill `node`, wipe its directory and bring it back as a new, empty node serving the
        slots it served before, on the same address; returns once the cluster is ok.
        `while_down` runs after the kill, before anything is repaired."""
        old_id = node.node_id()
        _, ranges = node.slot_table()[old_id]
        node.kill()
        shutil.rmtree(node.base)
        if while_down is not None:
            while_down()
        survivors = [other for other in self.nodes if other is not node]
        for other in survivors:
            other.command("CLUSTER", "FORGET", old_id)
        node.start()
        node.command("CLUSTER", "MEET", "127.0.0.1", survivors[0].port, survivors[0].bus_port)
        for first, last in ranges:
            node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        node.command("CLUSTER", "BUMPEPOCH")
        self.wait_ok(timeout)

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.base, ignore_errors=True)
