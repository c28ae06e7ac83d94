"""The forwarding proxy: the API's way to charge a card it never sees.

The API sends a request template naming an allowlisted destination, a path on it, headers and
a JSON body with placeholders (`{{card.number}}`, ...). The vault fills the card into the body
only, sends it with TLS verification on and redirects off, and returns the destination's answer
with any card number in it masked. Placeholders anywhere else (headers, path, object keys) are
refused, so card data can only ever travel in the body, to a host an operator allowlisted.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from core.errors import InvalidRequest, TesseraError
from core.redaction import redact
from tessera.runtime.http_client import Blocked, HttpClient, MaybeSent, NotSent, Reply
from vault.tokens import Card

PLACEHOLDER = re.compile(r"\{\{\s*([a-z_.0-9]+)\s*\}\}")
FIELDS = ("card.number", "card.exp_month", "card.exp_year", "card.cvc", "card.name")
_FORBIDDEN_HEADERS = {
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "keep-alive", "proxy-authorization", "proxy-connection", "expect", "cookie",
}  # fmt: skip
#: Response headers handed back to the caller; the rest stay in the vault.
RETURNED_HEADERS = ("content-type", "request-id", "x-request-id", "idempotency-key", "retry-after")


class Destination(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    paths: tuple[str, ...]
    #: Where the vault fetches an account update's new card (vault/card_updates.py): never a
    #: forward's path, since the answer there carries a card number the vault keeps.
    card_update_paths: tuple[str, ...] = ()


class ForwardRequest(msgspec.Struct, forbid_unknown_fields=True):
    destination: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,40}$")]
    path: Annotated[str, msgspec.Meta(max_length=200)]
    token: Annotated[str, msgspec.Meta(max_length=40)]
    body: dict[str, Any]
    method: Annotated[str, msgspec.Meta(pattern=r"^(POST|PUT|PATCH)$")] = "POST"
    #: Values are visible ASCII, spaces and tabs: what an HTTP header can carry (a control
    #: character or a non-ASCII one would make the HTTP client refuse, after the card was read).
    headers: Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=1000,
                                                             pattern=r"^[\t\x20-\x7e]*$")]],
                       msgspec.Meta(max_length=30)] = {}  # fmt: skip


class ForwardResponse(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: Any


class ForwardError(TesseraError):
    """The destination could not be asked, or did not answer; `sent` says whether it may have
    received the request, which is what decides whether a retry could charge twice."""

    type = "api_error"


def _refuse(where: str) -> InvalidRequest:
    return InvalidRequest(
        f"Card placeholders are allowed only in body values, not in {where}.",
        code="placeholder_not_allowed",
        param=where,
    )


def check_template(
    request: ForwardRequest, destinations: dict[str, Destination], *, card_update: bool = False
) -> Destination:
    """The destination of a forward (or, with `card_update`, of a card update's fetch), once
    the template is known to put card data in body values only, to an allowlisted path."""
    destination = destinations.get(request.destination)
    if destination is None:
        raise InvalidRequest(
            "This destination is not on the vault's allowlist.",
            code="destination_not_allowed",
            param="destination",
        )
    if PLACEHOLDER.search(request.path) or "{{" in request.path:
        raise _refuse("path")
    if request.path not in (destination.card_update_paths if card_update else destination.paths):
        raise InvalidRequest(
            "This path is not allowed on the destination.", code="path_not_allowed", param="path"
        )
    for name, value in request.headers.items():
        if "{{" in name or "{{" in value:
            raise _refuse("headers")
        if name.lower() in _FORBIDDEN_HEADERS or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
            raise InvalidRequest(
                f"Header {name!r} may not be set.", code="header_not_allowed", param="headers"
            )
    _check_body(request.body, "body")
    return destination


def _check_body(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if "{{" in str(key):
                raise _refuse("body keys")
            _check_body(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_body(item, where)
    elif isinstance(value, str):
        for match in PLACEHOLDER.finditer(value):
            if match[1] not in FIELDS:
                raise InvalidRequest(
                    f"Unknown placeholder {{{{{match[1]}}}}}; known: {', '.join(FIELDS)}.",
                    code="placeholder_unknown",
                    param=where,
                )


def fill(value: Any, card: Card) -> Any:
    """The body with the card filled in. A value that is exactly one placeholder takes the
    field's type (months and years as integers); a placeholder inside text is replaced as text.
    A field the card doesn't have (a CVC already used, no name) removes its key."""
    values: dict[str, Any] = {
        "card.number": card.number,
        "card.exp_month": card.exp_month,
        "card.exp_year": card.exp_year,
        "card.cvc": card.cvc,
        "card.name": card.name,
    }
    if isinstance(value, dict):
        filled = {}
        for key, item in value.items():
            new = fill(item, card)
            if new is not _ABSENT:
                filled[key] = new
        return filled
    if isinstance(value, list):
        return [item for item in (fill(v, card) for v in value) if item is not _ABSENT]
    if isinstance(value, str) and "{{" in value:
        whole = PLACEHOLDER.fullmatch(value.strip())
        if whole:
            field = values[whole[1]]
            return _ABSENT if field is None else field
        return PLACEHOLDER.sub(lambda m: "" if values[m[1]] is None else str(values[m[1]]), value)
    return value


_ABSENT: Any = object()


class Forwarder:
    """One pooled HTTP client for every destination; redirects are never followed. In
    production (`public_only`) card data goes to public addresses only: an allowlisted name
    whose DNS answer turns private, loopback or link-local is refused, not connected."""

    def __init__(
        self,
        destinations: dict[str, Destination],
        timeout_seconds: float,
        *,
        public_only: bool = False,
    ) -> None:
        self.destinations = destinations
        self.timeout_seconds = timeout_seconds
        # TLS is verified (aiohttp's default); redirects are never followed.
        self.client = HttpClient(timeout_seconds=timeout_seconds, public_only=public_only)

    async def send(
        self, destination: Destination, request: ForwardRequest, card: Card
    ) -> ForwardResponse:
        response = await self.exchange(destination, request, card)
        mask = CardMask(card.number)  # one compiled pattern for the whole answer
        return ForwardResponse(
            status=response.status,
            headers={
                h: mask.text(response.headers[h]) for h in RETURNED_HEADERS if h in response.headers
            },
            body=_masked_body(response, card, mask),
        )

    async def exchange(
        self, destination: Destination, request: ForwardRequest, card: Card
    ) -> Reply:
        """The request with the card filled in, and the destination's answer as it came: for
        the vault's own reading only (a forward masks it before anyone else sees it)."""
        body = msgspec.json.encode(fill(request.body, card))
        headers = {**request.headers, "content-type": "application/json"}
        url = destination.url.rstrip("/") + request.path
        try:
            # The whole exchange, connection and body included, is bounded by the time-out.
            response = await self.client.request(request.method, url, body=body, headers=headers)
        except Blocked:
            raise ForwardError(
                "The destination does not resolve to a public address; nothing was sent.",
                code="destination_unreachable",
                extra={"sent": "false"},
            ) from None
        except NotSent as exc:
            refused = not exc.timed_out
            raise ForwardError(
                "The destination refused the connection; nothing was sent."
                if refused
                else "No connection to the destination in time; nothing was sent.",
                code="destination_unreachable" if refused else "destination_timeout",
                extra={"sent": "false"},
            ) from None
        except MaybeSent as exc:
            timed_out = exc.timed_out
            raise ForwardError(
                "The destination did not answer in time."
                if timed_out
                else "The connection to the destination failed; the request may have been "
                "received.",
                code="destination_timeout" if timed_out else "destination_error",
                extra={"sent": "unknown"},
            ) from None
        finally:
            del body
        return response

    async def close(self) -> None:
        await self.client.close()


#: A number standing on its own: a candidate card number not glued to letters, digits or "_".
_STANDALONE = re.compile(r"(?<![0-9A-Za-z_])\d(?:[ -]?\d){12,}(?![0-9A-Za-z_])")


class CardMask:
    """Masks what a destination sends back: this card's number wherever it appears, in any
    grouping, and any other card number (Luhn-valid, 13-19 digits) that stands on its own.

    Digits inside a processor's identifier ("auth_e404eb5302637381279fec2") are left alone: a
    log line may be over-masked, but a reference the API stores and sends back must survive
    intact. (`core.redaction`, the logs' safety net, masks those too.)"""

    def __init__(self, pan: str) -> None:
        self._pan = re.compile(r"[ -]?".join(re.escape(d) for d in pan)) if pan else None
        self._masked = f"[REDACTED PAN ****{pan[-4:]}]"

    def text(self, value: str) -> str:
        if self._pan is not None:
            value = self._pan.sub(self._masked, value)
        return _STANDALONE.sub(lambda m: redact(m.group()), value)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            text = str(value)
            masked = self.text(text)
            return value if masked == text else masked
        if isinstance(value, dict):
            return {self.value(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value


def _masked_body(response: Reply, card: Card, mask: CardMask) -> Any:
    """What the destination said, with card numbers masked and the CVC, should a destination
    echo it as a value of its own, replaced: the caller must never get card data back."""
    if not response.content:
        return None
    try:
        body = mask.value(msgspec.json.decode(response.content))
    except msgspec.DecodeError:
        return mask.text(response.content[:65536].decode("utf-8", errors="replace"))
    return _without_cvc(body, card.cvc) if card.cvc else body


def _without_cvc(value: Any, cvc: str) -> Any:
    if isinstance(value, dict):
        return {key: _without_cvc(item, cvc) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_cvc(item, cvc) for item in value]
    if isinstance(value, str) and value == cvc:
        return "***"
    if isinstance(value, int) and str(value) == cvc:
        return "***"
    return value
