"""Recovering declined renewals: a declined merchant-initiated payment is retried, as new
attempts on the same payment, when core.recovery's policy allows — by the worker on a schedule
(when the merchant switched recovery on and the payment did not opt out) or at the merchant's
request (`POST /v1/payments/{id}/retry`). docs/subscriptions.md.

Each retry is decided and written under the payment's row lock, and only while no other
attempt of the payment awaits its answer: the worker and a merchant's request racing, or two
workers, never send the same retry twice, and a payment approved by one retry is no longer
`declined` for the other. The answer is recorded once (a conditional update on the attempt), by
the sender, a resumed request or the reconciler, whichever comes first; an approval moves the
payment `declined -> authorized` (and `captured` when it captures) through core's
`retry_result`, with the ledger's authorization and capture, exactly once.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog

from api.connectors.base import (
    AuthorizeRequest,
    AuthorizeResult,
    Connector,
    Outcome,
    StoredCredential,
)
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
from api.services.payments import announce_authorization, read_payment, state_of
from api.storage.idempotency import IdempotencyRepository, ReplayCache, StoredResponse
from api.storage.payment_methods import PaymentMethodRepository
from api.storage.payments import PaymentRepository
from api.storage.recovery import RecoveryQueue, RecoveryRepository
from core import payments as machine
from core.errors import (
    CardError,
    IdempotencyError,
    NotFound,
    ProcessorError,
    StateConflict,
    TesseraError,
)
from core.ids import new_id
from core.recovery import (
    WINDOW,
    Action,
    Attempt,
    Caps,
    Decision,
    Decline,
    FixedSchedule,
    History,
    LearnedSchedule,
    RecoveryPolicy,
    RecoveryStats,
)
from tessera.runtime.http import error_bytes, status_of

log = structlog.stdlib.get_logger("tessera.recovery")

#: A retry whose sender died is asked about by the reconciler this long after it was written.
INQUIRE_AFTER_SECONDS = 30.0
#: After a retry the processor failed to process (the issuer never saw it), the next one waits
#: at least this long.
FAILED_RETRY_BACKOFF = timedelta(hours=1)
#: While a retry awaits its answer, the worker looks at the payment again after this long.
IN_FLIGHT_RECHECK = timedelta(minutes=1)
#: The learned schedule learns from this much history, re-read this often.
LEARN_FROM = timedelta(days=90)
LEARN_EVERY_SECONDS = 300.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Launch:
    """A retry written and about to be sent."""

    merchant_id: str
    payment: Any
    attempt: Any
    credential: StoredCredential


@dataclass
class RecoveryService:
    pool: Any
    connectors: dict[str, Connector]
    keys: IdempotencyRepository
    replays: ReplayCache
    routing: Any
    publisher: Publisher
    caps: dict[str, Caps] = field(default_factory=dict)
    window: timedelta = WINDOW
    fixed: FixedSchedule = field(default_factory=FixedSchedule)
    min_outcomes: int = 300
    clock: Callable[[], datetime] = _utcnow
    rng: random.Random = field(default_factory=random.Random)
    stats: RecoveryStats = field(default_factory=RecoveryStats)
    _learned_at: float = float("-inf")

    def policy(self) -> RecoveryPolicy:
        schedule = LearnedSchedule(
            self.stats, self.rng, fallback=self.fixed, min_outcomes=self.min_outcomes
        )
        return RecoveryPolicy(schedule, self.caps, self.window)

    # --- the history the policy judges on --------------------------------------------------

    async def _history(self, conn: Any, payment: Any, now: datetime) -> History:
        repo = RecoveryRepository(conn)
        rows = await repo.card_attempts(
            payment["merchant_id"],
            payment["token"],
            now - WINDOW - timedelta(days=1),
            payment["id"],
        )
        updated = None
        if payment["payment_method"] is not None:
            updated = await repo.card_updated_at(payment["merchant_id"], payment["payment_method"])
        attempts = tuple(
            Attempt(
                payment_id=r["payment_id"],
                at=r["started_at"],
                retry=r["retry_by"] is not None,
                approved=r["outcome"] == "approved",
                pending=r["outcome"] in ("pending", "unknown"),
                decline=(
                    Decline(r["decline_code"], r["decline_advice_code"], r["decline_visa_category"])
                    if r["outcome"] == "declined" and r["decline_code"] is not None
                    else None
                ),
            )
            for r in rows
        )
        return History(payment["id"], payment["card_brand"], attempts, updated)

    # --- starting a recovery -----------------------------------------------------------------

    async def start(self, conn: Any, merchant_id: str, payment_id: str, cause: Cause) -> None:
        """Called in the transaction that recorded a payment's first decline: schedule its
        recovery if it is a renewal, its merchant has recovery on and it did not opt out."""
        repo = RecoveryRepository(conn)
        payment = await repo.lock(merchant_id, payment_id)
        if (
            payment is None
            or payment["mit_reason"] is None
            or payment["status"] != "declined"
            or payment["recovery"] is not None
            or not payment["recovery_allowed"]
        ):
            return
        if not (await self.routing.config(merchant_id, conn)).recovery:
            return
        now = self.clock()
        history = await self._history(conn, payment, now)
        mine = history.of_payment()
        if not mine:
            return
        decision = self.policy().decide(history, now)
        if decision.action in (Action.NEVER, Action.NOTHING_TO_RECOVER):
            return  # a hard decline: never retried, so never under recovery
        await self._apply(conn, payment, decision, now, cause, declined_at=mine[0].at)

    async def _apply(
        self,
        conn: Any,
        payment: Any,
        decision: Decision,
        now: datetime,
        cause: Cause,
        *,
        declined_at: datetime | None = None,
        not_before: datetime | None = None,
    ) -> None:
        """Write the policy's decision on a payment under recovery (no retry is sent here)."""
        repo = RecoveryRepository(conn)
        merchant_id, payment_id = payment["merchant_id"], payment["id"]
        first = declined_at or payment["declined_at"] or now
        deadline = payment["recovery_deadline"] or first + self.window
        if decision.action is Action.RETRY and decision.at is not None:
            at = decision.at if not_before is None else max(decision.at, not_before)
            if at <= deadline:
                await repo.schedule(
                    merchant_id,
                    payment_id,
                    next_attempt_at=at,
                    due_at=at,
                    reason=decision.reason,
                    deadline=deadline,
                    declined_at=first,
                )
                if not _same_schedule(payment, at, decision.reason):
                    await self._publish(
                        conn, merchant_id, payment_id, "payment.retry_scheduled", cause
                    )
                return
            decision = Decision(Action.EXHAUSTED, reason="window")
        if decision.action is Action.AWAITING_UPDATE and now < deadline:
            await repo.schedule(
                merchant_id,
                payment_id,
                next_attempt_at=None,
                due_at=deadline,
                reason="awaiting_update",
                deadline=deadline,
                declined_at=first,
            )
            if not _same_schedule(payment, None, "awaiting_update"):
                await self._publish(conn, merchant_id, payment_id, "payment.retry_scheduled", cause)
            return
        reason = "window" if decision.action is Action.AWAITING_UPDATE else decision.reason
        await repo.end(merchant_id, payment_id, "exhausted", reason or "exhausted", first)
        await self._publish(conn, merchant_id, payment_id, "payment.recovery_exhausted", cause)

    async def _publish(
        self,
        conn: Any,
        merchant_id: str,
        payment_id: str,
        event_type: str,
        cause: Cause,
        postings_for: str | None = None,
    ) -> Any:
        row, view = await read_payment(conn, merchant_id, payment_id)
        if postings_for is not None:
            await announce_authorization(
                self.publisher, self.routing, conn, row, view, postings_for, cause
            )
        await self.publisher.publish(
            conn, merchant_id, event_type, payment_id, view, cause, payment_id=payment_id
        )
        return view

    # --- the worker's schedule ----------------------------------------------------------------

    async def run_due(self, limit: int = 50) -> int:
        """One turn of the worker: decide up to `limit` recoveries due now, one transaction
        each, and send the retries that may go. Returns how many it looked at."""
        await self._learn()
        now = self.clock()
        looked = 0
        while looked < limit:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await RecoveryQueue(conn).claim_due(now)
                if row is None:
                    break
                looked += 1
                await RecoveryRepository(conn).lock_card(row["merchant_id"], row["token"])
                launch = await self._decide_scheduled(conn, row["merchant_id"], row["id"], now)
            if launch is not None:
                outcome = await self._send(launch, Cause())
                log.info("recovery_retry", payment=launch.payment["id"], outcome=outcome)
        return looked

    async def _decide_scheduled(
        self, conn: Any, merchant_id: str, payment_id: str, now: datetime
    ) -> _Launch | None:
        repo = RecoveryRepository(conn)
        payment = await repo.lock(merchant_id, payment_id)
        # (A retry's approval ends the recovery as `recovered` with the same update, so a
        # scheduled recovery's payment is always still `declined`.)
        if payment is None or payment["recovery"] != "scheduled":
            return None
        if await repo.in_flight(merchant_id, payment_id):
            await repo.schedule(
                merchant_id,
                payment_id,
                next_attempt_at=payment["recovery_next_attempt_at"],
                due_at=now + IN_FLIGHT_RECHECK,
                reason=payment["recovery_reason"] or "in_flight",
            )
            return None
        history = await self._history(conn, payment, now)
        decision = self.policy().decide(history, now)
        if decision.action is Action.RETRY and decision.at is not None and decision.at <= now:
            return await self._write_retry(conn, payment, decision, now, "schedule")
        await self._apply(conn, payment, decision, now, Cause())
        return None

    async def _write_retry(
        self, conn: Any, payment: Any, decision: Decision, now: datetime, by: str
    ) -> _Launch:
        """The retry's attempt, under the payment's lock, before anything is sent."""
        merchant_id = payment["merchant_id"]
        repo = RecoveryRepository(conn)
        latest = await repo.latest_attempt(merchant_id, payment["id"])
        assert decision.classification is not None
        attempt = await repo.insert_retry(
            merchant_id,
            payment["id"],
            latest["attempt"] + 1,
            payment["processor"],
            retry_by=by,
            recovery_key=decision.classification.key,
            started_at=now,
            inquire_after_seconds=INQUIRE_AFTER_SECONDS,
        )
        if payment["recovery"] == "scheduled":
            await repo.schedule(
                merchant_id,
                payment["id"],
                next_attempt_at=None,
                due_at=now + IN_FLIGHT_RECHECK,
                reason="in_flight",
            )
        method = await PaymentMethodRepository(conn).get(merchant_id, payment["payment_method"])
        credential = StoredCredential(payment["mit_reason"], method["network_transaction_id"])
        return _Launch(merchant_id, payment, attempt, credential)

    async def _send(self, launch: _Launch, cause: Cause) -> str:
        result = await self._authorize(launch)
        async with self.pool.acquire() as conn, conn.transaction():
            return await self.record(
                conn,
                launch.merchant_id,
                launch.payment["id"],
                launch.attempt["attempt"],
                result,
                cause,
            )

    # --- recording a retry's answer ------------------------------------------------------------

    async def record(
        self,
        conn: Any,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        result: AuthorizeResult,
        cause: Cause,
    ) -> str:
        """Inside the caller's transaction: the retry's answer, once. Returns what happened."""
        repo = RecoveryRepository(conn)
        payment = await repo.lock(merchant_id, payment_id)
        if result.outcome is Outcome.UNKNOWN:
            # The reconciler asks the processor about it; nothing else is sent meanwhile.
            await PaymentRepository(conn).mark_unknown(merchant_id, payment_id, attempt)
            return "unknown"
        retried = await repo.record_retry(
            merchant_id,
            payment_id,
            attempt,
            outcome=str(result.outcome),
            processor_reference=result.processor_reference,
            decline_code=result.decline_code,
            advice_code=result.advice_code,
            visa_category=result.visa_category,
        )
        if retried is None:
            return "already_recorded"
        now = self.clock()
        learnable = payment["declined_at"] is not None
        if learnable and result.outcome in (Outcome.APPROVED, Outcome.DECLINED):
            self.stats.record(
                retried,
                payment["declined_at"],
                now,
                result.outcome is Outcome.APPROVED,
            )
        if result.outcome is Outcome.APPROVED:
            new = machine.retry_result(state_of(payment), machine.AuthorizationOutcome.APPROVED)
            if result.captured:
                new = machine.capture(new)
            await repo.set_authorized(
                merchant_id,
                payment_id,
                status=str(new.status),
                amount_authorized=new.amount_authorized,
                amount_captured=new.amount_captured,
                processor_reference=result.processor_reference,
            )
            # The authorization's event carries the ledger's postings (once: this update ran
            # only because the attempt was still unanswered); then the recovery's own event.
            await self._publish(
                conn,
                merchant_id,
                payment_id,
                "payment.recovered",
                cause,
                postings_for=f"payment.{new.status}",
            )
            return "recovered"
        if result.outcome is Outcome.DECLINED:
            await repo.set_decline(
                merchant_id,
                payment_id,
                result.decline_code,
                result.advice_code,
                result.visa_category,
            )
        if payment["recovery"] != "scheduled":
            return str(result.outcome)  # a merchant's retry outside a scheduled recovery
        payment = await repo.lock(merchant_id, payment_id)
        history = await self._history(conn, payment, now)
        decision = self.policy().decide(history, now)
        not_before = now + FAILED_RETRY_BACKOFF if result.outcome is Outcome.FAILED else None
        await self._apply(conn, payment, decision, now, cause, not_before=not_before)
        return str(result.outcome)

    async def settle(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        reference: str,
        age_seconds: float,
        cutoff_seconds: float,
        late_window_seconds: float,
    ) -> str:
        """The reconciler's entry for a retry whose answer was not recorded: ask the
        processor. Not found after the cut-off: failed (and watched for a late approval,
        which the worker voids, so a lost retry never charges the card behind our back)."""
        async with self.pool.acquire() as conn:
            row = await RecoveryRepository(conn).latest_attempt(merchant_id, payment_id)
        found = await self.connectors[row["processor"]].inquire(reference)
        async with self.pool.acquire() as conn, conn.transaction():
            if found is not None and found.outcome is not Outcome.UNKNOWN:
                return await self.record(conn, merchant_id, payment_id, attempt, found, Cause())
            if found is None and age_seconds > cutoff_seconds:
                outcome = await self.record(
                    conn,
                    merchant_id,
                    payment_id,
                    attempt,
                    AuthorizeResult(Outcome.FAILED, failure_code="not_found_at_processor"),
                    Cause(),
                )
                await PaymentRepository(conn).watch_for_late_authorization(
                    merchant_id, payment_id, attempt, late_window_seconds
                )
                return f"failed_not_found:{outcome}"
        return "still_unknown"

    # --- the merchant's retry and cancel ----------------------------------------------------------

    async def retry(
        self,
        merchant_id: str,
        payment_id: str,
        *,
        idempotency_key: str,
        method: str,
        path: str,
        raw_body: bytes,
        request_id: str,
    ) -> Handled:
        """`POST /v1/payments/{id}/retry`: one attempt now, if the policy allows one now."""
        fingerprint = request_hash(method, path, raw_body)
        replay = await cached_replay(self.replays, merchant_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
        cause = Cause(request_id, idempotency_key)
        launch: _Launch | None = None
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await claim(
                self.keys, conn, merchant_id, idempotency_key, method, path, fingerprint
            )
            lease = claimed.lease
            if claimed.kind is ClaimKind.REPLAY:
                return await replayed(
                    self.replays, merchant_id, idempotency_key, fingerprint, claimed
                )
            if claimed.kind is ClaimKind.NEW:
                try:
                    launch = await self._start_merchant_retry(conn, merchant_id, payment_id)
                except TesseraError as exc:
                    response = StoredResponse(status_of(exc), error_bytes(exc, request_id))
                    await self.keys.finish(conn, merchant_id, idempotency_key, response)
                    return Handled(response.status, response.body)
                await self.keys.set_recovery_point(
                    conn, merchant_id, idempotency_key, "retry_started", payment_id
                )
            else:
                assert claimed.row is not None
                assert claimed.row.payment_id is not None
                payment_id = claimed.row.payment_id
        if launch is not None:
            result: AuthorizeResult | None = await self._authorize(launch)
        else:
            result = await self._inquire_latest(merchant_id, payment_id)
        handled = await self._finish(
            merchant_id, idempotency_key, payment_id, lease, result, cause, request_id
        )
        response = StoredResponse(handled.status, handled.body)
        await self.replays.put(merchant_id, idempotency_key, fingerprint, response)
        return handled

    async def complete(self, merchant_id: str, idempotency_key: str, lease: Any) -> None:
        """The completer's entry for a merchant's retry whose process died after writing its
        attempt: ask the processor, record, finish the key — as the client's retry would."""
        async with self.pool.acquire() as conn:
            row = await self.keys.lock_free(conn, merchant_id, idempotency_key)
        if row is None or row.payment_id is None:
            return
        result = await self._inquire_latest(merchant_id, row.payment_id)
        with contextlib.suppress(IdempotencyError):  # a client's retry took the key over
            await self._finish(
                merchant_id, idempotency_key, row.payment_id, lease, result, Cause(), new_id("req")
            )

    async def _finish(
        self,
        merchant_id: str,
        key: str,
        payment_id: str,
        lease: Any,
        result: AuthorizeResult | None,
        cause: Cause,
        request_id: str,
    ) -> Handled:
        """A merchant's retry, after the processor: record its answer (if there is one to
        record) and finish the key, while this request still holds it."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self.keys.holds(conn, merchant_id, key, lease):
                return await fenced(self.keys, conn, merchant_id, key)
            if result is not None:
                latest = await RecoveryRepository(conn).latest_attempt(merchant_id, payment_id)
                await self.record(conn, merchant_id, payment_id, latest["attempt"], result, cause)
            response = await self._retry_response(conn, merchant_id, payment_id, request_id)
            await self.keys.finish(conn, merchant_id, key, response)
        return Handled(response.status, response.body)

    async def _authorize(self, launch: _Launch) -> AuthorizeResult:
        payment = launch.payment
        return await self.connectors[launch.attempt["processor"]].authorize(
            AuthorizeRequest(
                merchant_id=launch.merchant_id,
                payment_id=payment["id"],
                reference=launch.attempt["reference"],
                token=payment["token"],
                amount=payment["amount"],
                currency=payment["currency"],
                capture=payment["capture"],
                setup_future_usage=False,
                stored_credential=launch.credential,
            )
        )

    async def _inquire_latest(self, merchant_id: str, payment_id: str) -> AuthorizeResult | None:
        """A resumed retry: what the processor knows of its attempt, if it is unanswered."""
        async with self.pool.acquire() as conn:
            latest = await RecoveryRepository(conn).latest_attempt(merchant_id, payment_id)
        if latest is None or latest["outcome"] not in ("pending", "unknown"):
            return None
        found = await self.connectors[latest["processor"]].inquire(latest["reference"])
        return found if found is not None else AuthorizeResult(Outcome.UNKNOWN)

    async def _start_merchant_retry(self, conn: Any, merchant_id: str, payment_id: str) -> _Launch:
        repo = RecoveryRepository(conn)
        payment = await repo.lock(merchant_id, payment_id)
        if payment is None:
            raise NotFound("No such payment.", param="id")
        if payment["mit_reason"] is None:
            raise StateConflict(
                "Only a merchant-initiated payment (a renewal on a payment_method) can be "
                "retried; ask the customer to pay again.",
                code="payment_not_retryable",
            )
        if payment["status"] != "declined":
            raise StateConflict(
                f"This payment is {payment['status']}; only a declined one can be retried.",
                code="payment_not_retryable",
                extra={"status": payment["status"]},
            )
        if await repo.in_flight(merchant_id, payment_id):
            raise StateConflict(
                "A retry of this payment is waiting for the processor's answer.",
                code="retry_in_progress",
            )
        now = self.clock()
        await repo.lock_card(merchant_id, payment["token"])
        history = await self._history(conn, payment, now)
        decision = self.policy().on_request(history, now)
        if decision.action is Action.RETRY and decision.at is not None and decision.at <= now:
            return await self._write_retry(conn, payment, decision, now, "merchant")
        raise _refusal(decision)

    async def _retry_response(
        self, conn: Any, merchant_id: str, payment_id: str, request_id: str
    ) -> StoredResponse:
        row, view = await read_payment(conn, merchant_id, payment_id)
        last = view.attempts[-1].outcome if view.attempts else None
        if row["status"] != "declined":
            return StoredResponse(200, msgspec.json.encode(view))
        if last in ("pending", "unknown"):
            return StoredResponse(202, msgspec.json.encode(view))
        if last == "failed":
            failed = ProcessorError(
                "The processor could not process the retry; nothing was authorized.",
                extra={"payment": payment_id},
            )
            return StoredResponse(502, error_bytes(failed, request_id))
        declined = CardError(
            "The retry was declined.",
            extra={"decline_code": row["decline_code"] or "generic_decline", "payment": payment_id},
        )
        return StoredResponse(402, error_bytes(declined, request_id))

    async def cancel(self, conn: Any, payment: Any) -> None:
        """Inside the caller's transaction, the payment locked: stop a scheduled recovery."""
        merchant_id, payment_id = payment["merchant_id"], payment["id"]
        if await RecoveryRepository(conn).in_flight(merchant_id, payment_id):
            raise StateConflict(
                "A retry of this payment is waiting for the processor's answer; its answer "
                "decides. Cancel again once it is recorded.",
                code="retry_in_progress",
            )
        await RecoveryRepository(conn).end(merchant_id, payment_id, "canceled", "merchant")

    # --- learning ---------------------------------------------------------------------------------

    async def _learn(self) -> None:
        """Rebuild the learned schedule's counts from the retries Tessera made (every
        merchant's, the last 90 days) every few minutes."""
        if time.monotonic() - self._learned_at < LEARN_EVERY_SECONDS:
            return
        async with self.pool.acquire() as conn:
            rows = await RecoveryQueue(conn).retry_outcomes(self.clock() - LEARN_FROM)
        stats = RecoveryStats()
        for row in rows:
            stats.record(row["recovery_key"], row["declined_at"], row["started_at"], row["ok"])
        self.stats = stats
        self._learned_at = time.monotonic()


def _same_schedule(payment: Any, at: datetime | None, reason: str) -> bool:
    """Whether the payment is scheduled so already (a re-decision that changed nothing, e.g.
    after a card update that does not concern its decline, sends no second event)."""
    return bool(
        payment["recovery"] == "scheduled"
        and payment["recovery_next_attempt_at"] == at
        and payment["recovery_reason"] == reason
    )


def _refusal(decision: Decision) -> StateConflict:
    """Why the policy lets no retry go now, as the merchant's error."""
    if decision.action is Action.NEVER:
        return StateConflict(
            "The issuer said not to try this card again (a hard decline): no retry will go.",
            code="decline_not_retryable",
            extra={"rule": decision.reason},
        )
    if decision.action is Action.AWAITING_UPDATE:
        return StateConflict(
            "The card must be updated before a retry (its decline asks for new card data).",
            code="awaiting_card_update",
            extra={"rule": decision.reason},
        )
    if decision.action is Action.RETRY and decision.at is not None:
        return StateConflict(
            "No retry may go yet: the issuer's advice or the schemes' retry caps allow the next "
            "one at next_attempt_at.",
            code="retry_not_allowed_yet",
            extra={"next_attempt_at": str(int(decision.at.timestamp()))},
        )
    if decision.action is Action.NOTHING_TO_RECOVER:
        return StateConflict("This payment has nothing to retry.", code="payment_not_retryable")
    return StateConflict(
        "This payment has had all the retries the schemes' caps and the recovery window allow.",
        code="recovery_exhausted",
        extra={"reason": decision.reason},
    )
