"""`/elements/v1/…`: the card-fields library, the iframe page and its assets.

- `tessera.js` is what a merchant's page loads (with the Subresource Integrity hash that
  `integrity.json` publishes); it is served to any origin (CORS `*`, as SRI needs).
- `card.html?key=pk_…&origin=https://shop.example` is the iframe. It is served only when the
  key is a merchant's and the origin one of that merchant's registered origins, with a strict
  Content-Security-Policy whose `frame-ancestors` is exactly that origin, so no other page can
  frame it. Its script posts messages to that origin only and accepts messages from it only.
- The iframe's `POST /v1/tokens` comes from the vault's own origin; `vault.routes` accepts that
  origin for token creation (the framing rules above decide who can use the fields).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from litestar import Controller, Request, Response, get

from core.cards import IIN_RANGES, MAX_EXPIRY_YEARS_AHEAD, Brand
from core.errors import InvalidRequest
from vault.elements.inventory import sri
from vault.listeners import PUBLIC
from vault.merchants import normalize_origin

STATIC = Path(__file__).parent / "static"
_KEY = re.compile(r"pk_(test|live)_[0-9a-f]{16,64}")

ASSET_TYPES = {
    "tessera.js": "text/javascript; charset=utf-8",
    "card.js": "text/javascript; charset=utf-8",
    "card.css": "text/css; charset=utf-8",
}
COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@cache
def asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def integrity(name: str = "tessera.js") -> str:
    """The Subresource Integrity value a `<script>` or `<link>` tag carries for the asset."""
    return sri(asset(name))


def card_policy(origin: str) -> str:
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        f"frame-ancestors {origin}"
    )


@cache
def brand_config() -> dict[str, Any]:
    """The brand rules of core.cards, for the fields' live validation (one source of truth)."""
    brands = {b.value: {"lengths": sorted(b.lengths), "cvc": b.cvc_length} for b in Brand}
    ranges = sorted(IIN_RANGES, key=lambda r: -r.width)
    return {
        "brands": brands,
        "ranges": [[r.low, r.high, r.width, r.brand.value] for r in ranges],
        "max_years_ahead": MAX_EXPIRY_YEARS_AHEAD,
    }


#: `{{integrity:card.js}}` in card.html: that asset's Subresource Integrity value.
_INTEGRITY_SLOT = re.compile(r"\{\{integrity:([a-z]+\.(?:js|css))\}\}")


@cache
def card_template() -> str:
    """card.html with the integrity of card.js and card.css filled in from the files, so the
    browser refuses either if what arrives is not what this vault has (the values are never
    written into the HTML by hand; vault/elements/inventory.json lists them for review)."""
    template = (STATIC / "card.html").read_text()
    return _INTEGRITY_SLOT.sub(lambda slot: integrity(slot[1]), template)


def card_page(key: str, origin: str) -> bytes:
    config = {"key": key, "origin": origin, **brand_config()}
    # JSON inside <script>: "<" escaped, so no value can close the element.
    data = json.dumps(config, separators=(",", ":")).replace("<", "\\u003c")
    return card_template().replace("{{config}}", data).encode()


def _refused() -> Response[bytes]:
    return Response(
        b"These card fields cannot be shown on this page.\n",
        status_code=403,
        media_type="text/plain; charset=utf-8",
        headers={
            **COMMON_HEADERS,
            "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
            "cache-control": "no-store",
        },
    )


class ElementsController(Controller):
    path = "/elements/v1"
    opt = {"listeners": PUBLIC}
    tags = ["card fields"]
    include_in_schema = False

    @get("/card.html", operation_id="cardFieldsPage")
    async def card(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        key = request.query_params.get("key", "")
        origin = request.query_params.get("origin", "")
        if not _KEY.fullmatch(key) or not origin:
            return _refused()
        try:
            origin = normalize_origin(origin)
        except InvalidRequest:
            return _refused()
        merchant = await request.app.state.merchant_directory.by_publishable_key(key)
        if merchant is None or origin not in merchant.allowed_origins:
            return _refused()
        return Response(
            card_page(key, origin),
            media_type="text/html; charset=utf-8",
            headers={
                **COMMON_HEADERS,
                "content-security-policy": card_policy(origin),
                "cache-control": "no-store",
            },
        )

    @get("/integrity.json", operation_id="cardFieldsIntegrity")
    async def integrity_hashes(self) -> Response[bytes]:
        body = json.dumps({"tessera.js": integrity("tessera.js")}).encode()
        return Response(
            body,
            media_type="application/json",
            headers={**COMMON_HEADERS, "access-control-allow-origin": "*"},
        )

    @get("/{name:str}", operation_id="cardFieldsAsset")
    async def static_asset(self, name: str) -> Response[bytes]:
        if name not in ASSET_TYPES:
            return Response(b"", status_code=404, headers=COMMON_HEADERS)
        headers = {**COMMON_HEADERS, "cache-control": "public, max-age=300"}
        if name == "tessera.js":
            # Loaded cross-origin with an integrity hash: SRI needs CORS.
            headers["access-control-allow-origin"] = "*"
            headers["cross-origin-resource-policy"] = "cross-origin"
        return Response(asset(name), media_type=ASSET_TYPES[name], headers=headers)
