"""`make deploy-check`: every offline check of deploy/ and the Dockerfiles; exit 1 on any failure."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.deploy import k8s, terraform
from tests.deploy.tools import ROOT, DeployCheck

DOCKERFILES = ["Dockerfile.api", "Dockerfile.vault", "deploy/Dockerfile.sandbox", "deploy/loadtest/Dockerfile"]


def yamllint(check: DeployCheck) -> None:
    check.run("yamllint", [check.tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint.yaml"), "deploy", "docs/pci"] if (ROOT / "docs/pci").exists() else [check.tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint.yaml"), "deploy"])


def dockerfiles(check: DeployCheck) -> None:
    argv = [check.tool("checkov"), "--quiet", "--compact", "--framework", "dockerfile", "--skip-download"]
    for name in DOCKERFILES:
        argv += ["-f", name]
    check.run("checkov dockerfiles", argv)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tessera-deploy-check-") as tmp:
        check = DeployCheck(out=Path(tmp))
        yamllint(check)
        dockerfiles(check)
        k8s.check(check)
        terraform.check(check)
    if check.failures:
        print(f"\nmake deploy-check: {len(check.failures)} failed step(s):")
        for failure in check.failures:
            print(f"  - {failure}")
        return 1
    print("\nmake deploy-check: every step passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
