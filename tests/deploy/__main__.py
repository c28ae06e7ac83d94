"""`make deploy-check`: every offline check of deploy/ and the Dockerfiles; exit 1 on a failure."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.deploy import k8s, terraform
from tests.deploy.tools import ROOT, DeployCheck

DOCKERFILES = [
    "Dockerfile.api",
    "Dockerfile.vault",
    "deploy/Dockerfile.sandbox",
    "deploy/loadtest/Dockerfile",
]
#: Every YAML tree yamllint judges (the PCI kit's docs join when they exist).
YAML_TREES = ["deploy", "docs/pci", ".yamllint.yaml"]


def yamllint(check: DeployCheck) -> None:
    trees = [tree for tree in YAML_TREES if (ROOT / tree).exists()]
    config = str(ROOT / ".yamllint.yaml")
    check.run("yamllint", [check.tool("yamllint"), "--strict", "-c", config, *trees])


def dockerfiles(check: DeployCheck) -> None:
    argv = [check.tool("checkov"), "--quiet", "--compact", "--skip-download"]
    argv += ["--framework", "dockerfile"]
    for name in DOCKERFILES:
        argv += ["-f", name]
    if check.run("checkov dockerfiles", argv).returncode == 0:
        check.ok("checkov dockerfiles", f"{len(DOCKERFILES)} Dockerfiles, 0 failed checks")


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
