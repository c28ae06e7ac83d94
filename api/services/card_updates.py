"""Card updates, the API half (issue 13; docs/subscriptions/card-updates.md).

The worker pages each PSP's account-updater list (masked: the old card's BIN and last four, the
new card's brand, BIN, last four and expiry) from a durable cursor, one worker at a time per PSP
(a lease on the cursor's row, which also fences the cursor's moves). An update concerns the live
payment methods set up at that PSP whose card has the old last four and whose token's BIN (the
vault's metadata) is the old one; for each, the vault is asked to fetch the new card with the
token's own card and replace it under the same token (`VaultClient.card_update`). The payment
method then shows the vault's masked card, in the transaction that writes its
`payment_method.updated` event, only if its card changed: a re-fetch, a lost answer
(`already_applied`) or a second worker sends no second event.

The network transaction id is kept on a number change: as at Visa and Mastercard, the original id
carries over an account-updater reissue (the simulators accept it for a number their updater
announced as the replacement: sandbox/scheme.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from api.services.events import Publisher
from api.services.payments import card_view, payment_method_view
from api.storage.card_updates import CardUpdateRepository
from api.storage.recovery import RecoveryRepository
from api.vault_client import CardUpdateRefused, VaultClient
from core.errors import TesseraError
from tessera.runtime.http_client import HttpClient, HttpFailure

log = structlog.stdlib.get_logger("tessera.card_updates")
PAGE = 100


@dataclass(frozen=True)
class Announced:
    """One update of a PSP's list, as the API may see it (no card data)."""

    id: str
    old_bin: str
    old_last4: str
    new_bin: str


@dataclass(frozen=True)
class Page:
    updates: list[Announced]
    has_more: bool


@dataclass(frozen=True)
class Feed:
    """One PSP's account updater: its list (fetched with the API's own key) and the card side's
    request template, which the vault fills with the token's card."""

    processor: str
    http: HttpClient
    headers: dict[str, str]
    list_path: str
    cursor_param: str
    card_path: str
    fields: dict[str, str] = field(default_factory=dict)

    def card_body(self, update: str) -> dict[str, Any]:
        if self.processor == "psp_b":
            return {"updateId": update, "cardNumber": "{{card.number}}"}
        return {"update": update, "number": "{{card.number}}"}

    async def page(self, cursor: str | None) -> Page | None:
        """The updates after `cursor`, oldest first; None when the PSP gave no usable answer."""
        params: dict[str, Any] = {"limit": PAGE}
        if cursor:
            params[self.cursor_param] = cursor
        try:
            response = await self.http.get(self.list_path, params=params)
            body = response.json() if response.status == 200 else None
        except (HttpFailure, ValueError):
            return None
        if not isinstance(body, dict):
            return None
        if self.processor == "psp_b":
            entries = [
                Announced(
                    u["updateId"],
                    u["previousCard"]["bin"],
                    u["previousCard"]["lastFour"],
                    u["card"]["bin"],
                )
                for u in body.get("updates", [])
            ]
            return Page(entries, bool(body.get("hasMore")))
        entries = [
            Announced(u["id"], u["old_card"]["bin"], u["old_card"]["last4"], u["new_card"]["bin"])
            for u in body.get("data", [])
        ]
        return Page(entries, bool(body.get("has_more")))


def feeds(
    psp_a: tuple[str, str], psp_b: tuple[str, str], timeout_seconds: float
) -> dict[str, Feed]:
    """Both simulated PSPs' feeds from their (base URL, API key). The lists are read minutes
    apart, so no connection is kept open between reads."""
    a_headers = {"Authorization": f"Bearer {psp_a[1]}"}
    b_headers = {"X-Api-Key": psp_b[1]}
    return {
        "psp_a": Feed(
            "psp_a",
            HttpClient(
                psp_a[0], headers=a_headers, timeout_seconds=timeout_seconds, keep_alive=False
            ),
            a_headers,
            "/v1/account_updates",
            "after",
            "/v1/account_updates/card",
            {"number": "number", "exp_month": "exp_month", "exp_year": "exp_year"},
        ),
        "psp_b": Feed(
            "psp_b",
            HttpClient(
                psp_b[0], headers=b_headers, timeout_seconds=timeout_seconds, keep_alive=False
            ),
            b_headers,
            "/v1/cardUpdates",
            "cursor",
            "/v1/cardUpdates/details",
            {"number": "cardNumber", "exp_month": "expiryMonth", "exp_year": "expiryYear"},
        ),
    }


@dataclass
class CardUpdateService:
    pool: Any
    vault: VaultClient
    feeds: dict[str, Feed]
    publisher: Publisher
    lease_seconds: float = 60.0
    #: How long a PSP's list rests after it was read to its end.
    poll_seconds: float = 1.0

    async def fetch(self, processor: str) -> int:
        """Handle the PSP's new updates if no other worker holds its cursor; the number of
        updates handled. The cursor moves past an update only once it is handled, so an update
        that must be retried (the vault or the PSP failed, a race) is read again next turn."""
        feed = self.feeds[processor]
        repo = CardUpdateRepository(self.pool)
        claimed = await repo.claim(processor, self.lease_seconds)
        if claimed is None:
            return 0
        cursor, lease = claimed["cursor"], claimed["locked_until"]
        handled = 0
        rest = self.poll_seconds
        while True:
            page = await feed.page(cursor)
            if page is None:
                log.warning("card_updates_list_failed", processor=processor)
                break
            for update in page.updates:
                if not await self.apply(feed, update):
                    page = Page([], False)
                    break
                if not await repo.advance(processor, update.id, lease):
                    log.warning("card_updates_lease_lost", processor=processor)
                    return handled
                cursor = update.id
                handled += 1
            if not page.has_more:
                break
        await repo.release(processor, lease, rest)
        return handled

    async def apply(self, feed: Feed, update: Announced) -> bool:
        """Apply the update to every payment method it concerns; False: retry it later."""
        repo = CardUpdateRepository(self.pool)
        for method in await repo.candidates(feed.processor, update.old_last4):
            merchant, token = method["merchant_id"], method["token"]
            try:
                card = await self.vault.token(merchant, token)
            except TesseraError as exc:
                log.warning("card_update_retry", update=update.id, code=exc.code)
                return False
            # The token's BIN is the old one, or the new one if the vault replaced the card
            # already (its answer was lost): anything else is another card with these last four.
            if card is None or card.bin not in (update.old_bin, update.new_bin):
                continue
            try:
                result = await self.vault.card_update(
                    merchant,
                    token,
                    destination=feed.processor,
                    update=update.id,
                    path=feed.card_path,
                    body=feed.card_body(update.id),
                    headers=feed.headers,
                    fields=feed.fields,
                )
            except CardUpdateRefused as exc:
                if exc.retry:
                    log.warning("card_update_retry", update=update.id, code=exc.code)
                    return False
                continue  # not this card's update (or the token is gone): the next candidate
            new = (
                result.card.brand,
                result.card.last4,
                result.card.exp_month,
                result.card.exp_year,
            )
            async with self.pool.acquire() as conn, conn.transaction():
                changed = await repo.set_card(
                    conn, merchant, method["id"], new, f"{feed.processor}:{update.id}"
                )
                if changed is not None:
                    row, old = changed
                    # Its renewals under recovery are due now: a retry that waited for this
                    # update goes at the worker's next turn.
                    await RecoveryRepository(conn).card_updated(merchant, method["id"])
                    await self.publisher.publish(
                        conn,
                        merchant,
                        "payment_method.updated",
                        row["id"],
                        payment_method_view(row),
                        previous_attributes={"card": card_view(old)},
                    )
            log.info(
                "card_updated",
                update=update.id,
                payment_method=method["id"],
                outcome=result.outcome,
                changed=changed is not None,
            )
        return True

    async def close(self) -> None:
        for feed in self.feeds.values():
            await feed.http.close()
