"""One error hierarchy for both services, with stable codes.

Each class names an error *type* (what kind of failure, the client's first switch) and every
instance carries a *code* (the precise reason, stable forever once published). The HTTP status
of each type is decided once, in the shared runtime's exception handlers, never here: the domain
does not know it is served over HTTP.

Messages are written for developers and must never contain card data: build them from
field names and limits, never from the offending value.
"""

from __future__ import annotations

from typing import ClassVar


class TesseraError(Exception):
    """Base of every error a client may see."""

    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.extra = extra or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, param={self.param!r})"


class InvalidRequest(TesseraError):
    """The request is malformed or a value is out of range; retrying it unchanged fails again."""

    type = "invalid_request_error"
    default_code = "parameter_invalid"


class PayloadTooLarge(InvalidRequest):
    default_code = "body_too_large"


class MethodNotAllowed(InvalidRequest):
    default_code = "method_not_allowed"


class NotFound(InvalidRequest):
    """The object does not exist, or it belongs to somebody else (indistinguishable on purpose)."""

    default_code = "resource_missing"


class AuthenticationFailed(TesseraError):
    type = "authentication_error"
    default_code = "invalid_credentials"


class PermissionDenied(TesseraError):
    type = "permission_error"
    default_code = "forbidden"


class StateConflict(InvalidRequest):
    """The object's state does not allow the operation (capture a declined payment, ...)."""

    default_code = "invalid_state"


class IdempotencyError(TesseraError):
    type = "idempotency_error"
    default_code = "idempotency_key_in_use"


class CardError(TesseraError):
    """The card was declined; the payment exists and says why."""

    type = "card_error"
    default_code = "card_declined"


class ProcessorError(TesseraError):
    """The processor could not process the request and nothing was authorized."""

    type = "api_error"
    default_code = "processor_error"


class RateLimited(TesseraError):
    type = "rate_limit_error"
    default_code = "rate_limited"


class ServiceUnavailable(TesseraError):
    """A dependency (database, cache, KMS) is unavailable; the request may be retried."""

    type = "api_error"
    default_code = "service_unavailable"


class InternalError(TesseraError):
    """A bug. The message shown to clients is generic; details go to the (redacted) log."""

    type = "api_error"
    default_code = "internal_error"
