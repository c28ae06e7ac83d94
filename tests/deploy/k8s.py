"""Kubernetes steps of make deploy-check (filled in by the k8s work)."""

from __future__ import annotations

from tests.deploy.tools import DeployCheck


def check(check: DeployCheck) -> None:
    check.fail("k8s", "deploy/k8s does not exist yet")
