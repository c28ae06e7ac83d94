"""A real HTTP server standing in for a PSP's card endpoint in the vault's forwarding tests.

It records every request it receives (so a test can see exactly what left the vault) and
answers with what it got, or as the test tells it: a status, a delay, a card number in the body.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class EchoServer:
    received: list[Received] = field(default_factory=list)
    status: int = 200
    delay_seconds: float = 0.0
    reply: dict[str, Any] | None = None
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EchoServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                owner.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                if owner.delay_seconds:
                    time.sleep(owner.delay_seconds)
                payload = owner.reply if owner.reply is not None else {"echo": body.decode()}
                data = json.dumps(payload).encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("x-secret-header", "not-for-the-caller")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def reset(self) -> None:
        self.received.clear()
        self.status, self.delay_seconds, self.reply = 200, 0.0, None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
