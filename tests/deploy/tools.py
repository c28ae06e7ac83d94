"""What every deploy-check step shares: where the tools are and how a command is judged."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@dataclass
class DeployCheck:
    """Collects the failures of every step; each step prints what it ran and what it judged."""

    out: Path
    failures: list[str] = field(default_factory=list)

    @property
    def venv_bin(self) -> Path:
        """checkov, kubernetes-validate and yamllint live in .venv-deploy (see pyproject.toml)."""
        return Path(os.environ.get("TESSERA_DEPLOY_VENV", ROOT / ".venv-deploy")) / "bin"

    def tool(self, name: str) -> str:
        path = self.venv_bin / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make deploy-venv` (or `make deploy-check`)")
        return str(path)

    def run(
        self, step: str, argv: list[str], *, cwd: Path = ROOT, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command; a non-zero exit is recorded as a failure of `step`, with its output."""
        print(f"--- {step}: {' '.join(argv)}", flush=True)
        result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, input=input)
        if result.returncode != 0:
            sys.stdout.write(result.stdout[-20000:])
            sys.stderr.write(result.stderr[-20000:])
            self.fail(step, f"exit {result.returncode}")
        return result

    def fail(self, step: str, why: str) -> None:
        print(f"FAILED {step}: {why}", flush=True)
        self.failures.append(f"{step}: {why}")

    def ok(self, step: str, what: str) -> None:
        print(f"ok {step}: {what}", flush=True)
