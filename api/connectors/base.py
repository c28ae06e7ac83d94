"""What every processor connector does, in our terms.

A connector turns our request into the processor's wire format and the processor's statuses
and decline codes into ours. Authorizations go through the vault (which fills in the card);
captures, voids, refunds and inquiries go straight to the processor with its own reference.
Adding a processor is one new module with this shape, plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tessera.runtime.http_client import HttpClient


class Outcome(StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"
    #: The processor said it did not process the request: nothing was authorized.
    FAILED = "failed"
    #: No answer we can trust (time-out, reset after sending): it may have been authorized.
    UNKNOWN = "unknown"
    #: Accepted; the processor confirms (or refuses) it later by a signed notification.
    PENDING = "pending"


@dataclass(frozen=True)
class StoredCredential:
    """A merchant-initiated transaction (MIT) on a stored card: no CVC, the reason, and the
    network transaction id of the credential's first, customer-initiated, transaction."""

    reason: str  # recurring | unscheduled | installment
    network_transaction_id: str


@dataclass(frozen=True)
class AuthorizeRequest:
    merchant_id: str
    payment_id: str
    reference: str
    token: str
    amount: int
    currency: str
    capture: bool
    #: The customer-initiated first transaction of a stored credential (sent with the CVC).
    setup_future_usage: bool = False
    #: Set for an MIT (a renewal); then no CVC is sent.
    stored_credential: StoredCredential | None = None


@dataclass(frozen=True)
class AuthorizeResult:
    outcome: Outcome
    processor_reference: str | None = None
    captured: bool = False
    decline_code: str | None = None
    #: What the issuer passed through with a decline (core.recovery.Decline): Mastercard's
    #: merchant advice code and Visa's decline category.
    advice_code: str | None = None
    visa_category: int | None = None
    failure_code: str | None = None
    #: The scheme's id of an approved stored-credential setup, as the processor answered it.
    network_transaction_id: str | None = None


#: The `failure_code` of an operation whose request surely never reached the processor (no
#: connection): a definite failure, unless an earlier request for it may have arrived.
NOT_SENT = "processor_unreachable"


@dataclass(frozen=True)
class OperationResult:
    """The answer to a capture, void or refund."""

    outcome: Outcome
    processor_reference: str | None = None
    failure_code: str | None = None


class Connector(Protocol):
    name: str

    async def authorize(self, request: AuthorizeRequest) -> AuthorizeResult: ...

    async def inquire(self, reference: str) -> AuthorizeResult | None:
        """What the processor knows of our reference; None if it never saw it; an `UNKNOWN`
        result if it could not be asked (no answer, or none we can read)."""
        ...

    async def capture(
        self, processor_reference: str, amount: int, currency: str, reference: str
    ) -> OperationResult: ...

    async def void(self, processor_reference: str, reference: str) -> OperationResult: ...

    async def refund(
        self, processor_reference: str, reference: str, amount: int, currency: str
    ) -> OperationResult: ...

    async def close(self) -> None: ...


def processor_client(base_url: str, headers: dict[str, str], timeout_seconds: float) -> HttpClient:
    """The pooled keep-alive client a connector talks to its processor with (captures, voids,
    refunds, inquiries; authorizations go through the vault). Proxies from the environment are
    ignored: where the payment API may connect is the deployment's decision."""
    return HttpClient(base_url, headers=headers, timeout_seconds=timeout_seconds)


def advice_code(value: object) -> str | None:
    """A Mastercard merchant advice code as a processor sent it: two digits, else none."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    text = text.strip().zfill(2) if text.strip().isdigit() else ""
    return text if len(text) == 2 else None


def visa_category(value: object) -> int | None:
    """A Visa decline category (1-4) as a processor sent it (a number or its text), else none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and 1 <= value <= 4 else None
