"""PSP A: a payment processor simulator (development and test infrastructure, never deployed).

A real HTTP server with its own JSON protocol, so the payment API's connector, the vault's
forwarding proxy, the tests and the load tests talk to something that behaves like a processor.
State lives in memory (one process; a restart forgets everything) and no request touches the
disk. The protocol, in short (sandbox/README.md has the tables and curl examples):

Every `/v1` request needs `Authorization: Bearer <TESSERA_PSP_A_API_KEY>`; otherwise
`401 {"error": {"code": "unauthorized"}}`. Errors are `{"error": {"code", "message"}}`.

- `POST /v1/authorizations` `{"reference", "amount", "currency", "capture", "card": {"number",
  "exp_month", "exp_year", "cvc"?, "holder"?}, "metadata"?}` -> `201` the authorization
  `{"id": "auth_…", "reference", "status", "decline_code", "amount", "currency",
  "amount_captured", "amount_refunded", "card": {"brand", "last4"}, "created"}`, status
  `approved`, `declined` or (approved with `capture: true`) `captured`. Idempotent on
  `reference`: the same reference with the same amount, currency and capture -> `200` the stored
  authorization; otherwise `409 reference_reused`. The outcome depends on the card number
  (`sandbox.cards.TEST_CARDS`): a non-Luhn number -> `400 invalid_card`; 4000000000000119 ->
  `500 processing_error`, nothing recorded; 4000000000000259 is recorded and then answered after
  `slow_seconds`; 4000000000000341 is held unrecorded for `late_seconds` (an inquiry meanwhile
  says not found) and only then approved; a past expiry -> declined `expired_card`.
- `POST /v1/authorizations/{id}/capture` `{"amount"?}` -> `200`, from `approved` only.
- `POST /v1/authorizations/{id}/void` -> `200` status `voided`, from `approved` only.
- `POST /v1/authorizations/{id}/refunds` `{"reference", "amount"}` -> `201` the refund
  `{"id": "rf_…", "reference", "authorization", "amount", "status": "succeeded", "created"}`.
- `GET /v1/authorizations?reference=…` and `GET /v1/authorizations/{id}` -> `200` or
  `404 not_found`: the status inquiry after a time-out.

Admin endpoints (no key; tests and load tests only): `GET|POST /admin/config` (latency, jitter,
slow card delay, fault injection), `GET /admin/stats`, `GET /admin/authorizations?reference=…`,
`POST /admin/reset`.

Card numbers and CVCs are used to decide the outcome and dropped: only brand and last4 are kept,
nothing is logged per request, and error messages never carry a submitted value.

Fault injection (issue 5), shared with PSP B (`sandbox.psp_b` imports it from here):
`FaultConfig` holds the fields (`fail_all_5xx`, `timeout_rate`, `timeout_seconds`,
`approval_rate`, `seed`) that both simulators' `Config` inherit, so `POST /admin/config` sets them
like any other field; `Faults` makes the seeded random decisions and counts what fired;
`HoldMiddleware` holds a chosen `/v1` answer for `timeout_seconds` after the request was processed
(a time-out is always a late answer, never a lost operation); `Simulator.network` fails every
request while `fail_all_5xx` is on; `Faults.overrule` turns table approvals into `do_not_honor`
declines at the configured rate per brand.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import os
import random
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar, cast

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from sandbox import scheme
from sandbox.account_updater import AccountUpdater, install_psp_a
from sandbox.cards import (
    TEST_CARDS,
    Behaviour,
    DeclineCode,
    Outcome,
    brand_of,
    expired,
    is_card_number,
    outcome_for,
)
from sandbox.issuer import IssuerScript
from sandbox.issuer import install as install_issuer

MAX_BODY: Final = 64 * 1024

# --- the wire format -----------------------------------------------------------------------


class Status(StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"
    CAPTURED = "captured"
    VOIDED = "voided"


Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=10**12)]


class CardIn(msgspec.Struct, forbid_unknown_fields=True):
    number: Annotated[str, msgspec.Meta(max_length=64)]
    exp_month: Annotated[int, msgspec.Meta(ge=1, le=12)]
    exp_year: Annotated[int, msgspec.Meta(ge=2000, le=2100)]
    cvc: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{3,4}$")] | None = None
    holder: Annotated[str, msgspec.Meta(max_length=200)] | None = None

    def __repr__(self) -> str:  # never the number or the CVC, whatever prints this
        return "CardIn(<redacted>)"


MitReason = Literal["recurring", "unscheduled", "installment"]


class MitExemption(msgspec.Struct, forbid_unknown_fields=True):
    """A merchant-initiated transaction on a stored credential: why, and the network
    transaction id of the credential's first (customer-initiated) transaction."""

    reason: MitReason
    network_transaction_id: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class CardOptions(msgspec.Struct, forbid_unknown_fields=True):
    mit_exemption: MitExemption | None = None


class PaymentMethodOptions(msgspec.Struct, forbid_unknown_fields=True):
    card: CardOptions | None = None


class CredentialDecline(StrEnum):
    """The scheme rules of stored credentials (sandbox/README.md), declined before the issuer."""

    #: A first transaction that stores the card, without the customer's CVC.
    AUTHENTICATION_REQUIRED = "authentication_required"
    #: An MIT without a network transaction id the scheme issued for this card.
    TRANSACTION_NOT_ALLOWED = "transaction_not_allowed"


class AuthorizationRequest(msgspec.Struct, forbid_unknown_fields=True):
    reference: Reference
    amount: Amount
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    capture: bool
    card: CardIn
    #: `off_session`: the customer-initiated first transaction of a stored credential.
    setup_future_usage: Literal["off_session"] | None = None
    #: `card.mit_exemption`: a merchant-initiated transaction on a stored credential.
    payment_method_options: PaymentMethodOptions | None = None
    metadata: (
        Annotated[
            dict[
                Annotated[str, msgspec.Meta(max_length=40)],
                Annotated[str, msgspec.Meta(max_length=500)],
            ],
            msgspec.Meta(max_length=50),
        ]
        | None
    ) = None

    def __repr__(self) -> str:
        return f"AuthorizationRequest(reference={self.reference!r}, card=<redacted>)"


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount | None = None


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    reference: Reference
    amount: Amount


class CardSummary(msgspec.Struct, frozen=True, gc=False):
    brand: str
    last4: str


class Authorization(msgspec.Struct, gc=False, omit_defaults=True):
    id: str
    reference: str
    status: Status
    decline_code: str | None
    amount: int
    currency: str
    amount_captured: int
    amount_refunded: int
    card: CardSummary
    created: int
    #: The scheme's id of an approved `setup_future_usage: off_session` transaction (only then).
    network_transaction_id: str | None = None
    #: A decline's Mastercard merchant advice code and Visa decline category, when the issuer
    #: sent them (sandbox/cards.py).
    network_advice_code: str | None = None
    visa_decline_category: int | None = None


class Refund(msgspec.Struct, frozen=True, gc=False):
    id: str
    reference: str
    authorization: str
    amount: int
    status: Literal["succeeded"]
    created: int


class _Entry(msgspec.Struct, gc=False):
    """A stored authorization and what its request asked for (compared on a replay)."""

    auth: Authorization
    capture: bool


class PspError(Exception):
    """An answer other than success: an HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


# --- run-time configuration ----------------------------------------------------------------


Brand = Literal["visa", "mastercard", "amex", "discover", "jcb", "diners", "unionpay", "unknown"]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]


class FaultConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fault-injection fields both simulators' `Config` inherit (sandbox/README.md).

    - `fail_all_5xx`: every authenticated `/v1` request answers `500 processing_error` after its
      latency, without being processed (nothing recorded, nothing changed).
    - `timeout_rate`: that fraction of `/v1` requests is processed as usual (an authorization is
      recorded, a capture applied) and its answer, whatever it is, is then held for
      `timeout_seconds` before it is sent: a client that gives up first has an unknown outcome
      that the status inquiry resolves.
    - `approval_rate`: brand -> probability that an approval from the card table stays an
      approval; otherwise it becomes a `do_not_honor` decline. Brands not listed: 1.
    - `seed`: seeds the random decisions of `timeout_rate` and `approval_rate` (two streams, so
      one fault's draws do not shift the other's); setting it (even to the same value) restarts
      both sequences, and so does `POST /admin/reset`. `null`: seeded from the OS.
    """

    fail_all_5xx: bool = False
    timeout_rate: Rate = 0.0
    timeout_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    approval_rate: dict[Brand, Rate] = {}
    seed: int | None = None


#: The fault fields, listed by `GET /admin/config` only when not at their default (so the config
#: of an unfaulted simulator reads as it did before fault injection existed).
FAULT_FIELDS: Final = FaultConfig.__struct_fields__
_FAULT_DEFAULTS: Final[dict[str, Any]] = msgspec.to_builtins(FaultConfig())


def config_view(config: FaultConfig, *, full: bool = False) -> dict[str, Any]:
    """What `GET /admin/config` answers: the simulator's own fields, then the fault fields that
    are not at their default (every one of them with `full`, i.e. `?all=true`)."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    view = {name: value for name, value in data.items() if name not in FAULT_FIELDS}
    for name in FAULT_FIELDS:
        if full or data[name] != _FAULT_DEFAULTS[name]:
            view[name] = data[name]
    return view


class Faults:
    """The random decisions of fault injection and the count of the faults that fired."""

    def __init__(self, seed: int | None = None) -> None:
        self.counters: Counter[str] = Counter()
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        self._timeouts = random.Random(None if seed is None else f"timeouts:{seed}")
        self._approvals = random.Random(None if seed is None else f"approvals:{seed}")

    def reset(self, seed: int | None) -> None:
        self.counters.clear()
        self.reseed(seed)

    def fail_all(self, config: FaultConfig) -> bool:
        if config.fail_all_5xx:
            self.counters["errors"] += 1
        return config.fail_all_5xx

    def hold_seconds(self, config: FaultConfig) -> float:
        """How long to hold this request's answer: 0, or `timeout_seconds` at `timeout_rate`."""
        rate = config.timeout_rate
        if rate <= 0 or (rate < 1 and self._timeouts.random() >= rate):
            return 0.0
        self.counters["timeouts"] += 1
        return config.timeout_seconds

    def overrule(self, outcome: Outcome, brand: str, config: FaultConfig) -> Outcome:
        """An approval from the card table stays one with the brand's `approval_rate`, else it
        becomes a `do_not_honor` decline. Declines, errors and the slow card are left alone."""
        if outcome.behaviour is not Behaviour.APPROVE:
            return outcome
        rate = cast("Mapping[str, float]", config.approval_rate).get(brand)
        if rate is None or rate >= 1 or (rate > 0 and self._approvals.random() < rate):
            return outcome
        self.counters["declines"] += 1
        return Outcome(Behaviour.DECLINE, DeclineCode.DO_NOT_HONOR)

    def stats(self) -> dict[str, int]:
        return {kind: self.counters[kind] for kind in ("errors", "timeouts", "declines")}


class HoldMiddleware:
    """Holds a `/v1` answer for `hold_seconds()` (the `timeout_rate` fault) after the request was
    processed: the response is kept, then sent whole once the time is up. Other paths pass."""

    def __init__(self, app: ASGIApp, hold_seconds: Callable[[], float]) -> None:
        self.app = app
        self.hold_seconds = hold_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hold = 0.0
        if scope["type"] == ScopeType.HTTP and scope["path"].startswith("/v1/"):
            hold = self.hold_seconds()
        if hold <= 0:
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def keep(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, keep)
        await asyncio.sleep(hold)
        for message in held:
            await send(message)


class Config(FaultConfig, kw_only=True):
    """What `POST /admin/config` changes at run time; the env vars give the starting values.
    The fault-injection fields come from `FaultConfig`; the admin endpoint validates and applies
    any field as is."""

    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=600_000)] = 0.0
    jitter_ms: Annotated[float, msgspec.Meta(ge=0, le=600_000)] = 0.0
    latency_distribution: Literal["uniform", "normal"] = "uniform"
    slow_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 12.0
    #: How long the late card's request waits unrecorded; longer than the API's cut-off.
    late_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 90.0

    def updated(self, changes: Mapping[str, Any]) -> Config:
        """A new config with `changes` applied; `msgspec.ValidationError` if one is invalid."""
        return msgspec.convert({**msgspec.structs.asdict(self), **changes}, type=Config)


class SettingsError(Exception):
    """A bad environment variable; the message names it (the process exits with code 2)."""


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    api_key: str
    config: Config

    @classmethod
    def from_env(cls) -> Settings:
        latency = os.environ.get("TESSERA_PSP_A_LATENCY_MS", "0")
        jitter = os.environ.get("TESSERA_PSP_A_JITTER_MS", "0")
        slow = os.environ.get("TESSERA_PSP_A_SLOW_SECONDS", "12")
        config = Config(
            latency_ms=checked_number("TESSERA_PSP_A_LATENCY_MS", latency, maximum=600_000),
            jitter_ms=checked_number("TESSERA_PSP_A_JITTER_MS", jitter, maximum=600_000),
            slow_seconds=checked_number("TESSERA_PSP_A_SLOW_SECONDS", slow, maximum=3600),
        )
        port = os.environ.get("TESSERA_PSP_A_PORT", "8201")
        api_key = os.environ.get("TESSERA_PSP_A_API_KEY", "psp_a_test_key")
        return cls(
            host=os.environ.get("TESSERA_PSP_A_HOST", "127.0.0.1"),
            port=checked_port("TESSERA_PSP_A_PORT", port),
            api_key=checked_api_key("TESSERA_PSP_A_API_KEY", api_key),
            config=config,
        )


# Checks of the simulators' environment variables (PSP B uses them too).


def checked_number(name: str, text: str, *, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {text!r}") from None
    if not 0 <= value <= maximum:
        raise SettingsError(f"{name} must be a number from 0 to {maximum:g}, got {text!r}")
    return value


def checked_port(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise SettingsError(f"{name} must be a port number from 1 to 65535")
    return int(text)


def checked_api_key(name: str, text: str) -> str:
    if not (text.isascii() and text.isprintable()) or not text or " " in text:
        raise SettingsError(f"{name} must be a non-empty token without spaces")
    return text


def run_simulator(app: Any, host: str, port: int) -> None:
    """uvicorn as both simulators run it."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        log_level="warning",
        # Longer than any client's idle keep-alive (httpx: 5 s), so the client always closes an
        # idle connection first and never reuses one the server is closing.
        timeout_keep_alive=75,
        # Requests held by the slow card must not hold a restart for long.
        timeout_graceful_shutdown=3,
        server_header=False,
    )


# --- the processor -------------------------------------------------------------------------


def latency_seconds(latency_ms: float, jitter_ms: float, distribution: str) -> float:
    """`latency_ms ± jitter_ms` in seconds: uniform, or normal (sigma = jitter); at least 0."""
    if jitter_ms == 0:
        millis = latency_ms
    elif distribution == "uniform":
        millis = random.uniform(latency_ms - jitter_ms, latency_ms + jitter_ms)
    else:
        millis = random.gauss(latency_ms, jitter_ms)
    return max(0.0, millis) / 1000


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Simulator:
    """The processor's state and rules, without HTTP. Every check-and-change runs without an
    `await` inside it, so under asyncio concurrent requests cannot interleave there: one
    reference gives one authorization, and refunds can never add up past the captured amount."""

    #: Its account updater (sandbox/account_updater.py): a card an update closed is declined.
    account_updater: AccountUpdater | None = None
    #: Scripted answers for a card's next authorizations (sandbox/issuer.py).
    issuer: IssuerScript

    def __init__(
        self, api_key: str, config: Config, cards: Mapping[str, Outcome] = TEST_CARDS
    ) -> None:
        self._api_key = api_key.encode()
        self.config = config
        self.cards = cards
        self.faults = Faults(config.seed)
        self.issuer = IssuerScript()
        self.reset()

    def reset(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_reference: dict[str, _Entry] = {}
        self._refunds: dict[str, Refund] = {}
        self._late: set[asyncio.Future[tuple[int, Authorization]]] = set()
        self.counters: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.declines: Counter[str] = Counter()
        self.faults.reset(self.config.seed)

    def configure(self, changes: Mapping[str, Any]) -> Config:
        """Applies `changes` (all or nothing); a given `seed` restarts the random sequences."""
        self.config = self.config.updated(changes)
        if "seed" in changes:
            self.faults.reseed(self.config.seed)
        return self.config

    # -- every /v1 request --

    def authenticate(self, header: str | None) -> None:
        self.counters["requests"] += 1
        scheme, _, key = (header or "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), self._api_key)):
            self.counters["unauthorized"] += 1
            raise PspError(401, "unauthorized", "Authorization: Bearer <api key> is required.")

    async def network(self) -> None:
        """The time the request takes on the wire and at the processor; then, with
        `fail_all_5xx`, the processor fails before processing anything. (Held answers, the
        `timeout_rate` fault, are `HoldMiddleware`'s: they come after the processing.)"""
        delay = self.latency_seconds()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.faults.fail_all(self.config):
            self.counters["processing_errors"] += 1
            raise PspError(500, "processing_error", "The processor is failing (fail_all_5xx).")

    def latency_seconds(self) -> float:
        config = self.config
        return latency_seconds(config.latency_ms, config.jitter_ms, config.latency_distribution)

    def _predecessors(self, number: str) -> list[str]:
        """The numbers this one replaced, per this simulator's account updater (sandbox/scheme.py:
        a network transaction id issued for one of them is valid for this number)."""
        return [] if self.account_updater is None else self.account_updater.predecessors(number)

    def outcome(self, card: CardIn) -> Outcome:
        """What the card table and the expiry date say (no randomness: a replay asks it too).
        The approval rate per brand overrules it only for a new authorization
        (`Faults.overrule`)."""
        table = outcome_for(card.number, self.cards)
        if table.behaviour is Behaviour.PROCESSING_ERROR:
            return table
        today = datetime.datetime.now(datetime.UTC).date()
        closed = self.account_updater is not None and self.account_updater.closed(
            card.number, card.exp_month, card.exp_year
        )
        if expired(card.exp_month, card.exp_year, today) or closed:
            return Outcome(Behaviour.DECLINE, DeclineCode.EXPIRED_CARD)
        return table

    # -- authorizations --

    async def authorize(self, request: AuthorizationRequest) -> tuple[int, Authorization]:
        late = outcome_for(request.card.number, self.cards).behaviour is Behaviour.LATE
        if late and request.reference not in self._by_reference:
            # Its own task, so the authorization still happens after the caller hung up.
            task = asyncio.ensure_future(self._authorize_late(request))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return await asyncio.shield(task)
        status, auth, slow = self._authorize_now(request)
        if slow:
            await asyncio.sleep(self.config.slow_seconds)
        return status, auth

    async def _authorize_late(self, request: AuthorizationRequest) -> tuple[int, Authorization]:
        await asyncio.sleep(self.config.late_seconds)
        status, auth, _ = self._authorize_now(request)
        return status, auth

    def _authorize_now(self, request: AuthorizationRequest) -> tuple[int, Authorization, bool]:
        # No await from the reference lookup to the insert: this is the idempotency guarantee.
        card = request.card
        if not is_card_number(card.number):
            raise PspError(400, "invalid_card", "card.number is not a valid card number.")
        outcome = self.outcome(card)
        slow = outcome.behaviour is Behaviour.SLOW
        known = self._by_reference.get(request.reference)
        if known is not None:
            auth = known.auth
            if (auth.amount, auth.currency, known.capture) != (
                request.amount,
                request.currency,
                request.capture,
            ):
                raise PspError(
                    409,
                    "reference_reused",
                    "This reference was used with another amount, currency or capture flag.",
                )
            self.counters["replays"] += 1
            return 200, auth, slow
        if outcome.behaviour is Behaviour.PROCESSING_ERROR:
            self.counters["processing_errors"] += 1
            raise PspError(500, "processing_error", "The processor could not process this.")
        outcome = self.faults.overrule(outcome, brand_of(card.number), self.config)
        outcome = self.issuer.next(card.number, outcome)  # a test's scripted answer
        broken_rule = credential_rule(request, self._predecessors(card.number))
        decline_code: str | None
        if broken_rule is not None:
            status, decline_code = Status.DECLINED, broken_rule
        elif outcome.behaviour is Behaviour.DECLINE:
            status, decline_code = Status.DECLINED, outcome.decline_code
        elif request.capture:
            status, decline_code = Status.CAPTURED, None
        else:
            status, decline_code = Status.APPROVED, None
        auth = Authorization(
            id=_new_id("auth"),
            reference=request.reference,
            status=status,
            decline_code=decline_code,
            amount=request.amount,
            currency=request.currency,
            amount_captured=request.amount if status is Status.CAPTURED else 0,
            amount_refunded=0,
            card=CardSummary(brand_of(card.number), card.number[-4:]),
            created=int(time.time()),
        )
        if broken_rule is None and outcome.behaviour is Behaviour.DECLINE:
            auth.network_advice_code = outcome.advice_code
            auth.visa_decline_category = outcome.visa_category
        if status is not Status.DECLINED and request.setup_future_usage == "off_session":
            auth.network_transaction_id = scheme.issue(card.number)
            self.counters["credentials_stored"] += 1
        entry = _Entry(auth, request.capture)
        self._entries[auth.id] = entry
        self._by_reference[auth.reference] = entry
        self.counters["authorizations"] += 1
        self.statuses[status] += 1
        if decline_code is not None:
            self.declines[decline_code] += 1
        if status is Status.CAPTURED:
            self.counters["captures"] += 1
        return 201, auth, slow

    def find(self, auth_id: str) -> Authorization:
        entry = self._entries.get(auth_id)
        if entry is None:
            raise PspError(404, "not_found", "No such authorization.")
        return entry.auth

    def find_by_reference(self, reference: str) -> Authorization:
        entry = self._by_reference.get(reference)
        if entry is None:
            raise PspError(404, "not_found", "No authorization has this reference.")
        return entry.auth

    def _move(self, auth: Authorization, status: Status) -> None:
        self.statuses[auth.status] -= 1
        self.statuses[status] += 1
        auth.status = status

    def capture(self, auth_id: str, amount: int | None) -> Authorization:
        auth = self.find(auth_id)
        if auth.status is Status.CAPTURED:
            if amount is None or amount == auth.amount_captured:
                return auth
            raise PspError(409, "already_captured", "Captured already, with another amount.")
        if auth.status is not Status.APPROVED:
            raise PspError(409, "not_capturable", f"A {auth.status} authorization is final.")
        if amount is not None and amount > auth.amount:
            raise PspError(400, "amount_too_large", "amount is larger than the authorization.")
        auth.amount_captured = auth.amount if amount is None else amount
        self._move(auth, Status.CAPTURED)
        self.counters["captures"] += 1
        return auth

    def void(self, auth_id: str) -> Authorization:
        auth = self.find(auth_id)
        if auth.status is Status.VOIDED:
            return auth
        if auth.status is not Status.APPROVED:
            raise PspError(409, "not_voidable", f"A {auth.status} authorization cannot be voided.")
        self._move(auth, Status.VOIDED)
        self.counters["voids"] += 1
        return auth

    def refund(self, auth_id: str, request: RefundRequest) -> tuple[int, Refund]:
        auth = self.find(auth_id)
        known = self._refunds.get(request.reference)
        if known is not None:
            if (known.authorization, known.amount) != (auth.id, request.amount):
                raise PspError(
                    409,
                    "reference_reused",
                    "This refund reference was used with another authorization or amount.",
                )
            self.counters["replays"] += 1
            return 200, known
        if auth.status is not Status.CAPTURED:
            raise PspError(409, "not_refundable", "Only a captured authorization is refundable.")
        if auth.amount_refunded + request.amount > auth.amount_captured:
            raise PspError(
                409, "amount_exceeds_captured", "Refunds would exceed the captured amount."
            )
        refund = Refund(
            id=_new_id("rf"),
            reference=request.reference,
            authorization=auth.id,
            amount=request.amount,
            status="succeeded",
            created=int(time.time()),
        )
        self._refunds[refund.reference] = refund
        auth.amount_refunded += request.amount
        self.counters["refunds"] += 1
        return 201, refund

    # -- admin --

    def authorizations(self, reference: str | None) -> list[Authorization]:
        """A scan of everything stored (not the reference index), so a duplicate would show."""
        return [
            entry.auth
            for entry in self._entries.values()
            if reference is None or entry.auth.reference == reference
        ]

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        body: dict[str, Any] = {
            "requests": counters["requests"],
            "authorizations": counters["authorizations"],
            "by_status": {status.value: self.statuses[status] for status in Status},
            "declines": {code.value: self.declines[code] for code in DeclineCode},
            "captures": counters["captures"],
            "voids": counters["voids"],
            "refunds": counters["refunds"],
            "replays": counters["replays"],
            "processing_errors": counters["processing_errors"],
            "unauthorized": counters["unauthorized"],
        }
        # Only once a fault has fired, so an unfaulted run's stats keep their earlier shape.
        # Injected 5xx answers count in `processing_errors` too.
        if any(self.faults.counters.values()):
            body["injected"] = self.faults.stats()
        return body


def mit_exemption_of(request: AuthorizationRequest) -> MitExemption | None:
    options = request.payment_method_options
    return options.card.mit_exemption if options and options.card else None


def credential_rule(
    request: AuthorizationRequest, predecessors: Iterable[str] = ()
) -> CredentialDecline | None:
    """The scheme's stored-credential rules: a setup needs the customer's CVC; an MIT needs a
    network transaction id issued for this card (by either simulator: sandbox/scheme.py)."""
    mit = mit_exemption_of(request)
    if mit is not None:
        if not scheme.valid_for(mit.network_transaction_id, request.card.number, predecessors):
            return CredentialDecline.TRANSACTION_NOT_ALLOWED
        return None
    if request.setup_future_usage == "off_session" and request.card.cvc is None:
        return CredentialDecline.AUTHENTICATION_REQUIRED
    return None


# --- HTTP ----------------------------------------------------------------------------------

_T = TypeVar("_T")
_encode = msgspec.json.Encoder().encode
_LONG_DIGITS: Final = re.compile(r"\d[\d -]{10,}\d")
_CODES: Final = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def _json(status: int, content: Any) -> Response[bytes]:
    return Response(content=_encode(content), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str) -> Response[bytes]:
    response = _json(status, {"error": {"code": code, "message": message}})
    if status == 401:
        response.headers["www-authenticate"] = "Bearer"
    return response


def _decode(kind: type[_T], body: bytes) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        # msgspec names unknown keys and enum values in its messages: no long digit runs pass.
        raise PspError(400, "invalid_request", _LONG_DIGITS.sub("[redacted]", str(exc))) from None


def _on_psp_error(_: Request[Any, Any, Any], exc: PspError) -> Response[bytes]:
    return _error(exc.status, exc.code, exc.message)


def _on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    return _error(status, _CODES.get(status, "http_error"), exc.detail if status < 500 else "")


def _on_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # The type and the route only: an exception's text could carry what the request carried.
    print(
        f"psp_a: internal error {type(exc).__name__} on {request.method} {request.url.path}",
        file=sys.stderr,
        flush=True,
    )
    return _error(500, "internal_error", "")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    sim = Simulator(settings.api_key, settings.config)

    async def enter(request: Request[Any, Any, Any]) -> None:
        sim.authenticate(request.headers.get("authorization"))
        await sim.network()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @post("/v1/authorizations")
    async def create_authorization(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        body = _decode(AuthorizationRequest, await request.body())
        if body.setup_future_usage is not None and mit_exemption_of(body) is not None:
            raise PspError(
                400,
                "invalid_request",
                "setup_future_usage and payment_method_options.card.mit_exemption exclude "
                "each other.",
            )
        status, auth = await sim.authorize(body)
        return _json(status, auth)

    @get("/v1/authorizations")
    async def inquire(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        reference = request.query_params.get("reference")
        if not reference:
            raise PspError(400, "invalid_request", "The query parameter reference is required.")
        return _json(200, sim.find_by_reference(reference))

    @get("/v1/authorizations/{auth_id:str}")
    async def retrieve(request: Request[Any, Any, Any], auth_id: str) -> Response[bytes]:
        await enter(request)
        return _json(200, sim.find(auth_id))

    @post("/v1/authorizations/{auth_id:str}/capture")
    async def capture(request: Request[Any, Any, Any], auth_id: str) -> Response[bytes]:
        await enter(request)
        body = await request.body()
        amount = _decode(CaptureRequest, body).amount if body.strip() else None
        return _json(200, sim.capture(auth_id, amount))

    @post("/v1/authorizations/{auth_id:str}/void")
    async def void(request: Request[Any, Any, Any], auth_id: str) -> Response[bytes]:
        await enter(request)
        return _json(200, sim.void(auth_id))

    @post("/v1/authorizations/{auth_id:str}/refunds")
    async def refund(request: Request[Any, Any, Any], auth_id: str) -> Response[bytes]:
        await enter(request)
        body = _decode(RefundRequest, await request.body())
        status, created = sim.refund(auth_id, body)
        return _json(status, created)

    @get("/admin/config", sync_to_thread=False)
    def read_config(request: Request[Any, Any, Any]) -> Response[bytes]:
        full = request.query_params.get("all", "").lower() in ("1", "true", "yes")
        return _json(200, config_view(sim.config, full=full))

    @post("/admin/config")
    async def write_config(request: Request[Any, Any, Any]) -> Response[bytes]:
        try:
            changes = msgspec.json.decode(await request.body(), type=dict[str, Any])
            sim.configure(changes)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise PspError(400, "invalid_request", str(exc)) from None
        return _json(200, config_view(sim.config))

    @get("/admin/stats", sync_to_thread=False)
    def stats() -> Response[bytes]:
        return _json(200, sim.stats())

    @get("/admin/authorizations", sync_to_thread=False)
    def list_authorizations(request: Request[Any, Any, Any]) -> Response[bytes]:
        found = sim.authorizations(request.query_params.get("reference"))
        return _json(200, {"authorizations": found})

    @post("/admin/reset", sync_to_thread=False)
    def reset() -> Response[bytes]:
        sim.reset()
        return _json(200, {"reset": True})

    app = Litestar(
        route_handlers=[
            healthz,
            create_authorization,
            inquire,
            retrieve,
            capture,
            void,
            refund,
            read_config,
            write_config,
            stats,
            list_authorizations,
            reset,
        ],
        exception_handlers={
            PspError: _on_psp_error,
            HTTPException: _on_http_error,
            Exception: _on_internal_error,
        },
        middleware=[lambda app: HoldMiddleware(app, lambda: sim.faults.hold_seconds(sim.config))],
        request_max_body_size=MAX_BODY,
        openapi_config=None,
        logging_config=None,
    )
    app.state.simulator = sim
    # The account updater (sandbox/account_updater.py): its list, card side and test hook.
    sim.account_updater = install_psp_a(app, AccountUpdater("au"), enter, _json, _error)
    # The scripted issuer (sandbox/issuer.py): a card's next answers, for recovery tests.
    install_issuer(app, sim.issuer, _error, _json)
    app.state.account_updater = sim.account_updater
    return app


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"psp_a: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    config = settings.config
    print(
        f"psp_a: listening on http://{settings.host}:{settings.port} "
        f"(latency {config.latency_ms:g}±{config.jitter_ms:g} ms, "
        f"slow card {config.slow_seconds:g} s)",
        flush=True,
    )
    run_simulator(create_app(settings), settings.host, settings.port)


if __name__ == "__main__":
    main()
