"""SQL for the ledger: postings (append-only), the merchant's balance, and the reconciliation
of the ledger against the payments table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.ledger import Posting


class LedgerRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def post(
        self,
        merchant_id: str,
        payment_id: str,
        postings: Iterable[Posting],
        settlement_delay_seconds: float,
    ) -> None:
        """All the postings of one change and their entries in one statement (one round trip),
        in the caller's transaction; the database checks at commit that each balances."""
        postings = list(postings)
        if not postings:
            return
        index, accounts, amounts, delays = entry_columns(postings, settlement_delay_seconds)
        await self.conn.execute(
            "WITH ids AS ("
            "  SELECT u.n, u.kind, u.currency, "
            "  nextval(pg_get_serial_sequence('ledger_postings', 'id')) AS id "
            "  FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS u(kind, currency, n)), "
            "p AS (INSERT INTO ledger_postings (id, merchant_id, payment_id, kind) "
            "  OVERRIDING SYSTEM VALUE SELECT id, $1, $2, kind FROM ids) "
            "INSERT INTO ledger_entries (posting_id, merchant_id, account, currency, amount, "
            "available_on) SELECT ids.id, $1, e.account, ids.currency, e.amount, "
            "now() + make_interval(secs => e.delay) "
            "FROM unnest($5::int[], $6::text[], $7::bigint[], $8::float8[]) "
            "AS e(n, account, amount, delay) JOIN ids ON ids.n = e.n",
            merchant_id,
            payment_id,
            [p.kind for p in postings],
            [p.currency for p in postings],
            index,
            accounts,
            amounts,
            delays,
        )

    async def balance(self, merchant_id: str) -> list[Any]:
        """Per currency, what is owed to the merchant: available now, and pending settlement."""
        rows = await self.conn.fetch(
            "SELECT currency, "
            "-coalesce(sum(amount) FILTER (WHERE available_on <= now()), 0)::bigint AS available, "
            "-coalesce(sum(amount) FILTER (WHERE available_on > now()), 0)::bigint AS pending "
            "FROM ledger_entries WHERE merchant_id = $1 AND account = 'merchant_balance' "
            "GROUP BY currency ORDER BY currency",
            merchant_id,
        )
        return list(rows)

    async def unbalanced_postings(self) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT merchant_id, posting_id, currency, sum(amount)::bigint AS total "
            "FROM ledger_entries GROUP BY merchant_id, posting_id, currency "
            "HAVING sum(amount) <> 0 ORDER BY merchant_id, posting_id LIMIT 100"
        )
        return list(rows)

    async def totals_by_currency(self) -> list[Any]:
        rows = await self.conn.fetch(
            "SELECT currency, sum(amount)::bigint AS total, count(*) AS entries "
            "FROM ledger_entries GROUP BY currency ORDER BY currency"
        )
        return list(rows)

    async def payments_against_ledger(self) -> list[Any]:
        """Every payment with what the ledger says of it, and whether an operation on it is
        still in flight (its figures may then differ until it settles)."""
        rows = await self.conn.fetch(
            "WITH l AS ("
            "  SELECT lp.merchant_id, lp.payment_id, "
            "  coalesce(sum(e.amount) FILTER (WHERE e.account = 'authorization_holds'), 0) "
            "    AS held, "
            "  coalesce(sum(e.amount) FILTER (WHERE e.account = 'psp_clearing' "
            "    AND lp.kind = 'capture'), 0) AS captured, "
            "  coalesce(sum(e.amount) FILTER (WHERE e.account = 'merchant_balance' "
            "    AND lp.kind IN ('refund', 'refund_pending', 'refund_reversal')), 0) AS refunded "
            "  FROM ledger_postings lp JOIN ledger_entries e "
            "    ON e.merchant_id = lp.merchant_id AND e.posting_id = lp.id "
            "  GROUP BY lp.merchant_id, lp.payment_id) "
            "SELECT p.merchant_id, p.id, p.status, p.amount_authorized, p.amount_captured, "
            "p.amount_refunded, coalesce(l.held, 0)::bigint AS held, "
            "coalesce(l.captured, 0)::bigint AS captured, "
            "coalesce(l.refunded, 0)::bigint AS refunded, "
            "(p.operation_lock_until > now() "
            " OR EXISTS (SELECT 1 FROM processor_operations o WHERE o.merchant_id = p.merchant_id "
            "   AND o.payment_id = p.id AND o.status = 'pending') "
            " OR EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.merchant_id = p.merchant_id "
            "   AND k.payment_id = p.id AND k.recovery_point = 'operation_started') "
            " OR EXISTS (SELECT 1 FROM refunds r WHERE r.merchant_id = p.merchant_id "
            "   AND r.payment_id = p.id AND r.status = 'pending' "
            "   AND NOT EXISTS (SELECT 1 FROM processor_operations o2 "
            "     WHERE o2.merchant_id = r.merchant_id AND o2.refund_id = r.id))"
            ") AS in_flight "
            "FROM payments p LEFT JOIN l ON l.merchant_id = p.merchant_id AND l.payment_id = p.id "
            "ORDER BY p.merchant_id, p.id"
        )
        return list(rows)


def entry_columns(
    postings: list[Posting], settlement_delay_seconds: float
) -> tuple[list[int], list[str], list[int], list[float]]:
    """The entries as the columns `post` unnests: posting number (from 1), account, amount,
    and the delay before the amount is available."""
    index, accounts, amounts, delays = [], [], [], []
    for number, posting in enumerate(postings, start=1):
        for entry in posting.entries:
            index.append(number)
            accounts.append(entry.account)
            amounts.append(entry.amount)
            delays.append(settlement_delay_seconds if entry.settles_later else 0.0)
    return index, accounts, amounts, delays
