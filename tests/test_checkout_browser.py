"""The demo checkout in a real browser: Debian's headless Chromium, driven by Playwright.

A shopper types cards into the vault's hosted fields on the demo merchant's page; the test
watches every request the browser makes and then reads the shop's log and the API's database:
the card number went to the vault's origin and nowhere else. A page on an origin the merchant did
not register can neither mount the fields nor create tokens.

`make screenshots` runs the first test with TESSERA_SCREENSHOTS=docs/img to redraw the README's
pictures; otherwise they are taken into a temporary directory and only checked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from playwright.sync_api import Browser, FrameLocator, Page, Playwright, Route, sync_playwright

from tests.conftest import ApiMerchant, create_merchant, dsn
from tests.support.processes import ServiceProcess, free_port

CHROMIUM = "/usr/bin/chromium"
APPROVED, DECLINED, NOT_LUHN = "4242424242424242", "4000000000000002", "4242424242424241"
PANS = (APPROVED, DECLINED, NOT_LUHN)


@dataclass
class Shop:
    process: ServiceProcess
    merchant: ApiMerchant

    @property
    def url(self) -> str:
        return self.process.url + "/"


@pytest.fixture(scope="module")
def shop(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    tokens: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shop]:
    port = free_port()
    merchant = create_merchant(
        api_env, vault, tokens["admin"], "Browser shop", origins=(f"http://127.0.0.1:{port}",)
    )
    env = {
        "TESSERA_DEMO_PORT": str(port),
        "TESSERA_DEMO_API_URL": api.url,
        "TESSERA_DEMO_VAULT_URL": vault.url,
        "TESSERA_DEMO_PUBLISHABLE_KEY": merchant.publishable_key,
        "TESSERA_DEMO_SECRET_KEY": merchant.secret_key,
    }
    log = tmp_path_factory.mktemp("shop") / "shop.log"
    process = ServiceProcess("sandbox.merchant_demo", env, port, log, args=[])
    process.start(ready_path="/healthz")
    yield Shop(process, merchant)
    process.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "Debian's chromium is missing: `make browser` installs it as root, or run "
            "`sudo apt-get install chromium`. The browser tests never download a browser."
        )
    chromium = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
    )
    yield chromium
    chromium.close()


@dataclass
class Sent:
    url: str
    body: str


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, list[Sent]]]:
    context = browser.new_context(viewport={"width": 900, "height": 1100})
    page = context.new_page()
    sent: list[Sent] = []
    page.on("request", lambda r: sent.append(Sent(r.url, r.post_data or "")))
    yield page, sent
    context.close()


def fields(page: Page) -> FrameLocator:
    return page.frame_locator("iframe[name=tessera-card-fields]")


def type_card(page: Page, number: str, expiry: str = "1234", cvc: str = "123") -> None:
    card = fields(page)
    card.locator("#number").fill("")
    card.locator("#number").press_sequentially(number, delay=15)
    card.locator("#expiry").fill("")
    card.locator("#expiry").press_sequentially(expiry, delay=15)
    card.locator("#cvc").fill("")
    card.locator("#cvc").press_sequentially(cvc, delay=15)


def outcome(page: Page) -> str:
    # Locators, not wait_for_function: the shop's CSP (rightly) forbids the eval it needs.
    result = page.locator("#result:not([data-outcome=''])")
    result.wait_for()
    value: str = result.get_attribute("data-outcome") or ""
    return value


def test_a_shopper_pays_and_the_card_number_only_ever_reaches_the_vault(
    page: tuple[Page, list[Sent]],
    shop: Shop,
    vault: ServiceProcess,
    api: ServiceProcess,
    databases: Any,
    tmp_path: Path,
) -> None:
    browser_page, sent = page
    shots = Path(os.environ.get("TESSERA_SCREENSHOTS") or tmp_path)
    browser_page.goto(shop.url)
    card = fields(browser_page)
    card.locator("#number").wait_for()

    # Live validation: formatting in groups, brand detection, focus moving on.
    card.locator("#number").press_sequentially(APPROVED, delay=15)
    assert card.locator("#number").input_value() == "4242 4242 4242 4242"
    assert card.locator("#brand").get_attribute("data-brand") == "visa"
    browser_page.locator("#brand", has_text="visa").wait_for()
    assert card.locator("#expiry").evaluate("e => e === document.activeElement")
    card.locator("#expiry").press_sequentially("1234", delay=15)
    assert card.locator("#expiry").input_value() == "12 / 34"
    card.locator("#cvc").press_sequentially("123", delay=15)
    browser_page.locator("main").screenshot(path=str(shots / "checkout-filled.png"))

    browser_page.click("#pay")
    assert outcome(browser_page) == "approved"
    assert "approved" in browser_page.inner_text("#result")
    browser_page.locator("main").screenshot(path=str(shots / "checkout-approved.png"))
    listed = httpx.get(
        f"{api.url}/v1/payments", params={"limit": 1}, headers=shop.merchant.auth
    ).json()["data"]
    assert (listed[0]["status"], listed[0]["card"]["last4"]) == ("captured", "4242")

    # A declining card, paid with Enter in the CVC field: the decline reason reaches the shopper.
    browser_page.goto(shop.url)
    type_card(browser_page, DECLINED)
    fields(browser_page).locator("#cvc").press("Enter")
    assert outcome(browser_page) == "declined"
    assert "do_not_honor" in browser_page.inner_text("#result")

    # An invalid number: flagged in the field, never sent anywhere.
    browser_page.goto(shop.url)
    type_card(browser_page, NOT_LUHN)
    number = fields(browser_page).locator("#number")
    assert number.get_attribute("aria-invalid") == "true"
    # The shop's style reached the fields: its font size, and its colour for the error state.
    computed = number.evaluate("e => [getComputedStyle(e).fontSize, getComputedStyle(e).color]")
    assert computed == ["16px", "rgb(176, 0, 32)"]
    browser_page.locator("#field-state", has_text="invalid_number").wait_for()
    requests_before = len(sent)
    browser_page.click("#pay")
    assert outcome(browser_page) == "error"
    assert "invalid_number" in browser_page.inner_text("#result")
    browser_page.locator("main").screenshot(path=str(shots / "checkout-error.png"))
    assert not [s for s in sent[requests_before:] if "/v1/tokens" in s.url or "/pay" in s.url]

    for name in ("checkout-filled.png", "checkout-approved.png", "checkout-error.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Where every card number went, as the browser saw it.
    vault_origin = urlsplit(vault.url)
    carrying = [s for s in sent if any(pan in s.body or pan in s.url for pan in PANS)]
    assert carrying, "the check below would prove nothing"
    for request in carrying:
        parts = urlsplit(request.url)
        assert (parts.scheme, parts.netloc, parts.path) == (
            vault_origin.scheme,
            vault_origin.netloc,
            "/v1/tokens",
        ), request.url
    assert NOT_LUHN not in "".join(s.body for s in sent)

    # Neither the shop's log nor anything in the API's database holds a card number.
    shop_log = shop.process.output()
    assert "POST /pay 200" in shop_log, "the log is captured (the check means something)"
    assert not [pan for pan in PANS if pan in shop_log]
    # (Playwright's sync API holds this thread's event loop: the check runs in another thread.)
    with ThreadPoolExecutor(1) as pool:
        assert not pool.submit(asyncio.run, pans_in_database(databases["api"])).result()


async def pans_in_database(db: Any) -> list[str]:
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    found = []
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        for table in tables:
            name = table["tablename"]
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{name}" t')
            text = "\n".join(r["row"] for r in rows)
            found += [f"{name}:{pan[-4:]}" for pan in PANS if pan in text]
    finally:
        await conn.close()
    return found


def test_a_page_on_an_unregistered_origin_cannot_mount_the_fields_or_create_tokens(
    page: tuple[Page, list[Sent]], shop: Shop, vault: ServiceProcess
) -> None:
    browser_page, _ = page
    statuses: dict[str, int] = {}
    browser_page.on(
        "response",
        lambda r: statuses.__setitem__(urlsplit(r.url).path, r.status),
    )
    # The same shop, reached as localhost: another origin, one the merchant never registered.
    foreign = shop.url.replace("127.0.0.1", "localhost")
    browser_page.goto(foreign)
    browser_page.locator("#result[data-outcome=mount_error]").wait_for(timeout=20_000)
    assert statuses["/elements/v1/card.html"] == 403
    assert fields(browser_page).locator("#number").count() == 0
    attempt = browser_page.evaluate(
        """async ([vault, key]) => {
            try {
                const response = await fetch(vault + "/v1/tokens", {
                    method: "POST",
                    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
                    body: JSON.stringify({number: "4242424242424242", exp_month: 12,
                                          exp_year: 2034, cvc: "123"}),
                });
                return "status " + response.status;
            } catch (error) {
                return "blocked";
            }
        }""",
        [vault.url, shop.merchant.publishable_key],
    )
    assert attempt == "blocked"  # the vault refuses the preflight: no token, no CORS
    preflight = httpx.options(
        vault.url + "/v1/tokens",
        headers={
            "origin": foreign.rstrip("/"),
            "access-control-request-method": "POST",
        },
    )
    assert preflight.status_code == 403


def test_the_fields_reflow_at_200_percent_zoom_and_work_by_keyboard(
    browser: Browser, shop: Shop
) -> None:
    # WCAG's reflow: 320 CSS pixels wide is a 1280-pixel window at 400 %, or 640 at 200 %.
    context = browser.new_context(viewport={"width": 640, "height": 900}, device_scale_factor=2)
    try:
        browser_page = context.new_page()
        browser_page.goto(shop.url)
        browser_page.evaluate("document.documentElement.style.zoom = '200%'")
        card = fields(browser_page)
        card.locator("#number").wait_for()
        overflow = card.locator("body").evaluate(
            "b => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        for field, label in (("number", "Card number"), ("expiry", "Expiry"), ("cvc", "Security")):
            assert card.locator(f"label[for={field}]").inner_text().startswith(label)
            assert card.locator(f"#{field}").is_visible()
        card.locator("#number").focus()
        browser_page.keyboard.press("Tab")
        assert card.locator("#expiry").evaluate("e => e === document.activeElement")
        browser_page.keyboard.press("Tab")
        assert card.locator("#cvc").evaluate("e => e === document.activeElement")
    finally:
        context.close()


def test_the_vault_serves_the_fields_with_a_strict_policy_and_the_library_with_its_hash(
    vault: ServiceProcess, shop: Shop
) -> None:
    import base64
    import hashlib

    library = httpx.get(vault.url + "/elements/v1/tessera.js")
    published = httpx.get(vault.url + "/elements/v1/integrity.json").json()["tessera.js"]
    digest = base64.b64encode(hashlib.sha384(library.content).digest()).decode()
    assert published == f"sha384-{digest}"
    assert library.headers["access-control-allow-origin"] == "*"  # SRI needs CORS
    assert library.headers["x-content-type-options"] == "nosniff"
    checkout = httpx.get(shop.url).text
    assert f'integrity="{published}"' in checkout

    origin = shop.process.url
    page = httpx.get(
        vault.url + "/elements/v1/card.html",
        params={"key": shop.merchant.publishable_key, "origin": origin},
    )
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert f"frame-ancestors {origin}" in policy
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "unsafe" not in policy
    for params in (
        {"key": shop.merchant.publishable_key, "origin": "https://evil.example"},
        {"key": "pk_test_" + "0" * 48, "origin": origin},
        {"key": shop.merchant.publishable_key, "origin": "javascript:alert(1)"},
        {"key": "sk_test_" + "0" * 48, "origin": origin},
    ):
        refused = httpx.get(vault.url + "/elements/v1/card.html", params=params)
        assert refused.status_code == 403
        assert "frame-ancestors 'none'" in refused.headers["content-security-policy"]


def test_the_browser_refuses_a_card_script_altered_on_the_way(
    page: tuple[Page, list[Sent]], shop: Shop
) -> None:
    """card.html carries card.js's integrity (PCI DSS 6.4.3): a copy changed anywhere between
    the vault and the shopper (an edge, a CDN) is not run, so the fields stay inert."""
    browser_page, _ = page

    def tamper(route: Route) -> None:
        original = route.fetch()
        route.fulfill(response=original, body=original.body() + b"\n;void 0;\n")

    browser_page.route("**/elements/v1/card.js", tamper)
    with browser_page.expect_console_message(
        lambda m: "integrity" in m.text.lower(), timeout=20_000
    ) as refusal:
        browser_page.goto(shop.url)
    assert "card.js" in refusal.value.text
    number = fields(browser_page).locator("#number")
    number.press_sequentially("4242424242424242")  # the page itself arrived...
    assert number.input_value() == "4242424242424242"  # ...but no script formats it
