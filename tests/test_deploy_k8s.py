"""The rendered GKE manifests (deploy/k8s/gke, plus the Locust run of deploy/k8s/load) say what
issue 11 and deploy/k8s/README.md claim: default deny everywhere; every allowed flow is one of
deploy/flows.yaml's (through deploy/k8s/segments.yaml), none missing, none more; only the
gateway, the API and its worker, and the admin toolbox reach the vault, each on its own port;
only Locust and the vault worker (its payment-page check) reach the gateway from inside;
every pod hardened; every Deployment with probes, limits, a PDB and zone spread; the service
accounts Terraform binds; no secret values; images by digest; settings a production service
accepts. `checker()` is a pure function of the documents; the mutation cases at the end copy
the rendered manifests, weaken one thing each, and show the checker reports it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from api.settings import ApiSettings, OperatorSettings
from tessera.runtime.settings import BaseSettings, SettingsError, load_settings
from tests.segmentation import model
from vault.settings import VaultSettings, VaultWorkerSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
Doc = dict[str, Any]
Flow = tuple[str, str, int, str]  # source segment, destination segment, port, protocol

NAME = "app.kubernetes.io/name"
WORKLOAD_KINDS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
UID = 10001
DIGEST = re.compile(r"^[^@\s:]+(:[0-9]+)?[^@\s:]*@sha256:[0-9a-f]{64}$")
ZONE = "topology.kubernetes.io/zone"

#: Kubernetes service account of each workload, and the environment.env key of the Google
#: service account it is bound to (None: no Google identity). Terraform binds exactly these.
SERVICE_ACCOUNTS: dict[tuple[str, str], str | None] = {
    ("tessera-cde", "tessera-vault"): "VAULT_GSA",
    ("tessera-cde", "tessera-vault-migrate"): "VAULT_MIGRATE_GSA",
    ("tessera-app", "tessera-api"): "API_GSA",
    ("tessera-app", "tessera-worker"): "WORKER_GSA",
    ("tessera-app", "tessera-api-migrate"): "API_MIGRATE_GSA",
    ("tessera-admin", "tessera-admin"): "ADMIN_GSA",
    ("tessera-edge", "tessera-ingressgateway"): "EDGE_GSA",
    ("tessera-load", "locust"): None,
}
#: The Google service account each environment.env key must name (Terraform's names).
GSA_NAMES = {
    "VAULT_GSA": "tessera-vault",
    "VAULT_MIGRATE_GSA": "tessera-vault-migrate",
    "API_GSA": "tessera-api",
    "WORKER_GSA": "tessera-worker",
    "API_MIGRATE_GSA": "tessera-api-migrate",
    "ADMIN_GSA": "tessera-admin",
    "EDGE_GSA": "tessera-edge",
}
WORKLOAD_SERVICE_ACCOUNT = {
    ("tessera-cde", "tessera-vault"): "tessera-vault",
    # The vault's own jobs, with the vault's database role and KMS key (and nothing more).
    ("tessera-cde", "tessera-vault-worker"): "tessera-vault",
    ("tessera-cde", "tessera-vault-migrate"): "tessera-vault-migrate",
    ("tessera-app", "tessera-api"): "tessera-api",
    ("tessera-app", "tessera-worker"): "tessera-worker",
    ("tessera-app", "tessera-api-migrate"): "tessera-api-migrate",
    ("tessera-admin", "tessera-admin-toolbox"): "tessera-admin",
    ("tessera-edge", "tessera-ingressgateway"): "tessera-ingressgateway",
    ("tessera-load", "locust-master"): "locust",
    ("tessera-load", "locust-worker"): "locust",
}
#: Who may reach the vault's pods, on which port: (namespace, pod name label or None for a
#: whole namespace, port). Nothing else.
VAULT_INGRESS = {
    ("tessera-edge", "tessera-ingressgateway", 8100),
    ("tessera-app", "tessera-api", 8101),
    ("tessera-app", "tessera-worker", 8101),
    ("tessera-admin", "tessera-admin-toolbox", 8102),
    ("gmp-system", None, 15020),
}
VAULT_PRINCIPALS = {
    "8100": {"cluster.local/ns/tessera-edge/sa/tessera-ingressgateway"},
    "8101": {
        "cluster.local/ns/tessera-app/sa/tessera-api",
        "cluster.local/ns/tessera-app/sa/tessera-worker",
    },
    "8102": {"cluster.local/ns/tessera-admin/sa/tessera-admin"},
}
#: Settings that are secrets: set only through <NAME>_FILE (a Secret Manager file).
SECRET_SETTINGS = {
    "TESSERA_VAULT_SERVICE_TOKEN",
    "TESSERA_VAULT_ADMIN_TOKEN",
    "TESSERA_VAULT_REDIS_URL",
    "TESSERA_API_VAULT_SERVICE_TOKEN",
    "TESSERA_API_WEBHOOK_SECRET_KEY",
    "TESSERA_API_PSP_A_API_KEY",
    "TESSERA_API_PSP_B_API_KEY",
    "TESSERA_API_PSP_B_HMAC_KEY",
    "TESSERA_API_REDIS_URL",
}
#: Which settings class each workload's container reads (migration Jobs read one variable).
SETTINGS_OF: dict[str, type[BaseSettings]] = {
    "tessera-vault": VaultSettings,
    "tessera-vault-worker": VaultWorkerSettings,
    "tessera-api": ApiSettings,
    "tessera-worker": ApiSettings,
    # Operators' commands in the toolbox read only what onboarding needs.
    "tessera-admin-toolbox": OperatorSettings,
}
MIGRATION_VARIABLES = {
    "tessera-vault-migrate": "TESSERA_VAULT_MIGRATION_URL",
    "tessera-api-migrate": "TESSERA_API_MIGRATION_URL",
}
#: Plausible production secrets for the files the pods mount (this test's own, not real).
SECRET_FILE_CONTENTS = {
    "vault-service-token": "s" * 40,
    "vault-admin-token": "a" * 40,
    "vault-redis-url": "rediss://:auth@192.0.2.20:6378/0",
    "redis-url": "rediss://:auth@192.0.2.21:6378/0",
    "webhook-secret-key": "ab" * 32,
    "psp-a-api-key": "live-key-of-psp-a",
    "psp-b-api-key": "live-key-of-psp-b",
    "psp-b-hmac-key": "cd" * 32,
}


# --- reading the rendered manifests -------------------------------------------------------------


def kustomize(folder: Path) -> list[Doc]:
    built = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@cache
def rendered() -> tuple[Doc, ...]:
    return tuple(kustomize(K8S / "gke") + kustomize(K8S / "load"))


def documents() -> list[Doc]:
    """A private copy: the mutation cases change it."""
    return copy.deepcopy(list(rendered()))


@cache
def environment() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (K8S / "gke" / "environment.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@cache
def mapping() -> Doc:
    loaded: Doc = yaml.safe_load((K8S / "segments.yaml").read_text())
    return loaded


def all_segments() -> dict[str, Doc]:
    return {**mapping()["segments"], **mapping()["kubernetes_segments"]}


def namespace_of(doc: Doc) -> str:
    return str(doc["metadata"].get("namespace", ""))


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def where(doc: Doc) -> str:
    return f"{doc['kind']} {namespace_of(doc)}/{doc['metadata']['name']}"


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def config_maps(docs: list[Doc]) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (namespace_of(d), d["metadata"]["name"]): dict(d.get("data", {}))
        for d in docs
        if d["kind"] == "ConfigMap"
    }


def container_env(docs: list[Doc], workload: Doc, container: Doc) -> dict[str, str]:
    """What the container's process gets: envFrom ConfigMaps in order, then env."""
    maps = config_maps(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[(namespace_of(workload), source["configMapRef"]["name"])])
    for variable in container.get("env", []):
        env[variable["name"]] = str(variable.get("value", "<valueFrom>"))
    return env


# --- segments: which pods, addresses and hosts each one is --------------------------------------


def segment_of_pod(namespace: str, labels: dict[str, str]) -> str | None:
    for segment, spec in all_segments().items():
        for entry in spec.get("pods", []):
            wanted = entry.get("labels") or {NAME: entry["name"]}
            if entry["namespace"] == namespace and selects({"matchLabels": wanted}, labels):
                return str(segment)
    return None


def segment_cidrs() -> dict[str, list[ipaddress.IPv4Network]]:
    found: dict[str, list[ipaddress.IPv4Network]] = {}
    for segment, spec in all_segments().items():
        texts = list(spec.get("cidrs", []))
        if "cidr" in spec:
            texts.append(spec["cidr"])
        if "cidr_from" in spec:
            texts.append(environment()[spec["cidr_from"]])
        if texts:
            found[segment] = [ipaddress.IPv4Network(text) for text in texts]
    return found


def public_segment() -> str:
    (name,) = [s for s, spec in all_segments().items() if spec.get("public")]
    return name


def peer_segments(peer: Doc, own_namespace: str, ingress: bool) -> tuple[set[str], list[str]]:
    """The segments a NetworkPolicy peer admits, and what is wrong with it."""
    problems: list[str] = []
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        allowed = ipaddress.IPv4Network(block["cidr"])
        excepted = [ipaddress.IPv4Network(text) for text in block.get("except", [])]
        if ingress:
            if allowed.prefixlen == 0:
                return {"internet"}, problems
            return set(), [f"ingress from {allowed}: not a segment"]
        found: set[str] = set()
        for segment, networks in segment_cidrs().items():
            if segment == "internet":
                continue
            for network in networks:
                inside = network.subnet_of(allowed) if network.prefixlen else False
                if inside and not any(network.subnet_of(e) for e in excepted):
                    found.add(segment)
        if not found and allowed.prefixlen != 0:
            problems.append(f"egress to {allowed}: not the address of any segment")
        if allowed.prefixlen == 0:
            private = [
                ipaddress.IPv4Network(text)
                for text in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
            ]
            missing = [str(p) for p in private if not any(p.subnet_of(e) for e in excepted)]
            if missing:
                problems.append(f"egress to 0.0.0.0/0 without excepting {', '.join(missing)}")
            found.add(public_segment())
        return found, problems
    namespaces: list[str]
    if "namespaceSelector" in peer:
        labels = peer["namespaceSelector"].get("matchLabels", {})
        name = labels.get("kubernetes.io/metadata.name")
        if name is None:
            return set(), ["a namespaceSelector that names no namespace (any namespace)"]
        namespaces = [name]
    else:
        namespaces = [own_namespace]
    found = set()
    for namespace in namespaces:
        pod_selector = peer.get("podSelector")
        candidates = [
            (segment, entry)
            for segment, spec in all_segments().items()
            for entry in ([{"namespace": spec["namespace"]}] if "namespace" in spec else [])
            + list(spec.get("pods", []))
            if entry["namespace"] == namespace
        ]
        for segment, entry in candidates:
            if "name" not in entry and "labels" not in entry:
                found.add(segment)  # a whole namespace we do not run
            elif pod_selector is None or not pod_selector.get("matchLabels"):
                found.add(segment)  # every pod of the namespace
            else:
                wanted = entry.get("labels") or {NAME: entry["name"]}
                if selects({"matchLabels": wanted}, pod_selector["matchLabels"]):
                    found.add(segment)
        if not candidates:
            problems.append(f"peer in namespace {namespace}: no segment lives there")
    if not found and not problems:
        problems.append(f"peer {peer}: selects no pod of any segment")
    return found, problems


def rule_ports(rule: Doc, what: str) -> tuple[list[tuple[int, str]], list[str]]:
    if not rule.get("ports"):
        return [], [f"{what}: a rule without ports opens every port"]
    ports: list[tuple[int, str]] = []
    problems: list[str] = []
    for port in rule["ports"]:
        if not isinstance(port.get("port"), int) or "endPort" in port:
            problems.append(f"{what}: port {port.get('port')!r} is not one numbered port")
            continue
        ports.append((port["port"], str(port.get("protocol", "TCP")).lower()))
    return ports, problems


def selected_segments(docs: list[Doc], namespace: str, selector: Doc) -> set[str]:
    found = set()
    for workload in workloads(docs):
        if namespace_of(workload) == namespace and selects(selector, pod_labels(workload)):
            segment = segment_of_pod(namespace, pod_labels(workload))
            found.add(segment or f"<unmapped {workload['metadata']['name']}>")
    return found


def fqdn_segment(names: set[str]) -> str | None:
    for segment, spec in all_segments().items():
        if spec.get("fqdns") and set(spec["fqdns"]) == names:
            return str(segment)
    return None


def realized(docs: list[Doc]) -> tuple[set[Flow], set[Flow], list[str]]:
    """Every (source, destination, port, protocol) the policies allow, by direction."""
    egress: set[Flow] = set()
    ingress: set[Flow] = set()
    problems: list[str] = []
    for policy in docs:
        namespace = namespace_of(policy)
        if policy["kind"] == "FQDNNetworkPolicy":
            sources = selected_segments(docs, namespace, policy["spec"]["podSelector"])
            for rule in policy["spec"]["egress"]:
                names = {m.get("name") or m.get("pattern", "") for m in rule["matches"]}
                segment = fqdn_segment(names)
                if segment is None:
                    problems.append(f"{where(policy)}: hosts {sorted(names)} are no segment's")
                    continue
                ports, bad = rule_ports(rule, where(policy))
                problems += bad
                egress |= {(s, segment, p, proto) for s in sources for p, proto in ports}
            continue
        if policy["kind"] != "NetworkPolicy":
            continue
        spec = policy["spec"]
        mine = selected_segments(docs, namespace, spec["podSelector"])
        for direction, rules in (("egress", spec.get("egress")), ("ingress", spec.get("ingress"))):
            for rule in rules or []:
                what = f"{where(policy)} {direction}"
                ports, bad = rule_ports(rule, what)
                problems += bad
                peers = rule.get("to" if direction == "egress" else "from")
                if not peers:
                    problems.append(f"{what}: a rule without peers admits anyone")
                    continue
                for peer in peers:
                    others, bad = peer_segments(peer, namespace, direction == "ingress")
                    problems += [f"{what}: {b}" for b in bad]
                    for a in mine:
                        for b in others:
                            for port, protocol in ports:
                                if direction == "egress":
                                    egress.add((a, b, port, protocol))
                                else:
                                    ingress.add((b, a, port, protocol))
    return egress, ingress, problems


def expected_flows() -> set[Flow]:
    """flows.yaml in Kubernetes terms (segments.yaml), plus the Kubernetes-only flows."""
    segments = all_segments()
    found: set[Flow] = set()
    for flow in model.load().flows:
        source = segments[flow.source].get("through", flow.source)
        target = segments[flow.destination]
        destination = target.get("via", flow.destination)
        port = target.get("ports", {}).get(flow.port, flow.port)
        found.add((source, destination, port, flow.protocol))
    for flow in mapping()["kubernetes_flows"]:
        found.add((flow["source"], flow["destination"], flow["port"], flow["protocol"]))
    return found


def ours(segment: str, docs: list[Doc]) -> bool:
    """A segment whose pods live in a namespace these manifests create (not kube-dns, istiod)."""
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    return any(e["namespace"] in namespaces for e in all_segments()[segment].get("pods", []))


# --- the checks ---------------------------------------------------------------------------------


def check_default_deny(docs: list[Doc]) -> Iterator[str]:
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    for namespace in namespaces:
        denies = [
            d
            for d in docs
            if d["kind"] == "NetworkPolicy"
            and namespace_of(d) == namespace
            and d["spec"]["podSelector"] in ({}, None)
            and {"Ingress", "Egress"} <= set(d["spec"].get("policyTypes", []))
            and not d["spec"].get("ingress")
            and not d["spec"].get("egress")
        ]
        if not denies:
            yield f"namespace {namespace}: no default-deny NetworkPolicy (ingress and egress)"
    for policy in docs:
        if policy["kind"] == "NetworkPolicy":
            types = set(policy["spec"].get("policyTypes", []))
            if "egress" in policy["spec"] and "Egress" not in types:
                yield f"{where(policy)}: egress rules without policyType Egress"


def check_flows(docs: list[Doc]) -> Iterator[str]:
    egress, ingress, problems = realized(docs)
    yield from problems
    wanted = expected_flows()
    for flow in sorted(egress | ingress):
        if flow not in wanted:
            yield f"allowed but not in flows.yaml or segments.yaml: {flow}"
    for flow in sorted(wanted):
        source, destination = flow[0], flow[1]
        if ours(source, docs) and flow not in egress:
            yield f"in flows.yaml, but no egress policy allows it: {flow}"
        if ours(destination, docs) and flow not in ingress:
            yield f"in flows.yaml, but no ingress policy allows it: {flow}"


def check_vault_ingress(docs: list[Doc]) -> Iterator[str]:
    """Finer than segments: which pods (by name) reach the vault's pods, on which port."""
    vault_labels = {NAME: "tessera-vault"}
    seen: set[tuple[str, str | None, int]] = set()
    for policy in docs:
        if policy["kind"] != "NetworkPolicy" or namespace_of(policy) != "tessera-cde":
            continue
        if not selects(policy["spec"]["podSelector"], vault_labels):
            continue
        for rule in policy["spec"].get("ingress") or []:
            ports = [p.get("port") for p in rule.get("ports") or [{"port": "every port"}]]
            for peer in rule.get("from") or [{"any": "peer"}]:
                namespace = (
                    peer.get("namespaceSelector", {})
                    .get("matchLabels", {})
                    .get(
                        "kubernetes.io/metadata.name",
                        "tessera-cde" if "podSelector" in peer else "*",
                    )
                )
                name = peer.get("podSelector", {}).get("matchLabels", {}).get(NAME)
                if set(peer.get("podSelector", {}).get("matchLabels", {})) - {NAME}:
                    name = f"{name}+more labels"
                for port in ports:
                    entry = (str(namespace), name, port)
                    seen.add(entry)
                    if entry not in VAULT_INGRESS:
                        yield f"vault pods admit {namespace}/{name or '*'} on {port}"
    for missing in sorted(VAULT_INGRESS - seen, key=str):
        yield f"vault pods do not admit {missing}"


def check_mesh(docs: list[Doc]) -> Iterator[str]:
    for namespace in ("tessera-cde", "tessera-app", "tessera-admin"):
        strict = [
            d
            for d in docs
            if d["kind"] == "PeerAuthentication"
            and namespace_of(d) == namespace
            and not d["spec"].get("selector")
            and d["spec"].get("mtls", {}).get("mode") == "STRICT"
            and all(v.get("mode") == "STRICT" for v in d["spec"].get("portLevelMtls", {}).values())
        ]
        if not strict:
            yield f"namespace {namespace}: no namespace-wide PeerAuthentication STRICT"
        others = [
            d
            for d in docs
            if d["kind"] == "PeerAuthentication"
            and namespace_of(d) == namespace
            and d not in strict
        ]
        for other in others:
            yield f"{where(other)}: weakens mTLS"
        if not any(
            d["kind"] == "AuthorizationPolicy" and namespace_of(d) == namespace and d["spec"] == {}
            for d in docs
        ):
            yield f"namespace {namespace}: no deny-all AuthorizationPolicy"
    policies = [
        d
        for d in docs
        if d["kind"] == "AuthorizationPolicy" and namespace_of(d) == "tessera-cde" and d["spec"]
    ]
    admitted: dict[str, set[str]] = {}
    for policy in policies:
        spec = policy["spec"]
        if spec.get("action", "ALLOW") != "ALLOW":
            continue
        for rule in spec.get("rules", []):
            principals = {
                p for f in rule.get("from", []) for p in f["source"].get("principals", [])
            }
            if not rule.get("from") or any(set(f["source"]) - {"principals"} for f in rule["from"]):
                yield f"{where(policy)}: a rule that admits more than named principals"
            ports = [p for t in rule.get("to", []) for p in t["operation"].get("ports", [])]
            if not ports:
                yield f"{where(policy)}: a rule for every port"
            for port in ports:
                admitted.setdefault(port, set()).update(principals)
    if admitted != VAULT_PRINCIPALS:
        yield f"vault AuthorizationPolicy admits {admitted}, expected {VAULT_PRINCIPALS}"


def check_pods(docs: list[Doc]) -> Iterator[str]:
    for workload in workloads(docs):
        spec = pod_spec(workload)
        context = spec.get("securityContext", {})
        name = where(workload)
        if spec.get("automountServiceAccountToken") is not False:
            yield f"{name}: automountServiceAccountToken is not false"
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            yield f"{name}: shares a host namespace"
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            yield f"{name}: pod seccompProfile is not RuntimeDefault"
        for box in containers(workload):
            merged = {**context, **box.get("securityContext", {})}
            at = f"{name} container {box['name']}"
            if merged.get("runAsNonRoot") is not True:
                yield f"{at}: runAsNonRoot is not true"
            if merged.get("runAsUser") != UID:
                yield f"{at}: runAsUser is not {UID}"
            if merged.get("readOnlyRootFilesystem") is not True:
                yield f"{at}: readOnlyRootFilesystem is not true"
            if merged.get("allowPrivilegeEscalation") is not False:
                yield f"{at}: allowPrivilegeEscalation is not false"
            if merged.get("privileged"):
                yield f"{at}: privileged"
            if merged.get("capabilities", {}).get("drop") != ["ALL"]:
                yield f"{at}: capabilities are not all dropped"
            if merged.get("capabilities", {}).get("add"):
                yield f"{at}: adds capabilities"
            if merged.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
                yield f"{at}: seccompProfile is not RuntimeDefault"
            resources = box.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        yield f"{at}: no {resource} {kind[:-1]}"
            if not DIGEST.match(str(box.get("image", ""))):
                yield f"{at}: image {box.get('image')} is not pinned by digest"


def check_deployments(docs: list[Doc]) -> Iterator[str]:
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    autoscalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        name = where(deployment)
        labels = pod_labels(deployment)
        spec = pod_spec(deployment)
        for box in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in box:
                    yield f"{name} container {box['name']}: no {probe}"
        if not any(
            namespace_of(b) == namespace_of(deployment) and selects(b["spec"]["selector"], labels)
            for b in budgets
        ):
            yield f"{name}: no PodDisruptionBudget"
        if not any(
            c["topologyKey"] == ZONE and selects(c["labelSelector"], labels)
            for c in spec.get("topologySpreadConstraints", [])
        ):
            yield f"{name}: no zone topology spread"
    for wanted in ("tessera-vault", "tessera-api"):
        scalers = [a for a in autoscalers if a["spec"]["scaleTargetRef"]["name"] == wanted]
        metrics = [m for a in scalers for m in a["spec"].get("metrics", [])]
        if not any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
            yield f"{wanted}: no HorizontalPodAutoscaler on CPU"
        if not any(
            m["type"] == "Pods" and "http_requests_total" in m["pods"]["metric"]["name"]
            for m in metrics
        ):
            yield f"{wanted}: no HorizontalPodAutoscaler on requests per second"


def check_placement(docs: list[Doc]) -> Iterator[str]:
    """Only the vault's pods go to the CDE node pool, and they go nowhere else."""
    for workload in workloads(docs):
        spec = pod_spec(workload)
        tolerates = any(t.get("key") == "tessera.dev/cde" for t in spec.get("tolerations", []))
        on_pool = spec.get("nodeSelector", {}).get("tessera.dev/pool") == "cde"
        cde = namespace_of(workload) == "tessera-cde"
        if cde and not (tolerates and on_pool):
            yield f"{where(workload)}: not pinned to the CDE node pool"
        if not cde and (tolerates or on_pool):
            yield f"{where(workload)}: on the CDE node pool"


def check_service_accounts(docs: list[Doc]) -> Iterator[str]:
    accounts = {
        (namespace_of(d), d["metadata"]["name"]): d for d in docs if d["kind"] == "ServiceAccount"
    }
    for key, account in accounts.items():
        if account.get("automountServiceAccountToken") is not False:
            yield f"ServiceAccount {key}: automountServiceAccountToken is not false"
        bound = account["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account")
        if key not in SERVICE_ACCOUNTS:
            if key[1] != "default":
                yield f"ServiceAccount {key}: not one Terraform knows"
            if bound:
                yield f"ServiceAccount {key}: bound to {bound}"
            continue
        gsa_key = SERVICE_ACCOUNTS[key]
        expected = environment()[gsa_key] if gsa_key else None
        if bound != expected:
            yield f"ServiceAccount {key}: bound to {bound}, expected {expected}"
        gsa_name = GSA_NAMES.get(gsa_key or "")
        if expected and gsa_name and not expected.startswith(f"{gsa_name}@"):
            yield f"ServiceAccount {key}: {expected} is not {gsa_name}@ (another identity)"
    load_rendered = any(d["metadata"]["name"] == "tessera-load" for d in docs)
    for key in SERVICE_ACCOUNTS:
        if key not in accounts and (key[0] != "tessera-load" or load_rendered):
            yield f"ServiceAccount {key} is missing"
    for workload in workloads(docs):
        key = (namespace_of(workload), workload["metadata"]["name"])
        used = pod_spec(workload).get("serviceAccountName", "default")
        if WORKLOAD_SERVICE_ACCOUNT.get(key) != used:
            yield f"{where(workload)}: runs as {used}, expected {WORKLOAD_SERVICE_ACCOUNT.get(key)}"


def check_secrets(docs: list[Doc]) -> Iterator[str]:
    for doc in docs:
        if doc["kind"] == "Secret":
            yield f"{where(doc)}: a Secret in the manifests"
        if doc["kind"] == "SecretProviderClass" and doc["spec"].get("secretObjects"):
            yield f"{where(doc)}: copies Secret Manager into a Kubernetes Secret"
    for workload in workloads(docs):
        for box in containers(workload):
            for variable in box.get("env", []):
                if "valueFrom" in variable:
                    yield f"{where(workload)}: {variable['name']} from a Secret, not a file"
            env = container_env(docs, workload, box)
            for name, value in env.items():
                if name in SECRET_SETTINGS:
                    yield f"{where(workload)}: {name} set as a value (use {name}_FILE)"
                schemes = ("postgresql://", "postgres://", "redis://", "rediss://")
                if value.startswith(schemes) and urlsplit(value).password:
                    yield f"{where(workload)}: {name} carries a password"


def check_settings(docs: list[Doc], files: Path) -> Iterator[str]:
    """Every variable set is one the process reads; the services load them in production."""
    for workload in workloads(docs):
        label = pod_labels(workload).get(NAME, "")
        for box in pod_spec(workload)["containers"]:
            env = container_env(docs, workload, box)
            if label in MIGRATION_VARIABLES:
                reads = MIGRATION_VARIABLES[label]
                if set(env) != {reads}:
                    yield f"{where(workload)}: sets {sorted(env)}, reads {reads}"
                continue
            settings = SETTINGS_OF.get(label)
            if settings is None:
                continue
            known = set(settings.env_names().values())
            for name in env:
                if name not in known and name.removesuffix("_FILE") not in known:
                    yield f"{where(workload)}: {name} is no setting of {settings.__name__}"
            real = {}
            for name, value in env.items():
                if name.endswith("_FILE"):
                    mounted = Path(value).name
                    if mounted not in SECRET_FILE_CONTENTS:
                        yield f"{where(workload)}: {name} names {value}, no file the test knows"
                        continue
                    local = files / mounted
                    local.write_text(SECRET_FILE_CONTENTS[mounted])
                    real[name] = str(local)
                else:
                    real[name] = value
            try:
                loaded = load_settings(settings, real)
            except SettingsError as exc:
                yield f"{where(workload)}: refused: {exc}"
                continue
            if not loaded.production:
                yield f"{where(workload)}: not in production mode"


def check_hosts(docs: list[Doc]) -> Iterator[str]:
    """The processors' hosts the FQDN policies open are the ones the services call."""
    maps = config_maps(docs)
    vault = maps.get(
        (
            "tessera-cde",
            next(
                n
                for ns, n in maps
                if ns == "tessera-cde" and n.startswith("tessera-vault-settings")
            ),
        ),
        {},
    )
    destinations = msgspec.json.decode(vault.get("TESSERA_VAULT_FORWARD_DESTINATIONS", "{}"))
    card_hosts = {urlsplit(d["url"]).hostname for d in destinations.values()}
    if card_hosts != set(all_segments()["psp-card"]["fqdns"]):
        yield f"forward destinations {sorted(map(str, card_hosts))} are not psp-card's hosts"
    api = next(
        v
        for (ns, n), v in maps.items()
        if ns == "tessera-app" and n.startswith("tessera-api-settings")
    )
    api_hosts = {
        urlsplit(api[k]).hostname for k in ("TESSERA_API_PSP_A_URL", "TESSERA_API_PSP_B_URL")
    }
    if api_hosts != set(all_segments()["psp-api"]["fqdns"]):
        yield f"the API's PSP URLs {sorted(map(str, api_hosts))} are not psp-api's hosts"


#: What the vault worker's pods may mount from Secret Manager: the vault's Redis, nothing else.
VAULT_WORKER_FILES = {"vault-redis-url", "redis-server-ca.pem"}


def check_vault_worker(docs: list[Doc]) -> Iterator[str]:
    """The vault worker serves nothing and calls no processor: finer than its segment (cde),
    whose flows are the vault's."""
    labels = {NAME: "tessera-vault-worker"}
    if not any(
        w["kind"] == "Deployment" and pod_labels(w).get(NAME) == labels[NAME]
        for w in workloads(docs)
    ):
        yield "no tessera-vault-worker Deployment"
    for doc in docs:
        if namespace_of(doc) != "tessera-cde":
            continue
        spec = doc.get("spec") or {}
        if (
            doc["kind"] == "NetworkPolicy"
            and selects(spec["podSelector"], labels)
            and spec.get("ingress")
        ):
            yield f"{where(doc)}: admits traffic to the vault worker"
        if doc["kind"] == "FQDNNetworkPolicy" and selects(spec["podSelector"], labels):
            yield f"{where(doc)}: opens host names to the vault worker"
        if doc["kind"] == "Service" and selects({"matchLabels": spec.get("selector", {})}, labels):
            yield f"{where(doc)}: serves the vault worker's pods"
        if (
            doc["kind"] == "AuthorizationPolicy"
            and spec.get("action", "ALLOW") == "ALLOW"
            and spec.get("rules")
            and selects(spec.get("selector", {}), labels)
        ):
            yield f"{where(doc)}: admits callers to the vault worker"
        if doc["kind"] == "SecretProviderClass" and doc["metadata"]["name"] == labels[NAME]:
            listed = yaml.safe_load(str(spec.get("parameters", {}).get("secrets", ""))) or []
            extra = {str(entry.get("path")) for entry in listed} - VAULT_WORKER_FILES
            if extra:
                yield f"{where(doc)}: mounts {sorted(extra)} into the vault worker"


#: The pods inside the cluster that may reach the edge gateway, as clients from outside do:
#: Locust, and the vault worker's payment-page check (PCI DSS 11.6.1). Finer than segments: the
#: vault worker is one of the cde segment's three kinds of pod, and only it may.
GATEWAY_CLIENTS = {("tessera-cde", "tessera-vault-worker"), ("tessera-load", "locust")}
SIDECAR_EXCLUDED_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"


def peer_workloads(docs: list[Doc], peer: Doc, own_namespace: str) -> list[Doc]:
    """The workloads a NetworkPolicy peer selects (an address block selects none of them)."""
    if "ipBlock" in peer:
        return []
    namespace: str | None = own_namespace
    if "namespaceSelector" in peer:
        labels = peer["namespaceSelector"].get("matchLabels", {})
        namespace = labels.get("kubernetes.io/metadata.name")  # None: any namespace
    pods = peer.get("podSelector") or {}
    return [
        w
        for w in workloads(docs)
        if namespace in (None, namespace_of(w)) and selects(pods, pod_labels(w))
    ]


def client_name(workload: Doc) -> tuple[str, str]:
    return namespace_of(workload), pod_labels(workload).get(NAME, "")


def check_gateway_clients(docs: list[Doc]) -> Iterator[str]:
    """Which pods reach the gateway from inside (both ends of the rule), and that the vault
    worker's rule is the port its public origin lands on, for a host the gateway serves."""
    gateway = find(docs, "Deployment", "tessera-edge", "tessera-ingressgateway")
    egress_ports: dict[tuple[str, str], set[int | str]] = {}
    admitted: set[tuple[str, str]] = set()
    for policy in docs:
        if policy["kind"] != "NetworkPolicy":
            continue
        namespace = namespace_of(policy)
        spec = policy["spec"]
        sources = [
            w
            for w in workloads(docs)
            if namespace_of(w) == namespace and selects(spec["podSelector"], pod_labels(w))
        ]
        for rule in spec.get("egress") or []:
            if not any(
                gateway in peer_workloads(docs, peer, namespace) for peer in rule.get("to") or []
            ):
                continue
            for source in sources:
                client = client_name(source)
                if client not in GATEWAY_CLIENTS:
                    yield f"{where(policy)}: {client[0]}/{client[1]} reaches the edge gateway"
                ports = {p.get("port") for p in rule.get("ports") or [{"port": "every port"}]}
                egress_ports.setdefault(client, set()).update(ports)
        if gateway not in sources:
            continue
        for rule in spec.get("ingress") or []:
            for peer in rule.get("from") or []:
                for workload in peer_workloads(docs, peer, namespace):
                    client = client_name(workload)
                    admitted.add(client)
                    if client not in GATEWAY_CLIENTS:
                        yield f"{where(policy)}: the gateway admits {client[0]}/{client[1]}"
    rendered_clients = {client_name(w) for w in workloads(docs)} & GATEWAY_CLIENTS
    for client in sorted(rendered_clients - set(egress_ports)):
        yield f"{client[0]}/{client[1]} does not reach the edge gateway"
    for client in sorted(rendered_clients - admitted):
        yield f"the gateway does not admit {client[0]}/{client[1]}"

    worker = find(docs, "Deployment", "tessera-cde", "tessera-vault-worker")
    (box,) = [c for c in pod_spec(worker)["containers"] if c["name"] == "vault-worker"]
    env = container_env(docs, worker, box)
    origin = urlsplit(env.get("TESSERA_VAULT_PUBLIC_ORIGIN", ""))
    if not all(
        env.get(f"TESSERA_VAULT_SCRIPTS_CHECK_{name}") for name in ("PUBLISHABLE_KEY", "ORIGIN")
    ):
        yield "the vault worker fetches card.html as no merchant (TESSERA_VAULT_SCRIPTS_CHECK_*)"
    port = origin.port or (443 if origin.scheme == "https" else 80)
    hosts = {
        host
        for d in docs
        if d["kind"] == "Gateway" and namespace_of(d) == "tessera-edge"
        for server in d["spec"]["servers"]
        for host in server["hosts"]
    }
    if origin.hostname not in hosts:
        yield f"the vault worker's public origin {origin.hostname} is none of the Gateway's hosts"
    service = find(docs, "Service", "tessera-edge", "tessera-ingressgateway")
    target = {p.get("targetPort") for p in service["spec"]["ports"] if p["port"] == port}
    landing = {
        p["containerPort"]
        for c in pod_spec(gateway)["containers"]
        for p in c.get("ports", [])
        if p.get("name") in target or p["containerPort"] in target
    }
    opened = egress_ports.get(("tessera-cde", "tessera-vault-worker"), set())
    if opened != landing:
        yield (
            f"the vault worker reaches the gateway on {sorted(opened, key=str)}; its public origin "
            f"lands on {sorted(landing)}"
        )
    excluded = worker["spec"]["template"]["metadata"].get("annotations", {})
    if str(port) not in str(excluded.get(SIDECAR_EXCLUDED_PORTS, "")).split(","):
        yield (
            f"the vault worker's sidecar captures port {port}: the page fetch would depend on "
            "the mesh's outbound traffic policy, not leave the pod as a browser's does"
        )


CHECKS: dict[str, Callable[[list[Doc]], Iterable[str]]] = {
    "default deny": check_default_deny,
    "flows": check_flows,
    "vault ingress": check_vault_ingress,
    "mesh": check_mesh,
    "pods": check_pods,
    "deployments": check_deployments,
    "placement": check_placement,
    "service accounts": check_service_accounts,
    "secrets": check_secrets,
    "hosts": check_hosts,
    "vault worker": check_vault_worker,
    "gateway clients": check_gateway_clients,
}


def checker(docs: list[Doc]) -> list[str]:
    return [f"{name}: {problem}" for name, check in CHECKS.items() for problem in check(docs)]


# --- the rendered manifests pass ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_rendered_gke_manifests_pass(name: str) -> None:
    assert list(CHECKS[name](documents())) == []


def test_the_services_accept_their_settings_in_production(tmp_path: Path) -> None:
    assert list(check_settings(documents(), tmp_path)) == []


def test_the_expected_flows_cover_every_flow_of_flows_yaml() -> None:
    """segments.yaml names every segment flows.yaml has, and every flow lands somewhere."""
    flows = model.load()
    assert set(flows.segments) <= set(mapping()["segments"])
    expected = expected_flows()
    assert len(expected) >= len({(f.source, f.destination) for f in flows.flows})
    assert ("app", "cde", 8101, "tcp") in expected
    assert ("edge", "cde", 8100, "tcp") in expected
    assert ("admin", "cde", 8102, "tcp") in expected


def test_every_object_carries_the_segment_labels() -> None:
    for doc in documents():
        if doc["kind"] in ("ConfigMap",) and doc["metadata"].get("annotations", {}).get(
            "config.kubernetes.io/local-config"
        ):
            continue
        labels = doc["metadata"].get("labels", {})
        assert labels.get("pci-scope") in ("cde", "connected", "out-of-scope"), where(doc)
        assert labels.get("tessera.dev/owner"), where(doc)
        assert labels.get("tessera.dev/data-class"), where(doc)
    for workload in workloads(documents()):
        assert pod_labels(workload).get("pci-scope") == workload["metadata"]["labels"]["pci-scope"]
    scopes = {
        d["metadata"]["name"]: d["metadata"]["labels"]["pci-scope"]
        for d in documents()
        if d["kind"] == "Namespace"
    }
    assert scopes["tessera-cde"] == "cde"
    assert scopes["tessera-app"] == "connected"
    assert scopes["tessera-load"] == "out-of-scope"


def test_the_local_overlay_renders_without_google_parts() -> None:
    docs = kustomize(K8S / "local")
    kinds = {d["kind"] for d in docs}
    assert "FQDNNetworkPolicy" not in kinds
    assert "SecretProviderClass" not in kinds
    for workload in workloads(docs):
        assert all(c["name"] != "cloud-sql-proxy" for c in containers(workload)), where(workload)
        for volume in pod_spec(workload).get("volumes", []):
            assert "csi" not in volume, where(workload)
    assert not list(check_default_deny(docs))


# --- the checker bites --------------------------------------------------------------------------


def find(docs: list[Doc], kind: str, namespace: str, name: str) -> Doc:
    (found,) = [
        d
        for d in docs
        if d["kind"] == kind and namespace_of(d) == namespace and d["metadata"]["name"] == name
    ]
    return found


def vault_policy(docs: list[Doc]) -> Doc:
    return find(docs, "NetworkPolicy", "tessera-cde", "tessera-vault")


def vault_deployment(docs: list[Doc]) -> Doc:
    return find(docs, "Deployment", "tessera-cde", "tessera-vault")


def widen_the_service_port_to_the_whole_app_namespace(docs: list[Doc]) -> None:
    rule = vault_policy(docs)["spec"]["ingress"][1]
    rule["from"] = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tessera-app"}}}
    ]


def open_the_admin_port_to_the_api(docs: list[Doc]) -> None:
    vault_policy(docs)["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 8102})


def admit_any_pod_of_any_namespace(docs: list[Doc]) -> None:
    vault_policy(docs)["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8101}]})


def drop_the_cde_default_deny(docs: list[Doc]) -> None:
    docs.remove(find(docs, "NetworkPolicy", "tessera-cde", "default-deny"))


def drop_the_load_default_deny(docs: list[Doc]) -> None:
    docs.remove(find(docs, "NetworkPolicy", "tessera-load", "default-deny"))


def let_the_vault_reach_any_host_on_443(docs: list[Doc]) -> None:
    vault_policy(docs)["spec"]["egress"].append(
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    )


def add_a_host_to_the_vault_forward_egress(docs: list[Doc]) -> None:
    policy = find(docs, "FQDNNetworkPolicy", "tessera-cde", "tessera-vault-psp-card")
    policy["spec"]["egress"][0]["matches"].append({"name": "exfiltrate.example"})


def let_the_api_reach_the_vault_database(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "tessera-app", "tessera-api-managed-services")
    policy["spec"]["egress"].append(
        {
            "to": [{"ipBlock": {"cidr": environment()["VAULT_DB_CIDR"]}}],
            "ports": [{"protocol": "TCP", "port": 3307}],
        }
    )


def drop_the_app_egress_to_the_vault(docs: list[Doc]) -> None:
    for name in ("tessera-api", "tessera-worker"):
        find(docs, "NetworkPolicy", "tessera-app", name)["spec"]["egress"].pop(0)


def drop_the_vault_ingress_from_the_app(docs: list[Doc]) -> None:
    vault_policy(docs)["spec"]["ingress"].pop(1)


def open_every_port_of_dns(docs: list[Doc]) -> None:
    del vault_policy(docs)["spec"]["egress"][0]["ports"]


def webhooks_to_private_addresses(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "tessera-app", "tessera-worker-webhooks")
    policy["spec"]["egress"][0]["to"][0]["ipBlock"]["except"].remove("10.0.0.0/8")


def drop_read_only_root_filesystem(docs: list[Doc]) -> None:
    box = pod_spec(vault_deployment(docs))["containers"][0]
    del box["securityContext"]["readOnlyRootFilesystem"]


def keep_capabilities(docs: list[Doc]) -> None:
    box = pod_spec(vault_deployment(docs))["containers"][0]
    del box["securityContext"]["capabilities"]


def allow_privilege_escalation_in_the_proxy(docs: list[Doc]) -> None:
    box = pod_spec(find(docs, "Deployment", "tessera-app", "tessera-api"))["initContainers"][0]
    box["securityContext"]["allowPrivilegeEscalation"] = True


def run_the_worker_as_root(docs: list[Doc]) -> None:
    spec = pod_spec(find(docs, "Deployment", "tessera-app", "tessera-worker"))
    spec["securityContext"]["runAsUser"] = 0
    for box in spec["containers"]:
        box["securityContext"]["runAsUser"] = 0


def drop_the_seccomp_profile(docs: list[Doc]) -> None:
    del pod_spec(find(docs, "Job", "tessera-load", "locust-master"))["securityContext"][
        "seccompProfile"
    ]


def drop_the_memory_limit(docs: list[Doc]) -> None:
    del pod_spec(vault_deployment(docs))["containers"][0]["resources"]["limits"]["memory"]


def mount_the_service_account_token(docs: list[Doc]) -> None:
    pod_spec(find(docs, "Deployment", "tessera-edge", "tessera-ingressgateway"))[
        "automountServiceAccountToken"
    ] = True


def pull_the_vault_by_tag(docs: list[Doc]) -> None:
    pod_spec(vault_deployment(docs))["containers"][0]["image"] = (
        "registry.example/tessera-vault:1.0"
    )


def drop_the_readiness_probe(docs: list[Doc]) -> None:
    del pod_spec(find(docs, "Deployment", "tessera-app", "tessera-api"))["containers"][0][
        "readinessProbe"
    ]


def drop_the_api_disruption_budget(docs: list[Doc]) -> None:
    docs.remove(find(docs, "PodDisruptionBudget", "tessera-app", "tessera-api"))


def drop_the_zone_spread(docs: list[Doc]) -> None:
    spec = pod_spec(vault_deployment(docs))
    spec["topologySpreadConstraints"] = [
        c for c in spec["topologySpreadConstraints"] if c["topologyKey"] != ZONE
    ]


def drop_the_requests_per_second_metric(docs: list[Doc]) -> None:
    scaler = find(docs, "HorizontalPodAutoscaler", "tessera-cde", "tessera-vault")
    scaler["spec"]["metrics"] = [m for m in scaler["spec"]["metrics"] if m["type"] != "Pods"]


def give_the_api_the_vaults_kms_identity(docs: list[Doc]) -> None:
    account = find(docs, "ServiceAccount", "tessera-app", "tessera-api")
    account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] = environment()[
        "VAULT_GSA"
    ]


def run_the_api_as_default(docs: list[Doc]) -> None:
    del pod_spec(find(docs, "Deployment", "tessera-app", "tessera-api"))["serviceAccountName"]


def schedule_the_api_on_the_cde_pool(docs: list[Doc]) -> None:
    pod_spec(find(docs, "Deployment", "tessera-app", "tessera-api"))["tolerations"] = [
        {"key": "tessera.dev/cde", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ]


def put_a_token_in_the_environment(docs: list[Doc]) -> None:
    box = pod_spec(vault_deployment(docs))["containers"][0]
    box["env"] = [{"name": "TESSERA_VAULT_ADMIN_TOKEN", "value": "x" * 40}]


def read_a_token_from_a_kubernetes_secret(docs: list[Doc]) -> None:
    box = pod_spec(find(docs, "Deployment", "tessera-app", "tessera-worker"))["containers"][0]
    box["env"] = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]


def add_a_password_to_the_dsn(docs: list[Doc]) -> None:
    (settings,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tessera-api-settings")
    ]
    settings["data"]["TESSERA_API_DATABASE_URL"] = (
        "postgresql://tessera_api:hunter2@127.0.0.1/tessera_api"  # pragma: allowlist secret
    )


def permissive_mtls_in_the_cde(docs: list[Doc]) -> None:
    find(docs, "PeerAuthentication", "tessera-cde", "default")["spec"]["mtls"]["mode"] = (
        "PERMISSIVE"
    )


def admit_another_principal_to_the_service_port(docs: list[Doc]) -> None:
    policy = find(docs, "AuthorizationPolicy", "tessera-cde", "tessera-vault")
    policy["spec"]["rules"][1]["from"][0]["source"]["principals"].append(
        "cluster.local/ns/tessera-load/sa/locust"
    )


def forward_to_a_host_the_policy_does_not_open(docs: list[Doc]) -> None:
    (settings,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tessera-vault-settings")
    ]
    settings["data"]["TESSERA_VAULT_FORWARD_DESTINATIONS"] = (
        '{"psp_a": {"url": "https://elsewhere.example", "paths": ["/v1/authorizations"]}}'
    )


def admit_the_api_to_the_vault_worker(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "tessera-cde", "tessera-vault-worker")
    policy["spec"]["ingress"] = copy.deepcopy(vault_policy(docs)["spec"]["ingress"][1:2])


def let_the_vault_worker_call_a_processor(docs: list[Doc]) -> None:
    policy = find(docs, "FQDNNetworkPolicy", "tessera-cde", "tessera-vault-psp-card")
    policy["spec"]["podSelector"] = {
        "matchExpressions": [
            {"key": NAME, "operator": "In", "values": ["tessera-vault", "tessera-vault-worker"]}
        ]
    }


def give_the_vault_worker_the_admin_token(docs: list[Doc]) -> None:
    spc = find(docs, "SecretProviderClass", "tessera-cde", "tessera-vault-worker")
    vault = find(docs, "SecretProviderClass", "tessera-cde", "tessera-vault")
    spc["spec"]["parameters"]["secrets"] = vault["spec"]["parameters"]["secrets"]


def drop_the_vault_worker_liveness_probe(docs: list[Doc]) -> None:
    box = pod_spec(find(docs, "Deployment", "tessera-cde", "tessera-vault-worker"))
    del box["containers"][0]["livenessProbe"]


def vault_worker_policy(docs: list[Doc]) -> Doc:
    return find(docs, "NetworkPolicy", "tessera-cde", "tessera-vault-worker")


def gateway_rule_of_the_vault_worker(docs: list[Doc]) -> Doc:
    gateway = find(docs, "Deployment", "tessera-edge", "tessera-ingressgateway")
    rules: list[Doc] = vault_worker_policy(docs)["spec"]["egress"]
    (rule,) = [
        r
        for r in rules
        if any(gateway in peer_workloads(docs, peer, "tessera-cde") for peer in r["to"])
    ]
    return rule


def move_the_gateway_egress_to_the_vault(docs: list[Doc]) -> None:
    """The same flow (cde -> edge 8443) for the segments, from the wrong pods."""
    rule = gateway_rule_of_the_vault_worker(docs)
    vault_worker_policy(docs)["spec"]["egress"].remove(rule)
    vault_policy(docs)["spec"]["egress"].append(rule)


def give_the_vault_the_gateway_egress_too(docs: list[Doc]) -> None:
    vault_policy(docs)["spec"]["egress"].append(
        copy.deepcopy(gateway_rule_of_the_vault_worker(docs))
    )


def admit_the_whole_cde_at_the_gateway(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "tessera-edge", "tessera-ingressgateway")
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            if peer.get("podSelector", {}).get("matchLabels", {}).get(NAME) == (
                "tessera-vault-worker"
            ):
                del peer["podSelector"]


def drop_the_gateway_ingress_from_the_vault_worker(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "tessera-edge", "tessera-ingressgateway")
    policy["spec"]["ingress"] = [
        rule
        for rule in policy["spec"]["ingress"]
        if not any(
            p.get("podSelector", {}).get("matchLabels", {}).get(NAME) == "tessera-vault-worker"
            for p in rule["from"]
        )
    ]


def open_the_gateway_status_port_to_the_vault_worker(docs: list[Doc]) -> None:
    gateway_rule_of_the_vault_worker(docs)["ports"].append({"protocol": "TCP", "port": 15021})


def vault_worker_settings(docs: list[Doc]) -> Doc:
    (settings,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"].startswith("tessera-vault-worker-settings")
    ]
    return settings


def check_a_host_the_gateway_does_not_serve(docs: list[Doc]) -> None:
    vault_worker_settings(docs)["data"]["TESSERA_VAULT_PUBLIC_ORIGIN"] = (
        "https://vault.elsewhere.example"
    )


def forget_the_merchant_of_the_page_check(docs: list[Doc]) -> None:
    settings = vault_worker_settings(docs)["data"]
    del settings["TESSERA_VAULT_SCRIPTS_CHECK_PUBLISHABLE_KEY"]
    del settings["TESSERA_VAULT_SCRIPTS_CHECK_ORIGIN"]


def let_the_sidecar_capture_the_page_fetch(docs: list[Doc]) -> None:
    annotations = find(docs, "Deployment", "tessera-cde", "tessera-vault-worker")["spec"][
        "template"
    ]["metadata"]["annotations"]
    annotations[SIDECAR_EXCLUDED_PORTS] = "3307"


MUTATIONS: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "widen the service port to the whole app namespace": (
        widen_the_service_port_to_the_whole_app_namespace,
        "vault ingress: vault pods admit tessera-app/* on 8101",
    ),
    "open the admin port to the API": (
        open_the_admin_port_to_the_api,
        "flows: allowed but not in flows.yaml or segments.yaml: ('app', 'cde', 8102, 'tcp')",
    ),
    "admit any pod of any namespace": (admit_any_pod_of_any_namespace, "admits anyone"),
    "drop the CDE default deny": (
        drop_the_cde_default_deny,
        "default deny: namespace tessera-cde: no default-deny",
    ),
    "drop the load default deny": (
        drop_the_load_default_deny,
        "default deny: namespace tessera-load: no default-deny",
    ),
    "let the vault reach any host on 443": (
        let_the_vault_reach_any_host_on_443,
        "('cde', 'merchant', 443, 'tcp')",
    ),
    "add a host to the vault's forward egress": (
        add_a_host_to_the_vault_forward_egress,
        "are no segment's",
    ),
    "let the API reach the vault's database": (
        let_the_api_reach_the_vault_database,
        "('app', 'vault-db', 3307, 'tcp')",
    ),
    "drop the app's egress to the vault": (
        drop_the_app_egress_to_the_vault,
        "no egress policy allows it: ('app', 'cde', 8101, 'tcp')",
    ),
    "drop the vault's ingress from the app": (
        drop_the_vault_ingress_from_the_app,
        "no ingress policy allows it: ('app', 'cde', 8101, 'tcp')",
    ),
    "open every port of DNS": (open_every_port_of_dns, "a rule without ports opens every port"),
    "webhooks to private addresses": (
        webhooks_to_private_addresses,
        "without excepting 10.0.0.0/8",
    ),
    "drop readOnlyRootFilesystem": (
        drop_read_only_root_filesystem,
        "readOnlyRootFilesystem is not true",
    ),
    "keep capabilities": (keep_capabilities, "capabilities are not all dropped"),
    "allow privilege escalation in the Auth Proxy": (
        allow_privilege_escalation_in_the_proxy,
        "container cloud-sql-proxy: allowPrivilegeEscalation is not false",
    ),
    "run the worker as root": (run_the_worker_as_root, "runAsUser is not 10001"),
    "drop the seccomp profile": (
        drop_the_seccomp_profile,
        "pod seccompProfile is not RuntimeDefault",
    ),
    "drop the memory limit": (drop_the_memory_limit, "no memory limit"),
    "mount the service account token": (
        mount_the_service_account_token,
        "automountServiceAccountToken is not false",
    ),
    "pull the vault by tag": (pull_the_vault_by_tag, "is not pinned by digest"),
    "drop the readiness probe": (drop_the_readiness_probe, "no readinessProbe"),
    "drop the API's disruption budget": (
        drop_the_api_disruption_budget,
        "Deployment tessera-app/tessera-api: no PodDisruptionBudget",
    ),
    "drop the zone spread": (drop_the_zone_spread, "no zone topology spread"),
    "drop the requests-per-second metric": (
        drop_the_requests_per_second_metric,
        "tessera-vault: no HorizontalPodAutoscaler on requests per second",
    ),
    "give the API the vault's KMS identity": (
        give_the_api_the_vaults_kms_identity,
        "ServiceAccount ('tessera-app', 'tessera-api'): bound to tessera-vault@",
    ),
    "run the API as default": (run_the_api_as_default, "runs as default"),
    "schedule the API on the CDE pool": (schedule_the_api_on_the_cde_pool, "on the CDE node pool"),
    "put a token in the environment": (
        put_a_token_in_the_environment,
        "TESSERA_VAULT_ADMIN_TOKEN set as a value",
    ),
    "read a token from a Kubernetes Secret": (
        read_a_token_from_a_kubernetes_secret,
        "from a Secret, not a file",
    ),
    "add a password to the DSN": (add_a_password_to_the_dsn, "carries a password"),
    "permissive mTLS in the CDE": (
        permissive_mtls_in_the_cde,
        "namespace tessera-cde: no namespace-wide PeerAuthentication STRICT",
    ),
    "admit another principal to the service port": (
        admit_another_principal_to_the_service_port,
        "vault AuthorizationPolicy admits",
    ),
    "forward to a host the policy does not open": (
        forward_to_a_host_the_policy_does_not_open,
        "are not psp-card's hosts",
    ),
    "admit the API to the vault worker": (
        admit_the_api_to_the_vault_worker,
        "tessera-cde/tessera-vault-worker: admits traffic to the vault worker",
    ),
    "let the vault worker call a processor": (
        let_the_vault_worker_call_a_processor,
        "opens host names to the vault worker",
    ),
    "give the vault worker the admin token": (
        give_the_vault_worker_the_admin_token,
        "mounts ['vault-admin-token', 'vault-service-token'] into the vault worker",
    ),
    "drop the vault worker's liveness probe": (
        drop_the_vault_worker_liveness_probe,
        "container vault-worker: no livenessProbe",
    ),
    "move the gateway egress from the vault worker to the vault": (
        move_the_gateway_egress_to_the_vault,
        "gateway clients: NetworkPolicy tessera-cde/tessera-vault: "
        "tessera-cde/tessera-vault reaches the edge gateway",
    ),
    "give the vault the gateway egress too": (
        give_the_vault_the_gateway_egress_too,
        "tessera-cde/tessera-vault reaches the edge gateway",
    ),
    "admit the whole CDE at the gateway": (
        admit_the_whole_cde_at_the_gateway,
        "the gateway admits tessera-cde/tessera-vault-migrate",
    ),
    "drop the gateway's ingress from the vault worker": (
        drop_the_gateway_ingress_from_the_vault_worker,
        "no ingress policy allows it: ('cde', 'edge', 8443, 'tcp')",
    ),
    "open the gateway's status port to the vault worker": (
        open_the_gateway_status_port_to_the_vault_worker,
        "the vault worker reaches the gateway on [15021, 8443]",
    ),
    "check a host the gateway does not serve": (
        check_a_host_the_gateway_does_not_serve,
        "public origin vault.elsewhere.example is none of the Gateway's hosts",
    ),
    "forget the merchant of the page check": (
        forget_the_merchant_of_the_page_check,
        "the vault worker fetches card.html as no merchant",
    ),
    "let the sidecar capture the page fetch": (
        let_the_sidecar_capture_the_page_fetch,
        "the vault worker's sidecar captures port 443",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_checker_reports_a_weakened_copy(mutation: str) -> None:
    weaken, expected = MUTATIONS[mutation]
    docs = documents()
    assert checker(docs) == []
    weaken(docs)
    problems = checker(docs)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TESSERA_VAULT_KMS_PROVIDER", "local", "refused: TESSERA_MODE=production"),
        ("TESSERA_VAULT_ADMIN_PORT", "", "refused"),
        ("TESSERA_VAULT_SURPRISE", "1", "TESSERA_VAULT_SURPRISE is no setting of VaultSettings"),
    ],
)
def test_the_settings_check_reports_a_weakened_copy(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    docs = documents()
    (settings,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tessera-vault-settings")
    ]
    if value:
        settings["data"][variable] = value
    else:
        del settings["data"][variable]
    problems = list(check_settings(docs, tmp_path))
    assert any(expected in problem for problem in problems), problems
