"""The demo merchant's shop (development only): `python -m sandbox.merchant_demo`.

What a merchant integrating Tessera writes, and no more:
- `GET /` — the checkout page. It loads the vault's `tessera.js` with its Subresource Integrity
  hash, mounts the hosted card fields, and gets a token; the card never touches this page.
- `POST /pay` `{"token", "order"}` — its back end: creates the payment at the payment API with the
  shop's secret key and an idempotency key made from the order id (so a double click or a retry
  cannot charge twice), and answers approved / declined (with the reason) / processing.

It logs one line per request and per payment, and sees no card number: tests read its log.
Settings (environment): TESSERA_DEMO_PUBLISHABLE_KEY and TESSERA_DEMO_SECRET_KEY (required),
TESSERA_DEMO_API_URL, TESSERA_DEMO_VAULT_URL (as the browser reaches the vault),
TESSERA_DEMO_HOST, TESSERA_DEMO_PORT.
"""

from __future__ import annotations

import html
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post

STATIC = Path(__file__).parent / "static"
ITEM = "Tessera mosaic print"
AMOUNT = 2599  # minor units
CURRENCY = "EUR"
_ORDER = re.compile(r"[0-9a-f-]{8,64}")
_TOKEN = re.compile(r"tok_[0-9a-z]{26}")


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    api_url: str
    vault_url: str
    publishable_key: str
    secret_key: str

    @classmethod
    def from_env(cls) -> Settings:
        missing = [
            name
            for name in ("TESSERA_DEMO_PUBLISHABLE_KEY", "TESSERA_DEMO_SECRET_KEY")
            if not os.environ.get(name)
        ]
        if missing:
            raise SystemExit(f"merchant_demo: set {', '.join(missing)} (make run does)")
        return cls(
            host=os.environ.get("TESSERA_DEMO_HOST", "127.0.0.1"),
            port=int(os.environ.get("TESSERA_DEMO_PORT", "8300")),
            api_url=os.environ.get("TESSERA_DEMO_API_URL", "http://127.0.0.1:8000").rstrip("/"),
            vault_url=os.environ.get("TESSERA_DEMO_VAULT_URL", "http://127.0.0.1:8100").rstrip("/"),
            publishable_key=os.environ["TESSERA_DEMO_PUBLISHABLE_KEY"],
            secret_key=os.environ["TESSERA_DEMO_SECRET_KEY"],
        )


class PayRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    order: str


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} shop: {message}", flush=True)


def _json(status: int, body: dict[str, Any]) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def outcome_of(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The API's answer, as the shop's page shows it."""
    if status == 201:
        return {"outcome": "approved", "payment": body["id"], "status": body["status"]}
    if status == 202:
        return {"outcome": "processing", "payment": body["id"], "status": body["status"]}
    error = body.get("error", {})
    if status == 402:
        return {
            "outcome": "declined",
            "payment": error.get("payment"),
            "decline_code": error.get("decline_code"),
            "message": error.get("message"),
        }
    return {"outcome": "error", "code": error.get("code"), "message": error.get("message")}


def create_app(settings: Settings) -> Litestar:
    api = httpx.AsyncClient(
        base_url=settings.api_url,
        headers={"authorization": f"Bearer {settings.secret_key}"},
        timeout=30,
    )
    vault = httpx.AsyncClient(base_url=settings.vault_url, timeout=5)
    integrity: dict[str, str] = {}

    async def library_integrity() -> str:
        if "tessera.js" not in integrity:
            response = await vault.get("/elements/v1/integrity.json")
            response.raise_for_status()
            integrity.update(response.json())
        return integrity["tessera.js"]

    def page_policy() -> str:
        vault_origin = settings.vault_url
        return (
            f"default-src 'self'; script-src 'self' {vault_origin}; frame-src {vault_origin}; "
            "connect-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )

    @get("/")
    async def checkout() -> Response[bytes]:
        try:
            sri = await library_integrity()
        except httpx.HTTPError:
            return Response(
                b"The vault is not answering yet; reload in a moment.",
                status_code=503,
                media_type="text/plain",
            )
        page = (
            (STATIC / "checkout.html")
            .read_text()
            .replace("{{vault}}", html.escape(settings.vault_url))
            .replace("{{integrity}}", html.escape(sri))
            .replace("{{publishable_key}}", html.escape(settings.publishable_key))
            .replace("{{item}}", html.escape(ITEM))
            .replace("{{price}}", f"{AMOUNT // 100}.{AMOUNT % 100:02d} {CURRENCY}")
        )
        return Response(
            page.encode(),
            media_type="text/html; charset=utf-8",
            headers={"content-security-policy": page_policy(), "cache-control": "no-store"},
        )

    @get("/{name:str}")
    async def static(name: str) -> Response[bytes]:
        types = {"checkout.js": "text/javascript", "checkout.css": "text/css"}
        if name not in types:
            return Response(b"not found", status_code=404, media_type="text/plain")
        return Response((STATIC / name).read_bytes(), media_type=types[name])

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @post("/pay")
    async def pay(request: Request[Any, Any, Any]) -> Response[bytes]:
        try:
            body = msgspec.json.decode(await request.body(), type=PayRequest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _json(400, {"outcome": "error", "message": "Send {token, order}."})
        if not _TOKEN.fullmatch(body.token) or not _ORDER.fullmatch(body.order):
            return _json(400, {"outcome": "error", "message": "Not a token or an order id."})
        payment = {"amount": AMOUNT, "currency": CURRENCY, "token": body.token}
        try:
            response = await api.post(
                "/v1/payments",
                json={**payment, "description": ITEM, "reference": body.order},
                headers={"idempotency-key": f"demo-order-{body.order}"},
            )
        except httpx.HTTPError as exc:
            log(f"order {body.order}: the payment API did not answer ({type(exc).__name__})")
            return _json(502, {"outcome": "error", "message": "The payment API did not answer."})
        result = outcome_of(response.status_code, response.json())
        log(
            f"order {body.order}: {result['outcome']} payment={result.get('payment')} "
            f"decline_code={result.get('decline_code')}"
        )
        return _json(200, result)

    async def close() -> None:
        await api.aclose()
        await vault.aclose()

    async def access_log(message: Any, scope: Any) -> None:
        if message["type"] == "http.response.start":
            log(f"{scope['method']} {scope['path']} {message['status']}")

    return Litestar(
        route_handlers=[checkout, static, healthz, pay],
        on_shutdown=[close],
        before_send=[access_log],
        openapi_config=None,
        request_max_body_size=16 * 1024,
    )


def main() -> None:
    settings = Settings.from_env()
    import uvicorn

    log(f"checkout at http://{settings.host}:{settings.port}/ (vault {settings.vault_url})")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
