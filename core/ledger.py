"""The double-entry ledger's postings: which accounts each movement of money touches.

Amounts are signed minor units, debit positive; every posting sums to zero in its currency (the
database refuses one that does not). Accounts, per merchant and currency:

- `authorization_holds` / `merchant_authorized`: money held on customers' cards for the merchant
  (memo accounts: an authorization adds, a capture or a release takes the hold away);
- `psp_clearing`: what the processors owe us (captures in, refunds and fees out);
- `merchant_balance`: what we owe the merchant (credit normal: captures credit it, fees and
  refunds debit it);
- `fees`: processing fees charged to the merchant;
- `customer_refunds`: refunds accepted by a processor but not yet confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    account: str
    amount: int
    #: Whether this entry waits for the settlement delay before it is available (captures).
    settles_later: bool = False


@dataclass(frozen=True, slots=True)
class Posting:
    kind: str
    currency: str
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        if not self.entries or sum(e.amount for e in self.entries) != 0:
            raise ValueError(f"the {self.kind} posting does not balance")
        if any(e.amount == 0 for e in self.entries):
            raise ValueError(f"the {self.kind} posting has a zero entry")


def _pair(kind: str, currency: str, debit: str, credit: str, amount: int) -> Posting:
    return Posting(kind, currency, (Entry(debit, amount), Entry(credit, -amount)))


def authorization(currency: str, amount: int) -> list[Posting]:
    return [_pair("authorization", currency, "authorization_holds", "merchant_authorized", amount)]


def release(currency: str, amount: int) -> list[Posting]:
    """The hold goes away: a cancel, an expiry, or the capture that replaces it."""
    return [_pair("release", currency, "merchant_authorized", "authorization_holds", amount)]


def capture(currency: str, authorized: int, captured: int, fee: int) -> list[Posting]:
    """The hold is released whole (the uncaptured rest goes back to the customer), the captured
    amount is owed by the processor and to the merchant, and the fee is charged."""
    postings = release(currency, authorized)
    postings.append(
        Posting(
            "capture",
            currency,
            (
                Entry("psp_clearing", captured, settles_later=True),
                Entry("merchant_balance", -captured, settles_later=True),
            ),
        )
    )
    if fee > 0:
        postings.append(
            Posting(
                "fee",
                currency,
                (
                    Entry("merchant_balance", fee, settles_later=True),
                    Entry("fees", -fee, settles_later=True),
                ),
            )
        )
    return postings


def authorization_and_capture(currency: str, amount: int, fee: int) -> list[Posting]:
    return authorization(currency, amount) + capture(currency, amount, amount, fee)


def refund_accepted(currency: str, amount: int) -> list[Posting]:
    """A refund the processor accepted and confirms later."""
    return [_pair("refund_pending", currency, "merchant_balance", "customer_refunds", amount)]


def refund_confirmed(currency: str, amount: int) -> list[Posting]:
    """An accepted refund confirmed by the processor."""
    return [_pair("refund", currency, "customer_refunds", "psp_clearing", amount)]


def refund_refused(currency: str, amount: int) -> list[Posting]:
    """An accepted refund the processor then refused: the reversal of `refund_accepted`."""
    return [_pair("refund_reversal", currency, "customer_refunds", "merchant_balance", amount)]


def refund(currency: str, amount: int) -> list[Posting]:
    """A refund the processor did at once."""
    return [_pair("refund", currency, "merchant_balance", "psp_clearing", amount)]
