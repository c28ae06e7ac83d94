from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from core.errors import InternalError, InvalidRequest, StateConflict
from core.money import parse_currency
from core.payments import (
    ALLOWED_TRANSITIONS,
    AuthorizationOutcome,
    PaymentState,
    PaymentStatus,
    authorize_result,
    can_transition,
    cancel,
    capture,
    check_invariants,
    is_final,
    new_payment,
    refund,
    retry_result,
    reverse_refund,
)


def unchecked(value: object) -> Any:
    """A value of the wrong type, on purpose: the runtime checks must refuse it."""
    return value


EUR = parse_currency("EUR")
S = PaymentStatus
APPROVED = AuthorizationOutcome.APPROVED


def authorized(amount: int = 1000) -> PaymentState:
    return authorize_result(new_payment(amount, EUR), APPROVED)


def captured(amount: int = 1000, capture_amount: int | None = None) -> PaymentState:
    return capture(authorized(amount), capture_amount)


def test_a_new_payment_is_processing_with_nothing_authorized() -> None:
    state = new_payment(1000, EUR)
    assert state == PaymentState(S.PROCESSING, EUR, 1000)
    assert state.amount_capturable == 0
    assert state.amount_refundable == 0


@pytest.mark.parametrize("amount", [0, -5])
def test_a_new_payment_needs_a_positive_amount(amount: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        new_payment(amount, EUR)
    assert caught.value.code == "amount_too_small"


def test_an_approved_authorization_authorizes_the_full_amount() -> None:
    state = authorized(1000)
    assert state.status is S.AUTHORIZED
    assert state.amount_authorized == 1000
    assert state.amount_capturable == 1000


@pytest.mark.parametrize(
    ("outcome", "status"),
    [(AuthorizationOutcome.DECLINED, S.DECLINED), (AuthorizationOutcome.FAILED, S.FAILED)],
)
def test_a_declined_or_failed_authorization_authorizes_nothing(
    outcome: AuthorizationOutcome, status: PaymentStatus
) -> None:
    state = authorize_result(new_payment(1000, EUR), outcome)
    assert state.status is status
    assert state.amount_authorized == 0
    # Failed is final; declined is not: a recovery retry may still move it on.
    assert is_final(state.status) is (status is S.FAILED)


def test_an_authorization_result_is_recorded_only_once() -> None:
    with pytest.raises(StateConflict) as caught:
        authorize_result(authorized(), AuthorizationOutcome.DECLINED)
    assert caught.value.code == "payment_not_processing"
    assert caught.value.extra == {"status": "authorized"}


def test_a_full_capture_captures_the_authorized_amount() -> None:
    state = capture(authorized(1000))
    assert state.status is S.CAPTURED
    assert state.amount_captured == 1000
    assert state.amount_refundable == 1000
    assert state.amount_released == 0


def test_a_partial_capture_releases_the_rest() -> None:
    state = capture(authorized(1000), 600)
    assert state.amount_captured == 600
    assert state.amount_authorized == 1000
    assert state.amount_released == 400
    assert state.amount_refundable == 600


def test_capture_cannot_exceed_the_authorized_amount() -> None:
    with pytest.raises(StateConflict) as caught:
        capture(authorized(1000), 1001)
    assert caught.value.code == "amount_exceeds_authorized"
    assert caught.value.param == "amount"


@pytest.mark.parametrize(("amount", "code"), [(0, "amount_too_small"), (-1, "amount_too_small")])
def test_capture_needs_a_positive_amount(amount: int, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        capture(authorized(), amount)
    assert caught.value.code == code
    assert caught.value.param == "amount"


def test_capture_refuses_a_non_int_amount() -> None:
    with pytest.raises(InvalidRequest) as caught:
        capture(authorized(), unchecked(10.0))
    assert caught.value.code == "amount_invalid"
    with pytest.raises(InvalidRequest):
        capture(authorized(), True)


def test_a_payment_is_captured_only_once() -> None:
    state = captured(1000, 400)
    with pytest.raises(StateConflict) as caught:
        capture(state, 100)
    assert caught.value.code == "payment_not_capturable"


@pytest.mark.parametrize(
    "state",
    [
        new_payment(1000, EUR),
        authorize_result(new_payment(1000, EUR), AuthorizationOutcome.DECLINED),
        authorize_result(new_payment(1000, EUR), AuthorizationOutcome.FAILED),
        cancel(authorize_result(new_payment(1000, EUR), APPROVED)),
    ],
    ids=lambda state: state.status.value,
)
def test_only_an_authorized_payment_can_be_captured_or_canceled(state: PaymentState) -> None:
    with pytest.raises(StateConflict) as caught:
        capture(state)
    assert caught.value.code == "payment_not_capturable"
    with pytest.raises(StateConflict) as caught:
        cancel(state)
    assert caught.value.code == "payment_not_cancelable"


def test_a_state_error_is_reported_before_an_amount_error() -> None:
    with pytest.raises(StateConflict) as caught:
        capture(new_payment(1000, EUR), -1)
    assert caught.value.code == "payment_not_capturable"


def test_cancel_releases_the_whole_authorization() -> None:
    state = cancel(authorized(1000))
    assert state.status is S.CANCELED
    assert state.amount_captured == 0
    assert state.amount_released == 1000
    assert is_final(state.status)


def test_a_captured_payment_cannot_be_canceled() -> None:
    with pytest.raises(StateConflict) as caught:
        cancel(captured())
    assert caught.value.code == "payment_not_cancelable"


def test_refund_defaults_to_everything_left() -> None:
    state = refund(captured(1000, 800))
    assert state.status is S.REFUNDED
    assert state.amount_refunded == 800
    assert state.amount_refundable == 0


def test_partial_refunds_add_up_to_a_full_refund() -> None:
    state = refund(captured(1000), 300)
    assert state.status is S.PARTIALLY_REFUNDED
    assert state.amount_refundable == 700
    state = refund(state, 300)
    assert state.status is S.PARTIALLY_REFUNDED
    assert state.amount_refunded == 600
    state = refund(state)
    assert state.status is S.REFUNDED
    assert state.amount_refunded == 1000


def test_refund_cannot_exceed_capture() -> None:
    with pytest.raises(StateConflict) as caught:
        refund(captured(1000, 500), 501)
    assert caught.value.code == "amount_exceeds_refundable"
    assert caught.value.param == "amount"
    partially = refund(captured(1000, 500), 200)
    with pytest.raises(StateConflict) as caught:
        refund(partially, 301)
    assert caught.value.code == "amount_exceeds_refundable"


def test_a_fully_refunded_payment_cannot_be_refunded_again() -> None:
    with pytest.raises(StateConflict) as caught:
        refund(refund(captured()))
    assert caught.value.code == "payment_not_refundable"
    assert caught.value.extra == {"status": "refunded"}


@pytest.mark.parametrize(
    "state",
    [new_payment(1000, EUR), authorize_result(new_payment(1000, EUR), APPROVED)],
    ids=lambda state: state.status.value,
)
def test_an_uncaptured_payment_cannot_be_refunded(state: PaymentState) -> None:
    with pytest.raises(StateConflict) as caught:
        refund(state, 100)
    assert caught.value.code == "payment_not_refundable"


def test_reversing_a_failed_refund_restores_the_amounts_and_the_status() -> None:
    full = refund(captured(1000))
    partial = reverse_refund(full, 400)
    assert partial.status is S.PARTIALLY_REFUNDED
    assert partial.amount_refunded == 600
    restored = reverse_refund(partial, 600)
    assert restored.status is S.CAPTURED
    assert restored.amount_refunded == 0
    assert restored == captured(1000)


def test_a_refund_reversal_cannot_exceed_what_was_refunded() -> None:
    state = refund(captured(1000), 300)
    with pytest.raises(StateConflict) as caught:
        reverse_refund(state, 301)
    assert caught.value.code == "amount_exceeds_refunded"
    assert caught.value.param == "amount"


def test_nothing_can_be_reversed_before_a_refund() -> None:
    with pytest.raises(StateConflict) as caught:
        reverse_refund(captured(), 1)
    assert caught.value.code == "payment_not_refunded"


def test_operations_never_modify_the_state_they_are_given() -> None:
    state = captured(1000)
    snapshot = replace(state)
    refund(state, 100)
    with pytest.raises(StateConflict):
        refund(state, 5000)
    assert state == snapshot


def test_the_transition_table_covers_every_status() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)
    assert can_transition(S.PROCESSING, S.AUTHORIZED)
    assert can_transition(S.AUTHORIZED, S.CAPTURED)
    assert can_transition(S.REFUNDED, S.CAPTURED)
    assert not can_transition(S.CAPTURED, S.AUTHORIZED)
    assert not can_transition(S.CANCELED, S.CAPTURED)
    assert not can_transition(S.AUTHORIZED, S.REFUNDED)


def test_final_statuses_are_the_ones_nothing_leaves() -> None:
    assert {s for s in S if is_final(s)} == {S.CANCELED, S.FAILED}


def test_a_declined_payment_moves_on_only_through_a_retry() -> None:
    declined = authorize_result(new_payment(500, EUR), AuthorizationOutcome.DECLINED)
    with pytest.raises(StateConflict):
        authorize_result(declined, AuthorizationOutcome.APPROVED)
    for outcome in (AuthorizationOutcome.DECLINED, AuthorizationOutcome.FAILED):
        assert retry_result(declined, outcome) == declined
    recovered = retry_result(declined, AuthorizationOutcome.APPROVED)
    assert (recovered.status, recovered.amount_authorized) == (S.AUTHORIZED, 500)
    assert capture(recovered).amount_captured == 500
    with pytest.raises(StateConflict) as refused:
        retry_result(recovered, AuthorizationOutcome.APPROVED)
    assert refused.value.code == "payment_not_retryable"
    with pytest.raises(StateConflict):
        retry_result(new_payment(500, EUR), AuthorizationOutcome.APPROVED)


def test_statuses_are_their_api_strings() -> None:
    assert [s.value for s in S] == [
        "processing",
        "authorized",
        "captured",
        "partially_refunded",
        "refunded",
        "canceled",
        "declined",
        "failed",
    ]


@pytest.mark.parametrize(
    "state",
    [
        PaymentState(S.PROCESSING, EUR, 0),
        PaymentState(S.PROCESSING, EUR, 1000, amount_authorized=1000),
        PaymentState(S.AUTHORIZED, EUR, 1000),
        PaymentState(S.AUTHORIZED, EUR, 1000, amount_authorized=1001),
        PaymentState(S.AUTHORIZED, EUR, 1000, 1000, amount_captured=10),
        PaymentState(S.CAPTURED, EUR, 1000, 1000, 0),
        PaymentState(S.CAPTURED, EUR, 1000, 500, 600),
        PaymentState(S.CAPTURED, EUR, 1000, 1000, 1000, amount_refunded=10),
        PaymentState(S.PARTIALLY_REFUNDED, EUR, 1000, 1000, 1000, 1000),
        PaymentState(S.PARTIALLY_REFUNDED, EUR, 1000, 1000, 1000, 0),
        PaymentState(S.REFUNDED, EUR, 1000, 1000, 1000, 999),
        PaymentState(S.REFUNDED, EUR, 1000, 1000, 500, 600),
        PaymentState(S.CANCELED, EUR, 1000, 1000, 1000),
        PaymentState(S.DECLINED, EUR, 1000, 1000),
        PaymentState(S.CAPTURED, EUR, 1000, 1000, -1),
        PaymentState(S.CAPTURED, EUR, 1000, 1000, 1000, -1),
        PaymentState(S.CAPTURED, EUR, 1000, 1000, unchecked(1000.0)),
        PaymentState(S.CAPTURED, unchecked("EUR"), 1000, 1000, 1000),
    ],
)
def test_check_invariants_rejects_impossible_states(state: PaymentState) -> None:
    with pytest.raises(InternalError) as caught:
        check_invariants(state)
    assert caught.value.code == "payment_invariant_violated"


def test_a_status_read_back_as_a_string_becomes_the_enum() -> None:
    state = PaymentState(unchecked("captured"), EUR, 1000, 1000, 1000)
    assert state.status is S.CAPTURED
    assert refund(state, 100).status is S.PARTIALLY_REFUNDED
    with pytest.raises(ValueError, match="settled"):
        PaymentState(unchecked("settled"), EUR, 1000)


def test_check_invariants_accepts_every_reachable_state() -> None:
    for state in (
        new_payment(1, EUR),
        authorized(),
        captured(),
        captured(1000, 1),
        cancel(authorized()),
        refund(captured(), 1),
        refund(captured()),
    ):
        check_invariants(state)
