"""A TCP fault proxy for tests: Toxiproxy's fault types, in one asyncio thread.

Toxiproxy (Shopify's Go proxy) is the usual tool, but its server is a Go binary that none of the
package registries reached here ships (PyPI has only clients for it), and `tc netem` is not
available on these kernels. This mirrors its toxic types, with its stream names ("upstream":
client to server, "downstream": server to client):

| here                                | Toxiproxy                                        |
|-------------------------------------|--------------------------------------------------|
| `latency(ms, jitter)`               | `latency`                                        |
| `timeout(ms=0)`                     | `timeout` (0: hold the connection, pass nothing) |
| `reset_after(n)`, `reset_on(bytes)` | `reset_peer` (RST: SO_LINGER 0, then close)      |
| `limit_bytes(n)`                    | `limit_data` (close after n bytes)               |
| `down()` / `heal()`                 | the proxy disabled / enabled with no toxics      |

One `FaultProxy` listens on a free loopback port and forwards each connection to one upstream
host:port. It runs its own event loop in a daemon thread, so a synchronous test can change the
fault while real services talk through it; each call returns once the fault is in force, and it
applies to open connections as well as new ones (from their next chunk). It counts open sockets
on each side, so a test can see that a client closed what it opened: no leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

Stream = Literal["upstream", "downstream", "both"]
T = TypeVar("T")
CHUNK = 65536
#: Patterns (`watch`, `reset_on`) are found across chunk boundaries up to this length.
MAX_PATTERN = 64


@dataclass(frozen=True)
class Faults:
    """What the proxy does to the bytes now. Replaced whole by each call; `generation` tells
    the connections' byte counters to start again from zero."""

    generation: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    latency_stream: Stream = "downstream"
    blackhole_stream: Stream | None = None
    blackhole_close_ms: float = 0.0
    reset_after: int | None = None
    reset_stream: Stream = "both"
    limit: int | None = None
    limit_stream: Stream = "downstream"
    reset_pattern: bytes | None = None
    reset_skip: int = 0
    reset_deliver: bool = True


@dataclass(frozen=True)
class OpenConnections:
    """Connections their client (`client`) or their server (`upstream`) still holds: a side
    that closed its end (FIN or RST) no longer counts."""

    client: int
    upstream: int


def _applies(stream: Stream | None, direction: str) -> bool:
    return stream == "both" or stream == direction


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    id: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    upstream_port: int | None = None
    client_open: bool = True
    upstream_open: bool = False
    generation: int = -1
    passed: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    tail: bytes = b""  # the end of the last upstream chunk, for a pattern split across two
    swallow_reply: bool = False  # reset_on fired: drop the answer and reset at its first byte
    dropped: bool = False  # the blackhole ate some of its bytes: its stream is broken for good

    def bytes_since_armed(self, faults: Faults, direction: str) -> int:
        if self.generation != faults.generation:
            self.generation = faults.generation
            self.passed = {"upstream": 0, "downstream": 0}
        return self.passed[direction]


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a peer that crashed or a middlebox would."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.transport.is_closing():
        writer.close()


class FaultProxy:
    """A TCP proxy to `upstream_host:upstream_port` whose faults a test switches at run time."""

    def __init__(self, upstream_host: str, upstream_port: int, name: str = "") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.name = name or f"{upstream_host}:{upstream_port}"
        self.port = 0
        self.faults = Faults()
        #: Connections accepted and resets sent since start, for reports.
        self.accepted = 0
        self.resets = 0
        self._ever_ports: set[int] = set()
        self._pattern_seen = 0
        self._watch: dict[bytes, int] = {}
        self._links: set[_Link] = set()
        self._next_id = 0
        self._rng = random.Random(0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=self.name)
        self._server: asyncio.Server | None = None

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shut)
        self._call(self._cancel_tasks)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.address}"

    # ---- faults (each returns once it is in force) --------------------------------------

    def latency(self, ms: float, jitter: float = 0.0, stream: Stream = "downstream") -> None:
        """Each chunk waits `ms` ± `jitter` (uniform) before it is passed on."""
        self._arm(replace(self.faults, latency_ms=ms, jitter_ms=jitter, latency_stream=stream))

    def timeout(self, ms: float = 0.0, stream: Stream = "both") -> None:
        """A blackhole: connections are accepted and kept, bytes are read and dropped, nothing
        is answered. With `ms` > 0 each connection is closed that long after the fault started
        (or after it was opened). Connection ends (FIN, RST) are still passed on."""
        self._arm(replace(self.faults, blackhole_stream=stream, blackhole_close_ms=ms))
        if ms > 0:
            self._call(self._close_links_later)

    def reset_after(self, n: int, stream: Stream = "both") -> None:
        """Each connection passes `n` more bytes on `stream` (counted per direction from now),
        then both of its sockets are reset (RST)."""
        self._arm(replace(self.faults, reset_after=n, reset_stream=stream))

    def reset_on(self, pattern: bytes, *, skip: int = 0, deliver: bool = True) -> None:
        """Reset the connection that carries the (`skip`+1)-th `pattern` upstream from now (one
        shot; patterns up to `MAX_PATTERN` bytes). `deliver`: the chunk reaches the server and
        its answer is dropped, the RST coming at the answer's first byte (the server did it, the
        client cannot know); otherwise the chunk is dropped and the reset is immediate (the
        server never saw it)."""
        armed = replace(self.faults, reset_pattern=pattern, reset_skip=skip, reset_deliver=deliver)
        self._arm(armed, pattern_seen=0)

    def limit_bytes(self, n: int, stream: Stream = "downstream") -> None:
        """Each connection passes `n` more bytes on `stream`, then is closed (FIN)."""
        self._arm(replace(self.faults, limit=n, limit_stream=stream))

    def down(self) -> None:
        """New connections are refused (the port is closed) and open ones are dropped."""
        self._call(self._shut)

    def heal(self) -> None:
        """No fault at all; listening again (on the same port) if it was down."""
        self._arm(Faults())
        if self._server is None:
            self._call(self._listen)

    # ---- what happened ------------------------------------------------------------------

    def open_connections(self) -> OpenConnections:
        async def count() -> OpenConnections:
            return OpenConnections(
                client=sum(link.client_open for link in self._links),
                upstream=sum(link.upstream_open for link in self._links),
            )

        return self._call(count)

    def upstream_ports(self) -> set[int]:
        """Local ports of the sockets to the upstream that are open now."""

        async def ports() -> set[int]:
            return {
                link.upstream_port
                for link in self._links
                if link.upstream_open and link.upstream_port is not None
            }

        return self._call(ports)

    def broken_still_open(self) -> int:
        """Connections the blackhole ate bytes of that their client still holds: after `heal()`
        they can never work again (a protocol's bytes are missing), so a client that keeps one
        leaks it."""

        async def count() -> int:
            return sum(link.dropped and link.client_open for link in self._links)

        return self._call(count)

    def all_upstream_ports(self) -> set[int]:
        """Every local port this proxy ever connected to the upstream from: the servers' own
        lists (pg_stat_activity, Redis's CLIENT LIST) name its connections by it."""

        async def ports() -> set[int]:
            return set(self._ever_ports)

        return self._call(ports)

    def watch(self, pattern: bytes) -> None:
        """Count `pattern` in the upstream bytes from now on (see `seen`)."""

        async def start() -> None:
            self._watch[pattern] = 0

        self._call(start)

    def seen(self, pattern: bytes) -> int:
        return self._watch.get(pattern, 0)

    # ---- inside the proxy's loop --------------------------------------------------------

    def _call(self, make: Callable[[], Coroutine[object, object, T]]) -> T:
        """Run `make()` in the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=10)

    def _arm(self, faults: Faults, pattern_seen: int | None = None) -> None:
        """Put `faults` in force, in the proxy's loop; byte counts start again from zero."""

        async def swap() -> None:
            self.faults = replace(faults, generation=self.faults.generation + 1)
            if pattern_seen is not None:
                self._pattern_seen = pattern_seen

        self._call(swap)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            self._drop(link, reset=False)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_links_later(self) -> None:
        for link in list(self._links):
            self._loop.create_task(self._close_after(link, self.faults))

    async def _close_after(self, link: _Link, faults: Faults) -> None:
        await asyncio.sleep(faults.blackhole_close_ms / 1000)
        if self.faults.generation == faults.generation:
            self._drop(link, reset=False)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        self.accepted += 1
        link = _Link(self._next_id, writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            self._drop(link, reset=False)  # as Toxiproxy: accepted, then closed
            return
        link.upstream, link.upstream_open = up_writer, True
        link.upstream_port = up_writer.get_extra_info("sockname")[1]
        self._ever_ports.add(link.upstream_port)
        if link not in self._links:  # dropped (down) while connecting
            self._drop(link, reset=False)
            return
        faults = self.faults
        if faults.blackhole_stream is not None and faults.blackhole_close_ms > 0:
            self._loop.create_task(self._close_after(link, faults))
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer, "upstream"),
                self._pump(link, up_reader, writer, "downstream"),
            )
        except asyncio.CancelledError:
            return  # the proxy stops
        self._drop(link, reset=False)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    # That side let go; its socket no longer counts as held, even while data
                    # for it is still held back (latency) or the other side still talks.
                    if direction == "upstream":
                        link.client_open = False
                    else:
                        link.upstream_open = False
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                passing = await self._through(link, data, direction)
                if passing is None:
                    return
                if passing:
                    writer.write(passing)
                    await writer.drain()
        except (ConnectionError, OSError):
            self._drop(link, reset=True)  # a reset on one side is passed on to the other

    async def _through(self, link: _Link, data: bytes, direction: str) -> bytes | None:
        """What of `data` goes on (b"": nothing now), or None when the link was ended."""
        faults = self.faults
        window = link.tail + data if direction == "upstream" else data
        if direction == "upstream":
            link.tail = window[-(MAX_PATTERN - 1) :]
            for pattern in self._watch:
                self._watch[pattern] += _occurrences(window, pattern, len(window) - len(data))
        if direction == "downstream" and link.swallow_reply:
            self._drop(link, reset=True)
            return None
        if _applies(faults.blackhole_stream, direction):
            link.dropped = True
            return b""
        if direction == "upstream" and faults.reset_pattern is not None:
            fired = self._pattern_fires(window, len(window) - len(data), faults)
            if fired and not faults.reset_deliver:
                self._drop(link, reset=True)
                return None
            if fired:
                link.swallow_reply = True
        if (faults.latency_ms or faults.jitter_ms) and _applies(faults.latency_stream, direction):
            delay = faults.latency_ms + self._rng.uniform(-faults.jitter_ms, faults.jitter_ms)
            await asyncio.sleep(max(0.0, delay) / 1000)
        passed = link.bytes_since_armed(faults, direction)
        if faults.reset_after is not None and _applies(faults.reset_stream, direction):
            allowed = max(0, faults.reset_after - passed)
            if len(data) >= allowed:
                await self._write_then(link, data[:allowed], direction, reset=True)
                return None
        if faults.limit is not None and _applies(faults.limit_stream, direction):
            allowed = max(0, faults.limit - passed)
            if len(data) >= allowed:
                await self._write_then(link, data[:allowed], direction, reset=False)
                return None
        link.passed[direction] = passed + len(data)
        return data

    async def _write_then(self, link: _Link, data: bytes, direction: str, *, reset: bool) -> None:
        target = link.upstream if direction == "upstream" else link.client
        if data and target is not None and not target.transport.is_closing():
            target.write(data)
            with contextlib.suppress(ConnectionError, OSError):
                await target.drain()
        self._drop(link, reset=reset)

    def _pattern_fires(self, window: bytes, new_from: int, faults: Faults) -> bool:
        assert faults.reset_pattern is not None
        found = _occurrences(window, faults.reset_pattern, new_from)
        if not found:
            return False
        self._pattern_seen += found
        if self._pattern_seen <= faults.reset_skip:
            return False
        self.faults = replace(faults, reset_pattern=None)  # one shot
        return True

    def _drop(self, link: _Link, *, reset: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        if reset:
            self.resets += 1
            _reset(link.client)
            _reset(link.upstream)
        else:
            _close(link.client)
            _close(link.upstream)
        link.client_open = link.upstream_open = False


def _occurrences(window: bytes, pattern: bytes, start_after: int) -> int:
    """How many times `pattern` occurs in `window` ending past `start_after` (new bytes)."""
    count, at = 0, window.find(pattern)
    while at != -1:
        if at + len(pattern) > start_after:
            count += 1
        at = window.find(pattern, at + 1)
    return count
