"""The payment page's scripts (PCI DSS 6.4.3, 11.6.1): the reviewed inventory and the check.

- Change control: a static file of the hosted fields cannot change without
  vault/elements/inventory.json changing in the same commit (the first test fails, and says how
  to update it).
- The check (`vault.elements.integrity`), against the session's vault: what it serves is what
  the inventory lists; through a compromised edge (a reverse proxy that appends a skimmer or
  rewrites a header) each difference is named, with both hashes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.conftest import VaultMerchant
from tests.support.processes import ServiceProcess
from tests.support.tampering_edge import SKIMMER, TamperingEdge
from vault.elements import inventory
from vault.elements.integrity import _PageParser, check
from vault.elements.inventory import UPDATE_COMMAND, differences, dump, load, sri, static_files

ORIGIN = "https://shop.example"  # the session's `shop` fixture registers it


def listed(name: str) -> str:
    """The inventory's integrity value for `name`."""
    asset = load().asset(name)
    assert asset is not None, name
    return asset.integrity


def test_the_inventory_lists_every_static_file_with_its_current_hash() -> None:
    problems = differences(load())
    assert problems == [], (
        "vault/elements/static changed without the script inventory (PCI DSS 6.4.3):\n"
        + "\n".join(problems)
        + f"\nreview the change, run `{UPDATE_COMMAND}`, and commit both in one commit"
    )
    # --write on an up-to-date inventory changes nothing: the file is in its canonical form.
    assert dump(inventory.updated(load(), static_files())) == inventory.INVENTORY_PATH.read_text()


def test_a_changed_or_new_static_file_is_reported_with_the_command_that_updates_the_inventory() -> (
    None
):
    files = static_files()
    files["card.js"] = sri(b"/* not the reviewed file */")
    files["analytics.js"] = sri(b"track()")

    problems = differences(load(), files)

    assert len(problems) == 2, problems
    changed = next(p for p in problems if "card.js" in p)
    assert listed("card.js") in changed
    assert files["card.js"] in changed
    assert UPDATE_COMMAND in changed
    assert "analytics.js is not in the inventory" in next(p for p in problems if "analytics" in p)
    with pytest.raises(ValueError, match=r"analytics\.js"):
        inventory.updated(load(), files)  # a purpose is written by a person, never generated


def test_the_iframe_page_carries_no_hand_written_hash_and_only_inventoried_scripts() -> None:
    template = (inventory.STATIC / "card.html").read_text()
    assert "sha384-" not in template
    parser = _PageParser()
    parser.feed(template)
    listed = {a.path: a for a in load().assets}
    for script in parser.scripts:
        if script["src"] == "inline":
            block = next(b for b in load().inline if b.id == script["id"])
            assert (script["type"], block.type) == ("application/json", "application/json")
        else:
            assert listed[script["src"]].type == "script"
            assert script["integrity"] == "{{integrity:card.js}}"
    assert [s["integrity"] for s in parser.stylesheets] == ["{{integrity:card.css}}"]
    assert parser.active == []


def test_every_inventory_entry_says_why_it_is_there_and_who_loads_it() -> None:
    entries = load()
    assert {a.name for a in entries.assets} == set(static_files())
    for asset in entries.assets:
        assert len(asset.purpose) > 40, asset.name
        assert len(asset.loaded_by) > 10, asset.name
        assert re.fullmatch(r"sha384-[A-Za-z0-9+/]{64}", asset.integrity), asset.name
    assert [b.id for b in entries.inline] == ["tessera-config"]
    assert "never execute" in entries.inline[0].why_not_a_script


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def edge(vault: ServiceProcess) -> Iterator[TamperingEdge]:
    proxy = TamperingEdge(vault.url).start()
    yield proxy
    proxy.stop()


async def test_the_vault_serves_exactly_what_the_inventory_lists(
    vault: ServiceProcess, shop: VaultMerchant, http: httpx.AsyncClient
) -> None:
    report = await check(
        http, vault.url, load(), publishable_key=shop.publishable_key, origin=ORIGIN
    )

    assert report.problems == []
    assert [(a.name, a.match) for a in report.assets] == [
        ("tessera.js", True),
        ("card.js", True),
        ("card.css", True),
    ]
    assert report.card_page is not None
    assert report.card_page.template["match"] is True
    served = {s["src"]: s["integrity"] for s in report.card_page.scripts}
    assert served["/elements/v1/card.js"] == listed("card.js")
    assert report.card_page.csp["frame-ancestors"] == [ORIGIN]
    assert report.refusal["status"] == 403
    assert report.to_dict()["ok"] is True


async def test_without_a_merchant_key_the_page_part_says_it_was_not_checked(
    vault: ServiceProcess, http: httpx.AsyncClient
) -> None:
    report = await check(http, vault.url, load())

    assert report.ok
    assert report.card_page is None
    assert "not fetched" in report.card_page_not_checked
    assert report.refusal["status"] == 403  # the refusal is still judged


async def test_scripts_altered_at_the_edge_are_named_with_both_hashes(
    vault: ServiceProcess, shop: VaultMerchant, edge: TamperingEdge, http: httpx.AsyncClient
) -> None:
    edge.tamper = {"/elements/v1/tessera.js": SKIMMER, "/elements/v1/card.css": SKIMMER}
    original = httpx.get(vault.url + "/elements/v1/tessera.js").content

    report = await check(
        http, edge.url, load(), publishable_key=shop.publishable_key, origin=ORIGIN
    )

    mismatches = {p.asset: p for p in report.problems if p.kind == "hash_mismatch"}
    assert set(mismatches) == {"tessera.js", "card.css"}
    assert mismatches["tessera.js"].expected == listed("tessera.js")
    assert mismatches["tessera.js"].served == sri(original + SKIMMER)
    assert {p.kind for p in report.problems} == {"hash_mismatch"}
    assert any(p.startswith("/elements/v1/card.html?") for p in edge.seen)  # all went through it


async def test_a_script_injected_into_the_iframe_page_and_a_loosened_policy_are_caught(
    vault: ServiceProcess, shop: VaultMerchant, edge: TamperingEdge, http: httpx.AsyncClient
) -> None:
    edge.tamper = {
        "/elements/v1/card.html": b'<script src="https://cdn.evil.example/s.js"></script>'
    }
    edge.replace_headers = {
        "content-security-policy": "default-src *; script-src * 'unsafe-inline'; frame-ancestors *"
    }

    report = await check(
        http, edge.url, load(), publishable_key=shop.publishable_key, origin=ORIGIN
    )

    kinds = {(p.kind, p.asset) for p in report.problems}
    assert ("not_inventoried", "card.html") in kinds
    assert ("page_changed", "card.html") in kinds
    assert ("csp", "card.html") in kinds
    assert ("refusal", "card.html") in kinds  # the refusal lost frame-ancestors 'none' too
    unlisted = next(p for p in report.problems if p.kind == "not_inventoried")
    assert "https://cdn.evil.example/s.js" in unlisted.message
    csp = {p.expected: p.served for p in report.problems if p.kind == "csp"}
    assert csp["'self'"] == "* 'unsafe-inline'"
    assert csp[ORIGIN] == "*"
