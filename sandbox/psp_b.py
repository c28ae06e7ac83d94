"""PSP B: a second payment processor simulator, deliberately unlike PSP A (development and test
infrastructure, never deployed).

An Adyen-like protocol, so the payment API's second connector meets what real processors do
differently: an `X-API-Key` header, camelCase fields, amounts as `{"value", "currency"}`, the
outcome of a payment in a `200` body (`resultCode` `Authorised`, `Refused` with a
`refusalReason`, or `Error`), its own `pspReference`, and captures, cancels and refunds that are
only *received* at once and confirmed later by a notification it POSTs to `notify_url`, signed
with HMAC-SHA256. State lives in memory, as at PSP A. The protocol in short (sandbox/README.md
has the tables):

- `POST /v1/payments` `{"merchantReference", "amount": {"value", "currency"}, "paymentMethod":
  {"number", "expiryMonth", "expiryYear", "cvc"?, "holderName"?, "type"?}, "captureImmediately"?,
  "metadata"?}` -> `200 {"pspReference", "merchantReference", "resultCode", "refusalReason"?,
  "amount"}`. Idempotent on `merchantReference`: the same amount, currency and
  `captureImmediately` -> the same answer, no second payment; otherwise `422 reference_reused`.
- `POST /v1/payments/{pspReference}/captures` `{"merchantReference"?, "amount"}`, `.../cancels`
  `{"merchantReference"?}`, `.../refunds` `{"merchantReference", "amount"}` -> `201 {"pspReference",
  "paymentPspReference", "merchantReference"?, "amount"?, "status": "received"}`; the outcome comes
  in a `CAPTURE`, `CANCELLATION` or `REFUND` notification `notify_delay_ms` later.
- `GET /v1/payments?merchantReference=…` and `GET /v1/payments/{pspReference}` -> `200` the
  payment with its modifications, or `404`: the status inquiry.

Errors are `{"status", "errorCode", "message", "errorType"}`. Admin endpoints (no key):
`GET|POST /admin/config` (PSP A's latency and fault fields plus `notify_url`, `notify_delay_ms`,
`fail_next_captures`, `fail_next_refunds`), `GET /admin/stats`, `GET /admin/payments`,
`GET /admin/notifications`, `POST /admin/notifications/replay`, `POST /admin/reset`.

`sign_notification` and `verify_notification` are the HMAC algorithm, as pure functions; the
payment API cannot import them (services never import the simulators), so sandbox/README.md
states it exactly. Card numbers and CVCs decide the outcome and are dropped: brand and last four
digits are all that is kept; nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import os
import re
import secrets
import string
import sys
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException

from sandbox import scheme
from sandbox.account_updater import AccountUpdater, install_psp_b
from sandbox.cards import (
    APPROVE,
    TEST_CARDS,
    Behaviour,
    DeclineCode,
    Outcome,
    brand_of,
    expired,
    is_card_number,
    outcome_for,
    with_overrides,
)
from sandbox.issuer import IssuerScript
from sandbox.issuer import install as install_issuer
from sandbox.psp_a import (
    FaultConfig,
    Faults,
    HoldMiddleware,
    SettingsError,
    checked_api_key,
    checked_number,
    checked_port,
    config_view,
    latency_seconds,
    run_simulator,
)

MAX_BODY: Final = 64 * 1024
MERCHANT_ACCOUNT: Final = "TesseraSandbox"
#: The development HMAC key (hex), used when `TESSERA_PSP_B_HMAC_KEY` is not set. Public on
#: purpose: the simulator is never deployed.
DEFAULT_HMAC_KEY: Final = "E92EF49F9B36436D3A9FBEFC305A24593559B43D854C8151FC9E242818957599"
#: Fails with `resultCode: "Error"` at PSP B only (PSP A approves it, like any other number):
#: failover the other way round from 4000000000000119.
ERROR_CARD: Final = "4000000000000101"
#: PSP B's view of the shared table: 4000000000000119 (a 5xx at PSP A) and 4000000000003220
#: (declined `do_not_honor` at PSP A) are approved, so failover and cascading can be seen.
CARDS: Final[Mapping[str, Outcome]] = with_overrides(
    TEST_CARDS,
    {
        "4000000000000119": APPROVE,
        "4000000000003220": APPROVE,
        ERROR_CARD: Outcome(Behaviour.PROCESSING_ERROR),
    },
)
REFUSAL_REASONS: Final[Mapping[DeclineCode, str]] = {
    DeclineCode.DO_NOT_HONOR: "Do Not Honor",
    DeclineCode.INSUFFICIENT_FUNDS: "Not enough balance",
    DeclineCode.EXPIRED_CARD: "Expired Card",
    DeclineCode.INCORRECT_CVC: "CVC Declined",
    DeclineCode.LOST_CARD: "Blocked Card",
    DeclineCode.STOLEN_CARD: "Blocked Card",
    DeclineCode.CLOSED_ACCOUNT: "Refused",
    DeclineCode.STOP_RECURRING: "Revocation Of Auth",
    DeclineCode.REVOCATION_OF_AUTHORIZATION: "Revocation Of Auth",
    DeclineCode.ISSUER_UNAVAILABLE: "Issuer Unavailable",
}
#: Adyen-like `refusalReasonCode` per refusal reason.
REFUSAL_REASON_CODES: Final[Mapping[str, str]] = {
    "Refused": "2",
    "Blocked Card": "5",
    "Expired Card": "6",
    "Issuer Unavailable": "9",
    "Not enough balance": "12",
    "Transaction Not Permitted": "23",
    "CVC Declined": "24",
    "Revocation Of Auth": "26",
    "Do Not Honor": "27",
    "Authentication required": "38",
}
#: The issuer's own response code, as `additionalData.refusalReasonRaw` ("41 : LOST CARD"): what
#: tells a lost card from a stolen one behind the same refusal reason.
RAW_RESPONSES: Final[Mapping[DeclineCode, str]] = {
    DeclineCode.DO_NOT_HONOR: "05 : DO NOT HONOR",
    DeclineCode.INSUFFICIENT_FUNDS: "51 : INSUFFICIENT FUNDS",
    DeclineCode.EXPIRED_CARD: "54 : EXPIRED CARD",
    DeclineCode.INCORRECT_CVC: "N7 : CVV2 FAILURE",
    DeclineCode.LOST_CARD: "41 : LOST CARD",
    DeclineCode.STOLEN_CARD: "43 : STOLEN CARD",
    DeclineCode.CLOSED_ACCOUNT: "46 : CLOSED ACCOUNT",
    DeclineCode.STOP_RECURRING: "R0 : STOP PAYMENT ORDER",
    DeclineCode.REVOCATION_OF_AUTHORIZATION: "R1 : REVOCATION OF AUTHORIZATION ORDER",
    DeclineCode.ISSUER_UNAVAILABLE: "91 : ISSUER UNAVAILABLE",
}


def _issuer_advice(outcome: Outcome) -> dict[str, str]:
    """The `additionalData` of a refusal by the issuer: its raw response and its advice."""
    assert outcome.decline_code is not None
    advice = {"refusalReasonRaw": RAW_RESPONSES[outcome.decline_code]}
    if outcome.advice_code is not None:
        advice["merchantAdviceCode"] = outcome.advice_code
    if outcome.visa_category is not None:
        advice["visaDeclineCategory"] = str(outcome.visa_category)
    return advice


#: The refusals of the scheme's stored-credential rules (sandbox/README.md), before the issuer:
#: a stored card's first payment without the shopper's CVC, and a `ContAuth` payment without a
#: `networkTxReference` the scheme issued for this card.
AUTHENTICATION_REQUIRED: Final = "Authentication required"
TRANSACTION_NOT_PERMITTED: Final = "Transaction Not Permitted"
#: The wait after each failed delivery attempt; one more attempt than waits, then it is given up.
RETRY_DELAYS: Final = (0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0)
DELIVERY_TIMEOUT_SECONDS: Final = 5.0

# --- the notification signature ------------------------------------------------------------


def signing_string(item: Mapping[str, Any]) -> str:
    """`pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:
    eventCode:success` of a `NotificationRequestItem`; an absent field is the empty string, the
    value is the amount in minor units as a decimal integer, nothing is escaped (as at Adyen)."""
    amount = item.get("amount") or {}
    value = amount.get("value", "")
    return ":".join(
        str(part)
        for part in (
            item.get("pspReference", ""),
            item.get("originalReference", ""),
            item.get("merchantAccountCode", ""),
            item.get("merchantReference", ""),
            "" if value is None else value,
            amount.get("currency", ""),
            item.get("eventCode", ""),
            item.get("success", ""),
        )
    )


def sign_notification(item: Mapping[str, Any], key: bytes) -> str:
    """Base64 of HMAC-SHA256(key, UTF-8 of `signing_string(item)`): the `hmacSignature` in the
    item's `additionalData`. `key` is the raw key: `bytes.fromhex(TESSERA_PSP_B_HMAC_KEY)`."""
    digest = hmac.new(key, signing_string(item).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_notification(item: Mapping[str, Any], key: bytes) -> bool:
    """Whether `item["additionalData"]["hmacSignature"]` is `sign_notification(item, key)`
    (compared in constant time). What a merchant does before acting on a notification."""
    additional = item.get("additionalData")
    signature = additional.get("hmacSignature") if isinstance(additional, Mapping) else None
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign_notification(item, key).encode(), signature.encode())


# --- the wire format -----------------------------------------------------------------------

Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
ResultCode = Literal["Authorised", "Refused", "Error"]
ModificationKind = Literal["capture", "cancel", "refund"]
ModificationStatus = Literal["received", "succeeded", "failed"]
EVENT_CODES: Final[Mapping[str, str]] = {
    "capture": "CAPTURE",
    "cancel": "CANCELLATION",
    "refund": "REFUND",
}


class AmountIn(msgspec.Struct, forbid_unknown_fields=True):
    value: Annotated[int, msgspec.Meta(gt=0, le=10**12)]
    currency: Currency


class PaymentMethodIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    number: Annotated[str, msgspec.Meta(max_length=64)]
    # Integers (what the vault's placeholders give) or digit strings as at Adyen ("03", "2031").
    expiry_month: (
        Annotated[int, msgspec.Meta(ge=1, le=12)]
        | Annotated[str, msgspec.Meta(pattern=r"^(0?[1-9]|1[0-2])$")]
    )
    expiry_year: (
        Annotated[int, msgspec.Meta(ge=2000, le=2100)]
        | Annotated[str, msgspec.Meta(pattern=r"^(20[0-9]{2}|2100)$")]
    )
    cvc: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{3,4}$")] | None = None
    holder_name: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    type: Literal["scheme"] = "scheme"

    def __repr__(self) -> str:  # never the number or the CVC, whatever prints this
        return "PaymentMethodIn(<redacted>)"


class AdditionalDataIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    #: The network transaction id of the stored credential's first payment (a `ContAuth` one).
    network_tx_reference: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class PaymentRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    merchant_reference: Reference
    amount: AmountIn
    payment_method: PaymentMethodIn
    capture_immediately: bool = False
    #: `Ecommerce` (the shopper is there) or `ContAuth` (a merchant-initiated payment on a
    #: stored card, which needs `additionalData.networkTxReference`).
    shopper_interaction: Literal["Ecommerce", "ContAuth"] = "Ecommerce"
    recurring_processing_model: (
        Literal["CardOnFile", "Subscription", "UnscheduledCardOnFile"] | None
    ) = None
    #: With `Ecommerce`: store the card; an `Authorised` answer carries its network id.
    store_payment_method: bool = False
    additional_data: AdditionalDataIn | None = None
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
        return f"PaymentRequest(merchantReference={self.merchant_reference!r}, <redacted>)"


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    amount: AmountIn
    merchant_reference: Reference | None = None


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    merchant_reference: Reference | None = None


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    merchant_reference: Reference
    amount: AmountIn


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    psp_reference: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class Amount(msgspec.Struct, frozen=True, gc=False):
    value: int
    currency: str


class PaymentResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    """The answer to `POST /v1/payments`, new or replayed."""

    psp_reference: str
    merchant_reference: str
    result_code: ResultCode
    amount: Amount
    refusal_reason: str | None = None
    refusal_reason_code: str | None = None
    #: `{"networkTxReference"}` on an authorised `storePaymentMethod` payment; on a refusal by
    #: the issuer `{"refusalReasonRaw"}` and, when the issuer sent them, `{"merchantAdviceCode"}`
    #: (Mastercard) and `{"visaDeclineCategory"}` (Visa).
    additional_data: dict[str, str] | None = None


class ModificationResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    """The `201` answer to a capture, cancel or refund: received, not yet done."""

    psp_reference: str
    payment_psp_reference: str
    status: Literal["received"]
    merchant_reference: str | None = None
    amount: Amount | None = None


class ModificationView(msgspec.Struct, rename="camel", omit_defaults=True):
    psp_reference: str
    type: ModificationKind
    status: ModificationStatus
    merchant_reference: str | None = None
    amount: Amount | None = None
    reason: str | None = None


class CardView(msgspec.Struct, rename="camel", frozen=True, gc=False):
    brand: str
    last_four: str


class PaymentView(msgspec.Struct, rename="camel", omit_defaults=True):
    """The status inquiry's answer: the payment as it is now, with its modifications in order."""

    psp_reference: str
    merchant_reference: str
    result_code: ResultCode
    amount: Amount
    capture_immediately: bool
    payment_method: CardView
    creation_date: str
    modifications: list[ModificationView]
    refusal_reason: str | None = None
    refusal_reason_code: str | None = None
    additional_data: dict[str, str] | None = None


@dataclass(eq=False)
class _Modification:
    psp_reference: str
    payment: _Payment
    kind: ModificationKind
    merchant_reference: str | None
    amount: Amount | None
    status: ModificationStatus = "received"
    reason: str | None = None
    #: Decided when it is received (`fail_next_captures`/`fail_next_refunds`).
    fails: bool = False
    answer: ModificationResponse | None = None

    @property
    def live(self) -> bool:
        return self.status != "failed"

    def view(self) -> ModificationView:
        return ModificationView(
            psp_reference=self.psp_reference,
            type=self.kind,
            status=self.status,
            merchant_reference=self.merchant_reference,
            amount=self.amount,
            reason=self.reason,
        )


@dataclass(eq=False)
class _Payment:
    answer: PaymentResponse
    capture_immediately: bool
    card: CardView
    created: str
    modifications: list[_Modification] = field(default_factory=list)

    @property
    def psp_reference(self) -> str:
        return self.answer.psp_reference

    def live(self, kind: ModificationKind) -> list[_Modification]:
        return [m for m in self.modifications if m.kind == kind and m.live]

    def captured(self) -> int:
        """Captured or being captured (a capture counts from when it is received until it fails)."""
        if self.capture_immediately and self.answer.result_code == "Authorised":
            return self.answer.amount.value
        return sum(m.amount.value for m in self.live("capture") if m.amount is not None)

    def refunded(self) -> int:
        return sum(m.amount.value for m in self.live("refund") if m.amount is not None)

    def view(self) -> PaymentView:
        answer = self.answer
        return PaymentView(
            psp_reference=answer.psp_reference,
            merchant_reference=answer.merchant_reference,
            result_code=answer.result_code,
            refusal_reason=answer.refusal_reason,
            refusal_reason_code=answer.refusal_reason_code,
            amount=answer.amount,
            capture_immediately=self.capture_immediately,
            payment_method=self.card,
            creation_date=self.created,
            modifications=[m.view() for m in self.modifications],
            additional_data=answer.additional_data,
        )


@dataclass(eq=False)
class _Notification:
    psp_reference: str
    event_code: str
    merchant_reference: str
    #: The JSON document exactly as sent (signed once; a replay sends the same bytes).
    body: bytes
    url: str
    status: Literal["pending", "delivered", "abandoned", "unsent"] = "pending"
    attempts: int = 0
    last_status: int | None = None

    def view(self) -> dict[str, Any]:
        return {
            "pspReference": self.psp_reference,
            "eventCode": self.event_code,
            "merchantReference": self.merchant_reference,
            "url": self.url,
            "status": self.status,
            "attempts": self.attempts,
            "lastStatus": self.last_status,
            "notification": msgspec.json.decode(self.body),
        }


class PspError(Exception):
    """An answer other than success: an HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


# --- run-time configuration ----------------------------------------------------------------

Millis = Annotated[float, msgspec.Meta(ge=0, le=600_000)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
NotifyUrl = Annotated[str, msgspec.Meta(max_length=2000, pattern=r"^(https?://[^\s]+)?$")]


class Config(FaultConfig, kw_only=True):
    """What `POST /admin/config` changes at run time; the env vars give the starting values.
    The fault-injection fields come from PSP A's `FaultConfig`."""

    latency_ms: Millis = 0.0
    jitter_ms: Millis = 0.0
    latency_distribution: Literal["uniform", "normal"] = "uniform"
    slow_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 12.0
    #: How long the late card's request waits unrecorded; longer than the API's cut-off.
    late_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 90.0
    #: Where notifications go; empty: none are made.
    notify_url: NotifyUrl = ""
    #: How long after it is received a capture, cancel or refund is done and notified (and an
    #: authorization notified).
    notify_delay_ms: Millis = 200.0
    #: The next N captures (refunds) received fail: their notification says `success: "false"`.
    fail_next_captures: Count = 0
    fail_next_refunds: Count = 0

    def updated(self, changes: Mapping[str, Any]) -> Config:
        """A new config with `changes` applied; `msgspec.ValidationError` if one is invalid."""
        return msgspec.convert({**msgspec.structs.asdict(self), **changes}, type=Config)


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    api_key: str
    hmac_key: bytes
    config: Config

    @classmethod
    def from_env(cls) -> Settings:
        # Each variable spelled out with its default (tests and compose checks read these lines).
        latency = os.environ.get("TESSERA_PSP_B_LATENCY_MS", "0")
        jitter = os.environ.get("TESSERA_PSP_B_JITTER_MS", "0")
        slow = os.environ.get("TESSERA_PSP_B_SLOW_SECONDS", "12")
        delay = os.environ.get("TESSERA_PSP_B_NOTIFY_DELAY_MS", "200")
        config = Config(
            latency_ms=checked_number("TESSERA_PSP_B_LATENCY_MS", latency, maximum=600_000),
            jitter_ms=checked_number("TESSERA_PSP_B_JITTER_MS", jitter, maximum=600_000),
            slow_seconds=checked_number("TESSERA_PSP_B_SLOW_SECONDS", slow, maximum=3600),
            notify_delay_ms=checked_number("TESSERA_PSP_B_NOTIFY_DELAY_MS", delay, maximum=600_000),
            notify_url=_notify_url(os.environ.get("TESSERA_PSP_B_NOTIFY_URL", "")),
        )
        port = os.environ.get("TESSERA_PSP_B_PORT", "8202")
        api_key = os.environ.get("TESSERA_PSP_B_API_KEY", "psp_b_test_key")
        return cls(
            host=os.environ.get("TESSERA_PSP_B_HOST", "127.0.0.1"),
            port=checked_port("TESSERA_PSP_B_PORT", port),
            api_key=checked_api_key("TESSERA_PSP_B_API_KEY", api_key),
            hmac_key=_hmac_key(os.environ.get("TESSERA_PSP_B_HMAC_KEY", DEFAULT_HMAC_KEY)),
            config=config,
        )


def _notify_url(text: str) -> str:
    if text and not re.fullmatch(r"https?://[^\s]+", text):
        raise SettingsError("TESSERA_PSP_B_NOTIFY_URL must be empty or an http(s) URL")
    return text


def _hmac_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise SettingsError("TESSERA_PSP_B_HMAC_KEY must be at least 16 bytes in hex (32 digits)")
    return key


# --- the processor -------------------------------------------------------------------------

_REFERENCE_ALPHABET: Final = string.ascii_uppercase + string.digits


def new_psp_reference() -> str:
    """16 random upper-case letters and digits."""
    return "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(16))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _month_year(method: PaymentMethodIn) -> tuple[int, int]:
    return int(method.expiry_month), int(method.expiry_year)


class Simulator:
    """PSP B's state and rules, without HTTP. As at PSP A, every check-and-change runs without an
    `await` inside it, so concurrent requests with one merchantReference make one payment and
    concurrent refunds never add up past the captured amount."""

    #: Its account updater (sandbox/account_updater.py): a card an update closed is declined.
    account_updater: AccountUpdater | None = None
    #: Scripted answers for a card's next authorizations (sandbox/issuer.py).
    issuer: IssuerScript

    def __init__(
        self,
        api_key: str,
        hmac_key: bytes,
        config: Config,
        cards: Mapping[str, Outcome] = CARDS,
    ) -> None:
        self._api_key = api_key.encode()
        self.hmac_key = hmac_key
        self.config = config
        self.cards = cards
        self.faults = Faults(config.seed)
        self.issuer = IssuerScript()
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self.reset()

    def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._payments: dict[str, _Payment] = {}
        self._by_reference: dict[str, _Payment] = {}
        self._late: set[asyncio.Future[PaymentResponse]] = set()
        self._modifications: dict[str, _Modification] = {}
        self._refunds: dict[str, _Modification] = {}
        self._notifications: dict[str, _Notification] = {}
        self.counters: Counter[str] = Counter()
        self.results: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.modification_counts: Counter[tuple[str, str]] = Counter()
        self.notification_counts: Counter[str] = Counter()
        self.faults.reset(self.config.seed)

    def configure(self, changes: Mapping[str, Any]) -> Config:
        """Applies `changes` (all or nothing); a given `seed` restarts the random sequences."""
        self.config = self.config.updated(changes)
        if "seed" in changes:
            self.faults.reseed(self.config.seed)
        return self.config

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._http is not None:
            await self._http.aclose()

    # -- every /v1 request --

    def authenticate(self, key: str | None) -> None:
        self.counters["requests"] += 1
        if key is None or not hmac.compare_digest(key.encode(), self._api_key):
            self.counters["unauthorized"] += 1
            raise PspError(401, "unauthorized", "The X-API-Key header is missing or wrong.")

    async def network(self) -> None:
        config = self.config
        delay = latency_seconds(config.latency_ms, config.jitter_ms, config.latency_distribution)
        if delay > 0:
            await asyncio.sleep(delay)
        if self.faults.fail_all(config):
            self.counters["processing_errors"] += 1
            raise PspError(500, "processing_error", "The processor is failing (fail_all_5xx).")

    def _predecessors(self, number: str) -> list[str]:
        """The numbers this one replaced, per this simulator's account updater (sandbox/scheme.py:
        a network transaction id issued for one of them is valid for this number)."""
        return [] if self.account_updater is None else self.account_updater.predecessors(number)

    def outcome(self, method: PaymentMethodIn) -> Outcome:
        """What the card table (PSP B's view) and the expiry date say; no randomness."""
        table = outcome_for(method.number, self.cards)
        if table.behaviour is Behaviour.PROCESSING_ERROR:
            return table
        month, year = _month_year(method)
        closed = self.account_updater is not None and self.account_updater.closed(
            method.number, month, year
        )
        if expired(month, year, datetime.datetime.now(datetime.UTC).date()) or closed:
            return Outcome(Behaviour.DECLINE, DeclineCode.EXPIRED_CARD)
        return table

    # -- payments --

    async def pay(self, request: PaymentRequest) -> PaymentResponse:
        number = request.payment_method.number
        late = outcome_for(number, self.cards).behaviour is Behaviour.LATE
        if late and request.merchant_reference not in self._by_reference:
            # Its own task, so the payment still happens after the caller hung up.
            task = asyncio.ensure_future(self._pay_late(request))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return await asyncio.shield(task)
        answer, slow = self._pay_now(request)
        if slow:
            await asyncio.sleep(self.config.slow_seconds)
        return answer

    async def _pay_late(self, request: PaymentRequest) -> PaymentResponse:
        await asyncio.sleep(self.config.late_seconds)
        return self._pay_now(request)[0]

    def _pay_now(self, request: PaymentRequest) -> tuple[PaymentResponse, bool]:
        # No await from the reference lookup to the insert: this is the idempotency guarantee.
        method = request.payment_method
        if not is_card_number(method.number):
            raise PspError(422, "invalid_card", "paymentMethod.number is not a card number.")
        outcome = self.outcome(method)
        slow = outcome.behaviour is Behaviour.SLOW
        known = self._by_reference.get(request.merchant_reference)
        if known is not None:
            stored = known.answer
            if (stored.amount.value, stored.amount.currency, known.capture_immediately) != (
                request.amount.value,
                request.amount.currency,
                request.capture_immediately,
            ):
                raise PspError(
                    422,
                    "reference_reused",
                    "This merchantReference was used with another amount, currency or "
                    "captureImmediately.",
                )
            self.counters["replays"] += 1
            return stored, slow
        brand = brand_of(method.number)
        outcome = self.faults.overrule(outcome, brand, self.config)
        outcome = self.issuer.next(method.number, outcome)  # a test's scripted answer
        refusal: str | None = None
        broken_rule = credential_rule(request, self._predecessors(method.number))
        if outcome.behaviour is Behaviour.PROCESSING_ERROR:
            result: ResultCode = "Error"
        elif broken_rule is not None:
            result, refusal = "Refused", broken_rule
        elif outcome.behaviour is Behaviour.DECLINE:
            assert outcome.decline_code is not None
            result, refusal = "Refused", REFUSAL_REASONS[outcome.decline_code]
        else:
            result = "Authorised"
        answer = PaymentResponse(
            psp_reference=new_psp_reference(),
            merchant_reference=request.merchant_reference,
            result_code=result,
            refusal_reason=refusal,
            refusal_reason_code=REFUSAL_REASON_CODES.get(refusal or ""),
            amount=Amount(request.amount.value, request.amount.currency),
        )
        if broken_rule is None and outcome.behaviour is Behaviour.DECLINE:
            answer.additional_data = _issuer_advice(outcome)
        if result == "Authorised" and request.store_payment_method:
            answer.additional_data = {"networkTxReference": scheme.issue(method.number)}
        payment = _Payment(
            answer=answer,
            capture_immediately=request.capture_immediately,
            card=CardView(brand, method.number[-4:]),
            created=_now(),
        )
        self._payments[answer.psp_reference] = payment
        self._by_reference[answer.merchant_reference] = payment
        self.counters["payments"] += 1
        self.results[result] += 1
        if refusal is not None:
            self.refusals[refusal] += 1
        if self.config.notify_url:
            self._later(self._authorisation_notification(payment))
        return answer, slow

    def find(self, psp_reference: str) -> _Payment:
        payment = self._payments.get(psp_reference)
        if payment is None:
            raise PspError(404, "not_found", "No payment has this pspReference.")
        return payment

    def find_by_reference(self, merchant_reference: str) -> _Payment:
        payment = self._by_reference.get(merchant_reference)
        if payment is None:
            raise PspError(404, "not_found", "No payment has this merchantReference.")
        return payment

    # -- modifications: received now, done and notified `notify_delay_ms` later --

    def capture(self, psp_reference: str, request: CaptureRequest) -> ModificationResponse:
        payment = self.find(psp_reference)
        amount = Amount(request.amount.value, request.amount.currency)
        self._same_currency(payment, amount)
        existing = next(iter(payment.live("capture")), None)
        if existing is not None:
            if existing.amount != amount:
                raise PspError(422, "already_captured", "Captured already, with another amount.")
            self.counters["replays"] += 1
            assert existing.answer is not None
            return existing.answer
        if payment.capture_immediately and payment.answer.result_code == "Authorised":
            raise PspError(422, "already_captured", "This payment was captured immediately.")
        if payment.answer.result_code != "Authorised" or payment.live("cancel"):
            raise PspError(422, "not_capturable", "Only an authorised payment can be captured.")
        if amount.value > payment.answer.amount.value:
            raise PspError(422, "amount_too_large", "amount is larger than the payment.")
        fails = self.config.fail_next_captures > 0
        if fails:
            self.config = self.config.updated(
                {"fail_next_captures": self.config.fail_next_captures - 1}
            )
        return self._receive(payment, "capture", request.merchant_reference, amount, fails=fails)

    def cancel(self, psp_reference: str, request: CancelRequest) -> ModificationResponse:
        payment = self.find(psp_reference)
        existing = next(iter(payment.live("cancel")), None)
        if existing is not None:
            self.counters["replays"] += 1
            assert existing.answer is not None
            return existing.answer
        if (
            payment.answer.result_code != "Authorised"
            or payment.capture_immediately
            or payment.live("capture")
        ):
            raise PspError(
                422, "not_cancellable", "Only an authorised, uncaptured payment can be cancelled."
            )
        return self._receive(payment, "cancel", request.merchant_reference, None, fails=False)

    def refund(self, psp_reference: str, request: RefundRequest) -> ModificationResponse:
        payment = self.find(psp_reference)
        amount = Amount(request.amount.value, request.amount.currency)
        known = self._refunds.get(request.merchant_reference)
        if known is not None:
            if (known.payment, known.amount) != (payment, amount):
                raise PspError(
                    422,
                    "reference_reused",
                    "This merchantReference was used for another refund.",
                )
            self.counters["replays"] += 1
            assert known.answer is not None
            return known.answer
        self._same_currency(payment, amount)
        captured = payment.captured()
        if captured == 0:
            raise PspError(422, "not_refundable", "Only a captured payment can be refunded.")
        if payment.refunded() + amount.value > captured:
            raise PspError(
                422, "amount_exceeds_captured", "Refunds would exceed the captured amount."
            )
        fails = self.config.fail_next_refunds > 0
        if fails:
            self.config = self.config.updated(
                {"fail_next_refunds": self.config.fail_next_refunds - 1}
            )
        answer = self._receive(payment, "refund", request.merchant_reference, amount, fails=fails)
        self._refunds[request.merchant_reference] = self._modifications[answer.psp_reference]
        return answer

    @staticmethod
    def _same_currency(payment: _Payment, amount: Amount) -> None:
        if amount.currency != payment.answer.amount.currency:
            raise PspError(422, "currency_mismatch", "amount.currency is not the payment's.")

    def _receive(
        self,
        payment: _Payment,
        kind: ModificationKind,
        merchant_reference: str | None,
        amount: Amount | None,
        *,
        fails: bool,
    ) -> ModificationResponse:
        modification = _Modification(
            psp_reference=new_psp_reference(),
            payment=payment,
            kind=kind,
            merchant_reference=merchant_reference,
            amount=amount,
            fails=fails,
        )
        modification.answer = ModificationResponse(
            psp_reference=modification.psp_reference,
            payment_psp_reference=payment.psp_reference,
            status="received",
            merchant_reference=merchant_reference,
            amount=amount,
        )
        payment.modifications.append(modification)
        self._modifications[modification.psp_reference] = modification
        self.modification_counts[kind, "received"] += 1
        self._later(self._settle(modification))
        return modification.answer

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, modification: _Modification) -> None:
        await asyncio.sleep(self.config.notify_delay_ms / 1000)
        payment = modification.payment
        if modification.fails:
            modification.status = "failed"
            modification.reason = f"{modification.kind.capitalize()} refused by the acquirer"
        elif modification.kind == "refund" and payment.captured() == 0:
            modification.status = "failed"
            modification.reason = "The payment's capture failed"
        else:
            modification.status = "succeeded"
        self.modification_counts[modification.kind, modification.status] += 1
        amount = modification.amount or payment.answer.amount
        item: dict[str, Any] = {
            "eventCode": EVENT_CODES[modification.kind],
            "pspReference": modification.psp_reference,
            "originalReference": payment.psp_reference,
            "merchantAccountCode": MERCHANT_ACCOUNT,
            "merchantReference": modification.merchant_reference
            or payment.answer.merchant_reference,
            "amount": {"value": amount.value, "currency": amount.currency},
            "success": "true" if modification.status == "succeeded" else "false",
            "eventDate": _now(),
        }
        if modification.reason is not None:
            item["reason"] = modification.reason
        await self._notify(item)

    async def _authorisation_notification(self, payment: _Payment) -> None:
        await asyncio.sleep(self.config.notify_delay_ms / 1000)
        answer = payment.answer
        item: dict[str, Any] = {
            "eventCode": "AUTHORISATION",
            "pspReference": answer.psp_reference,
            "merchantAccountCode": MERCHANT_ACCOUNT,
            "merchantReference": answer.merchant_reference,
            "amount": {"value": answer.amount.value, "currency": answer.amount.currency},
            "success": "true" if answer.result_code == "Authorised" else "false",
            "eventDate": _now(),
        }
        if answer.result_code != "Authorised":
            item["reason"] = answer.refusal_reason or "Acquirer Error"
        await self._notify(item)

    # -- notifications --

    async def _notify(self, item: dict[str, Any]) -> None:
        item["additionalData"] = {"hmacSignature": sign_notification(item, self.hmac_key)}
        document = {"live": "false", "notificationItems": [{"NotificationRequestItem": item}]}
        note = _Notification(
            psp_reference=item["pspReference"],
            event_code=item["eventCode"],
            merchant_reference=item["merchantReference"],
            body=msgspec.json.encode(document),
            url=self.config.notify_url,
        )
        self._notifications[note.psp_reference] = note
        self.notification_counts["created"] += 1
        if not note.url:
            note.status = "unsent"
            self.notification_counts["unsent"] += 1
            return
        for attempt in range(len(RETRY_DELAYS) + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS[attempt - 1])
            note.attempts += 1
            note.last_status = await self._post(note.url, note.body)
            if note.last_status is not None and 200 <= note.last_status < 300:
                note.status = "delivered"
                self.notification_counts["delivered"] += 1
                return
            self.notification_counts["failed_attempts"] += 1
        note.status = "abandoned"
        self.notification_counts["abandoned"] += 1

    async def _post(self, url: str, body: bytes) -> int | None:
        """One delivery attempt: the receiver's HTTP status, or None if it did not answer."""
        self.notification_counts["attempts"] += 1
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_SECONDS)
        try:
            response = await self._http.post(
                url,
                content=body,
                headers={"content-type": "application/json", "user-agent": "tessera-psp-b"},
            )
        except httpx.HTTPError:
            return None
        return response.status_code

    async def replay(self, psp_reference: str) -> dict[str, Any]:
        """Sends a notification again, byte for byte, once, to the current `notify_url` (or, if
        that is empty now, where it went first)."""
        note = self._notifications.get(psp_reference)
        if note is None:
            raise PspError(404, "not_found", "No notification has this pspReference.")
        url = self.config.notify_url or note.url
        if not url:
            raise PspError(409, "no_notify_url", "notify_url is not set.")
        self.notification_counts["replayed"] += 1
        status = await self._post(url, note.body)
        return {"pspReference": psp_reference, "eventCode": note.event_code, "status": status}

    # -- admin --

    def payments(self, merchant_reference: str | None) -> list[PaymentView]:
        """A scan of everything stored (not the reference index), so a duplicate would show."""
        return [
            payment.view()
            for payment in self._payments.values()
            if merchant_reference is None or payment.answer.merchant_reference == merchant_reference
        ]

    def notifications(self, psp_reference: str | None) -> list[dict[str, Any]]:
        return [
            note.view()
            for note in self._notifications.values()
            if psp_reference is None or note.psp_reference == psp_reference
        ]

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        notes = self.notification_counts
        pending = sum(1 for note in self._notifications.values() if note.status == "pending")
        return {
            "requests": counters["requests"],
            "payments": counters["payments"],
            "by_result": {code: self.results[code] for code in ("Authorised", "Refused", "Error")},
            "refusals": {
                reason: self.refusals[reason] for reason in dict.fromkeys(REFUSAL_REASONS.values())
            },
            **{
                f"{kind}s": {
                    status: self.modification_counts[kind, status]
                    for status in ("received", "succeeded", "failed")
                }
                for kind in EVENT_CODES
            },
            "replays": counters["replays"],
            "processing_errors": counters["processing_errors"],
            "unauthorized": counters["unauthorized"],
            "injected": self.faults.stats(),
            "notifications": {
                "created": notes["created"],
                "attempts": notes["attempts"],
                "delivered": notes["delivered"],
                "failed_attempts": notes["failed_attempts"],
                "abandoned": notes["abandoned"],
                "unsent": notes["unsent"],
                "pending": pending,
                "replayed": notes["replayed"],
            },
        }


def credential_rule(request: PaymentRequest, predecessors: Iterable[str] = ()) -> str | None:
    """The scheme's stored-credential rules, as a refusal reason (None: none broken)."""
    if request.shopper_interaction == "ContAuth":
        data = request.additional_data
        reference = data.network_tx_reference if data is not None else None
        if not scheme.valid_for(reference, request.payment_method.number, predecessors):
            return TRANSACTION_NOT_PERMITTED
        return None
    if request.store_payment_method and request.payment_method.cvc is None:
        return AUTHENTICATION_REQUIRED
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
    kind = "security" if status == 401 else "internal" if status >= 500 else "validation"
    body = {"status": status, "errorCode": code, "message": message, "errorType": kind}
    return _json(status, body)


def _decode(kind: type[_T], body: bytes) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        # msgspec names unknown keys and enum values in its messages: no long digit runs pass.
        message = _LONG_DIGITS.sub("[redacted]", str(exc))
        raise PspError(422, "validation_error", message) from None
    except msgspec.DecodeError:
        raise PspError(400, "invalid_json", "The body is not a JSON document.") from None


def _on_psp_error(_: Request[Any, Any, Any], exc: PspError) -> Response[bytes]:
    return _error(exc.status, exc.code, exc.message)


def _on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    return _error(status, _CODES.get(status, "http_error"), exc.detail if status < 500 else "")


def _on_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # The type and the route only: an exception's text could carry what the request carried.
    print(
        f"psp_b: internal error {type(exc).__name__} on {request.method} {request.url.path}",
        file=sys.stderr,
        flush=True,
    )
    return _error(500, "internal_error", "")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    sim = Simulator(settings.api_key, settings.hmac_key, settings.config)

    async def enter(request: Request[Any, Any, Any]) -> None:
        sim.authenticate(request.headers.get("x-api-key"))
        await sim.network()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @post("/v1/payments")
    async def create_payment(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        body = _decode(PaymentRequest, await request.body())
        if body.store_payment_method and body.shopper_interaction == "ContAuth":
            raise PspError(
                422, "validation_error", "storePaymentMethod needs shopperInteraction Ecommerce."
            )
        return _json(200, await sim.pay(body))

    @get("/v1/payments")
    async def inquire(request: Request[Any, Any, Any]) -> Response[bytes]:
        await enter(request)
        reference = request.query_params.get("merchantReference")
        if not reference:
            raise PspError(422, "validation_error", "merchantReference is required.")
        return _json(200, sim.find_by_reference(reference).view())

    @get("/v1/payments/{psp_reference:str}")
    async def retrieve(request: Request[Any, Any, Any], psp_reference: str) -> Response[bytes]:
        await enter(request)
        return _json(200, sim.find(psp_reference).view())

    @post("/v1/payments/{psp_reference:str}/captures")
    async def capture(request: Request[Any, Any, Any], psp_reference: str) -> Response[bytes]:
        await enter(request)
        body = _decode(CaptureRequest, await request.body())
        return _json(201, sim.capture(psp_reference, body))

    @post("/v1/payments/{psp_reference:str}/cancels")
    async def cancel(request: Request[Any, Any, Any], psp_reference: str) -> Response[bytes]:
        await enter(request)
        content = await request.body()
        body = _decode(CancelRequest, content) if content.strip() else CancelRequest()
        return _json(201, sim.cancel(psp_reference, body))

    @post("/v1/payments/{psp_reference:str}/refunds")
    async def refund(request: Request[Any, Any, Any], psp_reference: str) -> Response[bytes]:
        await enter(request)
        body = _decode(RefundRequest, await request.body())
        return _json(201, sim.refund(psp_reference, body))

    @get("/admin/config", sync_to_thread=False)
    def read_config(request: Request[Any, Any, Any]) -> Response[bytes]:
        full = request.query_params.get("all", "").lower() in ("1", "true", "yes")
        return _json(200, config_view(sim.config, full=full))

    @post("/admin/config")
    async def write_config(request: Request[Any, Any, Any]) -> Response[bytes]:
        changes = _decode(dict[str, Any], await request.body())
        try:
            sim.configure(changes)
        except msgspec.ValidationError as exc:
            raise PspError(422, "validation_error", str(exc)) from None
        return _json(200, config_view(sim.config))

    @get("/admin/stats", sync_to_thread=False)
    def stats() -> Response[bytes]:
        return _json(200, sim.stats())

    @get("/admin/payments", sync_to_thread=False)
    def list_payments(request: Request[Any, Any, Any]) -> Response[bytes]:
        found = sim.payments(request.query_params.get("merchantReference"))
        return _json(200, {"payments": found})

    @get("/admin/notifications", sync_to_thread=False)
    def list_notifications(request: Request[Any, Any, Any]) -> Response[bytes]:
        found = sim.notifications(request.query_params.get("pspReference"))
        return _json(200, {"notifications": found})

    @post("/admin/notifications/replay")
    async def replay(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = _decode(ReplayRequest, await request.body())
        return _json(200, await sim.replay(body.psp_reference))

    @post("/admin/reset", sync_to_thread=False)
    def reset() -> Response[bytes]:
        sim.reset()
        return _json(200, {"reset": True})

    app = Litestar(
        route_handlers=[
            healthz,
            create_payment,
            inquire,
            retrieve,
            capture,
            cancel,
            refund,
            read_config,
            write_config,
            stats,
            list_payments,
            list_notifications,
            replay,
            reset,
        ],
        exception_handlers={
            PspError: _on_psp_error,
            HTTPException: _on_http_error,
            Exception: _on_internal_error,
        },
        middleware=[lambda app: HoldMiddleware(app, lambda: sim.faults.hold_seconds(sim.config))],
        on_shutdown=[sim.close],
        request_max_body_size=MAX_BODY,
        openapi_config=None,
        logging_config=None,
    )
    app.state.simulator = sim
    # The account updater (sandbox/account_updater.py): its list, card side and test hook.
    sim.account_updater = install_psp_b(app, AccountUpdater("cu"), enter, _json, _error)
    # The scripted issuer (sandbox/issuer.py): a card's next answers, for recovery tests.
    install_issuer(app, sim.issuer, _error, _json)
    app.state.account_updater = sim.account_updater
    return app


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"psp_b: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    config = settings.config
    print(
        f"psp_b: listening on http://{settings.host}:{settings.port} "
        f"(latency {config.latency_ms:g}±{config.jitter_ms:g} ms, "
        f"slow card {config.slow_seconds:g} s, "
        f"notifications {'to ' + config.notify_url if config.notify_url else 'off'})",
        flush=True,
    )
    run_simulator(create_app(settings), settings.host, settings.port)


if __name__ == "__main__":
    main()
