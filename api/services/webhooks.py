"""Webhook endpoints and at-least-once, signed delivery of events to them.

- Each endpoint has a signing secret (`whsec_…`), shown once at creation or roll, kept encrypted
  (AES-256-GCM under TESSERA_API_WEBHOOK_SECRET_KEY). A roll keeps the old secret signing too
  for a grace period, so a merchant can switch without dropping a delivery.
- `Tessera-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` — one `v1` per live
  secret. The receiver checks t within 5 minutes and compares in constant time (docs/events.md).
- The worker sends due deliveries concurrently, at most N in flight per endpoint, each under a
  lease; anything but a 2xx within the time-out is retried with exponential backoff and jitter
  for 3 days; an endpoint that accepts nothing for 5 days is disabled, with an event.
- Merchant URLs are untrusted: in production only https to public addresses, checked when the
  endpoint is created and again (after DNS) before every delivery, which then connects to the
  address it checked (one lookup: DNS rebinding has no second answer to change) and follows no
  redirect.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import msgspec
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from api.services.events import EVENT_TYPES, Cause, EventView, Publisher, event_view
from api.storage.webhooks import DeliveryQueue, WebhookEndpointRepository
from core.errors import InvalidRequest, NotFound
from core.ids import new_id
from tessera.runtime.egress import ambiguous_numeric_host, is_public

log = structlog.stdlib.get_logger("tessera.webhooks")

MAX_RETRY_DELAY_SECONDS = 6 * 3600
SUBSCRIBABLE = (*EVENT_TYPES, "*")


class CreateWebhookEndpoint(msgspec.Struct, forbid_unknown_fields=True):
    # `extra_json_schema` only describes what `WebhookService.create` checks (and, for the URL,
    # what only a DNS lookup can tell: where it leads).
    url: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=2048, extra_json_schema={"pattern": "^https?://[^@/]+"}
        ),
    ]
    #: Event types, or ["*"] for all (checked by the service: 1 to 13 of them).
    events: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=64, extra_json_schema={"enum": SUBSCRIBABLE})]],
        msgspec.Meta(extra_json_schema={"minItems": 1, "maxItems": len(SUBSCRIBABLE)}),
    ]


class RollSecret(msgspec.Struct, forbid_unknown_fields=True):
    #: How long the old secret keeps signing: 0 (at once) to 7 days; 24 hours by default.
    grace_seconds: Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)] = 24 * 3600


class WebhookEndpointView(msgspec.Struct):
    id: str
    url: str
    events: list[str]
    status: str
    created: int
    object: str = "webhook_endpoint"


class WebhookEndpointWithSecret(msgspec.Struct):
    id: str
    url: str
    events: list[str]
    status: str
    created: int
    secret: str
    object: str = "webhook_endpoint"


class WebhookEndpointList(msgspec.Struct):
    data: list[WebhookEndpointView]
    object: str = "list"


class DeletedWebhookEndpoint(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "webhook_endpoint"


def endpoint_view(row: Any) -> WebhookEndpointView:
    return WebhookEndpointView(
        id=row["id"],
        url=row["url"],
        events=list(row["events"]),
        status=row["status"],
        created=int(row["created_at"].timestamp()),
    )


# --- secrets and signatures ------------------------------------------------------------------


@dataclass(frozen=True)
class SecretBox:
    """AES-256-GCM for the signing secrets at rest; the endpoint id is the associated data, so
    a secret copied onto another endpoint's row does not decrypt."""

    key: bytes

    def seal(self, endpoint_id: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self.key).encrypt(nonce, secret.encode(), endpoint_id.encode())

    def open(self, endpoint_id: str, sealed: bytes) -> str:
        plain = AESGCM(self.key).decrypt(sealed[:12], sealed[12:], endpoint_id.encode())
        return plain.decode()


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(live_secrets: list[str], timestamp: int, body: bytes) -> str:
    return ",".join([f"t={timestamp}", *(f"v1={sign(s, timestamp, body)}" for s in live_secrets)])


# --- where deliveries may go (SSRF) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckedDestination:
    """A URL that passed the policy, with every address its host resolved to (all allowed).
    The delivery connects to one of these addresses and to nothing else."""

    url: httpx.URL
    addresses: list[str]

    def pinned(self, address: str) -> httpx.URL:
        """The URL with its host replaced by a checked address: no second lookup."""
        return self.url.copy_with(host=address)


async def resolve(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


async def check_destination(url: str, production: bool) -> CheckedDestination | str:
    """The checked destination, or why a delivery may not go to `url`. Production: https to
    public addresses only (every address the name resolves to, `tessera.runtime.egress`).
    Development: also http, to loopback only. One parser (httpx's) for the check and the send."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return "url must be an absolute http(s) URL"
    host = parsed.host
    if parsed.scheme not in ("https", "http") or not host:
        return "url must be an absolute http(s) URL"
    if parsed.userinfo:
        return "url must not carry credentials"
    if ambiguous_numeric_host(host):
        return "url's host must be a name or a dotted-decimal IPv4 address"
    addresses = await resolve(host)
    if not addresses:
        return "url's host does not resolve"
    if production:
        if parsed.scheme != "https":
            return "url must use https"
        if not all(is_public(a) for a in addresses):
            return "url resolves to a private, loopback or link-local address"
    elif parsed.scheme == "http" and not all(
        ipaddress.ip_address(a).is_loopback for a in addresses
    ):
        return "http is allowed for loopback addresses only; use https"
    return CheckedDestination(parsed, addresses)


async def destination_problem(url: str, production: bool) -> str | None:
    """Why a delivery may not go to `url`, or None (see `check_destination`)."""
    checked = await check_destination(url, production)
    return checked if isinstance(checked, str) else None


# --- the merchant's endpoints ----------------------------------------------------------------


_ENDPOINT_ID_LENGTH = len("we_") + 26


@dataclass
class WebhookService:
    pool: Any
    box: SecretBox
    production: bool

    async def create(
        self, merchant_id: str, data: CreateWebhookEndpoint
    ) -> WebhookEndpointWithSecret:
        if not 1 <= len(data.events) <= len(SUBSCRIBABLE):
            raise InvalidRequest(
                f'events must list 1 to {len(SUBSCRIBABLE)} event types, or ["*"].',
                code="parameter_invalid",
                param="events",
            )
        events = sorted(set(data.events))
        unknown = [e for e in events if e not in SUBSCRIBABLE]
        if unknown:
            raise InvalidRequest(
                f"Unknown event types: {', '.join(unknown)}.",
                code="event_type_invalid",
                param="events",
            )
        if "*" in events:
            events = ["*"]
        problem = await destination_problem(data.url, self.production)
        if problem is not None:
            raise InvalidRequest(
                problem[0].upper() + problem[1:] + ".", code="url_invalid", param="url"
            )
        endpoint_id = new_id("we")
        secret = new_secret()
        async with self.pool.acquire() as conn:
            row = await WebhookEndpointRepository(conn).insert(
                merchant_id, endpoint_id, data.url, events, self.box.seal(endpoint_id, secret)
            )
        view = endpoint_view(row)
        return WebhookEndpointWithSecret(
            view.id, view.url, view.events, view.status, view.created, secret
        )

    async def list(self, merchant_id: str) -> WebhookEndpointList:
        async with self.pool.acquire() as conn:
            rows = await WebhookEndpointRepository(conn).list(merchant_id)
        return WebhookEndpointList([endpoint_view(r) for r in rows])

    async def get(self, merchant_id: str, endpoint_id: str) -> WebhookEndpointView:
        async with self.pool.acquire() as conn:
            row = await WebhookEndpointRepository(conn).get(merchant_id, _checked(endpoint_id))
        if row is None:
            raise NotFound("No such webhook endpoint.", param="id")
        return endpoint_view(row)

    async def delete(self, merchant_id: str, endpoint_id: str) -> DeletedWebhookEndpoint:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await WebhookEndpointRepository(conn).delete(merchant_id, _checked(endpoint_id))
        if row is None:
            raise NotFound("No such webhook endpoint.", param="id")
        return DeletedWebhookEndpoint(row["id"])

    async def roll(
        self, merchant_id: str, endpoint_id: str, data: RollSecret
    ) -> WebhookEndpointWithSecret:
        endpoint_id = _checked(endpoint_id)
        secret = new_secret()
        async with self.pool.acquire() as conn:
            row = await WebhookEndpointRepository(conn).roll(
                merchant_id, endpoint_id, self.box.seal(endpoint_id, secret), data.grace_seconds
            )
        if row is None:
            raise NotFound("No such webhook endpoint.", param="id")
        view = endpoint_view(row)
        return WebhookEndpointWithSecret(
            view.id, view.url, view.events, view.status, view.created, secret
        )


def _checked(endpoint_id: str) -> str:
    if len(endpoint_id) != _ENDPOINT_ID_LENGTH or not endpoint_id.startswith("we_"):
        raise NotFound("No such webhook endpoint.", param="id")
    return endpoint_id


# --- delivery (the worker) -------------------------------------------------------------------


def retry_delay(attempts: int, base_seconds: float, rng: random.Random) -> float:
    """Exponential backoff with ±25 % jitter: base, 2 base, 4 base… at most 6 hours."""
    exponent = min(attempts - 1, 30)
    delay = min(MAX_RETRY_DELAY_SECONDS, base_seconds * (2**exponent))
    return float(delay * rng.uniform(0.75, 1.25))


@dataclass
class WebhookDeliverer:
    """Claims due deliveries and sends each in its own task, so a slow endpoint holds only its
    own slots (at most `per_endpoint` in flight) and never the others'."""

    pool: Any
    box: SecretBox
    publisher: Publisher
    production: bool
    timeout_seconds: float = 10.0
    retry_base_seconds: float = 1.0
    retry_window_seconds: float = 3 * 24 * 3600
    disable_after_seconds: float = 5 * 24 * 3600
    per_endpoint: int = 4
    max_in_flight: int = 64
    rng: random.Random = field(default_factory=random.Random)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.queue = DeliveryQueue(self.pool)
        # Each send connects to the address it checked (a pinned URL, the original Host header
        # and TLS name): no pooled connections, as one made for one name must not carry
        # another's request. No proxies from the environment (they would connect anywhere);
        # the CA bundle is httpx's usual one (SSL_CERT_FILE / SSL_CERT_DIR, else certifi).
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_seconds, connect=min(3.0, self.timeout_seconds)),
            follow_redirects=False,
            headers={"user-agent": "Tessera-Webhooks/1"},
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
            verify=httpx.create_ssl_context(),
        )

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timeout_seconds + 1)
        await self.http.aclose()

    async def dispatch(self) -> int:
        """One turn: claim what is due (within the free slots) and start sending it."""
        room = self.max_in_flight - len(self._tasks)
        if room <= 0:
            return 0
        # The lease outlives the send (time-out) with room for a slow database afterwards.
        rows = await self.queue.claim(room, self.per_endpoint, self.timeout_seconds + 30)
        for row in rows:
            task = asyncio.create_task(self._deliver(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(rows)

    async def disable_failing(self) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await self.queue.failing_endpoints(conn, self.disable_after_seconds)
            for row in rows:
                await self.publisher.publish(
                    conn,
                    row["merchant_id"],
                    "webhook_endpoint.disabled",
                    row["id"],
                    endpoint_view(row),
                    Cause(),
                )
        for row in rows:
            log.warning("webhook_endpoint_disabled", endpoint=row["id"])
        return len(rows)

    async def _deliver(self, row: Any) -> None:
        merchant_id, event_id, endpoint_id = row["merchant_id"], row["event_id"], row["endpoint_id"]
        try:
            live = [self.box.open(endpoint_id, row["secret"])]
            if row["previous_valid"] and row["previous_secret"] is not None:
                live.append(self.box.open(endpoint_id, row["previous_secret"]))
            body = msgspec.json.encode(_event_of(row))
            status, error = await self._send(row["url"], body, live, event_id)
        except Exception as exc:  # a bug must not lose the delivery: retried like a failure
            log.exception("webhook_delivery_crashed", event_id=event_id, endpoint=endpoint_id)
            status, error = None, f"internal:{type(exc).__name__}"
        try:
            if status is not None and 200 <= status < 300:
                await self.queue.succeeded(merchant_id, event_id, endpoint_id, status)
                log.info(
                    "webhook_delivered", event_id=event_id, endpoint=endpoint_id, status=status
                )
                return
            delay = retry_delay(row["attempts"], self.retry_base_seconds, self.rng)
            outcome = await self.queue.retry_or_fail(
                merchant_id,
                event_id,
                endpoint_id,
                status=status,
                error=error,
                delay_seconds=delay,
                window_seconds=self.retry_window_seconds,
            )
            log.info(
                "webhook_not_accepted",
                event_id=event_id,
                endpoint=endpoint_id,
                status=status,
                error=error,
                outcome=outcome,
            )
        except Exception:  # the lease runs out and another turn takes the delivery again
            log.exception("webhook_result_not_recorded", event_id=event_id, endpoint=endpoint_id)

    async def _send(
        self, url: str, body: bytes, live: list[str], event_id: str
    ) -> tuple[int | None, str]:
        checked = await check_destination(url, self.production)
        if isinstance(checked, str):
            return None, "blocked_destination"
        headers = {
            "host": checked.url.netloc.decode("ascii"),
            "content-type": "application/json",
            "tessera-signature": signature_header(live, int(time.time()), body),
            "tessera-event-id": event_id,
        }
        error = "connection:ConnectError"
        for address in checked.addresses:  # the next one only if nothing could be sent
            try:
                response = await self.http.post(
                    checked.pinned(address),
                    content=body,
                    headers=headers,
                    extensions={"sni_hostname": checked.url.host},
                )
            except httpx.ConnectError as exc:
                error = f"connection:{type(exc).__name__}"
                continue
            except httpx.TimeoutException:
                return None, "timeout"
            except httpx.HTTPError as exc:
                return None, f"connection:{type(exc).__name__}"
            status = response.status_code
            return status, "" if response.is_success else f"http_{status}"
        return None, error


def _event_of(row: Any) -> EventView:
    return event_view(
        {
            "id": row["id"],
            "type": row["type"],
            "data": row["data"],
            "previous_attributes": row["previous"],
            "request_id": row["request_id"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["event_created_at"],
        }
    )
