"""Capture, cancel and refund: operations on an existing payment, in three atomic phases.

1. Claim the key; lock the payment row; wait (bounded) while another operation holds the
   payment's lease; decide with core's state machine; write the new amounts *before* asking the
   processor (so concurrent refunds can never add up past the capture) and take the lease.
2. Ask the processor, outside any transaction, by its reference for the payment.
3. Confirm (free the lease, refund `succeeded`) or, when the processor definitely did not do it,
   restore the amounts (refund `failed`). When the answer is unknown the reserved amounts stay
   and the key is released, so a retry with the same key asks the processor again (its capture,
   void and refund are idempotent on our references).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from api.connectors.base import NOT_SENT, Connector, OperationResult, Outcome
from api.services.events import Cause, Publisher
from api.services.idempotency import (
    ClaimKind,
    Handled,
    cached_replay,
    claim,
    fenced,
    replayed,
    request_hash,
)
from api.services.payments import RefundView, read_payment, refund_view, state_of
from api.services.routing import processing_fee
from api.storage.idempotency import (
    IdempotencyRepository,
    OperationKeys,
    ReplayCache,
    StoredResponse,
)
from api.storage.payments import OperationRepository, PaymentRepository
from core import ledger
from core import payments as machine
from core.errors import NotFound, ServiceUnavailable, StateConflict, TesseraError
from core.ids import new_id
from tessera.runtime import failpoints
from tessera.runtime.failpoints import failpoint
from tessera.runtime.http import error_bytes, status_of

#: The idempotency key the worker's expiry uses for a payment's cancel.
EXPIRY_KEY_PREFIX = "tessera-expiry:"
#: How long an operation waits for the one before it on the same payment.
WAIT_SECONDS = 15.0


class _Busy(Exception):
    """Another operation holds the payment: roll back the claim, wait, try again."""


@dataclass(frozen=True)
class Started:
    payment_id: str
    operation: str
    amount: int
    refund_id: str | None
    #: The lease this request holds on its key: phase 3 writes only while it still holds it.
    lease: Any = None
    #: A retry's or the completer's: an earlier request may have reached the processor.
    resumed: bool = False


def _cause(request_id: str, key: str) -> Cause:
    """The request behind an operation; none for the worker's expiry (its key is our own)."""
    if key.startswith(EXPIRY_KEY_PREFIX):
        return Cause()
    return Cause(request_id, key)


async def announce_operation(
    publisher: Publisher,
    routing: Any,
    conn: Any,
    payment: Any,
    started: Started,
    outcome: str,
    cause: Cause,
    *,
    confirmed_later: bool = False,
) -> msgspec.Struct | None:
    """The event (and the ledger's postings) of an operation's outcome: `succeeded`,
    `failed` or `accepted` (confirmed later by a notification). `confirmed_later` marks the
    notification's own outcome, which settles an accepted operation. A capture or cancel the
    processor refused at once changed nothing visible: no event."""
    currency = payment["currency"]
    postings: list[ledger.Posting] | None = None
    event_type: str | None = None
    if started.operation == "refund":
        event_type = {
            "succeeded": "refund.succeeded",
            "failed": "refund.failed",
            "accepted": "refund.pending",
        }[outcome]
        if outcome == "accepted":
            postings = ledger.refund_accepted(currency, started.amount)
        elif outcome == "succeeded":
            confirm = ledger.refund_confirmed if confirmed_later else ledger.refund
            postings = confirm(currency, started.amount)
        elif confirmed_later:
            postings = ledger.refund_refused(currency, started.amount)
    elif outcome == "succeeded" and started.operation == "capture":
        event_type = "payment.captured"
        fee = await processing_fee(routing, conn, payment, started.amount)
        postings = ledger.capture(currency, payment["amount_authorized"], started.amount, fee)
    elif outcome == "succeeded":
        event_type = "payment.canceled"
        postings = ledger.release(currency, payment["amount_authorized"])
    elif outcome == "failed" and confirmed_later:
        event_type = f"payment.{started.operation}_failed"
    if event_type is None:
        return None
    merchant_id = payment["merchant_id"]
    obj = await operation_object(conn, merchant_id, started)
    await publisher.publish(
        conn,
        merchant_id,
        event_type,
        started.refund_id or started.payment_id,
        obj,
        cause,
        payment_id=started.payment_id,
        postings=postings,
    )
    return obj


async def operation_object(conn: Any, merchant_id: str, started: Started) -> msgspec.Struct:
    """What an operation answers with, and its event carries: the refund, or the payment."""
    if started.refund_id is not None:
        refund = await OperationRepository(conn).refund(merchant_id, started.refund_id)
        return refund_view(refund)
    _, view = await read_payment(conn, merchant_id, started.payment_id)
    return view


@dataclass
class OperationService:
    pool: Any
    connectors: dict[str, Connector]
    keys: IdempotencyRepository
    replays: ReplayCache
    lease_seconds: float
    routing: Any = None
    publisher: Publisher = field(default_factory=Publisher)
    #: Stops a declined renewal's scheduled recovery on cancel (api.services.recovery).
    recovery: Any = None

    async def run(
        self,
        merchant_id: str,
        payment_id: str,
        operation: str,
        amount: int | None,
        reason: str | None,
        *,
        idempotency_key: str,
        method: str,
        path: str,
        raw_body: bytes,
        request_id: str,
    ) -> Handled:
        fingerprint = request_hash(method, path, raw_body)
        replay = await cached_replay(self.replays, merchant_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                started = await self._phase_one(
                    merchant_id,
                    payment_id,
                    operation,
                    amount,
                    reason,
                    idempotency_key,
                    method,
                    path,
                    fingerprint,
                    request_id,
                )
                break
            except _Busy:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        "Another operation on this payment is still running; retry.",
                        code="payment_busy",
                    ) from None
                await asyncio.sleep(0.02)
        if isinstance(started, Handled):
            return started
        result = await self._call_processor(merchant_id, started)
        failpoint("after_operation_call")
        handled = await self._phase_three(
            merchant_id, idempotency_key, fingerprint, started, result, request_id
        )
        failpoint("operation_before_response")
        return handled

    async def complete(self, merchant_id: str, idempotency_key: str, lease: Any) -> None:
        """The completer's entry: finish an operation whose process died after phase 1, as the
        client's retry would (the worker has already taken the key's lease: `lease`)."""
        async with self.pool.acquire() as conn:
            row = await OperationKeys.load(conn, merchant_id, idempotency_key)
            key = await self.keys.lock_free(conn, merchant_id, idempotency_key)
        if row is None or key is None or row["operation"] is None:
            return
        started = Started(
            row["payment_id"],
            row["operation"],
            row["operation_amount"],
            row["refund_id"],
            lease,
            resumed=True,
        )
        result = await self._call_processor(merchant_id, started)
        failpoint("after_operation_call")
        await self._phase_three(
            merchant_id, idempotency_key, key.request_hash, started, result, new_id("req")
        )

    async def expire(self, merchant_id: str, payment_id: str) -> Handled:
        """Cancel an authorization nobody captured in time, idempotently by construction."""
        path = f"/v1/payments/{payment_id}/cancel"
        return await self.run(
            merchant_id,
            payment_id,
            "cancel",
            None,
            None,
            idempotency_key=f"{EXPIRY_KEY_PREFIX}{payment_id}",
            method="POST",
            path=path,
            raw_body=b"",
            request_id=new_id("req"),
        )

    async def _phase_one(
        self,
        merchant_id: str,
        payment_id: str,
        operation: str,
        amount: int | None,
        reason: str | None,
        key: str,
        method: str,
        path: str,
        fingerprint: bytes,
        request_id: str,
    ) -> Started | Handled:
        async with self.pool.acquire() as conn, failpoints.transaction(conn, "operation_start"):
            claimed = await claim(self.keys, conn, merchant_id, key, method, path, fingerprint)
            if claimed.kind is ClaimKind.REPLAY:
                return await replayed(self.replays, merchant_id, key, fingerprint, claimed)
            if claimed.kind is ClaimKind.RESUME:
                row = await OperationKeys.load(conn, merchant_id, key)
                return Started(
                    row["payment_id"],
                    row["operation"],
                    row["operation_amount"],
                    row["refund_id"],
                    claimed.lease,
                    resumed=True,
                )
            failpoint("operation_key_claimed")
            operations = OperationRepository(conn)
            payment = await operations.lock(merchant_id, payment_id)
            if payment is None:
                return await self._finish_error(
                    conn,
                    merchant_id,
                    key,
                    fingerprint,
                    request_id,
                    NotFound("No such payment.", param="id"),
                )
            if payment["busy"]:
                raise _Busy
            if (
                operation == "cancel"
                and payment["status"] == "declined"
                and payment["recovery"] == "scheduled"
                and self.recovery is not None
            ):
                return await self._cancel_recovery(
                    conn, merchant_id, key, fingerprint, request_id, payment
                )
            state = state_of(payment)
            try:
                new, moved = _decide(state, operation, amount)
            except TesseraError as exc:
                return await self._finish_error(
                    conn, merchant_id, key, fingerprint, request_id, exc
                )
            refund_id = new_id("re") if operation == "refund" else None
            await operations.set_state(
                merchant_id,
                payment_id,
                status=str(new.status),
                amount_captured=new.amount_captured,
                amount_refunded=new.amount_refunded,
                lease_seconds=self.lease_seconds,
            )
            if refund_id is not None:
                await operations.insert_refund(merchant_id, refund_id, payment_id, moved, reason)
            await OperationKeys.start(
                conn,
                merchant_id,
                key,
                payment_id=payment_id,
                operation=operation,
                amount=moved,
                refund_id=refund_id,
            )
            failpoint("operation_state_written")
            return Started(payment_id, operation, moved, refund_id, claimed.lease)

    async def _cancel_recovery(
        self,
        conn: Any,
        merchant_id: str,
        key: str,
        fingerprint: bytes,
        request_id: str,
        payment: Any,
    ) -> Handled:
        """Cancel on a declined renewal under recovery: no retry goes any more. Nothing was
        authorized, so the processor is not asked."""
        try:
            await self.recovery.cancel(conn, payment)
        except TesseraError as exc:
            return await self._finish_error(conn, merchant_id, key, fingerprint, request_id, exc)
        _, answer = await read_payment(conn, merchant_id, payment["id"])
        response = StoredResponse(200, msgspec.json.encode(answer))
        await self.keys.finish(conn, merchant_id, key, response)
        return Handled(response.status, response.body)

    async def _call_processor(self, merchant_id: str, started: Started) -> OperationResult:
        result = await self._ask_processor(merchant_id, started)
        if started.resumed and result.failure_code == NOT_SENT:
            # This request surely did not arrive, but an earlier one for the operation may have
            # (its outcome was unknown, or its process died): nothing is known yet.
            return OperationResult(Outcome.UNKNOWN, failure_code=NOT_SENT)
        return result

    async def _ask_processor(self, merchant_id: str, started: Started) -> OperationResult:
        async with self.pool.acquire() as conn:
            payment = await PaymentRepository(conn).get(merchant_id, started.payment_id)
        reference = payment["processor_reference"]
        connector = self.connectors[payment["processor"]]
        currency = payment["currency"]
        if started.operation == "capture":
            return await connector.capture(
                reference, started.amount, currency, f"{started.payment_id}_capture"
            )
        if started.operation == "cancel":
            return await connector.void(reference, f"{started.payment_id}_cancel")
        assert started.refund_id is not None
        return await connector.refund(reference, started.refund_id, started.amount, currency)

    async def _phase_three(
        self,
        merchant_id: str,
        key: str,
        fingerprint: bytes,
        started: Started,
        result: OperationResult,
        request_id: str,
    ) -> Handled:
        async with self.pool.acquire() as conn, failpoints.transaction(conn, "operation_record"):
            if not await self.keys.holds(conn, merchant_id, key, started.lease):
                # Paused past its lease: the retry or completer that took the key over records
                # the outcome; doing it here too would book the capture (refund) twice.
                return await fenced(self.keys, conn, merchant_id, key)
            operations = OperationRepository(conn)
            payment = await operations.lock(merchant_id, started.payment_id)
            if result.outcome is Outcome.UNKNOWN:
                await OperationKeys.release(conn, merchant_id, key)
                unknown = ServiceUnavailable(
                    "The processor did not answer; retry with the same Idempotency-Key.",
                    code="processor_unavailable",
                )
                return Handled(503, error_bytes(unknown, request_id))
            if result.outcome is Outcome.PENDING:
                # Accepted; confirmed by a notification. The amounts stay counted and the
                # payment stays leased to this operation until then.
                await operations.expect_notification(
                    payment["processor"],
                    result.processor_reference or "",
                    merchant_id,
                    started.operation,
                    started.payment_id,
                    started.amount,
                    started.refund_id,
                    lease_seconds=self.lease_seconds,
                )
                published = await announce_operation(
                    self.publisher,
                    self.routing,
                    conn,
                    payment,
                    started,
                    "accepted",
                    _cause(request_id, key),
                )
                response = await self._response(
                    conn, merchant_id, started, True, result, request_id, published
                )
                await self.keys.finish(conn, merchant_id, key, response)
            else:
                ok = result.outcome is Outcome.APPROVED
                state = state_of(payment)
                final = state if ok else undo(state, started)
                await operations.set_state(
                    merchant_id,
                    started.payment_id,
                    status=str(final.status),
                    amount_captured=final.amount_captured,
                    amount_refunded=final.amount_refunded,
                    lease_seconds=None,
                )
                if started.refund_id is not None:
                    await operations.settle_refund(
                        merchant_id,
                        started.refund_id,
                        "succeeded" if ok else "failed",
                        result.processor_reference,
                        result.failure_code,
                    )
                published = await announce_operation(
                    self.publisher,
                    self.routing,
                    conn,
                    payment,
                    started,
                    "succeeded" if ok else "failed",
                    _cause(request_id, key),
                )
                response = await self._response(
                    conn, merchant_id, started, ok, result, request_id, published
                )
                await self.keys.finish(conn, merchant_id, key, response)
        # Cached only once committed: a replay must never answer what was rolled back.
        await self.replays.put(merchant_id, key, fingerprint, response)
        return Handled(response.status, response.body)

    async def _response(
        self,
        conn: Any,
        merchant_id: str,
        started: Started,
        ok: bool,
        result: OperationResult,
        request_id: str,
        published: msgspec.Struct | None = None,
    ) -> StoredResponse:
        """`published`: the object the operation's event carries, read in this transaction
        already (the answer is the same object)."""
        if not ok:
            failure = TesseraError(
                f"The processor refused the {started.operation}; nothing changed.",
                code="processor_error",
                extra={"payment": started.payment_id, "processor_code": result.failure_code or ""},
            )
            return StoredResponse(502, error_bytes(failure, request_id))
        answer = published or await operation_object(conn, merchant_id, started)
        status = 201 if started.refund_id is not None else 200
        return StoredResponse(status, msgspec.json.encode(answer))

    async def _finish_error(
        self,
        conn: Any,
        merchant_id: str,
        key: str,
        fingerprint: bytes,
        request_id: str,
        exc: TesseraError,
    ) -> Handled:
        """An error once the handler started is the outcome: stored and replayed like any."""
        response = StoredResponse(status_of(exc), error_bytes(exc, request_id))
        await self.keys.finish(conn, merchant_id, key, response)
        return Handled(response.status, response.body)

    async def refund_view(self, merchant_id: str, refund_id: str) -> RefundView:
        async with self.pool.acquire() as conn:
            refund = await OperationRepository(conn).refund(merchant_id, refund_id)
        if refund is None:
            raise NotFound("No such refund.", param="id")
        return refund_view(refund)


def _decide(
    state: machine.PaymentState, operation: str, amount: int | None
) -> tuple[machine.PaymentState, int]:
    """The new state, and how much money the operation moves."""
    if operation == "capture":
        new = machine.capture(state, amount)
        return new, new.amount_captured
    if operation == "cancel":
        return machine.cancel(state), state.amount_authorized
    new = machine.refund(state, amount)
    return new, new.amount_refunded - state.amount_refunded


def undo(state: machine.PaymentState, started: Started) -> machine.PaymentState:
    """The processor definitely did not do it: put the amounts back."""
    if started.operation == "refund":
        return machine.reverse_refund(state, started.amount)
    if state.status in (machine.PaymentStatus.CAPTURED, machine.PaymentStatus.CANCELED):
        return machine.PaymentState(
            machine.PaymentStatus.AUTHORIZED, state.currency, state.amount, state.amount_authorized
        )
    raise StateConflict("The payment changed meanwhile.", code="invalid_state")
