"""`tessera pci evidence --out DIR`: run every check, write report.md and report.json.

Exit status: 1 when any control fails, 0 otherwise ("not checked" is listed first in the report,
with its reason, and is never counted as a pass). A check that cannot reach what it looks at
(a connection refused, a time-out) is "not checked"; a check that breaks in any other way fails,
with the error: the kit cannot vouch for what it could not see.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import asyncpg
import httpx
import redis.exceptions

from core.redaction import redact
from tessera.devstack import StackConfig
from tessera.pci.checks import CHECKS
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.model import Control, ControlResult, Status
from tessera.runtime.commands import load_or_exit

#: Errors that mean "could not look", not "looked and found something wrong".
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    httpx.TransportError,
    asyncpg.CannotConnectNowError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
#: One check may take this long before it is reported as not checked.
CHECK_TIMEOUT_SECONDS = 600.0


class CheckModule(Protocol):
    CONTROL: Control

    async def run(self, ctx: EvidenceContext) -> ControlResult: ...


def load_check(name: str) -> CheckModule:
    return cast(CheckModule, importlib.import_module(f"tessera.pci.checks.{name}"))


async def run_check(module: CheckModule, ctx: EvidenceContext) -> ControlResult:
    started = time.monotonic()
    control = module.CONTROL
    try:
        result = await asyncio.wait_for(module.run(ctx), CHECK_TIMEOUT_SECONDS)
    except UNREACHABLE as exc:
        result = control.not_checked(f"could not reach what it checks: {_error(exc)}")
    except Exception as exc:  # a broken check must show, not vanish
        result = control.failed(f"the check itself broke: {_error(exc)}")
    return dataclasses.replace(result, seconds=time.monotonic() - started)


def _error(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:500]


async def gather(ctx: EvidenceContext, only: Sequence[str] = ()) -> list[ControlResult]:
    results = []
    for name in CHECKS:
        try:
            module = load_check(name)
        except ImportError as exc:  # a check that cannot load is a broken check: it fails
            control = Control(name.replace("_", "-"), name.replace("_", " "), ())
            if not only or control.id in only:
                results.append(control.failed(f"the check itself broke: {_error(exc)}"))
            continue
        if only and module.CONTROL.id not in only:
            continue
        results.append(await run_check(module, ctx))
    return results


def control_ids() -> list[str]:
    """Every control's id, in report order (a module that cannot load: its file's name)."""
    ids = []
    for name in CHECKS:
        try:
            ids.append(load_check(name).CONTROL.id)
        except ImportError:
            ids.append(name.replace("_", "-"))
    return ids


def _commit(root: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run(
            [git, "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def report(ctx: EvidenceContext, results: list[ControlResult]) -> dict[str, Any]:
    counts = {str(s): sum(r.status == s for r in results) for s in Status}
    return {
        "title": "Tessera PCI DSS v4.0.1 evidence",
        "generated_at": ctx.now.isoformat(),
        "date": ctx.now.date().isoformat(),
        "host": socket.gethostname(),
        "commit": _commit(ctx.root),
        "targets": {
            "api": ctx.settings.api_url,
            "vault": ctx.settings.vault_url,
            "vault_service": ctx.settings.service_url,
            "vault_admin": ctx.settings.admin_url,
        },
        "verdict": "fail" if counts["fail"] else "pass",
        "counts": counts,
        "not_checked": [
            {"control": r.control.id, "reason": r.summary}
            for r in results
            if r.status == Status.NOT_CHECKED
        ],
        "controls": [r.to_dict() for r in results],
    }


_MARK = {"pass": "PASS", "fail": "**FAIL**", "not_checked": "NOT CHECKED"}
_MAX_EVIDENCE_CHARS = 12_000


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# {data['title']}: {data['date']}",
        "",
        f"Generated {data['generated_at']} on `{data['host']}` at commit `{data['commit']}`.",
        f"Verdict: **{data['verdict'].upper()}** — "
        + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in data["counts"].items())
        + ".",
        "",
    ]
    if data["not_checked"]:
        lines += ["## Not checked (these are not passes)", ""]
        lines += [f"- `{n['control']}`: {n['reason']}" for n in data["not_checked"]]
        lines.append("")
    lines += [
        "## Summary",
        "",
        "| Control | Requirements | Result | Summary |",
        "|---|---|---|---|",
    ]
    for c in data["controls"]:
        summary = c["summary"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{c['control']}` {c['title']} | {', '.join(c['requirements'])} "
            f"| {_MARK[c['status']]} | {summary} |"
        )
    lines.append("")
    for c in data["controls"]:
        lines += [
            f"## `{c['control']}`: {c['title']}",
            "",
            f"Requirements {', '.join(c['requirements'])}. Result: {_MARK[c['status']]} "
            f"({c['seconds']} s).",
            "",
            c["summary"],
            "",
        ]
        lines += [f"- {d}" for d in c["details"]]
        if c["details"]:
            lines.append("")
        raw = json.dumps(c["evidence"], indent=2, default=str)
        if len(raw) > _MAX_EVIDENCE_CHARS:
            raw = raw[:_MAX_EVIDENCE_CHARS] + "\n… (cut here; report.json holds all of it)"
        lines += [
            "<details><summary>Evidence</summary>",
            "",
            "```json",
            raw,
            "```",
            "",
            "</details>",
        ]
        lines.append("")
    return "\n".join(lines)


def write(out: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """Both files, with every Luhn-valid digit run masked once more (a safety net)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(redact(json.dumps(data, indent=2, default=str)) + "\n")
    md_path.write_text(redact(markdown(data)) + "\n")
    return json_path, md_path


async def evidence(
    settings: EvidenceSettings,
    out: Path,
    *,
    now: datetime.datetime | None = None,
    only: Sequence[str] = (),
    run_segmentation: bool = False,
    root: Path | None = None,
) -> dict[str, Any]:
    ctx = EvidenceContext(
        settings=settings,
        now=now or datetime.datetime.now(datetime.UTC),
        root=root or Path(os.environ.get("TESSERA_ROOT") or Path.cwd()),
        out=out,
        run_segmentation=run_segmentation,
    )
    try:
        results = await gather(ctx, only)
    finally:
        await ctx.close()
    data = report(ctx, results)
    write(out, data)
    return data


def dev_stack_environment(run: Path | None = None) -> dict[str, str]:
    """The kit's settings for `make up`'s stack: its admin token and the demo merchant's
    publishable key and origin, which `tessera dev` keeps under .run/."""
    run = run or Path(os.environ.get("TESSERA_ROOT") or Path.cwd()) / ".run"
    env: dict[str, str] = {}
    dev_env = run / "dev.env"
    if dev_env.exists():
        for line in dev_env.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name == "TESSERA_VAULT_ADMIN_TOKEN":
                env[name] = value.strip()
    demo = run / "demo.json"
    if demo.exists():
        data = json.loads(demo.read_text())
        env["TESSERA_PCI_PUBLISHABLE_KEY"] = str(data.get("publishable_key", ""))
        env["TESSERA_PCI_CHECKOUT_ORIGIN"] = StackConfig.from_env().demo_origin
    env["TESSERA_PCI_LOG_PATHS"] = str(run / "logs")
    return env


def _timestamp(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera pci", description="The assessor's kit.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evidence", help="gather the evidence; exit 1 if a control fails")
    run.add_argument("--out", required=True, type=Path, help="directory for report.md/.json")
    run.add_argument("--only", default="", help="comma-separated control ids (default: all)")
    run.add_argument("--now", type=_timestamp, help="judge as of this ISO time (default: now)")
    run.add_argument(
        "--run-segmentation",
        action="store_true",
        help="run `make segmentation` now (root, minutes) instead of reading the last result",
    )
    run.add_argument(
        "--dev-stack",
        action="store_true",
        help="take unset settings from `make up`'s stack (.run/dev.env, .run/demo.json)",
    )
    args = parser.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(control_ids()))
    if unknown:  # a typo must not turn into an empty report that passes
        parser.error(
            f"--only: no control {', '.join(unknown)}; the controls: {', '.join(control_ids())}"
        )
    if args.dev_stack:
        os.environ.update({k: v for k, v in dev_stack_environment().items() if k not in os.environ})
    settings = load_or_exit(EvidenceSettings, "pci")
    data = asyncio.run(
        evidence(
            settings, args.out, now=args.now, only=only, run_segmentation=args.run_segmentation
        )
    )
    for c in data["controls"]:
        print(f"{_MARK[c['status']]:<12} {c['control']:<22} {redact(c['summary'])[:160]}")
    print(f"report: {args.out / 'report.md'} and report.json; verdict {data['verdict']}")
    return 1 if data["verdict"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
