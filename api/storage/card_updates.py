"""SQL for card updates: each PSP's account-updater cursor under a lease (one worker at a time
per PSP), the payment methods an update may concern, and the masked card an update sets."""

from __future__ import annotations

from typing import Any


class CardUpdateRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def claim(self, processor: str, lease_seconds: float) -> Any:
        """The PSP's cursor with a lease on it (`locked_until`, the fencing token), or None while
        another worker holds it or the PSP's next turn has not come."""
        await self.pool.execute(
            "INSERT INTO card_update_cursors (processor) VALUES ($1) ON CONFLICT DO NOTHING",
            processor,
        )
        return await self.pool.fetchrow(
            "UPDATE card_update_cursors SET locked_until = now() + make_interval(secs => $2) "
            "WHERE processor = $1 AND locked_until < now() RETURNING cursor, locked_until",
            processor,
            lease_seconds,
        )

    async def advance(self, processor: str, cursor: str, lease: Any) -> bool:
        """Move the cursor past a handled update; False if the lease was lost (another worker
        took the PSP over: this one must stop)."""
        status: str = await self.pool.execute(
            "UPDATE card_update_cursors SET cursor = $2, updated_at = now() "
            "WHERE processor = $1 AND locked_until = $3",
            processor,
            cursor,
            lease,
        )
        return status.endswith(" 1")

    async def release(self, processor: str, lease: Any, next_turn_seconds: float) -> None:
        await self.pool.execute(
            "UPDATE card_update_cursors SET locked_until = now() + make_interval(secs => $3) "
            "WHERE processor = $1 AND locked_until = $2",
            processor,
            lease,
            next_turn_seconds,
        )

    async def candidates(self, processor: str, last4: str) -> list[Any]:
        """Live payment methods set up at the PSP whose masked card ends in `last4`."""
        rows: list[Any] = await self.pool.fetch(
            "SELECT merchant_id, id, token FROM payment_methods WHERE processor = $1 "
            "AND card_last4 = $2 AND detached_at IS NULL ORDER BY merchant_id, id",
            processor,
            last4,
        )
        return rows

    async def set_card(
        self,
        conn: Any,
        merchant_id: str,
        payment_method: str,
        card: tuple[str, str, int, int],
        update: str,
    ) -> tuple[Any, Any] | None:
        """Give the payment method the vault's masked card (brand, last4, expiry), locked; the
        new row and the old card, or None when it shows that card already (a re-fetch, or
        another worker was first): so the caller sends its event once."""
        old = await conn.fetchrow(
            "SELECT card_brand, card_last4, card_exp_month, card_exp_year FROM payment_methods "
            "WHERE merchant_id = $1 AND id = $2 AND detached_at IS NULL FOR UPDATE",
            merchant_id,
            payment_method,
        )
        if old is None or tuple(old.values()) == card:
            return None
        row = await conn.fetchrow(
            "UPDATE payment_methods SET card_brand = $3, card_last4 = $4, card_exp_month = $5, "
            "card_exp_year = $6, card_update = $7, card_updated_at = now() "
            "WHERE merchant_id = $1 AND id = $2 RETURNING *",
            merchant_id,
            payment_method,
            *card,
            update,
        )
        return row, old
