"""Payment endpoints: parse, authenticate, call one service function, answer."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from api.auth import merchant_of, require_secret_key
from api.openapi import SECRET_KEY
from api.services.idempotency import Handled
from api.services.operations import OperationService
from api.services.payments import (
    CreatePayment,
    PaymentList,
    PaymentService,
    PaymentView,
    RefundView,
)
from api.services.recovery import RecoveryService
from core.errors import InvalidRequest, NotFound
from tessera.runtime.http import NO_NUL, error_responses, request_id_of, strict_body
from tessera.runtime.openapi import REQUEST_BODY

_PAYMENT_ID = re.compile(r"pay_[0-9a-z]{26}")
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
IdempotencyKey = Annotated[
    str | None,
    # Checked by `idempotency_key` (its own error codes), so documented as required here.
    Parameter(
        header="Idempotency-Key",
        description="1-255 printable ASCII characters.",
        required=True,
        schema_extra={"pattern": f"^{_KEY.pattern}$", "min_length": 1, "max_length": 255},
    ),
]
Cursor = Annotated[str | None, Parameter(pattern=r"^pay_[0-9a-z]{26}$")]


def idempotency_key(value: str | None) -> str:
    if value is None:
        raise InvalidRequest(
            "Every POST needs an Idempotency-Key header.",
            code="idempotency_key_missing",
            param="Idempotency-Key",
        )
    if not _KEY.fullmatch(value):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters.",
            code="idempotency_key_invalid",
            param="Idempotency-Key",
        )
    return value


def payment_id(value: str) -> str:
    if not _PAYMENT_ID.fullmatch(value):
        raise NotFound("No such payment.", param="id")
    return value


#: Checked by `_operate` (`amount_too_small`), so only described to msgspec.
PositiveAmount = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1})]


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: PositiveAmount | None = None


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: PositiveAmount | None = None
    reason: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None


class NoBody(msgspec.Struct, forbid_unknown_fields=True):
    pass


_BODIES: dict[str, type[msgspec.Struct]] = {
    "capture": CaptureRequest,
    "cancel": NoBody,
    "refund": RefundRequest,
}


async def _operate(
    request: Request[Any, Any, Any],
    operations: OperationService,
    payment: str,
    operation: str,
    key: str | None,
) -> Response[bytes]:
    raw = await request.body()
    body = strict_body(raw, _BODIES[operation]) if raw.strip() else _BODIES[operation]()
    amount: int | None = getattr(body, "amount", None)
    reason: str | None = getattr(body, "reason", None)
    if amount is not None and amount <= 0:
        raise InvalidRequest(
            "amount must be a positive integer.", code="amount_too_small", param="amount"
        )
    outcome = await operations.run(
        merchant_of(request),
        payment_id(payment),
        operation,
        amount,
        reason,
        idempotency_key=idempotency_key(key),
        method=request.method,
        path=request.url.path,
        raw_body=raw,
        request_id=request_id_of(request.scope),
    )
    return _answer(outcome)


def _answer(outcome: Handled) -> Response[bytes]:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(
        outcome.body, status_code=outcome.status, media_type=MediaType.JSON, headers=headers
    )


_REFUND_ID = re.compile(r"re_[0-9a-z]{26}")


class RefundController(Controller):
    path = "/v1/refunds"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["refunds"]

    @get("/{refund:str}", operation_id="getRefund", responses=error_responses(401, 404))
    async def read(
        self, request: Request[Any, Any, Any], refund: str, operations: OperationService
    ) -> RefundView:
        if not _REFUND_ID.fullmatch(refund):
            raise NotFound("No such refund.", param="id")
        return await operations.refund_view(merchant_of(request), refund)


class PaymentController(Controller):
    path = "/v1/payments"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["payments"]

    @post(
        operation_id="createPayment",
        status_code=201,
        summary="Authorize (and by default capture) a payment with a vault token",
        responses={
            201: ResponseSpec(PaymentView, description="Authorized or captured"),
            202: ResponseSpec(PaymentView, description="Processing: the outcome is not known yet"),
            **error_responses(400, 401, 402, 409, 413, 422, 502, 503),
        },
        opt={REQUEST_BODY: CreatePayment},
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        payments: PaymentService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        raw = await request.body()
        outcome = await payments.create(
            merchant_of(request),
            idempotency_key(key),
            request.method,
            request.url.path,
            raw,
            strict_body(raw, CreatePayment),
            request_id_of(request.scope),
        )
        return _answer(outcome)

    @post(
        "/{payment:str}/capture",
        operation_id="capturePayment",
        status_code=200,
        responses={
            200: ResponseSpec(PaymentView, description="Captured"),
            **error_responses(400, 401, 404, 409, 413, 422, 502, 503),
        },
        opt={REQUEST_BODY: CaptureRequest | None},
    )
    async def capture(
        self,
        request: Request[Any, Any, Any],
        payment: str,
        operations: OperationService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        return await _operate(request, operations, payment, "capture", key)

    @post(
        "/{payment:str}/cancel",
        operation_id="cancelPayment",
        status_code=200,
        responses={
            200: ResponseSpec(PaymentView, description="Canceled"),
            **error_responses(400, 401, 404, 409, 413, 422, 502, 503),
        },
        opt={REQUEST_BODY: NoBody | None},
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        payment: str,
        operations: OperationService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        return await _operate(request, operations, payment, "cancel", key)

    @post(
        "/{payment:str}/retry",
        operation_id="retryPayment",
        status_code=200,
        summary="Retry a declined renewal now, if its decline and the schemes' caps allow",
        responses={
            200: ResponseSpec(PaymentView, description="Recovered: authorized or captured"),
            202: ResponseSpec(PaymentView, description="The retry's outcome is not known yet"),
            **error_responses(400, 401, 402, 404, 409, 413, 422, 502, 503),
        },
        opt={REQUEST_BODY: NoBody | None},
    )
    async def retry(
        self,
        request: Request[Any, Any, Any],
        payment: str,
        recovery: RecoveryService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        raw = await request.body()
        if raw.strip():
            strict_body(raw, NoBody)
        outcome = await recovery.retry(
            merchant_of(request),
            payment_id(payment),
            idempotency_key=idempotency_key(key),
            method=request.method,
            path=request.url.path,
            raw_body=raw,
            request_id=request_id_of(request.scope),
        )
        return _answer(outcome)

    @post(
        "/{payment:str}/refunds",
        operation_id="refundPayment",
        status_code=201,
        responses={
            201: ResponseSpec(RefundView, description="Refunded"),
            **error_responses(400, 401, 404, 409, 413, 422, 502, 503),
        },
        opt={REQUEST_BODY: RefundRequest | None},
    )
    async def refund(
        self,
        request: Request[Any, Any, Any],
        payment: str,
        operations: OperationService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        return await _operate(request, operations, payment, "refund", key)

    @get("/{payment:str}", operation_id="getPayment", responses=error_responses(401, 404))
    async def read(
        self, request: Request[Any, Any, Any], payment: str, payments: PaymentService
    ) -> PaymentView:
        return await payments.get(merchant_of(request), payment_id(payment))

    @get(operation_id="listPayments", responses=error_responses(400, 401))
    async def index(
        self,
        request: Request[Any, Any, Any],
        payments: PaymentService,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 10,
        starting_after: Cursor = None,
        ending_before: Cursor = None,
    ) -> PaymentList:
        if starting_after and ending_before:
            raise InvalidRequest(
                "Use starting_after or ending_before, not both.", param="ending_before"
            )
        return await payments.page(merchant_of(request), limit, starting_after, ending_before)
