"""A merchant's webhook endpoint, as a real HTTP server: it verifies nothing itself, records
every request with its arrival and answer times, and answers as the test tells it — fail with a
status, hang past the sender's time-out, or accept — so tests can stage an outage and a recovery.
"""

from __future__ import annotations

import json
import re
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    arrived: float
    answered: float = 0.0
    status: int = 0

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


#: Decides one request's answer: (status, seconds to wait before answering).
Behaviour = Callable[[Delivery], tuple[int, float]]


def accept(_: Delivery) -> tuple[int, float]:
    return 200, 0.0


@dataclass
class WebhookReceiver:
    behaviour: Behaviour = accept
    deliveries: list[Delivery] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_flight: int = 0
    max_in_flight: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hooks"

    def start(self) -> WebhookReceiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                delivery = Delivery(
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    time.monotonic(),
                )
                with owner._lock:
                    owner.deliveries.append(delivery)
                    owner._in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
                try:
                    status, wait = owner.behaviour(delivery)
                    if wait:
                        time.sleep(wait)
                    delivery.status = status
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up first: a time-out, as staged
                finally:
                    delivery.answered = time.monotonic()
                    with owner._lock:
                        owner._in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def accepted_event_ids(self) -> set[str]:
        with self._lock:
            return {d.event["id"] for d in self.deliveries if 200 <= d.status < 300}


def _documented_verify() -> dict[str, Any]:
    """The verification snippet of docs/events.md, run as a merchant would copy it."""
    [code] = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


_DOCUMENTED = _documented_verify()


def verify_signature(
    header: str, body: bytes, secret: str, *, tolerance: int = 300, now: float | None = None
) -> bool:
    """docs/events.md's `verify`, with the clock set to `now` when given."""
    verify = _DOCUMENTED["verify"]
    if now is not None:
        clock = types.SimpleNamespace(time=lambda: now)
        verify = types.FunctionType(verify.__code__, {**_DOCUMENTED, "time": clock})
    return bool(verify(header, body, secret, tolerance))
