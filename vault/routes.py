"""The vault's HTTP handlers: parse, check the caller, call one service function, answer.

Every handler that touches card data, or the keys protecting it, writes an audit record before
anything leaves the vault; if the record cannot be written the request fails (fail closed).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import Parameter

from core.errors import (
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    TesseraError,
)
from core.redaction import redact
from tessera.runtime.http import NO_NUL, error_responses, request_id_of
from vault import listeners
from vault.audit import AuditLog, AuditUnavailable, VerifyReport
from vault.auth import ADMIN, MERCHANT, SERVICE, caller_of, require
from vault.forward import Forwarder, ForwardRequest, ForwardResponse, check_template
from vault.keys import KeyService
from vault.merchants import (
    MerchantRepository,
    MerchantView,
    RegisterMerchant,
    key_hash,
    normalize_origin,
)
from vault.monitoring import chain_verified
from vault.openapi import ADMIN_TOKEN, PUBLISHABLE_KEY, SERVICE_TOKEN
from vault.tokens import CreateToken, TokenService, TokenView, parse_token_id

MerchantHeader = Annotated[
    str,
    Parameter(
        header="Tessera-Merchant",
        pattern=r"^mer_[0-9A-Za-z]{16,40}$",
        description="The merchant the payment API acts for; tokens of others answer 404.",
    ),
]
BrowserOrigin = Annotated[
    str | None,
    Parameter(
        header="Origin",
        description="Sent by browsers: must be one of the merchant's registered origins.",
        required=False,
    ),
]
FORWARD_MAX_BODY = 64 * 1024


class DeletedToken(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "token"


async def record(
    audit: AuditLog,
    request: Request[Any, Any, Any],
    actor: str,
    action: str,
    outcome: str,
    *,
    token_id: str | None = None,
    detail: Mapping[str, str | int | bool] | None = None,
) -> None:
    """Append this request's audit record; raises (503) if it cannot be written."""
    await audit.append(
        actor=actor,
        action=action,
        outcome=outcome,
        request_id=request_id_of(request.scope),
        token_id=token_id,
        detail=detail,
    )


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _origin_check(request: Request[Any, Any, Any]) -> str | None:
    """A browser's request must come from one of the merchant's own origins."""
    origin = request.headers.get("origin")
    if origin is None:
        return None  # a native app or a server: no browser, no origin to check
    caller = caller_of(request)
    try:
        normalized = normalize_origin(origin)
    except InvalidRequest:
        raise PermissionDenied(
            "This origin may not create tokens.", code="origin_not_allowed"
        ) from None
    if normalized == own_origin(request):
        # The hosted card fields (vault/elements): served, and framable, only for the
        # merchant's own origins, so their requests come from the vault's origin.
        return None
    if normalized not in caller.allowed_origins:
        raise PermissionDenied("This origin may not create tokens.", code="origin_not_allowed")
    return origin


def own_origin(request: Request[Any, Any, Any]) -> str:
    """The vault's origin as browsers see it: TESSERA_VAULT_PUBLIC_ORIGIN, or this request's."""
    configured: str = request.app.state.settings.public_origin
    if configured:
        return configured
    return normalize_origin(f"{request.url.scheme}://{request.url.netloc}")


def _cors_headers(origin: str) -> dict[str, str]:
    return {"access-control-allow-origin": origin, "vary": "Origin"}


class TokenController(Controller):
    path = "/v1/tokens"
    tags = ["tokens"]

    @post(
        operation_id="createToken",
        guards=[require(MERCHANT)],
        opt={"listeners": listeners.PUBLIC},
        security=PUBLISHABLE_KEY,
        status_code=201,
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: CreateToken,
        tokens: TokenService,
        origin_header: BrowserOrigin = None,  # read by _origin_check; here for the document
    ) -> Response[TokenView]:
        origin = _origin_check(request)
        caller = caller_of(request)
        assert caller.merchant_id is not None
        view = await tokens.create(caller.merchant_id, data, _today())
        return Response(view, status_code=201, headers=_cors_headers(origin) if origin else None)

    @get(
        "/{token_id:str}",
        operation_id="readToken",
        guards=[require(SERVICE)],
        opt={"listeners": listeners.SERVICE},
        security=SERVICE_TOKEN,
    )
    async def read(
        self,
        request: Request[Any, Any, Any],
        token_id: str,
        merchant: MerchantHeader,
        tokens: TokenService,
        audit: AuditLog,
    ) -> TokenView:
        token_id = parse_token_id(token_id)
        view = await tokens.metadata(token_id, merchant)
        await record(audit, request, SERVICE, "token.read", "success", token_id=token_id)
        return view

    @delete(
        "/{token_id:str}",
        operation_id="deleteToken",
        guards=[require(SERVICE)],
        opt={"listeners": listeners.SERVICE},
        security=SERVICE_TOKEN,
        status_code=200,
    )
    async def remove(
        self,
        request: Request[Any, Any, Any],
        token_id: str,
        merchant: MerchantHeader,
        tokens: TokenService,
        audit: AuditLog,
    ) -> DeletedToken:
        token_id = parse_token_id(token_id)
        await record(audit, request, SERVICE, "token.delete", "requested", token_id=token_id)
        await tokens.delete(token_id, merchant)
        return DeletedToken(token_id)


class ForwardController(Controller):
    path = "/v1/forward"
    opt = {"listeners": listeners.SERVICE}
    tags = ["forward"]

    @post(
        operation_id="forward",
        guards=[require(SERVICE)],
        security=SERVICE_TOKEN,
        status_code=200,
        request_max_body_size=FORWARD_MAX_BODY,
        responses=error_responses(404, 502, 504),
    )
    async def forward(
        self,
        request: Request[Any, Any, Any],
        data: ForwardRequest,
        merchant: MerchantHeader,
        tokens: TokenService,
        audit: AuditLog,
        forwarder: Forwarder,
    ) -> ForwardResponse:
        token_id = parse_token_id(data.token, param="token")
        destination = check_template(data, forwarder.destinations)
        detail: dict[str, str | int | bool] = {"destination": data.destination, "path": data.path}
        # Recorded before the card is decrypted: no record, no card data leaves.
        await record(
            audit, request, SERVICE, "forward", "started", token_id=token_id, detail=detail
        )
        try:
            card = await tokens.reveal(token_id, merchant, take_cvc=True, use=True)
            answer = await forwarder.send(destination, data, card)
            del card
        except Exception as exc:
            outcome = exc.code if isinstance(exc, TesseraError) else "error"
            # A ForwardError says whether the destination may have the request; the other
            # errors struck before the card left, except a bug's, which could be anywhere.
            sent = exc.extra.get("sent", "false") if isinstance(exc, TesseraError) else "unknown"
            await _record_outcome(audit, request, outcome, token_id, detail, sent)
            raise
        completed = {**detail, "status": answer.status}
        await _record_outcome(audit, request, "completed", token_id, completed, "true")
        return answer


async def _record_outcome(
    audit: AuditLog,
    request: Request[Any, Any, Any],
    outcome: str,
    token_id: str,
    detail: Mapping[str, str | int | bool],
    sent: str,
) -> None:
    """A forward's outcome in the audit log. Past the `started` record the card may have left:
    if the outcome cannot be written the vault still fails closed (503), but says whether the
    destination may have the request (`sent`). Without it the API read a 503 as "nothing was
    sent" and marked a payment the processor had approved `failed`, or failed it over to a
    second processor: a second charge (found by the Postgres campaign, the vault's database
    lost during a forward)."""
    try:
        await record(audit, request, SERVICE, "forward", outcome, token_id=token_id, detail=detail)
    except AuditUnavailable as exc:
        raise ServiceUnavailable(
            "The audit log cannot be written; the forward's outcome was not recorded.",
            extra={"sent": sent},
        ) from exc


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=40)]
    reason: Annotated[str, msgspec.Meta(min_length=10, max_length=500, pattern=NO_NUL)]


class DetokenizedCard(msgspec.Struct):
    token: str
    number: str
    exp_month: int
    exp_year: int
    name: str | None
    object: str = "detokenized_card"


class AdminController(Controller):
    path = "/v1"
    opt = {"listeners": listeners.ADMIN}
    guards = [require(ADMIN)]
    security = ADMIN_TOKEN
    tags = ["admin"]

    @post(
        "/merchants",
        operation_id="registerMerchant",
        status_code=201,
        responses=error_responses(409),
    )
    async def register_merchant(
        self,
        request: Request[Any, Any, Any],
        data: RegisterMerchant,
        merchants: MerchantRepository,
        state: State,
        audit: AuditLog,
    ) -> MerchantView:
        if redact(data.id) != data.id:
            raise InvalidRequest("A merchant id must not look like a card number.", param="id")
        origins = sorted({normalize_origin(o) for o in data.allowed_origins})
        detail: dict[str, str | int | bool] = {"merchant": data.id}
        if data.card_retention_days is not None:
            detail["card_retention_days"] = data.card_retention_days
        await record(
            audit,
            request,
            ADMIN,
            "merchant.register",
            "requested",
            token_id=None,
            detail=detail,
        )
        created = await merchants.insert(
            data.id, key_hash(data.publishable_key), origins, data.card_retention_days
        )
        state.merchant_directory.forget()
        return MerchantView(
            id=data.id,
            allowed_origins=origins,
            created=int(created.timestamp()),
            card_retention_days=data.card_retention_days,
        )

    @post(
        "/detokenize",
        operation_id="detokenize",
        status_code=200,
        responses=error_responses(404, 429),
    )
    async def detokenize(
        self,
        request: Request[Any, Any, Any],
        data: DetokenizeRequest,
        tokens: TokenService,
        audit: AuditLog,
        state: State,
    ) -> DetokenizedCard:
        """Break-glass: the PAN itself, to an administrator, with a reason, rate-limited and
        always audited. Not for day-to-day use; every call is reviewed."""
        token_id = parse_token_id(data.token, param="token")
        if redact(data.reason) != data.reason:
            raise InvalidRequest("The reason must not contain card data.", param="reason")
        settings = state.settings
        window = int(datetime.datetime.now(datetime.UTC).timestamp() // 60)
        counter = f"vault:detokenize:admin:{window}"
        used = await state.redis.incr(counter)
        if used == 1:
            await state.redis.expire(counter, 120)
        if used > settings.detokenize_per_minute:
            await record(audit, request, ADMIN, "detokenize", "rate_limited", token_id=token_id)
            raise RateLimited("Too many detokenizations this minute.")
        try:
            card = await tokens.reveal(token_id, None, take_cvc=False)
        except TesseraError as exc:
            await record(audit, request, ADMIN, "detokenize", exc.code, token_id=token_id)
            raise
        await record(
            audit,
            request,
            ADMIN,
            "detokenize",
            "success",
            token_id=token_id,
            detail={"reason": data.reason},
        )
        return DetokenizedCard(token_id, card.number, card.exp_month, card.exp_year, card.name)

    @post("/keys/rotate", operation_id="rotateKeys", status_code=200)
    async def rotate(
        self, request: Request[Any, Any, Any], keys: KeyService, audit: AuditLog
    ) -> dict[str, str]:
        await record(audit, request, ADMIN, "keys.rotate", "requested")
        return await keys.rotate()

    @post("/keys/rewrap", operation_id="rewrapKeys", status_code=200)
    async def rewrap(
        self, request: Request[Any, Any, Any], keys: KeyService, audit: AuditLog
    ) -> dict[str, int | str]:
        await record(audit, request, ADMIN, "keys.rewrap", "requested")
        return await keys.rewrap()

    @get("/audit/verify", operation_id="verifyAudit")
    async def verify_audit(
        self, request: Request[Any, Any, Any], audit: AuditLog, state: State
    ) -> VerifyReport:
        report = await audit.verify()
        # A break is an alert (the gauge and audit.chain_broken), whoever found it.
        now = datetime.datetime.now(datetime.UTC).timestamp()
        await chain_verified(report, by="admin", now=now, redis=state.redis, alarms=state.alarms)
        await record(
            audit, request, ADMIN, "audit.verify", "ok" if report.ok else "broken", token_id=None
        )
        return report
