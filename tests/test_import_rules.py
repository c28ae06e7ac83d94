"""The import rules hold, and the check that enforces them does bite."""

from __future__ import annotations

import os
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
