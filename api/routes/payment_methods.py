"""Payment method endpoints: the stored credentials setup payments made (issue 13)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from api.auth import merchant_of, require_secret_key
from api.openapi import SECRET_KEY
from api.routes.payments import IdempotencyKey, NoBody, idempotency_key
from api.services.payments import (
    PaymentMethodList,
    PaymentMethodService,
    PaymentMethodView,
    PaymentService,
)
from core.errors import InvalidRequest
from tessera.runtime.http import error_responses, strict_body
from tessera.runtime.openapi import REQUEST_BODY

Cursor = Annotated[str | None, Parameter(pattern=r"^pm_[0-9a-z]{26}$")]


def _methods(payments: PaymentService) -> PaymentMethodService:
    """Payment methods share the payment service's pool, vault client and list reads."""
    return PaymentMethodService(payments.pool, payments.vault, payments.lists, payments.publisher)


class PaymentMethodController(Controller):
    path = "/v1/payment_methods"
    guards = [require_secret_key]
    security = SECRET_KEY
    tags = ["payment_methods"]

    @get(
        "/{payment_method:str}",
        operation_id="getPaymentMethod",
        responses=error_responses(401, 404),
    )
    async def read(
        self, request: Request[Any, Any, Any], payment_method: str, payments: PaymentService
    ) -> PaymentMethodView:
        return await _methods(payments).get(merchant_of(request), payment_method)

    @get(operation_id="listPaymentMethods", responses=error_responses(400, 401))
    async def index(
        self,
        request: Request[Any, Any, Any],
        payments: PaymentService,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 10,
        starting_after: Cursor = None,
        ending_before: Cursor = None,
    ) -> PaymentMethodList:
        if starting_after and ending_before:
            raise InvalidRequest(
                "Use starting_after or ending_before, not both.", param="ending_before"
            )
        return await _methods(payments).page(
            merchant_of(request), limit, starting_after, ending_before
        )

    @post(
        "/{payment_method:str}/detach",
        operation_id="detachPaymentMethod",
        summary="Detach a payment method: never usable again; its token goes when unused",
        status_code=200,
        responses={
            200: ResponseSpec(PaymentMethodView, description="Detached"),
            **error_responses(400, 401, 404, 413, 503),
        },
        opt={REQUEST_BODY: NoBody | None},
    )
    async def detach(
        self,
        request: Request[Any, Any, Any],
        payment_method: str,
        payments: PaymentService,
        key: IdempotencyKey = None,
    ) -> PaymentMethodView:
        # Detaching is idempotent by nature (again: the same answer); the key is checked as on
        # every POST, not stored.
        idempotency_key(key)
        raw = await request.body()
        if raw.strip():
            strict_body(raw, NoBody)
        return await _methods(payments).detach(merchant_of(request), payment_method)
