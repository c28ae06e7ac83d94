"""The PCI alert rules in the two forms Prometheus takes them, kept identical.

deploy/prometheus/pci-alerts.yaml is the plain rule file (promtool checks and unit-tests it);
Google Managed Prometheus on GKE evaluates `Rules` resources instead, so
deploy/k8s/base/cde/alert-rules.yaml carries the same groups as one (namespace tessera-cde: it
sees the vault's metrics). This module writes the resource from the file:

    python -m tests.deploy.alert_rules --write   # after editing pci-alerts.yaml
    python -m tests.deploy.alert_rules           # exit 1 if the two differ

`dump` writes YAML the way yamllint (make deploy-check) wants it: sequences indented.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from tests.deploy.tools import DEPLOY

PLAIN = DEPLOY / "prometheus" / "pci-alerts.yaml"
PROMTOOL_TESTS = DEPLOY / "prometheus" / "pci-alerts.test.yaml"
RESOURCE = DEPLOY / "k8s" / "base" / "cde" / "alert-rules.yaml"
WRITE_COMMAND = "python -m tests.deploy.alert_rules --write"
HEADER = f"""\
# Generated from deploy/prometheus/pci-alerts.yaml (checked and unit-tested with promtool): edit
# that file, then run `{WRITE_COMMAND}`. Managed Prometheus's rule
# evaluator runs these groups over the metrics of this namespace (the vault's): PCI DSS 10.7.2.
"""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def plain_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(PLAIN.read_text())["groups"]
    return groups


def resource_text() -> str:
    document = {
        "apiVersion": "monitoring.googleapis.com/v1",
        "kind": "Rules",
        "metadata": {"name": "tessera-vault-pci-alerts"},
        "spec": {"groups": plain_groups()},
    }
    return HEADER + dump(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.deploy.alert_rules")
    parser.add_argument("--write", action="store_true", help=f"rewrite {RESOURCE.name}")
    args = parser.parse_args(argv)
    wanted = resource_text()
    if args.write:
        RESOURCE.write_text(wanted)
        print(f"wrote {RESOURCE}")
        return 0
    if not RESOURCE.is_file() or RESOURCE.read_text() != wanted:
        print(f"{RESOURCE} differs from {PLAIN}: run `{WRITE_COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
