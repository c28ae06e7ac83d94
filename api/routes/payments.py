"""Payment endpoints: parse, authenticate, call one service function, answer."""

from __future__ import annotations

import re
from typing import Annotated, Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.params import Parameter

from api.auth import merchant_of, require_secret_key
from api.services.payments import CreatePayment, PaymentList, PaymentService, PaymentView
from core.errors import InvalidRequest, NotFound
from tessera.runtime.http import error_body, request_id_of

_PAYMENT_ID = re.compile(r"pay_[0-9a-z]{26}")
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
IdempotencyKey = Annotated[
    str | None,
    Parameter(header="Idempotency-Key", description="1-255 printable ASCII characters."),
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


class PaymentController(Controller):
    path = "/v1/payments"
    guards = [require_secret_key]
    tags = ["payments"]

    @post(operation_id="createPayment", status_code=201)
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: CreatePayment,
        payments: PaymentService,
        key: IdempotencyKey = None,
    ) -> Response[bytes]:
        outcome = await payments.create(
            merchant_of(request),
            idempotency_key(key),
            request.method,
            request.url.path,
            await request.body(),
            data,
            request_id_of(request.scope),
            error_body,
        )
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
        return Response(
            outcome.body, status_code=outcome.status, media_type=MediaType.JSON, headers=headers
        )

    @get("/{payment:str}", operation_id="getPayment")
    async def read(
        self, request: Request[Any, Any, Any], payment: str, payments: PaymentService
    ) -> PaymentView:
        return await payments.get(merchant_of(request), payment_id(payment))

    @get(operation_id="listPayments")
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
