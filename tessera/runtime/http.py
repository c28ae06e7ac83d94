"""What every Tessera HTTP service shares: request ids, access logs, metrics, error bodies.

`install(app, ...)` is called by each service's `create_app`; it is the one place where the
domain's error types become HTTP statuses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import asyncpg
import msgspec
import structlog
from litestar import Litestar, MediaType, Request, Response, get
from litestar.enums import ScopeType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    SerializationException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from core import errors
from core.ids import new_id
from core.redaction import redact_value
from tessera.runtime.redis_client import means_unavailable as means_redis_unavailable

log = structlog.stdlib.get_logger("tessera.http")
T = TypeVar("T")

#: For text a client sends that is stored: Postgres cannot hold the NUL character in text
#: (nor `\u0000` in JSON), so such text is refused (400), never left to fail the write (500).
NO_NUL = r"^[^\x00]*$"

REQUEST_ID_HEADER = "request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

#: The HTTP status of each error type, decided here once for every service.
_STATUS: list[tuple[type[errors.TesseraError], int]] = [
    (errors.PayloadTooLarge, 413),
    (errors.MethodNotAllowed, 405),
    (errors.NotFound, 404),
    (errors.StateConflict, 409),
    (errors.InvalidRequest, 400),
    (errors.AuthenticationFailed, 401),
    (errors.PermissionDenied, 403),
    (errors.CardError, 402),
    (errors.ProcessorError, 502),
    (errors.RateLimited, 429),
    (errors.ServiceUnavailable, 503),
]
#: Codes whose status differs from their type's.
_STATUS_BY_CODE = {
    "idempotency_key_reused": 422,
    "idempotency_key_in_use": 409,
    "destination_unreachable": 502,
    "destination_error": 502,
    "destination_timeout": 504,
}


def status_of(exc: errors.TesseraError) -> int:
    if exc.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[exc.code]
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def request_id_of(scope: Scope | Any) -> str:
    state = scope.get("state") or {}
    rid = state.get("request_id")
    return str(rid) if rid else ""


def error_response(exc: errors.TesseraError, request_id: str) -> Response[bytes]:
    return Response(
        content=error_bytes(exc, request_id), status_code=status_of(exc), media_type=MediaType.JSON
    )


# msgspec's "- at `$.amount`", or "- at `key` in `$.metadata`" for a dict's key.
_AT_PATH = re.compile(r" - at (?:`key` in )?`\$\.?([^`]*)`$")
_NAMED_FIELD = re.compile(r"field `([^`]+)`")
_NUL_RULE = f"matching regex {NO_NUL!r}"  # msgspec quotes the pattern as repr() does


def _param(key: str) -> str:
    """`metadata[...]` (some value of a dict) is the parameter `metadata`."""
    return key.replace("[...]", "")


def _explained(message: str) -> str:
    return message.replace(_NUL_RULE, "without the NUL character (\\u0000)")


_MISSING_PARAMETER = re.compile(r"Missing required (\w+) parameter '([^']+)'")


def _validation_error(exc: ValidationException) -> errors.TesseraError:
    """Turn Litestar's report of a msgspec validation failure into a precise error.

    Litestar hands over msgspec's message ("Expected `int`, got `str`", "Object contains
    unknown field `color`") and the key it failed at; the parameter is the key plus the named
    field, if any.
    """
    missing = _MISSING_PARAMETER.match(str(exc.detail or ""))
    if missing:  # "Missing required header parameter 'X' for path /…": never echo the path
        kind, name = missing[1], missing[2]
        return errors.InvalidRequest(
            f"Missing required {kind} parameter {name}.", code="parameter_missing", param=name
        )
    details = exc.extra if isinstance(exc.extra, list) else []
    detail = details[0] if details and isinstance(details[0], dict) else {}
    message = str(detail.get("message") or exc.detail or "Invalid request")
    key = str(detail.get("key") or "")

    key = "" if key == "data" else key  # Litestar names the body's root "data"
    path = _AT_PATH.search(message)
    if path:  # an older Litestar leaves msgspec's path in the message
        message, key = message[: path.start()], path[1]
    message, key = _explained(message), _param(key)
    named = _NAMED_FIELD.search(message)
    param: str | None = f"{key}.{named[1]}" if named and key else (named[1] if named else key)
    param = param or None
    if message.startswith("Object contains unknown field"):
        return errors.InvalidRequest(
            f"Unknown parameter: {param}.", code="parameter_unknown", param=param
        )
    if message.startswith("Object missing required field"):
        return errors.InvalidRequest(
            f"Missing required parameter: {param}.", code="parameter_missing", param=param
        )
    return errors.InvalidRequest(
        f"Invalid {param or 'request'}: {message}.", code="parameter_invalid", param=param
    )


#: What asyncpg raises when the server is gone, going or not the one to write to: refused or
#: reset connections, a server shutting down (`pg_ctl stop`, a crash of another backend), one
#: still starting, and a multi-host DSN none of whose hosts takes writes (mid-failover).
_DATABASE_GONE = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


#: asyncpg's words for a connection still draining the server's last error (protocol state 2,
#: ERROR_CONSUME): the server sent a FATAL (shutting down, its postmaster gone) and the socket's
#: close is not processed yet. A pooled connection caught in that moment fails its next statement
#: with "cannot switch to state N; another operation (2) is in progress" (seen three times in
#: 3,500 requests across two failovers, `make chaos`).
_DRAINING = "another operation (2) is in progress"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached or lost the connection.

    The whole chain is looked at: when the connection dies inside `async with
    conn.transaction()`, the transaction's exit cannot roll back on it and asyncpg replaces the
    real failure with `InterfaceError: cannot call Transaction.__aexit__(): the underlying
    connection is closed` (seen when Postgres was killed under load: a 500 instead of a 503)."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, _DATABASE_GONE):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" in str(current):
            return True
        if isinstance(current, asyncpg.InternalClientError) and _DRAINING in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def to_tessera_error(exc: Exception) -> errors.TesseraError:
    """Translate anything raised while serving a request into a client-safe error."""
    if isinstance(exc, errors.TesseraError):
        return exc
    if isinstance(exc, RequestEntityTooLarge):
        return errors.PayloadTooLarge("The request body is too large.")
    if isinstance(exc, ValidationException):
        return _validation_error(exc)
    if isinstance(exc, ClientException) and isinstance(exc.__cause__, SerializationException):
        return errors.InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    if isinstance(exc, NotFoundException):
        return errors.NotFound("Unrecognized request URL.", code="unknown_route")
    if isinstance(exc, MethodNotAllowedException):
        return errors.MethodNotAllowed("This method is not allowed on this URL.")
    if isinstance(exc, NotAuthorizedException):
        return errors.AuthenticationFailed("Authentication is required.")
    if isinstance(exc, PermissionDeniedException):
        return errors.PermissionDenied("Not allowed.")
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return errors.InvalidRequest(str(exc.detail), code="bad_request")
    if database_unavailable(exc):
        return errors.ServiceUnavailable("The database is unavailable; retry later.")
    if means_redis_unavailable(exc):
        return errors.ServiceUnavailable("The cache is unavailable; retry later.")
    if isinstance(exc, ConnectionError | TimeoutError):
        return errors.ServiceUnavailable("A dependency is unavailable; retry later.")
    return errors.InternalError("An internal error occurred; it has been logged.")


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    error = to_tessera_error(exc)
    status = status_of(error)
    if status >= 500:
        log.error(
            "request_failed",
            error_code=error.code,
            exception_type=type(exc).__name__,
            exc_info=status == 500,
        )
    response = error_response(error, request_id_of(request.scope))
    if isinstance(exc, MethodNotAllowedException) and exc.headers:
        # RFC 9110: a 405 names the methods the URL has (Litestar's router knows them).
        allow = {k.lower(): v for k, v in exc.headers.items()}.get("allow")
        if allow:
            response.headers["allow"] = allow
    return response


class Metrics:
    """Request counts and latency histograms, labelled by route template, never by raw path."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route template and status.",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from the request to the last byte of the response.",
            ["service", "method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.service = service

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(self.service, method, route, str(status)).inc()
        self.latency.labels(self.service, method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestContext:
    """Outermost ASGI layer: request id in and out, access log line, metrics.

    It wraps Litestar's whole handler (router and exception handling included), so unknown
    routes, 405s and 413s get a request id and are counted too.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, allowed: dict[str, bytes] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        #: The `Allow` header of each route template (see `install`).
        self.allowed = allowed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        incoming = _header(scope, b"request-id")
        rid = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else new_id("req")
        scope["state"]["request_id"] = rid
        structlog.contextvars.bind_contextvars(request_id=rid)
        started = time.perf_counter()
        status = 500
        raw_rid = rid.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"request-id", raw_rid)]
                allow = self.allowed.get(scope.get("path_template") or "")
                if method == "OPTIONS" and allow is not None:
                    headers = [(k, v) for k, v in headers if k.lower() != b"allow"]
                    headers.append((b"allow", allow))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            self.metrics.observe(method, route, status, elapsed)
            log.info(
                "request",
                method=method,
                route=route,
                status=status,
                duration_ms=round(elapsed * 1000, 3),
            )
            structlog.contextvars.unbind_contextvars("request_id")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


ReadinessCheck = Callable[[], Awaitable[None]]


class ReadinessReport(msgspec.Struct):
    """`/readyz`'s answer: each dependency's check, `ok` or why not. `degraded`: only an
    optional dependency failed, and the service still does its work (200)."""

    status: Literal["ready", "degraded", "unavailable"]
    checks: dict[str, str]


def health_handlers(
    checks: dict[str, ReadinessCheck], metrics: Metrics, optional: frozenset[str] = frozenset()
) -> list[Any]:
    """`/healthz` (the process answers), `/readyz` (its dependencies answer), `/metrics`.

    A failed check in `optional` leaves the service ready (`degraded`): a load balancer must not
    take every pod out of service because a cache or a read replica is down when payments still
    go through (the API decides idempotency in Postgres; lists answer 503 on their own)."""

    @get("/healthz", operation_id="healthz", include_in_schema=True, sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/readyz",
        operation_id="readyz",
        responses={
            200: ResponseSpec(ReadinessReport, description="Ready", generate_examples=False),
            503: ResponseSpec(
                ReadinessReport, description="A dependency is not ready", generate_examples=False
            ),
        },
    )
    async def readyz() -> Response[bytes]:
        results: dict[str, str] = {}
        ready, degraded = True, False
        for name, check in checks.items():
            try:
                await check()
                results[name] = "ok"
            except Exception as exc:
                if name in optional:
                    degraded = True
                else:
                    ready = False
                results[name] = _describe_failure(exc)
        status: Literal["ready", "degraded", "unavailable"] = (
            "unavailable" if not ready else "degraded" if degraded else "ready"
        )
        report = ReadinessReport(status, results)
        return Response(
            content=msgspec.json.encode(report),
            status_code=200 if ready else 503,
            media_type=MediaType.JSON,
        )

    @get("/metrics", operation_id="metrics", include_in_schema=False, sync_to_thread=False)
    def metrics_endpoint() -> Response[bytes]:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics_endpoint]


def _describe_failure(exc: Exception) -> str:
    # Never echo connection strings or driver messages that might carry them.
    if isinstance(exc, NotReady):
        return str(exc)
    return f"unavailable ({type(exc).__name__})"


class NotReady(Exception):
    """A readiness check failed for a reason worth showing (e.g. migrations behind)."""


def install(app: Litestar, metrics: Metrics) -> Litestar:
    """Wrap the app's handler in the request context layer; call last in `create_app`.

    Litestar answers OPTIONS itself, but on a path whose handlers were registered one by one
    (a controller's GET and POST) its `Allow` lists only the first one's methods; each route
    knows all of them, so the request context layer sends those."""
    allowed = {
        route.path_format: ", ".join(sorted(route.methods)).encode()
        for route in app.routes
        if isinstance(route, HTTPRoute)
    }
    app.asgi_handler = RequestContext(app.asgi_handler, metrics, allowed)
    return app


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {Exception: exception_handler}


def error_bytes(exc: errors.TesseraError, request_id: str) -> bytes:
    """The error body, also for services that store responses (idempotency).

    Messages and params are built from field names, but a client can name a field with a card
    number (or put one in a URL): everything is redacted on the way out."""
    body: dict[str, Any] = {"type": exc.type, "code": exc.code, "message": exc.message}
    if exc.param is not None:
        body["param"] = exc.param
    body.update(exc.extra)
    body = redact_value(body)
    body["request_id"] = request_id
    return msgspec.json.encode({"error": body})


def strict_body(raw: bytes, cls: type[T]) -> T:
    """Decode a request body strictly: Litestar converts bodies leniently ("10" would become
    10), but a payment API must refuse a string where it wants an integer."""
    try:
        return msgspec.json.decode(raw or b"{}", type=cls)
    except msgspec.ValidationError as exc:
        message = str(exc)
        path = _AT_PATH.search(message)
        text = _explained(message[: path.start()] if path else message)
        named = _NAMED_FIELD.search(text)
        key = _param(path[1]) if path else ""
        param = f"{key}.{named[1]}" if named and key else (named[1] if named else key) or None
        if text.startswith("Object contains unknown field"):
            raise errors.InvalidRequest(
                f"Unknown parameter: {param}.", code="parameter_unknown", param=param
            ) from None
        if text.startswith("Object missing required field"):
            raise errors.InvalidRequest(
                f"Missing required parameter: {param}.", code="parameter_missing", param=param
            ) from None
        raise errors.InvalidRequest(
            f"Invalid {param or 'request'}: {text}.", code="parameter_invalid", param=param
        ) from None
    except msgspec.DecodeError:
        raise errors.InvalidRequest(
            "The request body is not valid JSON.", code="invalid_json"
        ) from None


class ErrorDetail(msgspec.Struct):
    type: str
    code: str
    message: str
    request_id: str
    param: str | None = None


class ErrorEnvelope(msgspec.Struct):
    """Every error body: `{"error": {"type", "code", "message", "param"?, "request_id", ...}}`."""

    error: ErrorDetail


#: What each error status means, in every service's OpenAPI document.
ERROR_DESCRIPTIONS = {
    400: "Invalid request (`param` names the field)",
    401: "Missing or invalid credential",
    402: "Card declined (`decline_code`, `payment`)",
    403: "Credential not allowed here",
    404: "No such object (or another merchant's)",
    409: "Invalid state, idempotency key in use, or conflict",
    413: "Body too large",
    422: "Idempotency key reused with another request",
    429: "Rate limited",
    502: "Processor or destination error",
    503: "A dependency is unavailable; retry",
    504: "Destination time-out",
}


def error_responses(*statuses: int) -> dict[int, Any]:
    """OpenAPI entries for the error statuses an operation really returns (beyond those every
    operation shares, which `tessera.runtime.openapi` adds)."""
    return {
        status: ResponseSpec(
            data_container=ErrorEnvelope,
            description=ERROR_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in statuses
    }
