"""Control `segmentation`: the network segmentation test passed, recently.

`make segmentation` (root; `python -m tests.segmentation`) deploys deploy/flows.yaml as
nftables rules between network namespaces with the real services inside, probes every
(source, destination, port), runs payments end to end through the policy, proves the matrix
bites and runs a negative control; it writes its result to `.run/segmentation/latest.json`
(TESSERA_PCI_SEGMENTATION_RESULT). This control judges that file:

- missing: not checked ("never run on this machine"), never a pass;
- a failed run, or a result without its probe counts: fail;
- older than six months on the report's clock (`ctx.now`): fail. A service provider tests
  segmentation controls at least every six months (11.4.6) and after any change to them;
- else pass, with the date, the commit and the counts.

With `--run-segmentation` the kit runs `make segmentation` first; it needs root (network
namespaces), and without it the control is not checked, with the reason.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult

CONTROL = Control(
    "segmentation",
    "Network segmentation: the flows of deploy/flows.yaml and nothing else, tested recently",
    ("1.2.1", "1.3.1", "1.3.2", "11.4.5"),
)

#: A service provider tests segmentation at least once every six months (11.4.6).
MAX_AGE = datetime.timedelta(days=183)
#: `make segmentation` takes about a minute here; allow a slow machine plenty more.
RUN_TIMEOUT_SECONDS = 1800.0
_COUNTS = ("probes", "allowed", "allowed_reachable", "denied", "denied_blocked")


def judge(result: dict[str, Any], now: datetime.datetime) -> tuple[list[str], str]:
    """The failures (one line each) and the pass summary, from a result file's content."""
    failures = []
    missing = [k for k in ("date", "passed", *_COUNTS) if k not in result]
    if missing:
        return [f"the result lacks {', '.join(missing)}: not a complete run"], ""
    date = datetime.datetime.fromisoformat(str(result["date"]))
    if date.tzinfo is None:
        date = date.replace(tzinfo=datetime.UTC)
    age = now - date
    if not result["passed"]:
        failed = ", ".join(result.get("failed_checks") or []) or "see the result file"
        failures.append(f"the last run ({date.date()}) failed: {failed}")
    if result["allowed_reachable"] != result["allowed"]:
        failures.append(
            f"allowed flows reachable {result['allowed_reachable']}/{result['allowed']}"
        )
    if result["denied_blocked"] != result["denied"]:
        failures.append(f"denied probes blocked {result['denied_blocked']}/{result['denied']}")
    if result.get("mismatches"):
        failures.append(f"{len(result['mismatches'])} probes disagree with flows.yaml")
    if age > MAX_AGE:
        failures.append(
            f"the last run is {age.days} days old ({date.date()}): segmentation must be tested "
            f"at least every {MAX_AGE.days} days (11.4.6); run `make segmentation` (root)"
        )
    if age < -datetime.timedelta(minutes=5):
        failures.append(f"the result is dated after the report ({date.isoformat()})")
    negative = result.get("negative_control") or {}
    summary = (
        f"last run {date.date()} ({age.days} days before the report) at commit "
        f"{str(result.get('commit') or '?')[:12]}: {result['probes']} probes, allowed and "
        f"reachable {result['allowed_reachable']}/{result['allowed']}, denied and blocked "
        f"{result['denied_blocked']}/{result['denied']}, 0 mismatches; negative control: "
        f"{negative.get('through_with_policy_off', '?')}/{negative.get('denied_probes', '?')} "
        "denied probes get through with the policy off"
    )
    return failures, summary


def _modified(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


async def _run_make(root: Path, result: Path) -> str | None:
    """Run `make segmentation`; the reason it produced no new result, or None."""
    if os.geteuid() != 0:
        return "`make segmentation` needs root (network namespaces, nftables); run the kit as root"
    if shutil.which("make") is None:
        return "`make` is not installed"
    before = _modified(result)
    process = await asyncio.create_subprocess_exec(
        "make",
        "-C",
        str(root),
        "segmentation",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        code = await asyncio.wait_for(process.wait(), RUN_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"`make segmentation` did not finish in {RUN_TIMEOUT_SECONDS:.0f} s"
    after = _modified(result)
    if after is None or after == before:
        # A run that fails its checks still writes a (failed) result; no result means it
        # could not run at all (a missing tool, no namespaces).
        return f"`make segmentation` exited {code} without writing {result}"
    return None


async def run(ctx: EvidenceContext) -> ControlResult:
    path = Path(ctx.settings.segmentation_result)
    if not path.is_absolute():
        path = ctx.root / path
    ran: str | None = None
    if ctx.run_segmentation:
        reason = await _run_make(ctx.root, path)
        if reason:
            return CONTROL.not_checked(reason, {"result_file": str(path)})
        ran = "the kit ran `make segmentation` for this report"
    if not path.exists():
        return CONTROL.not_checked(
            f"never run on this machine: run `make segmentation` (root); no {path}",
            {"result_file": str(path)},
        )
    result: dict[str, Any] = json.loads(path.read_text())
    failures, summary = judge(result, ctx.now)
    evidence = {"result_file": str(path), "run_by_kit": ran is not None, "result": result}
    return CONTROL.judged(failures, summary, evidence)
