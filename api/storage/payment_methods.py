"""SQL for payment methods: stored credentials made by an approved setup payment."""

from __future__ import annotations

from typing import Any

from core.ids import new_id


class PaymentMethodRepository:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def create_from_setup(
        self, merchant_id: str, payment: Any, network_transaction_id: str
    ) -> tuple[Any, Any]:
        """The setup payment's payment method, written with the payment's link to it (one
        transaction: the caller's). Returns the payment's new row and the payment method's."""
        payment_method = new_id("pm")
        method = await self.conn.fetchrow(
            "INSERT INTO payment_methods (merchant_id, id, token, card_brand, card_last4, "
            "card_exp_month, card_exp_year, card_country, network_transaction_id, processor, "
            "setup_payment_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
            "RETURNING *",
            merchant_id,
            payment_method,
            payment["token"],
            payment["card_brand"],
            payment["card_last4"],
            payment["card_exp_month"],
            payment["card_exp_year"],
            payment["card_country"],
            network_transaction_id,
            payment["processor"],
            payment["id"],
        )
        row = await self.conn.fetchrow(
            "UPDATE payments SET payment_method = $3 WHERE merchant_id = $1 AND id = $2 "
            "RETURNING *",
            merchant_id,
            payment["id"],
            payment_method,
        )
        return row, method

    async def get(self, merchant_id: str, payment_method: str) -> Any:
        return await self.conn.fetchrow(
            "SELECT * FROM payment_methods WHERE merchant_id = $1 AND id = $2",
            merchant_id,
            payment_method,
        )

    async def live_for_share(self, merchant_id: str, payment_method: str) -> Any:
        """The payment method if it is not detached, locked against a concurrent detach until
        the caller's transaction ends (a renewal's first phase)."""
        return await self.conn.fetchrow(
            "SELECT * FROM payment_methods WHERE merchant_id = $1 AND id = $2 "
            "AND detached_at IS NULL FOR SHARE",
            merchant_id,
            payment_method,
        )

    async def detach(self, merchant_id: str, payment_method: str) -> Any:
        """Detached now, or when it was; None if the merchant has no such payment method.
        `newly`: detached by this transaction (so its event is sent once)."""
        return await self.conn.fetchrow(
            "UPDATE payment_methods SET detached_at = coalesce(detached_at, now()) "
            "WHERE merchant_id = $1 AND id = $2 RETURNING *, detached_at = now() AS newly",
            merchant_id,
            payment_method,
        )

    async def token_in_use(self, merchant_id: str, token: str) -> bool:
        """Whether a live payment method of the merchant still uses the token."""
        return bool(
            await self.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM payment_methods WHERE merchant_id = $1 "
                "AND token = $2 AND detached_at IS NULL)",
                merchant_id,
                token,
            )
        )

    async def page(
        self,
        merchant_id: str,
        *,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
    ) -> list[Any]:
        """The merchant's live payment methods, newest first; the id is the cursor."""
        if ending_before is not None:
            rows = await self.conn.fetch(
                "SELECT * FROM payment_methods WHERE merchant_id = $1 AND detached_at IS NULL "
                "AND id > $2 ORDER BY id ASC LIMIT $3",
                merchant_id,
                ending_before,
                limit + 1,
            )
            return list(rows)
        rows = await self.conn.fetch(
            "SELECT * FROM payment_methods WHERE merchant_id = $1 AND detached_at IS NULL "
            "AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            merchant_id,
            starting_after,
            limit + 1,
        )
        return list(rows)
