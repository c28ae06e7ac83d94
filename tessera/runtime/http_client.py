"""The services' outbound HTTP: API -> vault, API -> processors, vault -> processors.

aiohttp, because on the payment path the client's own CPU matters: measured on this machine with
50 requests in flight, httpx spent 3.4 ms of CPU per request (its pool walks every connection on
each request) and aiohttp 0.24 ms (docs/perf/README.md). Callers see two failures only, because
that is all a payment needs to know: the request was certainly not sent (`NotSent`: no
connection, or none free in time), or it may have arrived (`MaybeSent`: a time-out or a broken
connection after sending), which must never be retried blindly.

Idle pooled connections are closed after `IDLE_SECONDS`, well before our servers close them
(`*_KEEP_ALIVE_SECONDS`, 75 s), so a request is never written to a connection the server is
closing. Proxies from the environment are ignored and redirects are never followed: where a
service may connect is the deployment's decision. A client made with `public_only` connects to
public addresses only (`tessera.runtime.egress`): one lookup, every address checked, the
connection made to a checked one; anything else fails as `Blocked`, before anything is sent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from tessera.runtime.egress import (
    BlockedAddress,
    PublicAddressResolver,
    ambiguous_numeric_host,
    is_public,
)

IDLE_SECONDS = 15.0


class HttpFailure(Exception):
    """No answer. `sent` is "false" or "unknown" (the vault's forward API uses the same words);
    `timed_out` says whether time ran out (rather than a refused or broken connection)."""

    sent = "unknown"

    def __init__(self, cause: str, *, timed_out: bool) -> None:
        super().__init__(cause)
        self.timed_out = timed_out


class NotSent(HttpFailure):
    sent = "false"


class MaybeSent(HttpFailure):
    sent = "unknown"


class Blocked(NotSent):
    """The destination is not a public address (a `public_only` client); nothing was sent."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause, timed_out=False)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not JSON (as `json.loads` would raise)."""
        try:
            return msgspec.json.decode(self.content)
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None


class HttpClient:
    """One pooled session (made on first use, inside the event loop)."""

    def __init__(
        self,
        base_url: str = "",
        *,
        headers: dict[str, str] | None = None,
        timeout_seconds: float,
        connect_seconds: float = 3.0,
        max_connections: int = 1000,
        public_only: bool = False,
        keep_alive: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        # `connect` covers waiting for a free pooled connection too: past it, nothing was sent.
        self.timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, connect=min(connect_seconds, timeout_seconds)
        )
        self.max_connections = max_connections
        self.public_only = public_only
        #: False: each request opens its own connection and closes it after the answer (for
        #: calls minutes apart, where a kept connection would only sit idle).
        self.keep_alive = keep_alive
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_connections,
                    resolver=PublicAddressResolver() if self.public_only else None,
                    **(
                        {"keepalive_timeout": IDLE_SECONDS}
                        if self.keep_alive
                        else {"force_close": True}
                    ),
                ),
                timeout=self.timeout,
                headers=self.headers,
                trust_env=False,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        if json is not None:
            body = msgspec.json.encode(json)
            headers = {"content-type": "application/json", **(headers or {})}
        full_url = self.base_url + url if self.base_url else url
        if self.public_only:
            _check_literal_host(full_url)
        try:
            async with self._open().request(
                method,
                full_url,
                data=body,
                headers=headers,
                params=params,
                allow_redirects=False,
            ) as response:
                content = await response.read()
                return Reply(
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    content,
                )
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                raise Blocked(str(exc.os_error)) from None
            raise NotSent(type(exc).__name__, timed_out=False) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            timed_out = isinstance(exc, aiohttp.ConnectionTimeoutError)
            raise NotSent(type(exc).__name__, timed_out=timed_out) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MaybeSent(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from None

    async def get(self, url: str, **kwargs: Any) -> Reply:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Reply:
        return await self.request("POST", url, **kwargs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _check_literal_host(url: str) -> None:
    """aiohttp never asks the resolver about an address written in the URL: checked here."""
    host = URL(url).host or ""
    if ambiguous_numeric_host(host):
        raise Blocked(f"{host!r} is not a host name or a dotted-decimal address")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not is_public(address):
        raise Blocked(f"{host!r} is not a public address")
