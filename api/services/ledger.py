"""The merchant's balance, and the reconciliation of the ledger against the payments table
(`tessera ledger check`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from api.storage.ledger import LedgerRepository


class Amount(msgspec.Struct):
    amount: int
    currency: str


class BalanceView(msgspec.Struct):
    available: list[Amount]
    pending: list[Amount]
    object: str = "balance"


class Mismatch(msgspec.Struct):
    merchant: str
    payment: str
    status: str
    field: str
    payments_table: int
    ledger: int


class LedgerReport(msgspec.Struct):
    payments_checked: int
    in_flight: int
    postings_unbalanced: int
    currencies_unbalanced: list[str]
    mismatches: list[Mismatch]

    @property
    def ok(self) -> bool:
        return not (self.postings_unbalanced or self.currencies_unbalanced or self.mismatches)


def expected_hold(row: Any) -> int:
    return int(row["amount_authorized"]) if row["status"] == "authorized" else 0


@dataclass
class LedgerService:
    pool: Any

    async def balance(self, merchant_id: str) -> BalanceView:
        async with self.pool.acquire() as conn:
            rows = await LedgerRepository(conn).balance(merchant_id)
        return BalanceView(
            available=[Amount(r["available"], r["currency"]) for r in rows],
            pending=[Amount(r["pending"], r["currency"]) for r in rows],
        )

    async def check(self) -> LedgerReport:
        """Every posting balances; every currency sums to zero; and for every payment with no
        operation in flight, the ledger's hold, capture and refunds equal the payment's."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            ledger = LedgerRepository(conn)
            unbalanced = await ledger.unbalanced_postings()
            totals = await ledger.totals_by_currency()
            rows = await ledger.payments_against_ledger()
        mismatches = []
        in_flight = 0
        for row in rows:
            if row["in_flight"]:
                in_flight += 1
                continue
            for field, table, booked in (
                ("amount_held", expected_hold(row), row["held"]),
                ("amount_captured", row["amount_captured"], row["captured"]),
                ("amount_refunded", row["amount_refunded"], row["refunded"]),
            ):
                if table != booked:
                    mismatches.append(
                        Mismatch(row["merchant_id"], row["id"], row["status"], field, table, booked)
                    )
        return LedgerReport(
            payments_checked=len(rows),
            in_flight=in_flight,
            postings_unbalanced=len(unbalanced),
            currencies_unbalanced=[t["currency"] for t in totals if t["total"] != 0],
            mismatches=mismatches[:100],
        )
