"""The ledger's postings: each balances in its currency, whatever the amounts."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import ledger

amounts = st.integers(min_value=1, max_value=10**12)


def totals(postings: list[ledger.Posting]) -> Counter[str]:
    by_account: Counter[str] = Counter()
    for posting in postings:
        for entry in posting.entries:
            by_account[entry.account] += entry.amount
    return by_account


@given(amount=amounts, fee=st.integers(min_value=0, max_value=10**6))
def test_every_posting_balances(amount: int, fee: int) -> None:
    for postings in (
        ledger.authorization("EUR", amount),
        ledger.release("EUR", amount),
        ledger.capture("EUR", amount, amount, fee),
        ledger.authorization_and_capture("EUR", amount, fee),
        ledger.refund("EUR", amount),
        ledger.refund_accepted("EUR", amount),
        ledger.refund_confirmed("EUR", amount),
        ledger.refund_refused("EUR", amount),
    ):
        for posting in postings:
            assert sum(e.amount for e in posting.entries) == 0
            assert posting.currency == "EUR"


@given(authorized=amounts, data=st.data())
def test_a_partial_capture_releases_the_whole_hold(authorized: int, data: st.DataObject) -> None:
    captured = data.draw(st.integers(min_value=1, max_value=authorized))
    book = totals(
        ledger.authorization("EUR", authorized) + ledger.capture("EUR", authorized, captured, 0)
    )
    assert book["authorization_holds"] == 0
    assert book["psp_clearing"] == captured
    assert book["merchant_balance"] == -captured


@given(amount=amounts)
def test_an_accepted_refund_then_refused_leaves_the_merchant_whole(amount: int) -> None:
    book = totals(ledger.refund_accepted("EUR", amount) + ledger.refund_refused("EUR", amount))
    assert all(total == 0 for total in book.values())


@given(amount=amounts)
def test_an_accepted_then_confirmed_refund_equals_an_immediate_one(amount: int) -> None:
    later = totals(ledger.refund_accepted("EUR", amount) + ledger.refund_confirmed("EUR", amount))
    at_once = totals(ledger.refund("EUR", amount))
    assert +later == +at_once


def test_the_fee_is_charged_to_the_merchant_and_only_when_there_is_one() -> None:
    book = totals(ledger.capture("EUR", 1000, 1000, 40))
    assert book["merchant_balance"] == -1000 + 40
    assert book["fees"] == -40
    assert [p.kind for p in ledger.capture("EUR", 1000, 1000, 0)] == ["release", "capture"]


def test_a_posting_that_does_not_balance_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="does not balance"):
        ledger.Posting("x", "EUR", (ledger.Entry("psp_clearing", 5), ledger.Entry("fees", -4)))
    with pytest.raises(ValueError, match="does not balance"):
        ledger.Posting("x", "EUR", ())
    with pytest.raises(ValueError, match="zero entry"):
        ledger.Posting("x", "EUR", (ledger.Entry("psp_clearing", 0), ledger.Entry("fees", 0)))
