"""Does the vault serve the payment page its inventory describes? (PCI DSS 6.4.3, 11.6.1)

Everything is fetched over HTTP from the vault's public base URL, as a browser fetches it
(through whatever edge, CDN or proxy is in front), and compared with the reviewed inventory
(vault/elements/inventory.json):

- every inventoried script and stylesheet: its sha384 against the inventory's, `nosniff`;
- `integrity.json`: it publishes tessera.js's inventoried value (what merchants pin);
- `card.html` for a real merchant (a publishable key and one of its registered origins, when
  given): the Content-Security-Policy (`default-src 'none'`, `script-src 'self'`,
  `frame-ancestors` exactly that origin, and otherwise the vault's own policy), every
  `<script src>` and `<link rel=stylesheet>` inventoried and carrying the inventoried integrity,
  no script the inventory does not list (inline, event handler, `javascript:` URL), and the page
  equal to the reviewed template once its per-request parts are put back;
- `card.html` for a key no merchant has: refused, with `frame-ancestors 'none'`.

The vault worker runs it every few minutes (vault/watchdog.py) and the assessor's kit on demand
(tessera/pci/checks/payment_page_scripts.py). It only sends GETs.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode

import httpx

from vault.elements.inventory import URL_PREFIX, Inventory, sri
from vault.elements.routes import card_policy

#: The response headers recorded for each fetch (the 11.6.1 "HTTP headers" of the page).
RECORDED_HEADERS = (
    "content-type",
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "cache-control",
    "access-control-allow-origin",
    "cross-origin-resource-policy",
)
CONTENT_TYPES = {"script": "text/javascript", "stylesheet": "text/css", "page": "text/html"}
#: What integrity.json must publish: the library merchants' pages pin (the rest load inside
#: the iframe, with the integrity card.html carries).
PUBLISHED = ("tessera.js",)
#: The origin the refusal is asked for: reserved (RFC 6761), so no merchant can have it.
UNKNOWN_ORIGIN = "https://unregistered.invalid"

_CONFIG_BLOCK = re.compile(
    r'(<script type="application/json" id="tessera-config">)(.*?)(</script>)', re.DOTALL
)
# An inventoried asset's tag in the page, up to its integrity value (the template's order).
_ASSET_INTEGRITY = re.compile(
    r'(<(?:script|link)\b[^>]*\b(?:src|href)="' + re.escape(URL_PREFIX) + r'([a-z]+\.(?:js|css))"'
    r'[^>]*\bintegrity=")([^"]*)(")'
)


@dataclass
class Problem:
    """One difference between what is served and what was reviewed."""

    #: hash_mismatch, not_inventoried, integrity_attribute, csp, header, status, page_changed,
    #: config, refusal, published_integrity
    kind: str
    asset: str
    message: str
    expected: str = ""
    served: str = ""


@dataclass
class AssetCheck:
    name: str
    path: str
    status: int
    expected: str
    served: str
    match: bool
    headers: dict[str, str]


@dataclass
class PageCheck:
    """card.html as served for one merchant key and origin."""

    url: str
    status: int
    headers: dict[str, str]
    csp: dict[str, list[str]]
    #: Each `<script>`: its src (or "inline"), type, integrity; each stylesheet likewise.
    scripts: list[dict[str, str]]
    stylesheets: list[dict[str, str]]
    #: The page with its configuration and integrity values put back: sha384, and whether it
    #: is the reviewed template's.
    template: dict[str, Any]


@dataclass
class IntegrityReport:
    base_url: str
    assets: list[AssetCheck] = field(default_factory=list)
    published: dict[str, Any] = field(default_factory=dict)
    card_page: PageCheck | None = None
    #: Why card.html was not fetched for a merchant (no key or origin given), else "".
    card_page_not_checked: str = ""
    refusal: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def mask_key(key: str) -> str:
    """A publishable key is public, but evidence and logs need only enough of it to recognise."""
    return f"{key[:8]}…{key[-4:]}" if len(key) > 16 else key


def parse_csp(value: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives.setdefault(words[0].lower(), words[1:])
    return directives


def _headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in RECORDED_HEADERS if name in response.headers}


class _PageParser(HTMLParser):
    """The elements of a page that run or style something, and any attribute that runs code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict[str, str]] = []
        self.stylesheets: list[dict[str, str]] = []
        #: Event handlers, javascript: URLs, frames and plug-ins: never in the reviewed page.
        self.active: list[str] = []
        self._in_script: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name, value in values.items():
            if name.startswith("on"):
                self.active.append(f"<{tag} {name}=…> (an inline event handler)")
            if value.strip().lower().startswith("javascript:"):
                self.active.append(f"<{tag} {name}=javascript:…>")
        if tag in ("iframe", "frame", "object", "embed", "base"):
            self.active.append(f"<{tag}>")
        if tag == "script":
            entry = {
                "src": values.get("src", "") or "inline",
                "type": values.get("type", ""),
                "id": values.get("id", ""),
                "integrity": values.get("integrity", ""),
            }
            self.scripts.append(entry)
            self._in_script = entry
        elif tag == "link":
            rel = values.get("rel", "").lower().split()
            as_script = values.get("as", "").lower() == "script"
            if "stylesheet" in rel:
                self.stylesheets.append(
                    {"href": values.get("href", ""), "integrity": values.get("integrity", "")}
                )
            elif {"modulepreload", "preload", "prefetch"} & set(rel) and (
                as_script or "modulepreload" in rel
            ):
                self.scripts.append(
                    {
                        "src": values.get("href", ""),
                        "type": "preload",
                        "id": "",
                        "integrity": values.get("integrity", ""),
                    }
                )

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None


async def _get(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await http.get(url, headers={"accept": "*/*", "cache-control": "no-cache"})


def _check_nosniff(report: IntegrityReport, name: str, headers: dict[str, str]) -> None:
    if headers.get("x-content-type-options", "").lower() != "nosniff":
        report.problems.append(
            Problem(
                "header",
                name,
                "X-Content-Type-Options is not nosniff",
                "nosniff",
                headers.get("x-content-type-options", ""),
            )
        )


async def _check_assets(http: httpx.AsyncClient, report: IntegrityReport, inv: Inventory) -> None:
    for asset in inv.served():
        response = await _get(http, report.base_url + asset.path)
        served = sri(response.content) if response.status_code == 200 else ""
        headers = _headers(response)
        match = served == asset.integrity
        report.assets.append(
            AssetCheck(
                asset.name,
                asset.path,
                response.status_code,
                asset.integrity,
                served,
                match,
                headers,
            )
        )
        if response.status_code != 200:
            report.problems.append(
                Problem(
                    "status", asset.name, f"{asset.path} answered {response.status_code}", "200"
                )
            )
            continue
        if not match:
            report.problems.append(
                Problem(
                    "hash_mismatch",
                    asset.name,
                    f"{asset.path} is not the reviewed {asset.type}: its sha384 differs from "
                    "the inventory's",
                    asset.integrity,
                    served,
                )
            )
        _check_nosniff(report, asset.name, headers)
        wanted = CONTENT_TYPES[asset.type]
        if not headers.get("content-type", "").startswith(wanted):
            report.problems.append(
                Problem(
                    "header",
                    asset.name,
                    f"{asset.path} is not served as {wanted}",
                    wanted,
                    headers.get("content-type", ""),
                )
            )


async def _check_published(
    http: httpx.AsyncClient, report: IntegrityReport, inv: Inventory
) -> None:
    """integrity.json is where merchants copy tessera.js's hash from."""
    response = await _get(http, report.base_url + URL_PREFIX + "integrity.json")
    published: dict[str, Any] = {}
    if response.status_code == 200:
        try:
            loaded = json.loads(response.content)
            published = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            published = {}
    report.published = {"status": response.status_code, "values": published}
    for name in sorted({*PUBLISHED, *published}):
        asset = inv.asset(name)
        expected = asset.integrity if asset is not None else ""
        if published.get(name) != expected:
            report.problems.append(
                Problem(
                    "published_integrity",
                    name,
                    "integrity.json does not publish the inventoried value",
                    expected,
                    str(published.get(name, "")),
                )
            )


def _normalized(page: str) -> str:
    """The page with its per-request parts put back as the template's placeholders."""
    page = _CONFIG_BLOCK.sub(lambda m: m[1] + "{{config}}" + m[3], page, count=1)
    return _ASSET_INTEGRITY.sub(lambda m: f"{m[1]}{{{{integrity:{m[2]}}}}}{m[4]}", page)


def _check_page_elements(
    report: IntegrityReport, inv: Inventory, parser: _PageParser, page_name: str
) -> None:
    inline_ids = {block.id: block for block in inv.inline if block.page == page_name}
    for script in parser.scripts:
        if script["src"] == "inline":
            block = inline_ids.get(script["id"])
            if block is None or script["type"] != block.type:
                report.problems.append(
                    Problem(
                        "not_inventoried",
                        page_name,
                        f"an inline <script> (type {script['type'] or 'JavaScript'}, id "
                        f"{script['id'] or 'none'}) that the inventory does not list",
                    )
                )
            continue
        _check_listed(report, inv, page_name, "script", script["src"], script["integrity"])
    for sheet in parser.stylesheets:
        _check_listed(report, inv, page_name, "stylesheet", sheet["href"], sheet["integrity"])
    for active in parser.active:
        report.problems.append(
            Problem("not_inventoried", page_name, f"{active}: code the inventory does not list")
        )


def _check_listed(
    report: IntegrityReport, inv: Inventory, page: str, kind: str, url: str, integrity: str
) -> None:
    asset = inv.by_path(url)
    if asset is None or asset.type != kind:
        report.problems.append(
            Problem("not_inventoried", page, f"a {kind} the inventory does not list: {url}")
        )
    elif integrity != asset.integrity:
        report.problems.append(
            Problem(
                "integrity_attribute",
                asset.name,
                f"{page} loads {url} without the inventoried integrity",
                asset.integrity,
                integrity,
            )
        )


async def _check_card_page(
    http: httpx.AsyncClient, report: IntegrityReport, inv: Inventory, key: str, origin: str
) -> None:
    page_asset = next(a for a in inv.assets if a.type == "page")
    query = urlencode({"key": key, "origin": origin})
    response = await _get(http, f"{report.base_url}{page_asset.path}?{query}")
    headers = _headers(response)
    csp = parse_csp(headers.get("content-security-policy", ""))
    parser = _PageParser()
    text = response.content.decode("utf-8", errors="replace")
    parser.feed(text)
    normalized = sri(_normalized(text).encode())
    report.card_page = PageCheck(
        url=f"{page_asset.path}?key={mask_key(key)}&origin={origin}",
        status=response.status_code,
        headers=headers,
        csp=csp,
        scripts=parser.scripts,
        stylesheets=parser.stylesheets,
        template={
            "expected": page_asset.integrity,
            "served": normalized,
            "match": normalized == page_asset.integrity,
        },
    )
    name = page_asset.name
    if response.status_code != 200:
        report.problems.append(
            Problem(
                "status",
                name,
                f"card.html answered {response.status_code} for the merchant's key and origin "
                "(is the origin registered for the key?)",
                "200",
                str(response.status_code),
            )
        )
        return
    _check_nosniff(report, name, headers)
    for directive, wanted in (
        ("default-src", ["'none'"]),
        ("script-src", ["'self'"]),
        ("frame-ancestors", [origin]),
    ):
        if csp.get(directive) != wanted:
            report.problems.append(
                Problem(
                    "csp",
                    name,
                    f"Content-Security-Policy {directive} is not {' '.join(wanted)}",
                    " ".join(wanted),
                    " ".join(csp.get(directive, [])),
                )
            )
    expected_policy = parse_csp(card_policy(origin))
    if csp != expected_policy:
        report.problems.append(
            Problem(
                "csp",
                name,
                "the Content-Security-Policy is not the vault's card-fields policy",
                card_policy(origin),
                headers.get("content-security-policy", ""),
            )
        )
    _check_page_elements(report, inv, parser, name)
    if normalized != page_asset.integrity:
        report.problems.append(
            Problem(
                "page_changed",
                name,
                "card.html is not the reviewed template (vault/elements/static/card.html) once "
                "its configuration and integrity values are put back",
                page_asset.integrity,
                normalized,
            )
        )
    config = _CONFIG_BLOCK.search(text)
    try:
        values = json.loads(config[2]) if config else {}
    except ValueError:
        values = {}
    if not isinstance(values, dict) or (values.get("key"), values.get("origin")) != (key, origin):
        report.problems.append(
            Problem("config", name, "the configuration block is not this merchant's key and origin")
        )


async def _check_refusal(http: httpx.AsyncClient, report: IntegrityReport, inv: Inventory) -> None:
    """A key no merchant has must get a page no site can frame."""
    page_asset = next(a for a in inv.assets if a.type == "page")
    key = "pk_test_" + secrets.token_hex(16)
    query = urlencode({"key": key, "origin": UNKNOWN_ORIGIN})
    response = await _get(http, f"{report.base_url}{page_asset.path}?{query}")
    headers = _headers(response)
    csp = parse_csp(headers.get("content-security-policy", ""))
    report.refusal = {
        "url": f"{page_asset.path}?key={mask_key(key)}&origin={UNKNOWN_ORIGIN}",
        "status": response.status_code,
        "headers": headers,
    }
    if response.status_code != 403:
        report.problems.append(
            Problem(
                "refusal",
                page_asset.name,
                f"card.html for an unknown key answered {response.status_code}",
                "403",
                str(response.status_code),
            )
        )
    if csp.get("frame-ancestors") != ["'none'"]:
        report.problems.append(
            Problem(
                "refusal",
                page_asset.name,
                "the refusal for an unknown key may be framed: frame-ancestors is not 'none'",
                "'none'",
                " ".join(csp.get("frame-ancestors", [])),
            )
        )
    _check_nosniff(report, f"{page_asset.name} (refusal)", headers)


async def check(
    http: httpx.AsyncClient,
    base_url: str,
    inventory: Inventory,
    *,
    publishable_key: str = "",
    origin: str = "",
) -> IntegrityReport:
    """Compare what `base_url` serves with `inventory`. Transport errors propagate: what could
    not be fetched was not compared (the caller says "unreachable", never "ok")."""
    report = IntegrityReport(base_url.rstrip("/"))
    await _check_assets(http, report, inventory)
    await _check_published(http, report, inventory)
    if publishable_key and origin:
        await _check_card_page(http, report, inventory, publishable_key, origin)
    else:
        report.card_page_not_checked = (
            "no merchant publishable key and registered origin were given, so card.html was "
            "not fetched as a merchant's page (its CSP, scripts and template are not compared)"
        )
    await _check_refusal(http, report, inventory)
    return report
