"""The import rules hold, and the check that enforces them does bite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("core", "api", "vault", "sandbox", "tessera")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_import_rules() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/money.py", "import litestar", "core is the pure domain"),
        ("core/cards.py", "import asyncpg", "core is the pure domain"),
        ("core/ids.py", "import redis", "core is the pure domain"),
        ("api/settings.py", "import vault.settings", "never import each other"),
        ("vault/settings.py", "from api import settings", "never import each other"),
    ],
)
def test_a_forbidden_import_fails_the_check(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    root = copy_of_tree(tmp_path)
    target = root / module
    target.write_text(f"{line}\n" + target.read_text())
    result = lint_imports(root)
    assert result.returncode != 0
    assert broken in result.stdout
    assert "BROKEN" in result.stdout


#: Statements that change a connection's session state, which the pools no longer reset on
#: release (tessera/runtime/db.py): a SET that is not LOCAL, LISTEN, advisory locks, set_config
#: with is_local false.
SESSION_STATE = re.compile(
    r"""["'](?:SET\s+(?!LOCAL\b)|LISTEN\b)|pg_advisory_lock|set_config\([^)]*false"""
)


#: Code that opens its own connection (asyncpg.connect), never a pooled one.
OWN_CONNECTION = {"tessera/runtime/migrations.py"}


def session_state_changes(root: Path) -> list[str]:
    found = []
    for package in ("api", "vault", "tessera/runtime"):
        for path in sorted((root / package).rglob("*.py")):
            if str(path.relative_to(root)) in OWN_CONNECTION:
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if SESSION_STATE.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_pooled_connection_changes_its_session_state() -> None:
    assert session_state_changes(ROOT) == []


def test_the_session_state_check_bites(tmp_path: Path) -> None:
    tree = copy_of_tree(tmp_path)
    target = tree / "api" / "storage" / "payments.py"
    target.write_text(target.read_text() + '\nQUERY = "SET statement_timeout = 0"\n')
    assert [line.split(":")[0] for line in session_state_changes(tree)] == [
        "api/storage/payments.py"
    ]
