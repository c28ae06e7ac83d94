"""pip-audit over the installed environment (what uv.lock pins, dev tools included), judged
honestly: pip-audit says "No known vulnerabilities found" and exits 0 even when it could audit
nothing (every package "could not be audited" because the advisory data was unreachable).

Three outcomes, one line each:
- `pip-audit: PASS` - every package was looked up and none has a known vulnerability (exit 0);
- `pip-audit: FAIL` - a known vulnerability (exit 1), or pip-audit failed for another reason
  (exit 2);
- `pip-audit: NOT CHECKED` - the advisory data could not be fetched for some or all packages.
  This is never a pass, and says so; it exits 0 so that a machine without that network does not
  turn CI red (`make security` prints the line prominently).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: pip-audit's own words for a package it could not look up.
_NOT_AUDITED = re.compile(r"could not be audited|not found on PyPI", re.IGNORECASE)
#: A pip-audit crash caused by the network rather than by us.
_NETWORK = re.compile(
    r"ConnectionError|Max retries|Failed to establish|Name or service not known|"
    r"Temporary failure in name resolution|Network is unreachable|timed out|SSLError|"
    r"ProxyError|RemoteDisconnected|ServiceError|50[234] Server Error",
    re.IGNORECASE,
)


#: The environment this interpreter runs in; our own package (editable) has no advisories.
PIP_AUDIT = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--skip-editable"]
PIP_AUDIT += ["--format", "json"]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # PASS, FAIL or NOT CHECKED
    exit_code: int
    lines: list[str]


def judge(report: dict[str, Any]) -> Verdict:
    """The verdict on pip-audit's JSON report (`--format json`)."""
    dependencies = report.get("dependencies", [])
    editable = [d for d in dependencies if "editable" in d.get("skip_reason", "")]
    unaudited = [d for d in dependencies if _NOT_AUDITED.search(d.get("skip_reason", ""))]
    audited = [d for d in dependencies if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    counts = (
        f"{len(audited)} of {len(dependencies) - len(editable)} packages audited"
        f"{f', {len(unaudited)} could not be' if unaudited else ''}"
    )
    if vulnerable:
        lines = [f"pip-audit: FAIL - known vulnerabilities ({counts})"]
        for dependency in vulnerable:
            for vuln in dependency["vulns"]:
                fixes = ", ".join(vuln.get("fix_versions", [])) or "no fixed version"
                lines.append(
                    f"  {dependency['name']} {dependency['version']}: {vuln['id']} (fix: {fixes})"
                )
        return Verdict("FAIL", 1, lines)
    if unaudited or not audited:
        names = ", ".join(d["name"] for d in unaudited[:8]) + (
            ", ..." if len(unaudited) > 8 else ""
        )
        return Verdict(
            "NOT CHECKED",
            0,
            [
                f"pip-audit: NOT CHECKED - advisory data unreachable ({counts}: {names}). "
                "This is NOT a pass: run `make security` where PyPI's advisory data is reachable."
            ],
        )
    return Verdict("PASS", 0, [f"pip-audit: PASS - no known vulnerabilities ({counts})"])


def run(timeout_seconds: float = 300, arguments: Sequence[str] = ()) -> Verdict:
    """pip-audit with `arguments` added (default: the installed environment; the assessor's
    kit passes `-r <the lock's runtime requirements> --disable-pip`)."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "audit.json"
        try:
            completed = subprocess.run(
                [*PIP_AUDIT, *arguments, "--output", str(out)],
                capture_output=True,
                timeout=timeout_seconds,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Verdict(
                "NOT CHECKED",
                0,
                [
                    f"pip-audit: NOT CHECKED - no answer in {timeout_seconds:.0f} s. "
                    "This is NOT a pass."
                ],
            )
        errors = completed.stderr.decode(errors="replace")
        if out.exists() and out.stat().st_size:
            return judge(json.loads(out.read_text()))
    if _NETWORK.search(errors):
        reason = _NETWORK.search(errors)
        assert reason is not None
        return Verdict(
            "NOT CHECKED",
            0,
            [
                f"pip-audit: NOT CHECKED - advisory data unreachable ({reason.group()}). "
                "This is NOT a pass."
            ],
        )
    return Verdict("FAIL", 2, ["pip-audit: FAIL - pip-audit did not run:", errors[-2000:]])


def main() -> int:
    verdict = run()
    banner = "!" * 78
    if verdict.outcome == "NOT CHECKED":
        print(banner)
    for line in verdict.lines:
        print(line)
    if verdict.outcome == "NOT CHECKED":
        print(banner)
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
