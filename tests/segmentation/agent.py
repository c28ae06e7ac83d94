"""What the segmentation campaign runs *inside* a network namespace (`ip netns exec NS python -m
tests.segmentation.agent ...`): TCP/UDP probes, stand-in listeners, one HTTP request, a
readiness check, the database set-up and the KMS stand-in.

The probe, listen, http and ready commands use the standard library only, so that the many
short-lived agents start fast. Requests and probe targets come on stdin (as JSON), never on the
command line, so that credentials and test card numbers never show in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

#: A TCP handshake completed: something listens and the path is open.
OPEN = "open"
#: A RST (TCP) or an ICMP port unreachable (UDP) came back: nothing listens, but the packets got
#: through, so the path is open too.
REFUSED = "refused"
#: Nothing came back within the time-out: the packets were dropped on the way.
FILTERED = "filtered"


async def _probe_tcp(source: str, host: str, port: int, timeout: float) -> str:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0)), timeout
        )
    except TimeoutError:
        return FILTERED
    except ConnectionRefusedError:
        return REFUSED
    except OSError as exc:  # e.g. no route to host: an ICMP error came back, the path exists
        return f"error: {exc.strerror or exc}"
    writer.close()
    return OPEN


async def _probe_udp(source: str, host: str, port: int, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[str] = loop.create_future()

    class Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answered.done():
                answered.set_result(OPEN)

        def error_received(self, exc: Exception) -> None:
            if not answered.done():
                answered.set_result(
                    REFUSED if isinstance(exc, ConnectionRefusedError) else str(exc)
                )

    transport, _ = await loop.create_datagram_endpoint(
        Protocol, local_addr=(source, 0), remote_addr=(host, port)
    )
    try:
        transport.sendto(b"tessera segmentation probe")
        return await asyncio.wait_for(answered, timeout)
    except TimeoutError:
        return FILTERED
    finally:
        transport.close()


async def probe(source: str, targets: list[tuple[str, int, str]], timeout: float) -> list[str]:
    """Every target at once, from `source` (an address of this namespace)."""
    checks = [
        _probe_tcp(source, host, port, timeout)
        if protocol == "tcp"
        else _probe_udp(source, host, port, timeout)
        for host, port, protocol in targets
    ]
    return list(await asyncio.gather(*checks))


def listen(host: str, ports: list[str]) -> None:
    """Stand-in listeners (`tcp:443`, `udp:53`): TCP accepts and closes, UDP answers every
    datagram. They make a port that has no real service in the model visible to probes."""
    stop = threading.Event()
    sockets: list[socket.socket] = []
    for spec in ports:
        protocol, _, number = spec.partition(":")
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(number)))
        if protocol == "tcp":
            sock.listen(128)
        sockets.append(sock)

    def serve(sock: socket.socket) -> None:
        while not stop.is_set():
            try:
                if sock.type == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    conn.close()
                else:
                    data, peer = sock.recvfrom(512)
                    sock.sendto(data, peer)
            except OSError:
                return

    for sock in sockets:
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("listening", flush=True)
    stop.wait()
    for sock in sockets:
        sock.close()


def http(request: dict[str, Any]) -> dict[str, Any]:
    """One HTTP request; the answer's status and JSON body (any status, never an exception)."""
    body = request.get("body")
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **request.get("headers", {})}
    outgoing = urllib.request.Request(
        request["url"], data=data, headers=headers, method=request["method"]
    )
    try:
        with urllib.request.urlopen(outgoing, timeout=request.get("timeout", 30)) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        return {"status": 0, "body": None, "error": f"{type(exc).__name__}: {exc}"}
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return {"status": status, "body": parsed}


def ready(target: str) -> bool:
    """`http://…`: answers 200; `tcp://host:port`: accepts a connection."""
    if target.startswith("tcp://"):
        host, _, port = target.removeprefix("tcp://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return False
        return True
    try:
        with urllib.request.urlopen(target, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_ready(target: str, seconds: float) -> bool:
    """Poll `ready(target)` for up to `seconds`: one process per wait, not one per attempt."""
    deadline = time.monotonic() + seconds
    while not ready(target):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def create_database(admin_dsn: str, service: str, database: str) -> None:
    """The service's database and its owner and runtime roles, exactly as `make setup` makes
    them (tessera/dbsetup.py), on this segment's own Postgres."""
    from tessera.dbsetup import ServiceDatabase, ensure_roles_and_databases

    asyncio.run(ensure_roles_and_databases(admin_dsn, [ServiceDatabase(service, database)]))


def serve_kms(host: str, port: int, key_name: str) -> None:
    """The Cloud KMS stand-in of the test suite (a real gRPC server), on this segment's address."""
    from tests.support.fake_kms import FakeKms

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeKms.start(key_name, host=host, port=port) as fake:
        print(f"kms serving on {fake.address}", flush=True)
        stop.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.segmentation.agent")
    commands = parser.add_subparsers(dest="command", required=True)
    probe_cmd = commands.add_parser("probe", help="stdin: [[host, port, protocol], ...]")
    probe_cmd.add_argument("--source", required=True)
    probe_cmd.add_argument("--timeout", type=float, default=2.0)
    listen_cmd = commands.add_parser("listen")
    listen_cmd.add_argument("host")
    listen_cmd.add_argument("ports", nargs="+", help="tcp:PORT or udp:PORT")
    commands.add_parser("http", help="stdin: {method, url, headers?, body?}")
    ready_cmd = commands.add_parser(
        "ready", help="wait until http://… answers 200 or tcp://… accepts"
    )
    ready_cmd.add_argument("target")
    ready_cmd.add_argument("--wait", type=float, default=0.0, help="seconds to keep trying")
    database_cmd = commands.add_parser("create-database")
    database_cmd.add_argument("admin_dsn")
    database_cmd.add_argument("service")
    database_cmd.add_argument("database")
    kms_cmd = commands.add_parser("kms")
    kms_cmd.add_argument("host")
    kms_cmd.add_argument("port", type=int)
    kms_cmd.add_argument("key_name")
    args = parser.parse_args(argv)

    if args.command == "probe":
        targets = [(str(h), int(p), str(proto)) for h, p, proto in json.load(sys.stdin)]
        print(json.dumps(asyncio.run(probe(args.source, targets, args.timeout))))
    elif args.command == "listen":
        listen(args.host, args.ports)
    elif args.command == "http":
        print(json.dumps(http(json.load(sys.stdin))))
    elif args.command == "ready":
        return 0 if wait_ready(args.target, args.wait) else 1
    elif args.command == "create-database":
        create_database(args.admin_dsn, args.service, args.database)
    else:
        serve_kms(args.host, args.port, args.key_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
