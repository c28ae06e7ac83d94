"""A compromised edge in front of the vault: an HTTP reverse proxy that alters what it serves.

It stands where a CDN or an ingress stands in production: browsers (and the payment-page
checks) reach the vault through it. Every request is forwarded to the vault unchanged, and every
answer comes back unchanged, except the paths a test tells it to tamper with: their body gets a
piece of script or markup appended (a skimmer, in real life), and, if asked, a response header
replaced. Nothing in the repository is edited: the vault keeps serving the reviewed files, and only
what crosses the edge differs, which is what PCI DSS 11.6.1 asks to detect.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

#: What the tampered script gets appended: enough to change its hash, harmless if it ran.
SKIMMER = b"\n;/* injected at the edge */ void 0;\n"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "server",
    "date",
}


@dataclass
class TamperingEdge:
    upstream: str
    #: Paths (without the query) whose body gets these bytes appended (SKIMMER, or markup).
    tamper: dict[str, bytes] = field(default_factory=dict)
    #: Response headers to replace on every answer: {name: value}.
    replace_headers: dict[str, str] = field(default_factory=dict)
    #: Every path asked for, in order (with the query).
    seen: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _client: httpx.Client | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> TamperingEdge:
        edge = self
        self._client = httpx.Client(base_url=self.upstream, timeout=10)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                edge.seen.append(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}
                }
                assert edge._client is not None
                answer = edge._client.request(
                    self.command, self.path, headers=headers, content=body
                )
                content = answer.content
                content += edge.tamper.get(self.path.split("?", 1)[0], b"")
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() not in {
                        h.lower() for h in edge.replace_headers
                    }:
                        self.send_header(name, value)
                for name, value in edge.replace_headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_DELETE = do_OPTIONS = _forward

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
        if self._client is not None:
            self._client.close()
