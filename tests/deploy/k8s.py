"""Kubernetes steps of make deploy-check: render every kustomization under deploy/k8s, validate
each object against its schema, and let checkov judge the rendered output.

- `kubectl kustomize` renders the gke and local overlays and the Locust run (deploy/k8s/load).
- Built-in kinds: `kubernetes-validate --strict` against the Kubernetes version GKE runs.
- Custom resources (Istio, the CSI driver, GKE, Managed Prometheus): the strict JSON schemas
  in deploy/k8s/schemas/, one per apiVersion and kind. A kind with neither is a failure, never
  a skip.
- checkov `--framework kubernetes` on every rendered output: zero failed checks; suppressions
  are `checkov.io/skip*` annotations on the object, each with its reason.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import DEPLOY, DeployCheck

K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
#: Each kustomization that is applied on its own, by the name its output is written under.
RENDERED = {"gke": K8S / "gke", "local": K8S / "local", "load": K8S / "load"}
#: Manifests applied by hand beside a kustomization's output, checked with it.
BY_HAND = {"load": [K8S / "load" / "reader.yaml"]}
#: The Kubernetes minor version GKE's regular channel runs (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33"
#: API groups of the built-in kinds (kubernetes-validate knows their schemas).
BUILT_IN_GROUPS = frozenset(
    {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}
)


def api_group(document: dict[str, Any]) -> str:
    api_version = str(document["apiVersion"])
    return api_version.split("/")[0] if "/" in api_version else ""


def schema_path(document: dict[str, Any]) -> Path:
    """deploy/k8s/schemas/<kind>-<group>-<version>.json, lower case."""
    group, _, version = str(document["apiVersion"]).rpartition("/")
    return SCHEMAS / f"{str(document['kind']).lower()}-{group}-{version}.json"


def render(check: DeployCheck) -> dict[str, list[dict[str, Any]]]:
    """Each kustomization rendered into check.out/<name>.yaml, and its documents."""
    rendered: dict[str, list[dict[str, Any]]] = {}
    for name, folder in RENDERED.items():
        result = check.run(f"kustomize {name}", ["kubectl", "kustomize", str(folder)])
        if result.returncode != 0:
            continue
        text = result.stdout
        for path in BY_HAND.get(name, []):
            text += "---\n" + path.read_text()
        (check.out / f"{name}.yaml").write_text(text)
        documents = [doc for doc in yaml.safe_load_all(text) if doc]
        rendered[name] = documents
        check.ok(f"kustomize {name}", f"{len(documents)} objects")
    return rendered


def validate_built_in(check: DeployCheck, name: str, documents: list[dict[str, Any]]) -> None:
    built_in = [doc for doc in documents if api_group(doc) in BUILT_IN_GROUPS]
    path = check.out / f"{name}-built-in.yaml"
    path.write_text(yaml.safe_dump_all(built_in, sort_keys=False))
    argv = [check.tool("kubernetes-validate"), "--strict", "--quiet"]
    argv += ["-k", f"{KUBERNETES_VERSION}.0", str(path)]
    result = check.run(f"kubernetes-validate {name}", argv)
    # kubernetes-validate only warns about a kind it has no schema for: that is a failure here.
    if "Couldn't find schema" in result.stdout + result.stderr:
        check.fail(f"kubernetes-validate {name}", "a built-in kind without a schema")
    elif result.returncode == 0:
        check.ok(f"kubernetes-validate {name}", f"{len(built_in)} objects, --strict")


def validate_custom(check: DeployCheck, name: str, documents: list[dict[str, Any]]) -> None:
    step = f"CRD schemas {name}"
    try:
        # jsonschema ships no type information; it is what kubernetes-validate runs on too.
        jsonschema: Any = importlib.import_module("jsonschema")
    except ImportError:
        check.fail(step, "the jsonschema package is missing from this environment")
        return
    custom = [doc for doc in documents if api_group(doc) not in BUILT_IN_GROUPS]
    problems: list[str] = []
    for doc in custom:
        where = f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
        path = schema_path(doc)
        if not path.is_file():
            problems.append(f"{where}: no schema ({path.relative_to(K8S)}): write one")
            continue
        validator = jsonschema.Draft202012Validator(json.loads(path.read_text()))
        for error in validator.iter_errors(doc):
            at = "/".join(str(part) for part in error.absolute_path)
            problems.append(f"{where}: {at}: {error.message}")
    for problem in problems:
        print(f"  {problem}")
    if problems:
        check.fail(step, f"{len(problems)} problem(s)")
    else:
        check.ok(step, f"{len(custom)} objects against deploy/k8s/schemas")


def checkov(check: DeployCheck, names: list[str]) -> None:
    argv = [check.tool("checkov"), "--quiet", "--compact", "--skip-download"]
    argv += ["--framework", "kubernetes"]
    for name in names:
        argv += ["-f", str(check.out / f"{name}.yaml")]
    if check.run("checkov kubernetes", argv).returncode == 0:
        check.ok("checkov kubernetes", f"{', '.join(names)}: 0 failed checks")


def check(check: DeployCheck) -> None:
    rendered = render(check)
    for name, documents in rendered.items():
        validate_built_in(check, name, documents)
        validate_custom(check, name, documents)
    if rendered:
        checkov(check, list(rendered))
