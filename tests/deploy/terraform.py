"""Terraform steps of make deploy-check (filled in by the Terraform work)."""

from __future__ import annotations

from tests.deploy.tools import DeployCheck


def check(check: DeployCheck) -> None:
    check.fail("terraform", "deploy/terraform does not exist yet")
