"""Creating and reading payments: the authorize use case in three atomic phases.

1. Claim the idempotency key and create the payment (`processing`) and its first attempt, in one
   transaction, committed before anything leaves for the processor.
2. Call the processor (through the vault) outside any transaction, with our deterministic
   reference (payment id + attempt number).
3. Record the answer through core's state machine and finish the key with the response, in one
   transaction; then put the response in the replay cache.

A request that died after phase 1 leaves its key leased; once the lease runs out, a retry with
the same key resumes at phase 2 by first asking the processor about the attempt's reference, so
a card is never authorized twice.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from api.connectors.base import (
    AuthorizeRequest,
    AuthorizeResult,
    Connector,
    Outcome,
    StoredCredential,
)
from api.services.breaker import CircuitBreaker
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
from api.services.paging import keyset_page
from api.services.routing import SOFT_DECLINES, Candidate, OutcomeStats, processing_fee, rank
from api.storage.idempotency import IdempotencyRepository, ReplayCache, StoredResponse
from api.storage.payment_methods import PaymentMethodRepository
from api.storage.payments import PaymentRepository
from api.storage.read_pools import ListReads
from api.storage.routing import RoutingRepository
from api.vault_client import VaultClient
from core import ledger
from core import payments as machine
from core.bins import country_of
from core.errors import CardError, InvalidRequest, NotFound, ProcessorError, ServiceUnavailable
from core.ids import new_id
from core.money import CURRENCIES, MAX_AMOUNT, parse_currency, validate_amount
from core.recovery import Decline, DeclineClass, classify
from tessera.runtime import failpoints
from tessera.runtime.failpoints import failpoint
from tessera.runtime.http import NO_NUL, error_bytes

_TOKEN_ID = re.compile(r"tok_[0-9a-z]{26}")
PAYMENT_METHOD_ID = re.compile(r"pm_[0-9a-z]{26}")
MitReason = Literal["recurring", "unscheduled", "installment"]
Metadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=NO_NUL)],
        Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)],
    ],
    msgspec.Meta(max_length=20),
]


class CreatePayment(msgspec.Struct, forbid_unknown_fields=True):
    # `extra_json_schema` only describes: core.money and `_create` check these, each with its
    # own error code, and the OpenAPI document says so.
    amount: Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_AMOUNT})]
    currency: Annotated[
        str, msgspec.Meta(max_length=3, extra_json_schema={"enum": sorted(CURRENCIES)})
    ]
    #: The card, for a customer-present payment (required unless `payment_method` is given).
    token: (
        Annotated[
            str,
            msgspec.Meta(max_length=40, extra_json_schema={"pattern": f"^{_TOKEN_ID.pattern}$"}),
        ]
        | None
    ) = None
    capture: bool = True
    #: `off_session`: keep the card for merchant-initiated payments (a payment method).
    setup_future_usage: Literal["off_session"] | None = None
    #: A stored credential to charge while the customer is not there (a renewal).
    payment_method: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=40, extra_json_schema={"pattern": f"^{PAYMENT_METHOD_ID.pattern}$"}
            ),
        ]
        | None
    ) = None
    #: Must be true with `payment_method`: the payment is merchant-initiated.
    off_session: bool = False
    #: Why the merchant charges the stored card (with `payment_method`).
    mit_reason: MitReason | None = None
    #: false: if declined, this renewal is not retried by Tessera's recovery (the merchant's
    #: own `POST /v1/payments/{id}/retry` still may). Only with `payment_method`.
    recovery: bool | None = None
    description: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None
    reference: Annotated[str, msgspec.Meta(max_length=200, pattern=NO_NUL)] | None = None
    metadata: Metadata = {}


class CardView(msgspec.Struct):
    brand: str
    last4: str
    exp_month: int
    exp_year: int


class RefundView(msgspec.Struct):
    id: str
    payment: str
    amount: int
    status: str
    created: int
    reason: str | None = None
    object: str = "refund"


class DeclineView(msgspec.Struct, omit_defaults=False):
    """A decline as the processor gave it, and whether it may be tried again
    (core.recovery.classify; the table is docs/subscriptions.md)."""

    code: str
    #: Mastercard's merchant advice code ("01", "02", "03", "21", "24".."30"), if sent.
    advice_code: str | None
    #: Visa's decline category (1 never, 2 not now, 3 data quality, 4 generic), if sent.
    visa_category: int | None
    retryable: DeclineClass
    #: Which rule of the table decided.
    rule: str


def decline_view(code: str | None, advice: str | None, category: int | None) -> DeclineView | None:
    if code is None:
        return None
    found = classify(Decline(code, advice, category))
    return DeclineView(code, advice, category, found.decline_class, found.rule)


class RecoveryView(msgspec.Struct, omit_defaults=False):
    """A declined renewal's recovery (docs/subscriptions.md)."""

    #: scheduled (a retry will go, or waits for a card update), recovered (a retry was
    #: approved), exhausted (no retry may go any more), canceled (the merchant stopped it).
    status: str
    #: Retries made so far (by the schedule or at the merchant's request).
    attempts: int
    #: When the next retry goes; null when none is scheduled (or it waits for a card update).
    next_attempt_at: int | None
    #: Why it waits or ended: the decline table's rule, awaiting_update, caps, schedule, ...
    reason: str | None


class AttemptView(msgspec.Struct):
    processor: str
    reference: str
    outcome: str
    processor_reference: str | None
    decline_code: str | None
    latency_ms: int | None
    #: A late authorization found after this attempt failed at the cut-off, and reversed:
    #: `voided`, or `refunded` if the processor had captured it.
    late_reversal: str | None = None
    #: The attempt's decline with the issuer's advice and its class; null unless declined.
    decline: DeclineView | None = None
    #: A recovery retry: `schedule` (the worker) or `merchant` (POST .../retry); else null.
    retry: str | None = None


class PaymentView(msgspec.Struct, omit_defaults=False):
    id: str
    amount: int
    currency: str
    status: str
    amount_authorized: int
    amount_captured: int
    amount_refunded: int
    capture: bool
    card: CardView
    processor: str | None
    processor_reference: str | None
    decline_code: str | None
    failure_code: str | None
    description: str | None
    reference: str | None
    metadata: dict[str, str]
    created: int
    refunds: list[RefundView]
    attempts: list[AttemptView] = []
    #: The payment method this payment set up (once approved) or charged.
    payment_method: str | None = None
    #: The decline with the issuer's advice and whether it may be retried; null unless declined.
    decline: DeclineView | None = None
    #: A declined renewal's recovery; null for a payment never under recovery.
    recovery: RecoveryView | None = None
    object: str = "payment"


class PaymentMethodView(msgspec.Struct, omit_defaults=False):
    id: str
    card: CardView
    created: int
    usage: str
    #: When it was detached (never usable again); null while it is usable.
    detached_at: int | None
    object: str = "payment_method"


class PaymentMethodList(msgspec.Struct):
    data: list[PaymentMethodView]
    has_more: bool
    object: str = "list"


def card_view(row: Any) -> CardView:
    """The masked card of a payment or payment method row (or of its old values)."""
    return CardView(
        row["card_brand"], row["card_last4"], row["card_exp_month"], row["card_exp_year"]
    )


def payment_method_view(row: Any) -> PaymentMethodView:
    detached = row["detached_at"]
    return PaymentMethodView(
        id=row["id"],
        card=card_view(row),
        created=int(row["created_at"].timestamp()),
        usage=row["usage"],
        detached_at=None if detached is None else int(detached.timestamp()),
    )


class PaymentList(msgspec.Struct):
    data: list[PaymentView]
    has_more: bool
    object: str = "list"


def payment_view(row: Any, refunds: list[Any], attempts: list[Any] | None = None) -> PaymentView:
    metadata = row["metadata"]
    if isinstance(metadata, str):
        metadata = msgspec.json.decode(metadata)
    return PaymentView(
        id=row["id"],
        amount=row["amount"],
        currency=row["currency"],
        status=row["status"],
        amount_authorized=row["amount_authorized"],
        amount_captured=row["amount_captured"],
        amount_refunded=row["amount_refunded"],
        capture=row["capture"],
        card=CardView(
            row["card_brand"], row["card_last4"], row["card_exp_month"], row["card_exp_year"]
        ),
        processor=row["processor"],
        processor_reference=row["processor_reference"],
        decline_code=row["decline_code"],
        failure_code=row["failure_code"],
        description=row["description"],
        reference=row["reference"],
        metadata=metadata,
        created=int(row["created_at"].timestamp()),
        refunds=[refund_view(r) for r in refunds],
        attempts=[
            AttemptView(
                a["processor"],
                a["reference"],
                a["outcome"],
                a["processor_reference"],
                a["decline_code"],
                a["latency_ms"],
                a["late_reversal"],
                decline_view(
                    a["decline_code"], a["decline_advice_code"], a["decline_visa_category"]
                ),
                a["retry_by"],
            )
            for a in attempts or []
        ],
        payment_method=row["payment_method"],
        decline=decline_view(
            row["decline_code"], row["decline_advice_code"], row["decline_visa_category"]
        ),
        recovery=recovery_view(row, attempts),
    )


def recovery_view(row: Any, attempts: list[Any] | None) -> RecoveryView | None:
    if row["recovery"] is None:
        return None
    due = row["recovery_next_attempt_at"]
    return RecoveryView(
        status=row["recovery"],
        attempts=sum(1 for a in attempts or [] if a["retry_by"] is not None),
        next_attempt_at=None if due is None else int(due.timestamp()),
        reason=row["recovery_reason"],
    )


def refund_view(row: Any) -> RefundView:
    return RefundView(
        id=row["id"],
        payment=row["payment_id"],
        amount=row["amount"],
        status=row["status"],
        created=int(row["created_at"].timestamp()),
        reason=row["reason"],
    )


async def read_payment(conn: Any, merchant_id: str, payment_id: str) -> tuple[Any, PaymentView]:
    """The payment's row and its view (with its refunds and attempts), read on `conn`; `404`
    if the merchant has no such payment."""
    payments = PaymentRepository(conn)
    row = await payments.get(merchant_id, payment_id)
    if row is None:
        raise NotFound("No such payment.", param="id")
    refunds = await payments.refunds(merchant_id, [payment_id])
    attempts = await payments.attempts(merchant_id, [payment_id])
    return row, payment_view(row, refunds, attempts)


async def announce_authorization(
    publisher: Publisher,
    routing: Any,
    conn: Any,
    payment: Any,
    view: msgspec.Struct,
    event_type: str,
    cause: Cause,
) -> None:
    """The event of an authorization's outcome (a first attempt's or a recovery retry's), with
    the ledger's postings for it."""
    postings = None
    currency = payment["currency"]
    if event_type == "payment.authorized":
        postings = ledger.authorization(currency, payment["amount_authorized"])
    elif event_type == "payment.captured":
        fee = await processing_fee(routing, conn, payment, payment["amount_captured"])
        postings = ledger.authorization_and_capture(currency, payment["amount_captured"], fee)
    await publisher.publish(
        conn,
        payment["merchant_id"],
        event_type,
        payment["id"],
        view,
        cause,
        payment_id=payment["id"],
        postings=postings,
    )


def state_of(row: Any) -> machine.PaymentState:
    """The state machine's view of a payment row."""
    return machine.PaymentState(
        row["status"],
        parse_currency(row["currency"]),
        row["amount"],
        row["amount_authorized"],
        row["amount_captured"],
        row["amount_refunded"],
    )


@dataclass
class PaymentService:
    pool: Any
    vault: VaultClient
    connectors: dict[str, Connector]
    keys: IdempotencyRepository
    replays: ReplayCache
    routing: RoutingRepository
    stats: OutcomeStats
    breaker: CircuitBreaker
    #: After this long, an authorization the processor has never heard of will never appear.
    processor_cutoff_seconds: float = 60.0
    late_authorization_window_seconds: float = 24 * 3600
    publisher: Publisher = field(default_factory=Publisher)
    rng: random.Random = field(default_factory=random.Random)
    #: Schedules the recovery of a declined renewal (api.services.recovery); None: never.
    recovery: Any = None
    max_in_flight: int = 256
    admission_wait_seconds: float = 30.0
    #: Where `page` reads (a replica, if configured); everything else reads `pool`, the primary.
    lists: ListReads | None = None
    _slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """One of `max_in_flight` slots, or `503 at_capacity` after `admission_wait_seconds`.
        Taken before anything is written, so a refused request left no trace."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.admission_wait_seconds)
        except TimeoutError:
            raise ServiceUnavailable(
                "Too many payments in progress; nothing was done. Retry with the same "
                "Idempotency-Key.",
                code="at_capacity",
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    async def ranking(
        self,
        merchant_id: str,
        currency: str,
        brand: str,
        amount: int,
        tried: set[str],
        country: str | None = None,
    ) -> list[Candidate]:
        config = await self.routing.config(merchant_id)
        ranked = await rank(
            config,
            self.stats,
            currency=currency,
            brand=brand,
            country=country,
            amount=amount,
            is_open=self.breaker.is_open,
            rng=self.rng,
        )
        return [c for c in ranked if c.processor not in tried and c.processor in self.connectors]

    async def create(
        self,
        merchant_id: str,
        idempotency_key: str,
        method: str,
        path: str,
        raw_body: bytes,
        data: CreatePayment,
        request_id: str,
    ) -> Handled:
        fingerprint = request_hash(method, path, raw_body)
        replay = await cached_replay(self.replays, merchant_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
        async with self.admitted():
            return await self._create(
                merchant_id, idempotency_key, fingerprint, method, path, data, request_id
            )

    async def _create(
        self,
        merchant_id: str,
        idempotency_key: str,
        fingerprint: bytes,
        method: str,
        path: str,
        data: CreatePayment,
        request_id: str,
    ) -> Handled:
        # Validation before the key is claimed: failures here are not stored.
        currency = parse_currency(data.currency)
        amount = validate_amount(data.amount, currency)
        stored = await self._payment_method_for(merchant_id, data)
        if stored is None:
            assert data.token is not None  # checked by `_payment_method_for`
            if not _is_token(data.token):
                raise InvalidRequest("This is not a token id.", code="token_invalid", param="token")
            card = await self.vault.token(merchant_id, data.token)
            if card is None:
                raise InvalidRequest(
                    "No such token for this merchant (unknown or deleted).",
                    code="token_invalid",
                    param="token",
                )
            country = country_of(card.bin)
            ranked = await self.ranking(
                merchant_id, currency.code, card.brand, amount, set(), country
            )
            if not ranked:
                raise ServiceUnavailable(
                    "No processor can take this payment right now; retry later.",
                    code="no_processor_available",
                )
            processor = ranked[0].processor
            token, brand, last4 = data.token, card.brand, card.last4
            exp_month, exp_year = card.exp_month, card.exp_year
        else:
            # A renewal goes through the processor that set the credential up, never routed
            # elsewhere (docs/subscriptions/stored-credentials.md): nothing is written if it
            # cannot take it now.
            processor = stored["processor"]
            if processor not in self.connectors or await self.breaker.is_open(processor):
                raise ServiceUnavailable(
                    "The processor this payment method was set up with cannot take payments "
                    "right now; nothing was done. Retry later.",
                    code="processor_unavailable",
                )
            token, brand, last4 = stored["token"], stored["card_brand"], stored["card_last4"]
            exp_month, exp_year = stored["card_exp_month"], stored["card_exp_year"]
            country = stored["card_country"]
        payment_id = new_id("pay")
        resumed = False
        known: tuple[Any, Any] | None = None  # the new payment and attempt, as just written
        async with self.pool.acquire() as conn, failpoints.transaction(conn, "authorize_start"):
            claimed = await claim(
                self.keys, conn, merchant_id, idempotency_key, method, path, fingerprint
            )
            lease = claimed.lease
            if claimed.kind is ClaimKind.REPLAY:
                return await replayed(
                    self.replays, merchant_id, idempotency_key, fingerprint, claimed
                )
            if claimed.kind is ClaimKind.RESUME:
                assert claimed.row is not None
                assert claimed.row.payment_id is not None
                payment_id = claimed.row.payment_id
                resumed = True
            else:
                failpoint("authorize_key_claimed")
                if stored is not None:
                    # Held until this transaction ends: a concurrent detach waits for it.
                    live = await PaymentMethodRepository(conn).live_for_share(
                        merchant_id, stored["id"]
                    )
                    if live is None:
                        raise _detached()
                payments = PaymentRepository(conn)
                created = await payments.insert(
                    merchant_id,
                    {
                        "id": payment_id,
                        "amount": amount,
                        "currency": currency.code,
                        "capture": data.capture,
                        "token": token,
                        "card_brand": brand,
                        "card_last4": last4,
                        "card_exp_month": exp_month,
                        "card_exp_year": exp_year,
                        "processor": processor,
                        "description": data.description,
                        "reference": data.reference,
                        "metadata": data.metadata,
                        "card_country": country,
                        "setup_future_usage": data.setup_future_usage,
                        "payment_method": None if stored is None else stored["id"],
                        "mit_reason": data.mit_reason,
                        "recovery_allowed": data.recovery is not False,
                    },
                )
                first = await payments.insert_attempt(
                    merchant_id, payment_id, 1, processor, f"{payment_id}_1"
                )
                await self.keys.set_recovery_point(
                    conn, merchant_id, idempotency_key, "payment_created", payment_id
                )
                failpoint("authorize_attempt_written")
                known = (created, first)

        return await self._drive(
            merchant_id,
            idempotency_key,
            payment_id,
            resumed,
            fingerprint,
            request_id,
            known,
            lease=lease,
        )

    async def _payment_method_for(self, merchant_id: str, data: CreatePayment) -> Any:
        """The live payment method a renewal charges, or None for a payment with a token; the
        combinations of the stored-credential fields that make no sense are refused here."""
        if data.payment_method is None:
            if data.off_session:
                raise InvalidRequest(
                    "off_session is for a payment with a payment_method.", param="off_session"
                )
            if data.mit_reason is not None:
                raise InvalidRequest(
                    "mit_reason is for an off_session payment with a payment_method.",
                    param="mit_reason",
                )
            if data.recovery is not None:
                raise InvalidRequest(
                    "recovery is for an off_session payment with a payment_method: only "
                    "merchant-initiated payments are retried.",
                    param="recovery",
                )
            if data.token is None:
                raise InvalidRequest(
                    "A payment needs a token (or a payment_method).",
                    code="parameter_missing",
                    param="token",
                )
            return None
        if data.token is not None:
            raise InvalidRequest("Give a token or a payment_method, not both.", param="token")
        if data.setup_future_usage is not None:
            raise InvalidRequest(
                "A payment_method is set up already; setup_future_usage goes with a token.",
                param="setup_future_usage",
            )
        if not data.off_session:
            raise InvalidRequest(
                "A payment with a payment_method is merchant-initiated: off_session must be true.",
                param="off_session",
            )
        if data.mit_reason is None:
            raise InvalidRequest(
                "An off_session payment needs a mit_reason: recurring, unscheduled or installment.",
                code="parameter_missing",
                param="mit_reason",
            )
        row = None
        if PAYMENT_METHOD_ID.fullmatch(data.payment_method):
            async with self.pool.acquire() as conn:
                row = await PaymentMethodRepository(conn).get(merchant_id, data.payment_method)
        if row is None:
            raise InvalidRequest(
                "No such payment method for this merchant.",
                code="payment_method_invalid",
                param="payment_method",
            )
        if row["detached_at"] is not None:
            raise _detached()
        return row

    async def complete(self, merchant_id: str, idempotency_key: str, lease: Any) -> None:
        """The completer's entry: finish a request whose process died after phase 1, exactly
        as the client's own retry would (the worker has already taken the key's lease: `lease`)."""
        async with self.pool.acquire() as conn:
            row = await self.keys.lock_free(conn, merchant_id, idempotency_key)
        if row is None or row.payment_id is None:
            return
        await self._drive(
            merchant_id,
            idempotency_key,
            row.payment_id,
            True,
            row.request_hash,
            new_id("req"),
            lease=lease,
        )

    async def _drive(
        self,
        merchant_id: str,
        idempotency_key: str,
        payment_id: str,
        resumed: bool,
        fingerprint: bytes,
        request_id: str,
        known: tuple[Any, Any] | None = None,
        *,
        lease: Any,
    ) -> Handled:
        """Phases 2 and 3, from a new request, a client's retry or the completer. `known`: the
        payment and attempt rows phase 1 just wrote (a new request need not read them again).

        Phase 2 may take several attempts: after a *definite* failure (the processor said it did
        not process the payment) — or a soft decline, when the merchant switched cascading on —
        the next processor in the ranking gets a new attempt with its own reference, recorded
        before it is sent. Never after an unknown outcome: that could authorize twice.

        `lease` is this driver's lease on the key. Before each write (a new attempt, the
        answer) the driver checks it still holds it: a driver paused past its lease, whose key
        a retry or the completer took over, writes nothing and answers with what the other
        recorded (`fenced`). Else it would fail over to a second processor, and authorize the
        card twice, after the other driver had the first processor approve it.
        """
        if known is not None and not resumed:
            payment, attempt = known
            tried = {attempt["processor"]}
        else:
            async with self.pool.acquire() as conn:
                payments = PaymentRepository(conn)
                attempt = await payments.latest_attempt(merchant_id, payment_id)
                payment = await payments.get(merchant_id, payment_id)
                tried = {attempt["processor"]}
                if resumed:  # a resumed request may already have failed over: read them all
                    tried |= {
                        a["processor"] for a in await payments.attempts(merchant_id, [payment_id])
                    }
        credential: StoredCredential | None = None
        if payment["mit_reason"] is not None:
            async with self.pool.acquire() as conn:
                method = await PaymentMethodRepository(conn).get(
                    merchant_id, payment["payment_method"]
                )
            credential = StoredCredential(payment["mit_reason"], method["network_transaction_id"])
        result: AuthorizeResult | None = None
        if resumed:
            # Never authorize blindly after a crash: ask about our reference first.
            result = await self.connectors[attempt["processor"]].inquire(attempt["reference"])
        while payment["status"] == "processing":
            connector = self.connectors[attempt["processor"]]
            if result is None:
                result = await connector.authorize(
                    AuthorizeRequest(
                        merchant_id=merchant_id,
                        payment_id=payment_id,
                        reference=attempt["reference"],
                        token=payment["token"],
                        amount=payment["amount"],
                        currency=payment["currency"],
                        capture=payment["capture"],
                        setup_future_usage=payment["setup_future_usage"] == "off_session",
                        stored_credential=credential,
                    )
                )
                await self._learn(connector.name, payment, result)
            if credential is not None:
                break  # a renewal stays with the processor that set the credential up
            if not await self._should_fail_over(merchant_id, result):
                break
            failpoint("before_failover")
            ranked = await self.ranking(
                merchant_id,
                payment["currency"],
                payment["card_brand"],
                payment["amount"],
                tried,
                payment["card_country"],
            )
            if not ranked:
                break
            next_processor = ranked[0].processor
            number = attempt["attempt"] + 1
            async with (
                self.pool.acquire() as conn,
                failpoints.transaction(conn, "authorize_failover"),
            ):
                if not await self.keys.holds(conn, merchant_id, idempotency_key, lease):
                    return await fenced(self.keys, conn, merchant_id, idempotency_key)
                payments = PaymentRepository(conn)
                await payments.close_attempt(
                    merchant_id,
                    payment_id,
                    attempt["attempt"],
                    outcome=str(result.outcome),
                    processor_reference=result.processor_reference,
                    decline_code=result.decline_code,
                    advice_code=result.advice_code,
                    visa_category=result.visa_category,
                )
                attempt = await payments.insert_attempt(
                    merchant_id, payment_id, number, next_processor, f"{payment_id}_{number}"
                )
                await payments.switch_processor(merchant_id, payment_id, next_processor)
            tried.add(next_processor)
            result = None

        failpoint("after_processor_call")
        # Phase 3: record the answer, its event and postings, and the response together.
        async with self.pool.acquire() as conn, failpoints.transaction(conn, "authorize_record"):
            if not await self.keys.holds(conn, merchant_id, idempotency_key, lease):
                return await fenced(self.keys, conn, merchant_id, idempotency_key)
            payments = PaymentRepository(conn)
            event_type, recorded = None, None
            if result is not None:
                event_type, recorded = await self._record(
                    payments,
                    merchant_id,
                    payment_id,
                    attempt["attempt"],
                    result,
                    payment,
                    Cause(request_id, idempotency_key),
                )
            if recorded is None:
                recorded = await payments.get(merchant_id, payment_id)
            payment = recorded
            attempts = await payments.attempts(merchant_id, [payment_id])
            view = payment_view(payment, [], attempts)
            if event_type is not None:
                cause = Cause(request_id, idempotency_key)
                await self._announce(conn, payment, view, event_type, cause)
            response = _response(view, request_id)
            await self.keys.finish(conn, merchant_id, idempotency_key, response)
        await self.replays.put(merchant_id, idempotency_key, fingerprint, response)
        failpoint("authorize_before_response")
        return Handled(response.status, response.body)

    async def _learn(self, processor: str, payment: Any, result: AuthorizeResult) -> None:
        """Feed the router's auth-rate window and the processor's circuit breaker."""
        if result.outcome in (Outcome.APPROVED, Outcome.DECLINED):
            await self.stats.record(
                processor,
                payment["card_brand"],
                payment["currency"],
                approved=result.outcome is Outcome.APPROVED,
            )
        await self.breaker.record(
            processor, ok=result.outcome in (Outcome.APPROVED, Outcome.DECLINED)
        )

    async def _should_fail_over(self, merchant_id: str, result: AuthorizeResult) -> bool:
        if result.outcome is Outcome.FAILED:
            return True
        if result.outcome is Outcome.DECLINED and result.decline_code in SOFT_DECLINES:
            return (await self.routing.config(merchant_id)).cascade_soft_declines
        return False

    async def settle(
        self, merchant_id: str, payment_id: str, attempt: int, reference: str, age_seconds: float
    ) -> str:
        """The reconciler's entry for a `processing` payment: ask the processor about the
        attempt. Found: record what it says. Not found after the processor's cut-off: failed.
        Returns what happened, for the worker's log."""
        async with self.pool.acquire() as conn:
            row = await PaymentRepository(conn).latest_attempt(merchant_id, payment_id)
        found = await self.connectors[row["processor"]].inquire(reference)
        failpoint("reconcile_after_inquiry")
        async with self.pool.acquire() as conn, failpoints.transaction(conn, "reconcile_record"):
            payments = PaymentRepository(conn)
            if found is not None and found.outcome is not Outcome.UNKNOWN:
                await payments.reopen_attempt(merchant_id, payment_id, attempt)
                event_type, _ = await self._record(
                    payments, merchant_id, payment_id, attempt, found
                )
                await self._announce_current(conn, merchant_id, payment_id, event_type)
                return str(found.outcome)
            if found is None and age_seconds > self.processor_cutoff_seconds:
                await payments.reopen_attempt(merchant_id, payment_id, attempt)
                event_type, _ = await self._record(
                    payments,
                    merchant_id,
                    payment_id,
                    attempt,
                    AuthorizeResult(Outcome.FAILED, failure_code="not_found_at_processor"),
                )
                await self._announce_current(conn, merchant_id, payment_id, event_type)
                await payments.watch_for_late_authorization(
                    merchant_id, payment_id, attempt, self.late_authorization_window_seconds
                )
                return "failed_not_found"
        return "still_unknown"

    async def reverse_late_authorization(
        self,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        processor: str,
        reference: str,
        window_closed: bool,
    ) -> str:
        """The worker's look at an attempt that failed at the cut-off: the processor may have
        authorized it after all, and the payment's answer (`failed`) was given. A late
        authorization is voided, or refunded if the processor captured it, so the customer is
        never charged for a payment the merchant was told failed. Returns what happened."""
        connector = self.connectors[processor]
        found = await connector.inquire(reference)
        if found is None or found.outcome is Outcome.UNKNOWN:
            if found is None and window_closed:
                async with self.pool.acquire() as conn:
                    await PaymentRepository(conn).end_late_check(
                        merchant_id, payment_id, attempt, reversal=None, processor_reference=None
                    )
                return "window_closed"
            return "not_found" if found is None else "still_unknown"
        if found.outcome is not Outcome.APPROVED or found.processor_reference is None:
            async with self.pool.acquire() as conn:
                await PaymentRepository(conn).end_late_check(
                    merchant_id, payment_id, attempt, reversal=None, processor_reference=None
                )
            return f"late_{found.outcome}"
        async with self.pool.acquire() as conn:
            payment = await PaymentRepository(conn).get(merchant_id, payment_id)
        late_reference = f"{reference}_reversal"
        if found.captured:
            result = await connector.refund(
                found.processor_reference, late_reference, payment["amount"], payment["currency"]
            )
            reversal = "refunded"
        else:
            result = await connector.void(found.processor_reference, late_reference)
            reversal = "voided"
        if result.outcome not in (Outcome.APPROVED, Outcome.PENDING):
            return f"reversal_{result.outcome}"  # asked again at the next turn
        async with self.pool.acquire() as conn:
            await PaymentRepository(conn).end_late_check(
                merchant_id,
                payment_id,
                attempt,
                reversal=reversal,
                processor_reference=found.processor_reference,
            )
        return reversal

    async def _record(
        self,
        payments: PaymentRepository,
        merchant_id: str,
        payment_id: str,
        attempt: int,
        result: AuthorizeResult,
        current: Any = None,
        cause: Cause | None = None,
    ) -> tuple[str | None, Any]:
        """Apply the processor's answer; returns the event it makes (None if nothing changed)
        and the payment's new row when this wrote one. `current`: a row of the payment read
        earlier, enough here because the write applies only while the payment is still
        `processing`, the one state the answer is computed from."""
        if current is None:
            current = await payments.get(merchant_id, payment_id)
        state = state_of(current)
        if result.outcome is Outcome.UNKNOWN:
            # Stays `processing`; the reconciler settles it by asking the processor.
            if await payments.mark_unknown(merchant_id, payment_id, attempt):
                return "payment.processing", None
            return None, None
        outcome = {
            Outcome.APPROVED: machine.AuthorizationOutcome.APPROVED,
            Outcome.DECLINED: machine.AuthorizationOutcome.DECLINED,
            Outcome.FAILED: machine.AuthorizationOutcome.FAILED,
        }[result.outcome]
        new = machine.authorize_result(state, outcome)
        if result.captured:
            new = machine.capture(new)
        row = await payments.record_authorization(
            merchant_id,
            payment_id,
            attempt,
            status=str(new.status),
            amount_authorized=new.amount_authorized,
            amount_captured=new.amount_captured,
            outcome=str(result.outcome),
            processor_reference=result.processor_reference,
            decline_code=result.decline_code,
            failure_code=result.failure_code,
            advice_code=result.advice_code,
            visa_category=result.visa_category,
        )
        if (
            row is not None
            and row["setup_future_usage"] == "off_session"
            and result.outcome is Outcome.APPROVED
            and result.network_transaction_id is not None
        ):
            # The stored credential, with the payment that set it up, in the same transaction.
            row, method = await PaymentMethodRepository(payments.conn).create_from_setup(
                merchant_id, row, result.network_transaction_id
            )
            await self.publisher.publish(
                payments.conn,
                merchant_id,
                "payment_method.created",
                method["id"],
                payment_method_view(method),
                cause,
            )
        return (f"payment.{new.status}", row) if row is not None else (None, None)

    async def _announce_current(
        self, conn: Any, merchant_id: str, payment_id: str, event_type: str | None
    ) -> None:
        """The worker's changes: the event carries the payment as it is now, and no request."""
        if event_type is None:
            return
        payment, view = await read_payment(conn, merchant_id, payment_id)
        await self._announce(conn, payment, view, event_type, Cause())

    async def _announce(
        self, conn: Any, payment: Any, view: PaymentView, event_type: str, cause: Cause
    ) -> None:
        await announce_authorization(
            self.publisher, self.routing, conn, payment, view, event_type, cause
        )
        renewal = payment["mit_reason"] is not None
        if event_type == "payment.declined" and renewal and self.recovery is not None:
            # A declined renewal may be recovered: scheduled in this same transaction.
            await self.recovery.start(conn, payment["merchant_id"], payment["id"], cause)

    async def get(self, merchant_id: str, payment_id: str) -> PaymentView:
        async with self.pool.acquire() as conn:
            _, view = await read_payment(conn, merchant_id, payment_id)
        return view

    async def page(
        self,
        merchant_id: str,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
    ) -> PaymentList:
        lists = self.lists if self.lists is not None else ListReads(self.pool)
        async with lists.acquire() as conn:
            payments = PaymentRepository(conn)
            rows = await payments.page(
                merchant_id, limit=limit, starting_after=starting_after, ending_before=ending_before
            )
            rows, has_more = keyset_page(rows, limit, ending_before is not None)
            ids = [r["id"] for r in rows]
            refunds = await payments.refunds(merchant_id, ids)
            attempts = await payments.attempts(merchant_id, ids)
        refunds_of: dict[str, list[Any]] = {}
        for refund in refunds:
            refunds_of.setdefault(refund["payment_id"], []).append(refund)
        attempts_of: dict[str, list[Any]] = {}
        for attempt in attempts:
            attempts_of.setdefault(attempt["payment_id"], []).append(attempt)
        data = [
            payment_view(r, refunds_of.get(r["id"], []), attempts_of.get(r["id"], [])) for r in rows
        ]
        return PaymentList(data=data, has_more=has_more)


@dataclass
class PaymentMethodService:
    """Reading and detaching the stored credentials that setup payments made."""

    pool: Any
    vault: VaultClient
    lists: ListReads | None = None
    publisher: Publisher = field(default_factory=Publisher)

    async def get(self, merchant_id: str, payment_method: str) -> PaymentMethodView:
        row = None
        if PAYMENT_METHOD_ID.fullmatch(payment_method):
            async with self.pool.acquire() as conn:
                row = await PaymentMethodRepository(conn).get(merchant_id, payment_method)
        if row is None:
            raise NotFound("No such payment method.", param="id")
        return payment_method_view(row)

    async def page(
        self, merchant_id: str, limit: int, starting_after: str | None, ending_before: str | None
    ) -> PaymentMethodList:
        lists = self.lists if self.lists is not None else ListReads(self.pool)
        async with lists.acquire() as conn:
            rows = await PaymentMethodRepository(conn).page(
                merchant_id, limit=limit, starting_after=starting_after, ending_before=ending_before
            )
        rows, has_more = keyset_page(rows, limit, ending_before is not None)
        return PaymentMethodList([payment_method_view(r) for r in rows], has_more)

    async def detach(self, merchant_id: str, payment_method: str) -> PaymentMethodView:
        """Never usable again, at once; then the vault token is deleted unless another live
        payment method of the merchant uses it. Detaching again answers the same and retries
        the deletion, so a vault that did not answer the first time is caught up."""
        row = None
        if PAYMENT_METHOD_ID.fullmatch(payment_method):
            async with self.pool.acquire() as conn, conn.transaction():
                methods = PaymentMethodRepository(conn)
                row = await methods.detach(merchant_id, payment_method)
                in_use = row is not None and await methods.token_in_use(merchant_id, row["token"])
                if row is not None and row["newly"]:
                    await self.publisher.publish(
                        conn,
                        merchant_id,
                        "payment_method.detached",
                        row["id"],
                        payment_method_view(row),
                    )
        if row is None:
            raise NotFound("No such payment method.", param="id")
        if not in_use:
            await self.vault.delete_token(merchant_id, row["token"])
        return payment_method_view(row)


def _detached() -> InvalidRequest:
    return InvalidRequest(
        "This payment method is detached; it can never be used again.",
        code="payment_method_detached",
        param="payment_method",
    )


def _is_token(value: str) -> bool:
    return _TOKEN_ID.fullmatch(value) is not None


def _response(view: PaymentView, request_id: str) -> StoredResponse:
    if view.status == "declined":
        declined = CardError(
            "The card was declined.",
            extra={"decline_code": view.decline_code or "generic_decline", "payment": view.id},
        )
        return StoredResponse(402, error_bytes(declined, request_id))
    if view.status == "failed":
        failed = ProcessorError(
            "The processor could not process the payment; nothing was authorized.",
            extra={"payment": view.id},
        )
        return StoredResponse(502, error_bytes(failed, request_id))
    status = 202 if view.status == "processing" else 201
    return StoredResponse(status, msgspec.json.encode(view))
