"""The fault proxy itself (tests/support/fault_proxy.py): each fault does what it says, against a
real TCP echo server and a real HTTP server, before the network campaign relies on it."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.echo_server import EchoServer
from tests.support.fault_proxy import FaultProxy, OpenConnections
from tests.support.payments import wait_for


class _Echo(socketserver.BaseRequestHandler):
    server: EchoTcpServer

    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                with self.server.lock:
                    self.server.received += data
                self.request.sendall(data)
        except ConnectionResetError:
            return  # the proxy's resets reach the server too


class EchoTcpServer(socketserver.ThreadingTCPServer):
    """Sends back every byte it gets, and keeps them all (what reached the server)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received = b""
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoTcpServer]:
    server = EchoTcpServer()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: EchoTcpServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", echo.port, "echo").start()
    echo.received = b""
    yield proxy
    proxy.stop()


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the socket gets, and how it ended: "eof" (FIN) or "reset" (RST)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        return got, "reset"
    return got, "eof"


def test_bytes_pass_both_ways_and_open_connections_are_counted_on_each_side(
    proxy: FaultProxy, echo: EchoTcpServer
) -> None:
    first, second = connect(proxy), connect(proxy)
    for sock in (first, second):
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
    assert proxy.open_connections() == OpenConnections(client=2, upstream=2)
    assert len(proxy.upstream_ports()) == 2
    first.close()
    wait_for(lambda: proxy.open_connections() == OpenConnections(client=1, upstream=1), 5)
    second.close()
    wait_for(lambda: proxy.open_connections() == OpenConnections(client=0, upstream=0), 5)
    assert proxy.upstream_ports() == set()
    assert len(proxy.all_upstream_ports()) == 2
    assert echo.received == b"hellohello"


def test_latency_holds_each_chunk_before_passing_it_on(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.latency(300, stream="downstream")
        started = time.monotonic()
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        assert time.monotonic() - started >= 0.3
        proxy.heal()
        sock.sendall(b"pong")
        assert sock.recv(100) == b"pong"


def test_timeout_passes_nothing_and_answers_nothing_until_healed(
    proxy: FaultProxy, echo: EchoTcpServer
) -> None:
    held = connect(proxy, timeout=0.5)
    proxy.timeout()
    held.sendall(b"lost")
    with pytest.raises(TimeoutError):
        held.recv(100)
    with connect(proxy, timeout=0.5) as new:  # new connections are accepted, and held too
        new.sendall(b"lost too")
        with pytest.raises(TimeoutError):
            new.recv(100)
    assert echo.received == b""
    proxy.heal()
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert sock.recv(100) == b"back"
    assert proxy.broken_still_open() == 1  # `held` lost bytes: it can never work again
    held.close()
    wait_for(lambda: proxy.broken_still_open() == 0, 5)


def test_timeout_with_a_duration_closes_the_connection_after_it(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.timeout(ms=300)
        started = time.monotonic()
        sock.sendall(b"lost")
        assert read_until_closed(sock) == (b"", "eof")
        assert time.monotonic() - started >= 0.25


def test_reset_after_passes_that_many_bytes_then_sends_a_reset(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.reset_after(100, stream="downstream")
        sock.sendall(b"x" * 1000)
        assert read_until_closed(sock) == (b"x" * 100, "reset")


def test_reset_on_delivers_the_pattern_then_resets_before_the_answer(
    proxy: FaultProxy, echo: EchoTcpServer
) -> None:
    with connect(proxy) as sock:
        proxy.reset_on(b"COMMIT", skip=1)
        sock.sendall(b"BEGIN")
        assert sock.recv(100) == b"BEGIN"
        sock.sendall(b"COMMIT 1")  # skipped
        assert sock.recv(100) == b"COMMIT 1"
        sock.sendall(b"COMMIT 2")
        assert read_until_closed(sock) == (b"", "reset")
    wait_for(lambda: echo.received.endswith(b"COMMIT 2"), 5)  # the server did get it
    with connect(proxy) as sock:  # one shot: the next connection is left alone
        sock.sendall(b"COMMIT 3")
        assert sock.recv(100) == b"COMMIT 3"


def test_reset_on_without_delivery_never_lets_the_pattern_reach_the_server(
    proxy: FaultProxy, echo: EchoTcpServer
) -> None:
    proxy.watch(b"COMMIT")
    with connect(proxy) as sock:
        proxy.reset_on(b"COMMIT", deliver=False)
        sock.sendall(b"COM")  # a pattern split across two chunks is still found
        time.sleep(0.1)
        sock.sendall(b"MIT")
        assert read_until_closed(sock) == (b"COM", "reset")
    assert b"MIT" not in echo.received
    assert proxy.seen(b"COMMIT") == 1


def test_limit_bytes_closes_the_connection_after_that_many_bytes(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.limit_bytes(5)
        sock.sendall(b"0123456789")
        assert read_until_closed(sock) == (b"01234", "eof")


def test_down_refuses_new_connections_drops_open_ones_and_heal_listens_again(
    proxy: FaultProxy,
) -> None:
    port = proxy.port
    open_one = connect(proxy)
    open_one.sendall(b"a")
    assert open_one.recv(10) == b"a"
    proxy.down()
    assert read_until_closed(open_one)[0] == b""
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert proxy.open_connections() == OpenConnections(client=0, upstream=0)
    proxy.heal()
    assert proxy.port == port
    with connect(proxy) as sock:
        sock.sendall(b"b")
        assert sock.recv(10) == b"b"


def test_an_http_client_through_the_proxy_times_out_then_works_once_healed() -> None:
    server = EchoServer().start()
    proxy = FaultProxy("127.0.0.1", int(server.url.rsplit(":", 1)[1]), "http").start()
    try:
        url = proxy.url() + "/v1/authorizations"
        assert httpx.post(url, json={"a": 1}, timeout=2).status_code == 200
        proxy.timeout()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"a": 2}, timeout=0.5)
        assert len(server.received) == 1
        proxy.heal()
        assert httpx.post(url, json={"a": 3}, timeout=2).status_code == 200
        wait_for(lambda: proxy.open_connections() == OpenConnections(0, 0), 5)
    finally:
        proxy.stop()
        server.stop()
