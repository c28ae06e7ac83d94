"""Where a service may connect when someone else chose the host (SSRF): webhook URLs a merchant
registers, forward destinations whose DNS the vault does not control.

Three rules, shared by the API's webhook deliveries and the vault's forwarding proxy:

- Only public addresses. Python's `is_global` is the base; an IPv6 address that carries an IPv4
  one (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, 6to4 `2002:aabb:ccdd::`,
  Teredo, NAT64 `64:ff9b::/96`) is public only if the IPv4 address inside is too, because a
  relay or translator on the way may deliver it there. Local-use NAT64 (`64:ff9b:1::/48`) never
  is.
- Numeric host spellings other than dotted decimal (`2130706433`, `0177.0.0.1`, `0x7f.1`) are
  refused outright: resolvers and URL parsers disagree on what they mean.
- Resolve once, check every address, connect only to a checked one: `PublicAddressResolver` is
  what aiohttp connects through; httpx callers pin the checked address themselves.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class BlockedAddress(OSError):
    """A host resolved to an address a service must not connect to (raised by the resolver, so
    that nothing is ever connected)."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for on some path (mapped, compatible, 6to4,
    Teredo server and client, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(address: str | IPAddress) -> bool:
    """Whether a connection to `address` leaves for the public internet (and nowhere else)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id or ip in _NAT64_LOCAL_USE:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(is_public(v4) for v4 in inner)
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_private
    )


def ambiguous_numeric_host(host: str) -> bool:
    """True for an IPv4 address spelled some other way than four decimal parts: `2130706433`,
    `0177.0.0.1`, `0x7f.0.0.1`, `127.1`. The C resolver reads them as addresses, other parsers
    as names or as other addresses, so a URL that uses one is refused rather than guessed at."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


class PublicAddressResolver(AbstractResolver):
    """aiohttp's resolver that answers only with public addresses: if the name resolves to any
    other, the lookup fails and nothing is connected. aiohttp connects only to the addresses a
    resolver returns, so the address checked is the address connected to (DNS rebinding
    between a check and a connect cannot happen: there is one lookup)."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if ambiguous_numeric_host(host):
            raise BlockedAddress(f"{host!r} is not a host name or a dotted-decimal address")
        results = await self.inner.resolve(host, port, family)
        blocked = [r["host"] for r in results if not is_public(r["host"])]
        if blocked:
            raise BlockedAddress(f"{host!r} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self.inner.close()
