"""Who may call what. Three callers, three credentials, checked on every request:

- a merchant's checkout (browser, app), with its publishable key `pk_…`: create tokens;
- the payment API, with the service token (or, behind a mesh, its mTLS identity): read token
  metadata, delete tokens, forward;
- a vault administrator, with the admin token: merchants, keys, audit, break-glass detokenize.

Secrets are compared with `hmac.compare_digest`; publishable keys are looked up by their
SHA-256. A credential that is valid but not allowed on an endpoint gets 403; anything else 401.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from core.errors import AuthenticationFailed, PermissionDenied
from vault.merchants import MerchantDirectory
from vault.settings import VaultSettings

ADMIN = "admin"
SERVICE = "service"
MERCHANT = "merchant"


@dataclass(frozen=True)
class Caller:
    kind: str
    merchant_id: str | None = None
    allowed_origins: tuple[str, ...] = ()

    @property
    def actor(self) -> str:
        return f"merchant:{self.merchant_id}" if self.merchant_id else self.kind


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Send a credential as `Authorization: Bearer ...`.")
    return token.strip()


def mesh_identity(connection: ASGIConnection[Any, Any, Any, Any], settings: VaultSettings) -> bool:
    """The payment API's mTLS identity, as the mesh sidecar that terminated mTLS reports it.

    Envoy/Istio set `X-Forwarded-Client-Cert: By=...;Hash=...;URI=spiffe://...` (and strip any
    value a client sent); each element is one hop, the last one is the peer of the sidecar.
    """
    if not settings.trust_forwarded_client_cert:
        return False
    header = connection.headers.get("x-forwarded-client-cert")
    if not header:
        return False
    last_hop = header.split(",")[-1]
    uris = [
        part.split("=", 1)[1].strip('"')
        for part in last_hop.split(";")
        if part.strip().lower().startswith("uri=")
    ]
    return any(uri in settings.service_identities for uri in uris)


async def identify(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    settings: VaultSettings = connection.app.state.settings
    if mesh_identity(connection, settings) and not connection.headers.get("authorization"):
        return Caller(SERVICE)
    token = bearer(connection)
    raw = token.encode()
    # Both comparisons always run, so timing says nothing about which one matched.
    is_admin = hmac.compare_digest(raw, settings.admin_token.encode())
    is_service = hmac.compare_digest(raw, settings.service_token.encode())
    if is_admin:
        return Caller(ADMIN)
    if is_service:
        return Caller(SERVICE)
    if token.startswith("pk_"):
        directory: MerchantDirectory = connection.app.state.merchant_directory
        merchant = await directory.by_publishable_key(token)
        if merchant is not None:
            return Caller(MERCHANT, merchant.id, merchant.allowed_origins)
    raise AuthenticationFailed("The credential is not valid.")


def require(kind: str) -> Any:
    """A Litestar guard admitting only one kind of caller; the caller is kept in scope state."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        caller = await identify(connection)
        if caller.kind != kind:
            raise PermissionDenied("This credential may not call this endpoint.")
        connection.scope["state"]["caller"] = caller

    return guard


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    caller: Caller = connection.scope["state"]["caller"]
    return caller
