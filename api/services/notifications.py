"""Signed notifications from PSP B: the confirmations of captures, cancels and refunds it only
*received* at first. Each is verified (HMAC-SHA256, constant-time compare) before anything is
applied, applied in one transaction with its dedupe record, and a replay has no second effect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from api.services.events import Cause, Publisher
from api.services.operations import Started, announce_operation, undo
from api.services.payments import state_of
from api.storage.payments import OperationRepository
from core.errors import AuthenticationFailed, InvalidRequest, ServiceUnavailable

EVENTS = {"CAPTURE": "capture", "CANCELLATION": "cancel", "REFUND": "refund"}
#: The references `OperationService` gives PSP B's captures, cancels and refunds
#: (`<payment id>_capture`, `<payment id>_cancel`, the refund's id); the worker's reversals of
#: late authorizations (`…_reversal`) are not recorded as pending operations.
_OPERATION_REFERENCE = re.compile(r"pay_[0-9a-z]{26}_(capture|cancel)|re_[0-9a-z]{26}")


def signing_string(item: dict[str, Any]) -> str:
    """PSP B's (Adyen's) HMAC payload: pspReference:originalReference:merchantAccountCode:
    merchantReference:value:currency:eventCode:success, absent fields empty."""
    amount = item.get("amount") or {}
    value = amount.get("value", "")
    parts = (
        item.get("pspReference", ""),
        item.get("originalReference", ""),
        item.get("merchantAccountCode", ""),
        item.get("merchantReference", ""),
        "" if value is None else value,
        amount.get("currency", ""),
        item.get("eventCode", ""),
        item.get("success", ""),
    )
    return ":".join(str(part) for part in parts)


def signature_valid(item: dict[str, Any], key: bytes) -> bool:
    additional = item.get("additionalData")
    signature = additional.get("hmacSignature") if isinstance(additional, dict) else None
    if not isinstance(signature, str):
        return False
    expected = base64.b64encode(
        hmac.new(key, signing_string(item).encode(), hashlib.sha256).digest()
    )
    return hmac.compare_digest(expected, signature.encode())


@dataclass
class NotificationService:
    pool: Any
    psp_b_hmac_key: bytes
    routing: Any = None
    publisher: Publisher = field(default_factory=Publisher)
    processor: str = "psp_b"

    async def apply(self, body: bytes) -> int:
        """Verify every item, then apply each new one; returns how many were new."""
        try:
            data = msgspec.json.decode(body)
            items = [entry["NotificationRequestItem"] for entry in data["notificationItems"]]
        except (msgspec.DecodeError, KeyError, TypeError):
            raise InvalidRequest("Not a notification.", code="notification_invalid") from None
        if not items or not all(
            isinstance(i, dict) and signature_valid(i, self.psp_b_hmac_key) for i in items
        ):
            raise AuthenticationFailed(
                "The notification's signature is not valid.", code="signature_invalid"
            )
        applied = 0
        for item in items:
            applied += await self._apply_one(item)
        return applied

    async def _apply_one(self, item: dict[str, Any]) -> int:
        event = str(item.get("eventCode", ""))
        success = item.get("success") == "true"
        reference = str(item.get("pspReference", ""))
        async with self.pool.acquire() as conn, conn.transaction():
            operations = OperationRepository(conn)
            if not await operations.first_notification(self.processor, reference, event, success):
                return 0  # a replay: applied before
            if event not in EVENTS:
                return 1  # acknowledged (AUTHORISATION and others carry nothing new for us)
            pending = await operations.pending_operation(self.processor, reference)
            if pending is None and _ours(item):
                # The confirmation came before the request that made the operation recorded that
                # it waits for one (a slow database; a request that died before its last step and
                # is finished later by its retry or the completer). Acknowledged now, it would be
                # lost for good: refused instead (this transaction, its dedupe record included,
                # rolls back), so the PSP sends it again.
                raise ServiceUnavailable(
                    "This operation is not recorded yet; send the notification again.",
                    code="notification_early",
                )
            if pending is None or pending["status"] != "pending":
                return 1
            merchant_id, payment_id = pending["merchant_id"], pending["payment_id"]
            payment = await operations.lock(merchant_id, payment_id)
            state = state_of(payment)
            if not success:
                started = Started(
                    payment_id, pending["operation"], pending["amount"], pending["refund_id"]
                )
                state = undo(state, started)
            await operations.set_state(
                merchant_id,
                payment_id,
                status=str(state.status),
                amount_captured=state.amount_captured,
                amount_refunded=state.amount_refunded,
                lease_seconds=None,
            )
            if pending["refund_id"] is not None:
                await operations.settle_refund(
                    merchant_id,
                    pending["refund_id"],
                    "succeeded" if success else "failed",
                    reference,
                    None if success else str(item.get("reason") or "refused"),
                )
            await operations.settle_operation(
                self.processor, reference, "succeeded" if success else "failed"
            )
            started = Started(
                payment_id, pending["operation"], pending["amount"], pending["refund_id"]
            )
            await announce_operation(
                self.publisher,
                self.routing,
                conn,
                payment,
                started,
                "succeeded" if success else "failed",
                Cause(),
                confirmed_later=True,
            )
            return 1


def _ours(item: dict[str, Any]) -> bool:
    """Whether the notification confirms a capture, cancel or refund made by `OperationService`."""
    return _OPERATION_REFERENCE.fullmatch(str(item.get("merchantReference", ""))) is not None
