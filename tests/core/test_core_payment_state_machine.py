"""Random sequences of operations against the payment state machine, checked against a model."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from core.errors import InvalidRequest, TesseraError
from core.money import CURRENCIES, Currency
from core.payments import (
    ALLOWED_TRANSITIONS,
    AuthorizationOutcome,
    PaymentState,
    PaymentStatus,
    authorize_result,
    cancel,
    capture,
    check_invariants,
    is_final,
    new_payment,
    refund,
    retry_result,
    reverse_refund,
)

S = PaymentStatus

# Mostly approvals, so that runs get past the authorization.
outcomes = st.sampled_from([*[AuthorizationOutcome.APPROVED] * 4, *AuthorizationOutcome])


def amount_near(limit: int) -> st.SearchStrategy[int | None]:
    """None (the default amount), a valid amount, or one just around the edges."""
    return st.one_of(
        st.none(),
        st.integers(min_value=1, max_value=max(limit, 1)),
        st.integers(min_value=-2, max_value=limit + 3),
        st.sampled_from([limit, limit + 1]),
    )


some_currencies = st.sampled_from([CURRENCIES["EUR"], CURRENCIES["JPY"], CURRENCIES["KWD"]])


class PaymentMachine(RuleBasedStateMachine):
    """Applies random operations; a refused one must leave the state as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.state: PaymentState | None = None
        self.captured = 0
        self.refunds = 0
        self.reversals = 0

    @initialize(
        amount=st.integers(min_value=1, max_value=1000),
        currency=some_currencies,
    )
    def start(self, amount: int, currency: Currency) -> None:
        self.state = new_payment(amount, currency)

    @property
    def current(self) -> PaymentState:
        assert self.state is not None
        return self.state

    def apply(self, operation: Callable[[PaymentState], PaymentState]) -> PaymentState | None:
        before = self.current
        snapshot = (
            before.status,
            before.amount,
            before.amount_authorized,
            before.amount_captured,
            before.amount_refunded,
        )
        refusal: TesseraError | None = None
        try:
            after = operation(before)
        except TesseraError as error:
            refusal = error
        if refusal is not None:
            assert isinstance(refusal, InvalidRequest), "a refusal is never an internal error"
            assert self.current is before
            assert snapshot == (
                before.status,
                before.amount,
                before.amount_authorized,
                before.amount_captured,
                before.amount_refunded,
            )
            return None
        # A retry that is declined again leaves the payment as it was (no transition).
        assert after.status in ALLOWED_TRANSITIONS[before.status] or after == before
        assert after.currency == before.currency
        assert after.amount == before.amount
        self.state = after
        return after

    @rule(outcome=outcomes)
    def do_authorize(self, outcome: AuthorizationOutcome) -> None:
        was = self.current.status
        after = self.apply(lambda s: authorize_result(s, outcome))
        assert (after is not None) == (was is S.PROCESSING)

    @rule(outcome=outcomes)
    def do_retry(self, outcome: AuthorizationOutcome) -> None:
        was = self.current
        after = self.apply(lambda s: retry_result(s, outcome))
        assert (after is not None) == (was.status is S.DECLINED)
        if after is not None and outcome is not AuthorizationOutcome.APPROVED:
            assert after == was

    @rule(data=st.data())
    def do_capture(self, data: st.DataObject) -> None:
        before = self.current
        amount = data.draw(amount_near(before.amount_authorized or before.amount))
        after = self.apply(lambda s: capture(s, amount))
        expected_ok = before.status is S.AUTHORIZED and (
            amount is None or 0 < amount <= before.amount_authorized
        )
        assert (after is not None) == expected_ok
        if after is not None:
            self.captured = after.amount_captured
            assert after.amount_captured == (amount or before.amount_authorized)

    @rule()
    def do_cancel(self) -> None:
        was = self.current.status
        after = self.apply(cancel)
        assert (after is not None) == (was is S.AUTHORIZED)

    @rule(data=st.data())
    def do_refund(self, data: st.DataObject) -> None:
        before = self.current
        amount = data.draw(amount_near(before.amount_refundable or before.amount))
        after = self.apply(lambda s: refund(s, amount))
        refundable = before.status in {S.CAPTURED, S.PARTIALLY_REFUNDED}
        left = before.amount_captured - before.amount_refunded
        assert (after is not None) == (refundable and (amount is None or 0 < amount <= left))
        if after is not None:
            self.refunds += amount if amount is not None else left

    @rule(data=st.data())
    def do_reverse_refund(self, data: st.DataObject) -> None:
        before = self.current
        amount = data.draw(amount_near(before.amount_refunded or before.amount))
        if amount is None:
            amount = before.amount_refunded
        after = self.apply(lambda s: reverse_refund(s, amount))
        reversible = before.status in {S.PARTIALLY_REFUNDED, S.REFUNDED}
        assert (after is not None) == (reversible and 0 < amount <= before.amount_refunded)
        if after is not None:
            self.reversals += amount

    @invariant()
    def invariants_hold(self) -> None:
        if self.state is None:
            return
        state = self.state
        check_invariants(state)
        assert 0 <= state.amount_captured <= state.amount_authorized <= state.amount
        assert 0 <= state.amount_refunded <= state.amount_captured
        assert state.amount_captured == self.captured
        assert state.amount_refunded == self.refunds - self.reversals
        if state.status is S.REFUNDED:
            assert state.amount_refunded == state.amount_captured
        if is_final(state.status):
            assert state.amount_captured == 0


PaymentMachine.TestCase.settings = settings(
    database=None,
    deadline=None,
    max_examples=300,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_operations_keep_the_payment_invariants = PaymentMachine.TestCase
