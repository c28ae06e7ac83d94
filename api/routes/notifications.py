"""Where processors post their notifications. No merchant key: the signature is the proof."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, post

from api.services.notifications import NotificationService
from tessera.runtime.http import error_responses
from tessera.runtime.openapi import REQUEST_BODY


class NotificationItem(msgspec.Struct, rename="pascal"):
    #: PSP B's (Adyen's) item: pspReference, eventCode, success, amount, ..., and
    #: `additionalData.hmacSignature`, the HMAC-SHA256 that makes it count.
    notification_request_item: dict[str, Any]


class PspBNotification(msgspec.Struct, rename="camel"):
    """What PSP B posts (read raw by the service, which checks every item's signature)."""

    notification_items: Annotated[list[NotificationItem], msgspec.Meta(min_length=1)]


class NotificationController(Controller):
    path = "/v1/notifications"
    tags = ["notifications"]

    @post(
        "/psp_b",
        operation_id="notifyPspB",
        status_code=200,
        media_type=MediaType.TEXT,
        responses=error_responses(400, 401),
        opt={REQUEST_BODY: PspBNotification},
    )
    async def psp_b(
        self, request: Request[Any, Any, Any], notifications: NotificationService
    ) -> Response[str]:
        await notifications.apply(await request.body())
        return Response("[accepted]", media_type=MediaType.TEXT)
