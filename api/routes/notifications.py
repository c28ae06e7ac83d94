"""Where processors post their notifications. No merchant key: the signature is the proof."""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, Response, post

from api.services.notifications import NotificationService


class NotificationController(Controller):
    path = "/v1/notifications"
    tags = ["notifications"]

    @post("/psp_b", operation_id="notifyPspB", status_code=200, media_type=MediaType.TEXT)
    async def psp_b(
        self, request: Request[Any, Any, Any], notifications: NotificationService
    ) -> Response[str]:
        await notifications.apply(await request.body())
        return Response("[accepted]", media_type=MediaType.TEXT)
