"""A merchant's webhook endpoint, as a real HTTP server: it verifies nothing itself, records
every request with its arrival and answer times, and answers as the test tells it — fail with a
status, hang past the sender's time-out, or accept — so tests can stage an outage and a recovery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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


def verify_signature(
    header: str, body: bytes, secret: str, *, tolerance: int = 300, now: float | None = None
) -> bool:
    """What a merchant's endpoint does (docs/events.md has the same code): the timestamp is
    within the tolerance, and one of the `v1` signatures matches, compared in constant time."""
    fields = [part.split("=", 1) for part in header.split(",") if "=" in part]
    timestamps = [value for key, value in fields if key == "t"]
    signatures = [value for key, value in fields if key == "v1"]
    if len(timestamps) != 1 or not timestamps[0].isdigit() or not signatures:
        return False
    timestamp = int(timestamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)
