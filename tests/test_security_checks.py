"""The checks behind `make security`: the project's semgrep rules fire on bad code and not on
good code, the card-number detector finds real-looking card numbers but not the documented test
cards, the secrets check fails on a new finding without printing it, and pip-audit's verdict is
never a pass when the advisory data could not be fetched."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tessera.security.luhn_secrets import ALLOWED_TEST_CARDS, card_numbers
from tessera.security.pip_audit_gate import judge
from tessera.security.secrets_check import check
from tests.support.processes import ROOT

RULES = ROOT / ".semgrep"
SEMGREP = str(Path(sys.executable).with_name("semgrep"))  # the venv's, beside its python


def with_check_digit(body: str) -> str:
    """`body` plus its Luhn check digit: card numbers made here, never written in the repo."""
    total = 0
    for index, char in enumerate(reversed(body)):
        value = int(char) * (2 if index % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return body + str((10 - total % 10) % 10)


# --- semgrep ---------------------------------------------------------------------------------


def test_each_semgrep_rule_fires_on_its_bad_examples_and_not_on_its_good_ones() -> None:
    """`semgrep --test`: every `# ruleid:` line must match and every `# ok:` line must not."""
    rules = sorted(p.stem for p in RULES.glob("*.yaml"))
    assert rules == ["aes-mode-not-gcm", "card-data-in-log", "random-for-secret", "secret-compare"]
    for rule in rules:
        fixture = (RULES / f"{rule}.py").read_text()
        assert "# ruleid:" in fixture, rule
        assert "# ok:" in fixture, rule
    run = subprocess.run(
        [SEMGREP, "--test", "--metrics=off", "--disable-version-check", "."],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(rules)}/{len(rules)}: ✓ All tests passed" in run.stdout + run.stderr


# --- the card-number detector ----------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        with_check_digit("411111111111111"),  # 16 digits
        with_check_digit("37144963539843"),  # 15 (amex length)
        with_check_digit("601100099013942"),
        with_check_digit("420000000000"),  # 13
        with_check_digit("622126000000000000"),  # 19
    ],
)
def test_a_luhn_valid_number_that_is_not_a_test_card_is_found(number: str) -> None:
    assert list(card_numbers(f"card: {number}.")) == [number]
    grouped = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    assert list(card_numbers(f'"pan": "{grouped}"')) == [grouped]
    dashed = grouped.replace(" ", "-")
    assert list(card_numbers(dashed)) == [dashed]


def test_the_documented_test_cards_are_allowed() -> None:
    text = " ".join(sorted(ALLOWED_TEST_CARDS))
    assert list(card_numbers(text)) == []
    assert "4242424242424242" in ALLOWED_TEST_CARDS


def test_every_card_number_in_the_docs_is_a_test_card() -> None:
    """docs/ may show only numbers the detector allows; it would flag any other."""
    found = [
        (path.name, n)
        for path in (ROOT / "docs").glob("*.md")
        for n in card_numbers(path.read_text())
    ]
    assert found == []
    documented = set(re.findall(r"\b\d{15,16}\b", (ROOT / "docs" / "api.md").read_text()))
    assert documented
    assert documented <= ALLOWED_TEST_CARDS


@pytest.mark.parametrize(
    "text",
    [
        with_check_digit("411111111111111")[:-1] + "0",  # fails the Luhn check (digit changed)
        "auth_" + with_check_digit("411111111111111"),  # inside an identifier
        with_check_digit("411111111111111") + "a9",
        with_check_digit("41111111111"),  # 12 digits: too short
        with_check_digit("4111111111111111111"),  # 20 digits: too long
        "order 12345, amount 5000",
        '"redis": 0.41358293426207604,',  # a decimal fraction that happens to pass Luhn
    ],
)
def test_what_is_not_a_card_number_is_not_found(text: str) -> None:
    if text.isdigit() and len(text) == 16:
        assert with_check_digit(text[:-1]) != text  # the case really is Luhn-invalid
    assert list(card_numbers(text)) == []


# --- the secrets check (detect-secrets with the detector) ------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_a_new_card_number_fails_the_secrets_check_without_being_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # check() moves into the repository; restored afterwards
    repo = tmp_path / "repo"
    (repo / "tessera" / "security").mkdir(parents=True)
    shutil.copy(ROOT / "tessera" / "security" / "luhn_secrets.py", repo / "tessera" / "security")
    (repo / "app.py").write_text('TEST_CARD = "4242424242424242"\n')
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    assert check(repo, update=True) == 0
    assert check(repo) == 0, capsys.readouterr().out

    number = with_check_digit("4" + str(uuid.uuid4().int)[:14])
    (repo / "notes.md").write_text(f"refund for card {number} please\n")
    _git(repo, "add", "notes.md")
    capsys.readouterr()
    assert check(repo) == 1
    out = capsys.readouterr().out
    assert "notes.md:1: Card number (Luhn-valid, not a documented test card)" in out
    assert number not in out
    assert number[-8:] not in out

    assert check(repo, update=True) == 0  # a reviewed baseline accepts it
    assert check(repo) == 0


def test_an_sri_hash_is_not_a_secret_but_the_same_value_elsewhere_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """vault/elements/inventory.json pins each script by its public sha384: only a line that is
    an `"integrity": "sha384-…"` member is let through, not the same value under another name."""
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "repo"
    (repo / "tessera" / "security").mkdir(parents=True)
    shutil.copy(ROOT / "tessera" / "security" / "luhn_secrets.py", repo / "tessera" / "security")
    value = base64.b64encode(hashlib.sha384(uuid.uuid4().bytes).digest()).decode()
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    assert check(repo, update=True) == 0  # the baseline of a repository without either file
    (repo / "inventory.json").write_text(f'{{\n  "integrity": "sha384-{value}",\n}}\n')
    _git(repo, "add", "inventory.json")
    assert check(repo) == 0, capsys.readouterr().out
    (repo / "settings.json").write_text(f'{{\n  "signing_key": "{value}"\n}}\n')
    _git(repo, "add", "settings.json")
    capsys.readouterr()
    assert check(repo) == 1
    assert "settings.json:2: Base64 High Entropy String" in capsys.readouterr().out


# --- pip-audit's verdict ---------------------------------------------------------------------


def _dependency(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "version": "1.0", **fields}


def test_pip_audit_that_could_audit_nothing_is_not_a_pass() -> None:
    """The real report on a machine whose registry has no advisory data: every package
    skipped, and pip-audit itself says "No known vulnerabilities found" with exit 0."""
    unreachable = "Dependency not found on PyPI and could not be audited: x (1.0)"
    report = {
        "dependencies": [
            _dependency("aiohttp", skip_reason=unreachable),
            _dependency("httpx", skip_reason=unreachable),
            {"name": "tessera", "skip_reason": "distribution marked as editable"},
        ]
    }
    verdict = judge(report)
    assert verdict.outcome == "NOT CHECKED"
    assert verdict.exit_code == 0
    assert "NOT a pass" in verdict.lines[0]
    assert "0 of 2 packages audited" in verdict.lines[0]


def test_pip_audit_with_some_packages_unaudited_is_not_a_pass() -> None:
    report = {
        "dependencies": [
            _dependency("aiohttp", vulns=[]),
            _dependency("httpx", skip_reason="Dependency not found on PyPI and could not be"),
        ]
    }
    assert judge(report).outcome == "NOT CHECKED"
    assert judge({"dependencies": []}).outcome == "NOT CHECKED"


def test_pip_audit_with_a_known_vulnerability_fails() -> None:
    vuln = {"id": "GHSA-xxxx-yyyy-zzzz", "fix_versions": ["3.14.6"], "aliases": []}
    report = {"dependencies": [_dependency("aiohttp", vulns=[vuln]), _dependency("x", vulns=[])]}
    verdict = judge(report)
    assert (verdict.outcome, verdict.exit_code) == ("FAIL", 1)
    assert "  aiohttp 1.0: GHSA-xxxx-yyyy-zzzz (fix: 3.14.6)" in verdict.lines


def test_pip_audit_with_every_package_audited_and_clean_passes() -> None:
    report = {"dependencies": [_dependency("aiohttp", vulns=[]), _dependency("x", vulns=[])]}
    verdict = judge(report)
    assert (verdict.outcome, verdict.exit_code) == ("PASS", 0)
    assert "2 of 2 packages audited" in verdict.lines[0]


def test_a_real_pip_audit_run_without_a_network_says_not_checked() -> None:
    """pip-audit itself, in a network namespace with no route anywhere."""
    gate = "tessera.security.pip_audit_gate"
    namespace = f"tsaud{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
    try:
        run = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", gate],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    assert run.returncode == 0, run.stderr
    assert "pip-audit: NOT CHECKED" in run.stdout
    assert "NOT a pass" in run.stdout
    assert "PASS -" not in run.stdout
