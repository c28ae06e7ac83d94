"""Control `software-inventory`: a software bill of materials of what the services run, and no
known vulnerability in it.

- **Inventory** (6.3.2): uv exports a CycloneDX 1.5 SBOM of uv.lock's runtime dependencies
  (`uv export --format cyclonedx1.5 --no-dev --frozen`; both services ship one package,
  `tessera`, with one set of dependencies: the Dockerfiles install the same lock) into the
  report's directory as `sbom.cdx.json`. The kit validates it: CycloneDX 1.5, at least one
  component, and every package of the lock's runtime closure (walked from the project's own
  dependencies and the extras it asks for, dev groups left out) present at its locked version.
- **Known vulnerabilities** (6.3.1): pip-audit over exactly those pinned, hashed requirements,
  judged as `make security` judges it (tessera/security/pip_audit_gate.py): advisory data
  unreachable for any package is NOT CHECKED, with the reason, never a pass; a vulnerability
  fails the control with the list; none passes. pip-audit's answer is kept for an hour within
  one process for the same requirements (a test module runs the kit many times; the CLI once).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult
from tessera.security import pip_audit_gate

CONTROL = Control(
    "software-inventory",
    "An SBOM of the services' third-party software, and no known vulnerability in it",
    ("6.3.1", "6.3.2"),
)

SBOM_NAME = "sbom.cdx.json"
UV_TIMEOUT_SECONDS = 120.0
PIP_AUDIT_TIMEOUT_SECONDS = 300.0
#: pip-audit's verdict on the same requirements is reused for this long within a process.
AUDIT_MEMO_SECONDS = 3600.0
_audits: dict[str, tuple[float, datetime.datetime, pip_audit_gate.Verdict]] = {}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def runtime_closure(lock: Mapping[str, Any]) -> dict[str, str]:
    """name -> version of every package the project needs at run time, from uv.lock: the root
    package's dependencies (with the extras they ask for), transitively; dev groups left out.
    Markers are not evaluated: a package needed on any platform belongs to the inventory."""
    packages = {_normal(p["name"]): p for p in lock["package"]}
    roots = [p for p in lock["package"] if "editable" in p.get("source", {})]
    if len(roots) != 1:
        raise ValueError(f"uv.lock: expected one editable project package, found {len(roots)}")
    seen: set[tuple[str, tuple[str, ...]]] = set()
    pending = [
        (_normal(d["name"]), tuple(sorted(d.get("extra", []))))
        for d in roots[0].get("dependencies", [])
    ]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        package = packages[name]
        wanted = list(package.get("dependencies", []))
        for extra in extras:
            wanted += package.get("optional-dependencies", {}).get(extra, [])
        pending += [(_normal(d["name"]), tuple(sorted(d.get("extra", [])))) for d in wanted]
    return {name: str(packages[name]["version"]) for name, _ in seen}


def validate_sbom(
    sbom: Mapping[str, Any], locked: Mapping[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """Failures, and what was compared, of an SBOM against the lock's runtime closure."""
    failures = []
    if sbom.get("bomFormat") != "CycloneDX" or sbom.get("specVersion") != "1.5":
        failures.append(
            f"the SBOM is not CycloneDX 1.5 ({sbom.get('bomFormat')} {sbom.get('specVersion')})"
        )
    components = {
        _normal(str(c.get("name"))): str(c.get("version")) for c in sbom.get("components") or []
    }
    if not components:
        failures.append("the SBOM lists no component")
    missing = sorted(n for n in locked if n not in components)
    wrong = sorted(
        f"{n} {components[n]} (locked {v})"
        for n, v in locked.items()
        if n in components and components[n] != v
    )
    extra = sorted(n for n in components if n not in locked)
    if missing:
        failures.append(f"locked runtime packages missing from the SBOM: {', '.join(missing)}")
    if wrong:
        failures.append(f"SBOM versions differ from the lock: {', '.join(wrong)}")
    if extra:
        failures.append(f"SBOM components outside the lock's runtime closure: {', '.join(extra)}")
    compared = {
        "components": len(components),
        "locked_runtime_packages": len(locked),
        "missing": missing,
        "version_differences": wrong,
        "outside_the_lock": extra,
    }
    return failures, compared


def find_uv(root: Path) -> str | None:
    """The `uv` the Makefile uses: on the PATH, else the one `make` installs under .run/."""
    found = shutil.which("uv")
    if found:
        return found
    private = root / ".run" / "uv" / "bin" / "uv"
    return str(private) if private.exists() else None


async def _uv_export(uv: str, root: Path, fmt: str, out: Path, *extra: str) -> str | None:
    """`uv export` of the lock's runtime dependencies to `out`; an error message, or None."""
    process = await asyncio.create_subprocess_exec(
        uv,
        "export",
        "--format",
        fmt,
        "--frozen",
        "--no-dev",
        *extra,
        "--output-file",
        str(out),
        cwd=root,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), UV_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"`uv export --format {fmt}` did not finish in {UV_TIMEOUT_SECONDS:.0f} s"
    if process.returncode != 0:
        return f"`uv export --format {fmt}` failed: {stderr.decode(errors='replace')[-500:]}"
    return None


async def _audit(requirements: str) -> tuple[pip_audit_gate.Verdict, str, bool]:
    """pip-audit's verdict on the requirements, when it was reached, and whether memoized."""
    pinned = [line for line in requirements.splitlines() if not line.startswith("#")]
    key = hashlib.sha256("\n".join(pinned).encode()).hexdigest()
    memo = _audits.get(key)
    if memo and time.monotonic() - memo[0] < AUDIT_MEMO_SECONDS:
        return memo[2], memo[1].isoformat(), True
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "requirements.txt"
        path.write_text(requirements)
        verdict = await asyncio.to_thread(
            pip_audit_gate.run,
            PIP_AUDIT_TIMEOUT_SECONDS,
            ["--requirement", str(path), "--disable-pip"],
        )
    audited_at = datetime.datetime.now(datetime.UTC)
    _audits[key] = (time.monotonic(), audited_at, verdict)
    return verdict, audited_at.isoformat(), False


async def run(ctx: EvidenceContext) -> ControlResult:
    uv = find_uv(ctx.root)
    if uv is None:
        return CONTROL.not_checked("`uv` is not installed (make installs it under .run/uv)")
    lock_path = ctx.root / "uv.lock"
    locked = runtime_closure(tomllib.loads(lock_path.read_text()))
    ctx.out.mkdir(parents=True, exist_ok=True)
    sbom_path = ctx.out / SBOM_NAME
    error = await _uv_export(
        uv, ctx.root, "cyclonedx1.5", sbom_path, "--preview-features", "sbom-export"
    )
    if error:
        return CONTROL.failed(f"the SBOM could not be made: {error}")
    sbom: dict[str, Any] = json.loads(sbom_path.read_text())
    failures, compared = validate_sbom(sbom, locked)
    tools = (sbom.get("metadata") or {}).get("tools") or []
    evidence: dict[str, Any] = {
        "sbom": str(sbom_path),
        "sbom_sha256": hashlib.sha256(sbom_path.read_bytes()).hexdigest(),
        "made_by": [f"{t.get('name')} {t.get('version')}" for t in tools],
        "lock_sha256": hashlib.sha256(lock_path.read_bytes()).hexdigest(),
        **compared,
    }
    if importlib.util.find_spec("pip_audit") is None:
        evidence["pip_audit"] = "not installed"
        if failures:
            return CONTROL.failed("; ".join(failures), evidence)
        return CONTROL.not_checked(
            f"SBOM valid ({compared['components']} components), but pip-audit is not installed "
            "here, so known vulnerabilities were not looked up: this is NOT a pass",
            evidence,
        )
    with tempfile.TemporaryDirectory() as directory:
        requirements = Path(directory) / "requirements.txt"
        error = await _uv_export(
            uv, ctx.root, "requirements.txt", requirements, "--no-emit-project", "--no-header"
        )
        if error:
            return CONTROL.failed(f"the requirements for pip-audit could not be made: {error}")
        verdict, audited_at, memoized = await _audit(requirements.read_text())
    evidence["pip_audit"] = {
        "outcome": verdict.outcome,
        "lines": verdict.lines,
        "audited_at": audited_at,
        "reused_from_earlier_in_this_process": memoized,
    }
    if verdict.outcome == "FAIL":
        failures += verdict.lines
    if failures:
        return CONTROL.failed("; ".join(failures), evidence)
    if verdict.outcome == "NOT CHECKED":
        return CONTROL.not_checked(
            f"SBOM valid ({compared['components']} components, every locked runtime package at "
            f"its locked version), but {verdict.lines[0]}",
            evidence,
        )
    return CONTROL.passed(
        f"SBOM of {compared['components']} components, every locked runtime package at its "
        f"locked version; {verdict.lines[0]}",
        evidence,
    )
