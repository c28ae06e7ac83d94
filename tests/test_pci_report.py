"""The evidence runner's own rules: how a check's outcome becomes the report and the exit code.

The checks themselves are proved against a real stack in tests/test_pci_evidence.py; here each
rule of the runner is shown on checks that pass, fail, cannot reach their peer or break.
"""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from tessera.pci import evidence
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.model import Control, ControlResult, Status

NOW = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)


def check(control_id: str, outcome: Any) -> Any:
    control = Control(control_id, f"the {control_id} control", ("10.2.1",))

    async def run(ctx: EvidenceContext) -> ControlResult:
        if isinstance(outcome, BaseException):
            raise outcome
        result: ControlResult = outcome(control)
        return result

    return SimpleNamespace(CONTROL=control, run=run)


def context(tmp_path: Path) -> EvidenceContext:
    return EvidenceContext(EvidenceSettings(), NOW, tmp_path, tmp_path / "out")


async def results(tmp_path: Path, *modules: Any) -> list[ControlResult]:
    ctx = context(tmp_path)
    try:
        return [await evidence.run_check(m, ctx) for m in modules]
    finally:
        await ctx.close()


async def test_an_unreachable_peer_is_not_checked_and_a_broken_check_fails(tmp_path: Path) -> None:
    unreachable, broken, fine = await results(
        tmp_path,
        check("a", ConnectionRefusedError(111, "Connect call failed")),
        check("b", KeyError("chain_id")),
        check("c", lambda c: c.passed("all good", {"n": 1})),
    )
    assert unreachable.status == Status.NOT_CHECKED
    assert "could not reach" in unreachable.summary
    assert broken.status == Status.FAILED
    assert "the check itself broke: KeyError" in broken.summary
    assert fine.status == Status.PASSED
    assert fine.seconds >= 0


async def test_a_refused_database_connection_is_not_checked(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = EvidenceSettings(
        vault_database_url=f"postgresql://tessera_auditor@127.0.0.1:{port}/x"
    )

    async def run(ctx: EvidenceContext) -> ControlResult:
        async with ctx.database("vault") as conn:
            await conn.fetchval("SELECT 1")
        return control.passed("unreachable code")

    control = Control("db", "a database control", ("7.2.1",))
    ctx = EvidenceContext(settings, NOW, tmp_path, tmp_path)
    try:
        result = await evidence.run_check(SimpleNamespace(CONTROL=control, run=run), ctx)
    finally:
        await ctx.close()
    assert result.status == Status.NOT_CHECKED


async def test_the_kit_sessions_are_read_only(tmp_path: Path, databases: Any) -> None:
    db = databases["api"]
    settings = EvidenceSettings(
        api_database_url=f"postgresql://tessera_auditor@127.0.0.1:5432/{db.database}"
    )
    ctx = EvidenceContext(settings, NOW, tmp_path, tmp_path)
    try:
        async with ctx.database("api") as conn:
            assert await conn.fetchval("SELECT count(*) >= 0 FROM payments")
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("CREATE TEMPORARY TABLE t (x int)")
    finally:
        await ctx.close()


def test_the_report_lists_not_checked_first_and_fails_on_any_fail(tmp_path: Path) -> None:
    ok = Control("ok", "fine", ("3.2.1",)).passed("fine")
    skipped = Control("seg", "segmentation", ("11.4.5",)).not_checked("never run here")
    bad = Control("pan", "no PAN", ("3.4.1",)).failed(
        "a card number in payments.description", {"found": ["4242 4242 4242 4242"]}
    )
    ctx = context(tmp_path)
    data = evidence.report(ctx, [ok, skipped, bad])
    assert data["verdict"] == "fail"
    assert data["counts"] == {"pass": 1, "fail": 1, "not_checked": 1}
    assert data["not_checked"] == [{"control": "seg", "reason": "never run here"}]
    json_path, md_path = evidence.write(tmp_path / "out", data)
    md = md_path.read_text()
    assert md.index("Not checked (these are not passes)") < md.index("## Summary")
    assert md.startswith("# Tessera PCI DSS v4.0.1 evidence: 2026-11-26")
    # The safety net: a card number that reached the evidence is masked in both files.
    assert "4242 4242 4242 4242" not in md
    assert "4242 4242 4242 4242" not in json_path.read_text()
    assert json.loads(json_path.read_text())["controls"][2]["status"] == "fail"

    data = evidence.report(ctx, [ok, skipped])
    assert data["verdict"] == "pass"


def test_the_dev_stack_settings_come_from_run(tmp_path: Path) -> None:
    (tmp_path / "dev.env").write_text(
        "TESSERA_VAULT_ADMIN_TOKEN=abc\nTESSERA_VAULT_SERVICE_TOKEN=x\n"
    )
    (tmp_path / "demo.json").write_text(json.dumps({"publishable_key": "pk_test_00"}))
    env = evidence.dev_stack_environment(tmp_path)
    assert env["TESSERA_VAULT_ADMIN_TOKEN"] == "abc"
    assert "TESSERA_VAULT_SERVICE_TOKEN" not in env  # the kit holds the admin credential only
    assert env["TESSERA_PCI_PUBLISHABLE_KEY"] == "pk_test_00"
    assert env["TESSERA_PCI_LOG_PATHS"] == str(tmp_path / "logs")


def test_an_unknown_control_in_only_is_refused_not_an_empty_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evidence.main(["evidence", "--out", str(tmp_path), "--only", "keys,kyes"])
    assert exit_info.value.code == 2
    assert "no control kyes" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
    assert evidence.control_ids()[0] == "audit-log"
