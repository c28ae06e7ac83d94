"""One pooled HTTP client behind the suite's module-level `httpx.get()`, `httpx.post()`, ...

Each of those builds a client per call, and every client loads the CA bundle into an SSL
context: about 24 ms of CPU per call, on the same two cores the services under test use, for
thousands of calls (polling a starting process alone makes dozens). The suite talks plain HTTP to
its own processes on loopback, so one client answers the same: no cookie is kept between calls,
the pool has no cap (concurrent tests open as many connections as before), and an idle
connection is dropped after one second, well before any of our servers closes it (so no request
is ever sent on a connection the server is closing). Calls that set TLS or proxy options, or go to
an https:// URL, still get a client of their own.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx

_OWN_CLIENT_OPTIONS = ("verify", "cert", "proxy", "trust_env")
_METHODS = ("get", "options", "head", "post", "put", "patch", "delete")


def install() -> None:
    client = httpx.Client(
        limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64, keepalive_expiry=1.0
        )
    )
    per_call = httpx.request

    def request(method: str, url: Any, **kwargs: Any) -> httpx.Response:
        if any(option in kwargs for option in _OWN_CLIENT_OPTIONS) or str(url).startswith("https:"):
            return per_call(method, url, **kwargs)
        try:
            return client.request(method, url, **kwargs)
        finally:
            client.cookies.clear()

    httpx.request = request
    for method in _METHODS:
        setattr(httpx, method, functools.partial(request, method.upper()))
