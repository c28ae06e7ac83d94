"""Card updates: replace a token's card with the one an account updater announced.

An account updater (sandbox/account_updater.py simulates PSP A's and PSP B's) lists updates to
the payment API masked (BIN, last four, expiry), and gives the new number only to a caller that
sends the old one: the vault. So the payment API, which must never see a card number, picks the
token an update concerns and asks the vault, on the service listener, to apply it:

    POST /v1/tokens/{token_id}/card_updates
    {"destination": "psp_a", "update": "au_…", "path": "/v1/account_updates/card",
     "body": {"update": "au_…", "number": "{{card.number}}"},
     "headers": {"authorization": "Bearer …"},
     "fields": {"number": "number", "exp_month": "exp_month", "exp_year": "exp_year"}}

The vault fills the token's current card into the template (body values only, as a forward
does) and sends it to an allowlisted destination, on a path its operator allowed for card
updates (`card_update_paths`, never a forward's: the answer carries a number, and it stays in
the vault). It reads the new card from the answer's `fields`, checks it (a card number, not
expired), and replaces the card record under the same token: sealed under the current data key
with a new nonce, the old ciphertext overwritten in place, the new BIN, last four, expiry and
fingerprint; any CVC still held for the old card is discarded. The answer is the token's masked
metadata, what the payment method and its `payment_method.updated` event need.

Why a route the API calls, not a vault job pulling the PSPs: which token an update concerns is
known only where stored credentials live (the payment methods, in the API's database), and the
PSP's credentials are the API's (sent in the template, as for a forward). The vault needs no PSP
knowledge and still decides what it accepts: the destination and path are allowlisted, the card
sent is the token's own, and an update for another card is answered 404 by the PSP, which the
vault reports as 409 `card_update_not_applicable` without changing anything.

Every request is audited as `token.update`: `started` before the card leaves the vault, then
its outcome (`replaced`, `unchanged`, an error code), or `already_applied` alone when the token
already carries this update (asked again after a lost answer: nothing is sent).
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, post

from core.cards import validate_expiry, validate_pan
from core.errors import InvalidRequest, NotFound, ProcessorError, StateConflict, TesseraError
from core.redaction import redact
from tessera.runtime.http import error_responses
from tessera.runtime.http_client import Reply
from vault import listeners
from vault.audit import AuditLog
from vault.auth import SERVICE, require
from vault.forward import Forwarder, ForwardError, ForwardRequest, check_template
from vault.openapi import SERVICE_TOKEN
from vault.routes import FORWARD_MAX_BODY, MerchantHeader, record
from vault.tokens import TokenService, TokenView, parse_token_id, token_view

_FIELD = msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class CardFields(msgspec.Struct, forbid_unknown_fields=True):
    """Which top-level fields of the destination's answer hold the new card."""

    number: Annotated[str, _FIELD] = "number"
    exp_month: Annotated[str, _FIELD] = "exp_month"
    exp_year: Annotated[str, _FIELD] = "exp_year"


class CardUpdateRequest(msgspec.Struct, forbid_unknown_fields=True):
    destination: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,40}$")]
    #: The updater's id of the update; the token keeps "destination:update" once applied.
    update: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    path: Annotated[str, msgspec.Meta(max_length=200)]
    body: dict[str, Any]
    headers: Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=1000,
                                                             pattern=r"^[\t\x20-\x7e]*$")]],
                       msgspec.Meta(max_length=30)] = {}  # fmt: skip
    fields: CardFields = msgspec.field(default_factory=CardFields)


class CardUpdateResult(msgspec.Struct):
    token: TokenView
    #: replaced: the new card is sealed; unchanged: the updater's card is the token's already;
    #: already_applied: this update was applied before (nothing was sent this time).
    outcome: Literal["replaced", "unchanged", "already_applied"]
    number_changed: bool
    expiry_changed: bool
    object: str = "card_update"


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def new_card(reply: Reply, fields: CardFields, today: datetime.date) -> tuple[str, int, int]:
    """The new number and expiry from the destination's answer, checked; never echoing them."""
    if reply.status == 404:
        raise StateConflict(
            "The destination has no such update for this token's card.",
            code="card_update_not_applicable",
        )
    if reply.status != 200:
        raise ForwardError(
            f"The destination answered the card update with status {reply.status}.",
            code="destination_error",
            extra={"sent": "true"},
        )
    try:
        answer = msgspec.json.decode(reply.content)
    except msgspec.DecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise ProcessorError(
            "The destination's answer is not a JSON object.", code="card_update_invalid"
        )
    try:
        number, _ = validate_pan(answer.get(fields.number))
        exp_month, exp_year = validate_expiry(
            answer.get(fields.exp_month), answer.get(fields.exp_year), today=today
        )
    except InvalidRequest as exc:
        raise ProcessorError(
            f"The destination's new card is not a valid, unexpired card ({exc.param or 'number'}).",
            code="card_update_invalid",
        ) from None
    return number, exp_month, exp_year


class CardUpdateController(Controller):
    path = "/v1/tokens"
    opt = {"listeners": listeners.SERVICE}
    tags = ["tokens"]

    @post(
        "/{token_id:str}/card_updates",
        operation_id="updateTokenCard",
        guards=[require(SERVICE)],
        security=SERVICE_TOKEN,
        status_code=200,
        request_max_body_size=FORWARD_MAX_BODY,
        responses=error_responses(404, 409, 502, 504),
    )
    async def apply(
        self,
        request: Request[Any, Any, Any],
        token_id: str,
        data: CardUpdateRequest,
        merchant: MerchantHeader,
        tokens: TokenService,
        audit: AuditLog,
        forwarder: Forwarder,
    ) -> CardUpdateResult:
        """Replace the token's card with an account update's, fetched by the vault."""
        token_id = parse_token_id(token_id)
        if redact(data.update) != data.update:
            raise InvalidRequest("update must not look like a card number.", param="update")
        template = ForwardRequest(
            data.destination, data.path, token_id, data.body, "POST", data.headers
        )
        destination = check_template(template, forwarder.destinations, card_update=True)
        row = await tokens.tokens.live(token_id, merchant)
        if row is None:
            raise NotFound("No such token.", param="token_id")
        applied = f"{data.destination}:{data.update}"
        detail: dict[str, str | int | bool] = {
            "destination": data.destination,
            "path": data.path,
            "update": data.update,
        }
        if row["card_update"] == applied:
            await record(
                audit, request, SERVICE, "token.update", "already_applied", token_id=token_id,
                detail=detail,
            )  # fmt: skip
            return CardUpdateResult(token_view(row), "already_applied", False, False)
        # Recorded before the card is decrypted and sent: no record, no card data leaves.
        await record(
            audit, request, SERVICE, "token.update", "started", token_id=token_id, detail=detail
        )
        try:
            card = await tokens.card_of(row)
            reply = await forwarder.exchange(destination, template, card)
            number, exp_month, exp_year = new_card(reply, data.fields, _today())
            number_changed = number != card.number
            expiry_changed = (exp_month, exp_year) != (card.exp_month, card.exp_year)
            if number_changed or expiry_changed:
                view = await tokens.replace(row, card, number, exp_month, exp_year, applied)
                if view is None:
                    raise StateConflict(
                        "The token changed while its card was being updated; ask again.",
                        code="token_changed",
                    )
                outcome: Literal["replaced", "unchanged"] = "replaced"
            else:
                view, outcome = token_view(row), "unchanged"
            del card, number, reply
        except Exception as exc:
            failed = exc.code if isinstance(exc, TesseraError) else "error"
            await record(
                audit, request, SERVICE, "token.update", failed, token_id=token_id, detail=detail
            )
            raise
        changed = {**detail, "number_changed": number_changed, "expiry_changed": expiry_changed}
        await record(
            audit, request, SERVICE, "token.update", outcome, token_id=token_id, detail=changed
        )
        return CardUpdateResult(view, outcome, number_changed, expiry_changed)
