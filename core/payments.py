"""The payment state machine, as pure functions from one immutable state to the next.

Storage, locking and the processor call live elsewhere; this module only decides whether an
operation is allowed and what the amounts become. A refused operation raises `StateConflict`
(or `InvalidRequest` for a malformed amount) and, the state being immutable, leaves nothing
half-done.

    processing                    --approved-->        authorized
    processing                    --declined-->        declined
    processing                    --failed-->          failed
    declined                      --retry_approved-->  authorized   (a recovery retry only)
    authorized                    --capture-->         captured
    authorized                    --cancel-->          canceled
    captured, partially_refunded  --refund-->          partially_refunded or refunded
    partially_refunded, refunded  --reverse_refund-->  partially_refunded or captured

`refunded` is not final: a refund can still fail at the processor (`reverse_refund`). Nor is
`declined`: a declined renewal under recovery (docs/subscriptions.md) may be retried, and only
`retry_result` — what a retry's approval makes — moves it on; `authorize_result` never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from core.errors import InternalError, InvalidRequest, StateConflict
from core.money import Currency

__all__ = [
    "ALLOWED_TRANSITIONS",
    "AuthorizationOutcome",
    "PaymentState",
    "PaymentStatus",
    "authorize_result",
    "can_transition",
    "cancel",
    "capture",
    "check_invariants",
    "is_final",
    "new_payment",
    "refund",
    "retry_result",
    "reverse_refund",
]


class PaymentStatus(StrEnum):
    PROCESSING = "processing"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    CANCELED = "canceled"
    DECLINED = "declined"
    FAILED = "failed"


class AuthorizationOutcome(StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"
    FAILED = "failed"


_S = PaymentStatus

ALLOWED_TRANSITIONS: Final[Mapping[PaymentStatus, frozenset[PaymentStatus]]] = MappingProxyType(
    {
        _S.PROCESSING: frozenset({_S.AUTHORIZED, _S.DECLINED, _S.FAILED}),
        _S.AUTHORIZED: frozenset({_S.CAPTURED, _S.CANCELED}),
        _S.CAPTURED: frozenset({_S.PARTIALLY_REFUNDED, _S.REFUNDED}),
        _S.PARTIALLY_REFUNDED: frozenset({_S.PARTIALLY_REFUNDED, _S.REFUNDED, _S.CAPTURED}),
        _S.REFUNDED: frozenset({_S.PARTIALLY_REFUNDED, _S.CAPTURED}),
        _S.CANCELED: frozenset(),
        _S.DECLINED: frozenset({_S.AUTHORIZED}),
        _S.FAILED: frozenset(),
    }
)

_REFUNDABLE: Final = frozenset({_S.CAPTURED, _S.PARTIALLY_REFUNDED})
_REVERSIBLE: Final = frozenset({_S.PARTIALLY_REFUNDED, _S.REFUNDED})


def can_transition(current: PaymentStatus, new: PaymentStatus) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


def is_final(status: PaymentStatus) -> bool:
    """Final means nothing can change the payment any more (so `refunded` is not final)."""
    return not ALLOWED_TRANSITIONS[status]


@dataclass(frozen=True, slots=True)
class PaymentState:
    """The amounts of a payment, all in minor units of `currency`.

    `amount_authorized` and `amount_captured` are history and never decrease: after a partial
    capture the difference is released, after a cancel the whole authorization is.
    """

    status: PaymentStatus
    currency: Currency
    amount: int
    amount_authorized: int = 0
    amount_captured: int = 0
    amount_refunded: int = 0

    def __post_init__(self) -> None:
        # Storage hands back plain strings; an unknown one fails here, loudly.
        object.__setattr__(self, "status", PaymentStatus(self.status))

    @property
    def amount_capturable(self) -> int:
        return self.amount_authorized if self.status is _S.AUTHORIZED else 0

    @property
    def amount_refundable(self) -> int:
        return self.amount_captured - self.amount_refunded if self.status in _REFUNDABLE else 0

    @property
    def amount_released(self) -> int:
        """Authorized but never captured: returned to the cardholder's available balance."""
        if self.status is _S.CANCELED:
            return self.amount_authorized
        if self.status in _REFUNDABLE or self.status is _S.REFUNDED:
            return self.amount_authorized - self.amount_captured
        return 0


def new_payment(amount: int, currency: Currency) -> PaymentState:
    """A payment starts in `processing`, before the processor has answered."""
    return _checked(PaymentState(_S.PROCESSING, currency, _positive(amount)))


def authorize_result(state: PaymentState, outcome: AuthorizationOutcome) -> PaymentState:
    """Record the processor's answer to the authorization; the full amount is authorized."""
    if state.status is not _S.PROCESSING:
        raise _conflict(state, "payment_not_processing", "has already been authorized or closed")
    if outcome is AuthorizationOutcome.APPROVED:
        return _move(state, replace(state, status=_S.AUTHORIZED, amount_authorized=state.amount))
    if outcome is AuthorizationOutcome.DECLINED:
        return _move(state, replace(state, status=_S.DECLINED))
    return _move(state, replace(state, status=_S.FAILED))


def retry_result(state: PaymentState, outcome: AuthorizationOutcome) -> PaymentState:
    """Record the answer to a recovery retry of a declined payment. Approved: the full amount
    is authorized (and the caller captures it if the payment captures). Declined or failed: the
    payment stays `declined` — the retry is history on its attempts, not a new status."""
    if state.status is not _S.DECLINED:
        raise _conflict(state, "payment_not_retryable", "can only be retried when declined")
    if outcome is AuthorizationOutcome.APPROVED:
        return _move(state, replace(state, status=_S.AUTHORIZED, amount_authorized=state.amount))
    return _checked(state)


def capture(state: PaymentState, amount: int | None = None) -> PaymentState:
    """Capture once, all or part of the authorization; the rest is released, not kept."""
    if state.status is not _S.AUTHORIZED:
        raise _conflict(state, "payment_not_capturable", "can only be captured when authorized")
    to_capture = state.amount_authorized if amount is None else _positive(amount)
    if to_capture > state.amount_authorized:
        raise StateConflict(
            f"amount must not exceed the authorized amount ({state.amount_authorized})",
            code="amount_exceeds_authorized",
            param="amount",
        )
    return _move(state, replace(state, status=_S.CAPTURED, amount_captured=to_capture))


def cancel(state: PaymentState) -> PaymentState:
    """Release an authorization that will not be captured."""
    if state.status is not _S.AUTHORIZED:
        raise _conflict(state, "payment_not_cancelable", "can only be canceled when authorized")
    return _move(state, replace(state, status=_S.CANCELED))


def refund(state: PaymentState, amount: int | None = None) -> PaymentState:
    """Refund all that remains (the default) or part of it; refunds never exceed the capture."""
    if state.status not in _REFUNDABLE:
        raise _conflict(
            state,
            "payment_not_refundable",
            "can only be refunded when captured and not fully refunded",
        )
    remaining = state.amount_captured - state.amount_refunded
    to_refund = remaining if amount is None else _positive(amount)
    if to_refund > remaining:
        raise StateConflict(
            f"amount must not exceed the amount left to refund ({remaining})",
            code="amount_exceeds_refundable",
            param="amount",
        )
    return _with_refunded(state, state.amount_refunded + to_refund)


def reverse_refund(state: PaymentState, amount: int) -> PaymentState:
    """Undo a refund the processor reported as failed: the money stays with the merchant."""
    if state.status not in _REVERSIBLE:
        raise _conflict(state, "payment_not_refunded", "has no refund to reverse")
    to_reverse = _positive(amount)
    if to_reverse > state.amount_refunded:
        raise StateConflict(
            f"amount must not exceed the amount refunded ({state.amount_refunded})",
            code="amount_exceeds_refunded",
            param="amount",
        )
    return _with_refunded(state, state.amount_refunded - to_reverse)


def check_invariants(state: PaymentState) -> None:
    """Raise `InternalError` if the state is impossible: a bug here or corrupted storage."""
    problem = _invariant_problem(state)
    if problem is not None:
        raise InternalError(
            f"payment state violates an invariant: {problem}", code="payment_invariant_violated"
        )


def _invariant_problem(state: PaymentState) -> str | None:
    amounts = (
        state.amount,
        state.amount_authorized,
        state.amount_captured,
        state.amount_refunded,
    )
    if not isinstance(state.status, PaymentStatus):
        return "unknown status"
    if not isinstance(state.currency, Currency):
        return "currency is not a Currency"
    if any(not isinstance(a, int) or isinstance(a, bool) for a in amounts):
        return "amounts must be ints"
    if state.amount <= 0:
        return "amount must be positive"
    if not 0 <= state.amount_captured <= state.amount_authorized <= state.amount:
        return "0 <= captured <= authorized <= amount does not hold"
    if not 0 <= state.amount_refunded <= state.amount_captured:
        return "0 <= refunded <= captured does not hold"
    authorized, captured, refunded = amounts[1:]
    expected = {
        _S.PROCESSING: authorized == 0,
        _S.DECLINED: authorized == 0,
        _S.FAILED: authorized == 0,
        _S.AUTHORIZED: authorized > 0 and captured == 0,
        _S.CANCELED: authorized > 0 and captured == 0,
        _S.CAPTURED: captured > 0 and refunded == 0,
        _S.PARTIALLY_REFUNDED: 0 < refunded < captured,
        _S.REFUNDED: captured > 0 and refunded == captured,
    }
    if not expected[state.status]:
        return f"amounts do not match the status {state.status.value}"
    return None


def _with_refunded(state: PaymentState, refunded: int) -> PaymentState:
    if refunded == 0:
        status = _S.CAPTURED
    elif refunded == state.amount_captured:
        status = _S.REFUNDED
    else:
        status = _S.PARTIALLY_REFUNDED
    return _move(state, replace(state, status=status, amount_refunded=refunded))


def _move(state: PaymentState, new: PaymentState) -> PaymentState:
    if not can_transition(state.status, new.status):
        raise InternalError(
            f"transition {state.status.value} -> {new.status.value} is not allowed",
            code="payment_invariant_violated",
        )
    return _checked(new)


def _checked(state: PaymentState) -> PaymentState:
    check_invariants(state)
    return state


def _positive(amount: object) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRequest(
            "amount must be an integer in minor units", code="amount_invalid", param="amount"
        )
    if amount <= 0:
        raise InvalidRequest("amount must be at least 1", code="amount_too_small", param="amount")
    return amount


def _conflict(state: PaymentState, code: str, reason: str) -> StateConflict:
    return StateConflict(
        f"this payment is {state.status.value}; it {reason}",
        code=code,
        param=None,
        extra={"status": state.status.value},
    )
