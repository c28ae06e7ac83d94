"""The reviewed inventory of what the hosted card fields load (PCI DSS 6.4.3), and its upkeep.

`inventory.json` beside this module is the committed, reviewed list of every script and
stylesheet that runs on a payment page because of Tessera: `tessera.js` on the merchant's
checkout page, and inside the iframe (`card.html`) `card.js`, `card.css` and the inline JSON
configuration block (data, not a script). Each entry says why it is there, who loads it, its
URL path and its Subresource Integrity value (sha384). The change control is that a static
file cannot change without the inventory changing in the same reviewed commit: a test compares
the two and names the command that brings the inventory up to date,

    python -m vault.elements.inventory --write

which rewrites only the integrity values (purposes and loaders are written by a person; a new
file without an entry is refused). `vault.elements.integrity` compares what the vault serves
with this file, from the worker on a schedule and from the assessor's kit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from functools import cache
from pathlib import Path
from typing import Literal

import msgspec

STATIC = Path(__file__).parent / "static"
INVENTORY_PATH = Path(__file__).parent / "inventory.json"
UPDATE_COMMAND = "python -m vault.elements.inventory --write"
#: Where the static files are served (vault/elements/routes.py).
URL_PREFIX = "/elements/v1/"

AssetType = Literal["script", "stylesheet", "page"]


class Asset(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file the hosted fields load, as reviewed."""

    name: str
    type: AssetType
    path: str
    loaded_by: str
    purpose: str
    #: sha384 of the file, as a Subresource Integrity value (`sha384-<base64>`). For the page
    #: (a template, filled per request) it is the template's.
    integrity: str
    note: str = ""


class InlineBlock(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `<script>` element without `src` in a page: allowed only when it is data."""

    id: str
    page: str
    type: str
    purpose: str
    why_not_a_script: str


class Inventory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str
    update: str
    assets: tuple[Asset, ...]
    inline: tuple[InlineBlock, ...] = ()

    def asset(self, name: str) -> Asset | None:
        return next((a for a in self.assets if a.name == name), None)

    def by_path(self, path: str) -> Asset | None:
        return next((a for a in self.assets if a.path == path), None)

    def served(self) -> tuple[Asset, ...]:
        """The assets served byte for byte as they are on disk (not the templated page)."""
        return tuple(a for a in self.assets if a.type != "page")


def sri(data: bytes) -> str:
    """The Subresource Integrity value of `data` (sha384, base64): what a browser compares."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def load(path: Path = INVENTORY_PATH) -> Inventory:
    return msgspec.json.decode(path.read_bytes(), type=Inventory)


@cache
def committed() -> Inventory:
    """The inventory as shipped with this code (read once per process)."""
    return load()


def static_files() -> dict[str, str]:
    """Every file under static/, by name, with its integrity value."""
    return {p.name: sri(p.read_bytes()) for p in sorted(STATIC.iterdir()) if p.is_file()}


def differences(inventory: Inventory, files: dict[str, str] | None = None) -> list[str]:
    """Why the inventory does not describe the static files (empty: it does)."""
    files = static_files() if files is None else files
    problems = []
    for name, value in files.items():
        asset = inventory.asset(name)
        if asset is None:
            problems.append(
                f"static/{name} is not in the inventory: add an entry for it by hand (purpose, "
                f"loaded_by, path) to vault/elements/inventory.json, then run {UPDATE_COMMAND}"
            )
        elif asset.integrity != value:
            problems.append(
                f"static/{name} changed: the inventory says {asset.integrity}, the file is "
                f"{value}; review the change and run {UPDATE_COMMAND} (commit both together)"
            )
        elif asset.path != URL_PREFIX + name:
            problems.append(f"{name}: the inventory's path {asset.path} is not {URL_PREFIX}{name}")
    for asset in inventory.assets:
        if asset.name not in files:
            problems.append(f"the inventory lists {asset.name}, which static/ does not have")
    return problems


def updated(inventory: Inventory, files: dict[str, str]) -> Inventory:
    """The inventory with each listed asset's integrity taken from its file."""
    unlisted = sorted(set(files) - {a.name for a in inventory.assets})
    if unlisted:
        raise ValueError(
            f"not in the inventory: {', '.join(unlisted)}; add an entry for each by hand "
            "(purpose, loaded_by, path), then run this again"
        )
    assets = tuple(
        msgspec.structs.replace(a, integrity=files[a.name])
        for a in inventory.assets
        if a.name in files
    )
    return msgspec.structs.replace(inventory, assets=assets)


def dump(inventory: Inventory) -> str:
    return json.dumps(msgspec.to_builtins(inventory), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vault.elements.inventory",
        description="Check (default) or update the card fields' script inventory.",
    )
    parser.add_argument(
        "--write", action="store_true", help="rewrite the integrity values from the files"
    )
    args = parser.parse_args(argv)
    inventory = load()
    if args.write:
        try:
            new = updated(inventory, static_files())
        except ValueError as exc:
            print(f"inventory: {exc}", file=sys.stderr)
            return 1
        INVENTORY_PATH.write_text(dump(new))
        changed = [a.name for a, b in zip(inventory.assets, new.assets, strict=True) if a != b]
        print(f"inventory: {', '.join(changed) or 'nothing'} updated in {INVENTORY_PATH}")
        return 0
    problems = differences(inventory)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"inventory: {len(inventory.assets)} assets match {STATIC}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
