"""Account updater: the simulators announce that a stored card has a new expiry or a new number.

Real account-updater services (Visa Account Updater, Mastercard Automatic Billing Updater)
learn from issuers that a card was reissued and tell the merchants that stored it. Each
simulator holds one `AccountUpdater` and serves it in its own dialect (sandbox/README.md has
both), always split in two halves:

- **The list** (the payment API's side, masked): updates since a cursor, each naming the old
  card only by BIN and last four and the new one by brand, BIN, last four and expiry. Nothing
  in it is card data, so the API, which must never see a PAN, can fetch it and pick the
  payment methods it concerns.
- **The card** (the card side, for the vault only): the new number and expiry of one update,
  answered only to a caller that sends the update's *old* number, i.e. one that holds the card
  already. The vault asks it through its allowlisted forward destination; an unknown update or
  a number that is not the old card answer the same 404, so the endpoint reveals nothing to a
  caller without the card.

A test hook (`POST /admin/account_updates`, no key, like the other admin hooks) announces an
update. Numbers are held only for this (in memory, as the simulators hold nothing else of a
card): it is the one thing an updater must know.
"""

from __future__ import annotations

import hmac
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from litestar import Litestar, Request, Response, get, post

from sandbox.cards import brand_of, is_card_number

_LETTERS: Final = string.ascii_lowercase
#: The most updates one list page holds.
PAGE_LIMIT: Final = 100


class UpdaterError(Exception):
    """Raised by the updater; each simulator turns it into its own error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ScheduleUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """The test hook's body: the card as stored, and what the issuer changed."""

    number: Annotated[str, msgspec.Meta(max_length=19)]
    new_exp_month: Annotated[int, msgspec.Meta(ge=1, le=12)]
    new_exp_year: Annotated[int, msgspec.Meta(ge=2000, le=2100)]
    #: A reissued card with another number; absent: the same number, a new expiry.
    new_number: Annotated[str, msgspec.Meta(max_length=19)] | None = None
    #: From now on the simulator declines the old card `expired_card` (the old number, or the
    #: old number with any other expiry): the issuer closed it. Off by default, so a test's
    #: update of a shared test card changes nothing for the other tests.
    decline_old: bool = False


@dataclass(frozen=True, slots=True)
class Update:
    id: str
    seq: int
    old_number: str
    new_number: str
    exp_month: int
    exp_year: int
    created: int
    decline_old: bool = False

    @property
    def kind(self) -> Literal["expiry", "number"]:
        return "expiry" if self.new_number == self.old_number else "number"


class AccountUpdater:
    """The updates a simulator announced, in order; ids are random, the order is `seq`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        self._updates: list[Update] = []
        self._by_id: dict[str, Update] = {}

    def schedule(self, request: ScheduleUpdate) -> Update:
        for name, number in (("number", request.number), ("new_number", request.new_number)):
            if number is not None and not is_card_number(number):
                raise UpdaterError(400, "invalid_card", f"{name} is not a card number.")
        update = Update(
            # Letters only: an id with a long digit run could look like a card number to the
            # vault's audit log, which refuses to record one.
            id=f"{self.prefix}_{''.join(secrets.choice(_LETTERS) for _ in range(24))}",
            seq=len(self._updates) + 1,
            old_number=request.number,
            new_number=request.new_number or request.number,
            exp_month=request.new_exp_month,
            exp_year=request.new_exp_year,
            created=int(time.time()),
            decline_old=request.decline_old,
        )
        self._updates.append(update)
        self._by_id[update.id] = update
        return update

    def since(self, after: str | None, limit: int) -> tuple[list[Update], bool]:
        """The updates after the one named `after` (all of them without it), oldest first."""
        start = 0
        if after:
            known = self._by_id.get(after)
            if known is None:
                raise UpdaterError(400, "invalid_cursor", "No update has this id.")
            start = known.seq
        page = self._updates[start : start + limit]
        return page, start + limit < len(self._updates)

    def card(self, update_id: str, old_number: str) -> Update:
        """The update's new card, for a caller that holds its old one; else not found."""
        update = self._by_id.get(update_id)
        if update is None or not hmac.compare_digest(
            update.old_number.encode(), old_number.encode()
        ):
            raise UpdaterError(404, "not_found", "No such update for this card.")
        return update

    def replaced(self, number: str) -> bool:
        """Whether an issuer reissued this number under another."""
        return any(u.old_number == number and u.kind == "number" for u in self._updates)

    def predecessors(self, number: str) -> list[str]:
        """The numbers an issuer reissued as this one, directly or through earlier reissues:
        a real scheme lets a stored credential's network transaction id carry over an
        account-updater replacement, so the simulators accept an id issued for any of them."""
        found: list[str] = []
        frontier = [number]
        while frontier:
            current = frontier.pop()
            for u in self._updates:
                if u.kind == "number" and u.new_number == current and u.old_number not in found:
                    found.append(u.old_number)
                    frontier.append(u.old_number)
        return [n for n in found if n != number]

    def closed(self, number: str, exp_month: int, exp_year: int) -> bool:
        """Whether an update announced with `decline_old` closed this card: the old number, or
        (a new expiry) the number with any expiry but the new one. The simulators decline it
        `expired_card`, as an issuer declines the plastic it replaced."""
        return any(
            u.decline_old
            and u.old_number == number
            and (u.kind == "number" or (exp_month, exp_year) != (u.exp_month, u.exp_year))
            for u in self._updates
        )


def masked(update: Update) -> dict[str, Any]:
    """PSP A's list entry: no card data (BIN and last four, the expiry)."""
    return {
        "id": update.id,
        "object": "account_update",
        "kind": update.kind,
        "old_card": {"bin": update.old_number[:6], "last4": update.old_number[-4:]},
        "new_card": {
            "brand": str(brand_of(update.new_number)),
            "bin": update.new_number[:6],
            "last4": update.new_number[-4:],
            "exp_month": update.exp_month,
            "exp_year": update.exp_year,
        },
        "created": update.created,
    }


def masked_b(update: Update) -> dict[str, Any]:
    """PSP B's list entry, in its camelCase dialect."""
    return {
        "updateId": update.id,
        "type": "EXPIRY_UPDATE" if update.kind == "expiry" else "PAN_UPDATE",
        "previousCard": {"bin": update.old_number[:6], "lastFour": update.old_number[-4:]},
        "card": {
            "brand": str(brand_of(update.new_number)),
            "bin": update.new_number[:6],
            "lastFour": update.new_number[-4:],
            "expiryMonth": update.exp_month,
            "expiryYear": update.exp_year,
        },
        "createdAt": update.created,
    }


class CardRequestA(msgspec.Struct, forbid_unknown_fields=True):
    update: Annotated[str, msgspec.Meta(max_length=64)]
    number: Annotated[str, msgspec.Meta(max_length=19)]


class CardRequestB(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    update_id: Annotated[str, msgspec.Meta(max_length=64)]
    card_number: Annotated[str, msgspec.Meta(max_length=19)]


Enter = Callable[[Request[Any, Any, Any]], Awaitable[None]]
Encode = Callable[[int, Any], Response[bytes]]
#: A simulator's error body: (status, code, message).
Refuse = Callable[[int, str, str], Response[bytes]]
Handler = Callable[[Request[Any, Any, Any]], Awaitable[Response[bytes]]]


def _limit(request: Request[Any, Any, Any]) -> int:
    text = request.query_params.get("limit", str(PAGE_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= PAGE_LIMIT:
        raise UpdaterError(400, "invalid_request", f"limit is 1 to {PAGE_LIMIT}.")
    return int(text)


_T = TypeVar("_T")


def _decode(kind: type[_T], body: bytes) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError):
        # Never msgspec's message: it could quote the number sent.
        raise UpdaterError(400, "invalid_request", "The body is not a valid request.") from None


def _answering(refuse: Refuse, handler: Handler) -> Handler:
    """The handler, with an `UpdaterError` answered in the simulator's own error body."""

    async def answer(request: Request[Any, Any, Any]) -> Response[bytes]:
        try:
            return await handler(request)
        except UpdaterError as exc:
            return refuse(exc.status, exc.code, exc.message)

    return answer


def install_psp_a(
    app: Litestar, updater: AccountUpdater, enter: Enter, encode: Encode, refuse: Refuse
) -> AccountUpdater:
    """PSP A: `GET /v1/account_updates?after=&limit=` -> `{"object": "list", "data",
    "has_more"}` (masked) and `POST /v1/account_updates/card` `{"update", "number"}` -> the new
    `{"update", "number", "exp_month", "exp_year"}` (the card side); the test hook."""

    async def list_updates(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        page, more = updater.since(request.query_params.get("after"), _limit(request))
        return encode(200, {"object": "list", "data": [masked(u) for u in page], "has_more": more})

    async def card(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        asked = _decode(CardRequestA, await request.body())
        update = updater.card(asked.update, asked.number)
        new = {"number": update.new_number, "exp_month": update.exp_month}
        return encode(200, {"update": update.id, **new, "exp_year": update.exp_year})

    list_path, card_path = "/v1/account_updates", "/v1/account_updates/card"
    _register(app, updater, refuse, encode, masked, (list_path, list_updates), (card_path, card))
    return updater


def install_psp_b(
    app: Litestar, updater: AccountUpdater, enter: Enter, encode: Encode, refuse: Refuse
) -> AccountUpdater:
    """PSP B: `GET /v1/cardUpdates?cursor=&limit=` -> `{"updates", "cursor", "hasMore"}`
    (masked; the next cursor is the last update's id, the same one when nothing is new) and
    `POST /v1/cardUpdates/details` `{"updateId", "cardNumber"}` -> `{"updateId", "cardNumber",
    "expiryMonth", "expiryYear"}` (the card side); the test hook."""

    async def list_updates(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        cursor = request.query_params.get("cursor")
        page, more = updater.since(cursor, _limit(request))
        next_cursor = page[-1].id if page else cursor
        updates = [masked_b(u) for u in page]
        return encode(200, {"updates": updates, "cursor": next_cursor, "hasMore": more})

    async def card(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        asked = _decode(CardRequestB, await request.body())
        update = updater.card(asked.update_id, asked.card_number)
        new = {"cardNumber": update.new_number, "expiryMonth": update.exp_month}
        return encode(200, {"updateId": update.id, **new, "expiryYear": update.exp_year})

    list_path, card_path = "/v1/cardUpdates", "/v1/cardUpdates/details"
    _register(app, updater, refuse, encode, masked_b, (list_path, list_updates), (card_path, card))
    return updater


def _register(
    app: Litestar,
    updater: AccountUpdater,
    refuse: Refuse,
    encode: Encode,
    view: Callable[[Update], Any],
    list_updates: tuple[str, Handler],
    card: tuple[str, Handler],
) -> None:
    async def schedule(request: Request[Any, Any, Any]) -> Response[bytes]:
        update = updater.schedule(_decode(ScheduleUpdate, await request.body()))
        return encode(201, view(update))

    async def reset(request: Request[Any, Any, Any]) -> Response[bytes]:
        updater.reset()
        return encode(200, {"reset": True})

    app.register(get(list_updates[0])(_answering(refuse, list_updates[1])))
    app.register(post(card[0], status_code=200)(_answering(refuse, card[1])))
    app.register(post("/admin/account_updates")(_answering(refuse, schedule)))
    app.register(post("/admin/account_updates/reset", status_code=200)(_answering(refuse, reset)))
