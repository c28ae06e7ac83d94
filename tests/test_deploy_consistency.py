"""deploy/k8s and deploy/terraform name the same things: each side is checked alone by
tests/test_deploy_k8s.py and tests/test_deploy_terraform.py, and neither would notice the other
renaming a secret, a service account or a port. `inconsistencies()` reads the rendered GKE
overlay (`kubectl kustomize deploy/k8s/gke`), the parsed Terraform tree (python-hcl2), the
overlay's environment.env and segments.yaml, and lists every place they disagree: Workload
Identity both ways, Secret Manager secrets and who reads them, the KMS key name, Cloud SQL
instances, IAM database users and databases, the CDE node pool, the restricted Google APIs
address, the Memorystore and Cloud SQL ports, and the edge load balancer's firewall. The
mutation cases weaken a copy of one side and show each disagreement is reported.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tests.deploy import terraform
from tests.deploy.terraform import Tree

ROOT = Path(__file__).resolve().parents[1]
GKE_OVERLAY = ROOT / "deploy" / "k8s" / "gke"
SEGMENTS = ROOT / "deploy" / "k8s" / "segments.yaml"
Doc = dict[str, Any]

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
SECRET_RESOURCE = re.compile(r"^projects/[^/]+/secrets/([^/]+)/versions/[^/]+$")
KMS_KEY = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/([^/]+)/cryptoKeys/([^/]+)$")
#: Kubernetes spells GKE's taint effects differently.
TAINT_EFFECTS = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute"}
#: Google's VIP block (restricted.googleapis.com is 199.36.153.4/30, private 199.36.153.8/30).
GOOGLE_VIPS = ipaddress.IPv4Network("199.36.152.0/22")
#: Memorystore's port: 6378 with in-transit TLS, 6379 without.
REDIS_PORT = {"SERVER_AUTHENTICATION": 6378, "DISABLED": 6379}
CLOUD_SQL_PROXY_PORT = 3307


@dataclass
class Sources:
    """Both sides, as read from disk; the mutation cases change a deep copy."""

    docs: list[Doc]
    tree: Tree
    env: dict[str, str]
    segments: dict[str, Any]


# --- reading -------------------------------------------------------------------------------------


@cache
def rendered_gke() -> tuple[Doc, ...]:
    built = subprocess.run(
        ["kubectl", "kustomize", str(GKE_OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return tuple(doc for doc in yaml.safe_load_all(built.stdout) if doc)


def read_env(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@cache
def _sources() -> Sources:
    return Sources(
        docs=list(rendered_gke()),
        tree=terraform.load_tree(),
        env=read_env(GKE_OVERLAY / "environment.env"),
        segments=yaml.safe_load(SEGMENTS.read_text()),
    )


def sources() -> Sources:
    return copy.deepcopy(_sources())


def of_kind(docs: list[Doc], kind: str) -> Iterator[Doc]:
    return (doc for doc in docs if doc.get("kind") == kind)


def key(doc: Doc) -> str:
    return f"{doc['metadata'].get('namespace')}/{doc['metadata']['name']}"


def pods(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(namespace/name, workload, pod spec) of every Deployment and Job."""
    for doc in docs:
        if doc.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield key(doc), doc, doc["spec"]["template"]["spec"]


def gsa_of_email(email: str) -> str | None:
    name, _, domain = email.partition("@")
    return name if domain.endswith(".iam.gserviceaccount.com") else None


def ksa_gsas(docs: list[Doc]) -> dict[str, str | None]:
    """namespace/KSA -> the GSA name its annotation names (None: no Google identity)."""
    found: dict[str, str | None] = {}
    for account in of_kind(docs, "ServiceAccount"):
        email = (account["metadata"].get("annotations") or {}).get(GSA_ANNOTATION)
        found[key(account)] = gsa_of_email(str(email)) if email else None
    return found


def pod_gsa(docs: list[Doc], namespace: str, spec: Doc) -> str | None:
    ksa = f"{namespace}/{spec.get('serviceAccountName', 'default')}"
    return ksa_gsas(docs).get(ksa)


def tf_workloads(tree: Tree) -> dict[str, str]:
    """GSA -> namespace/KSA that Terraform lets act as it."""
    locals_: dict[str, Any] = tree["modules/iam"].locals.get("workloads", {})
    return {gsa: f"{w.get('namespace')}/{w.get('ksa')}" for gsa, w in locals_.items()}


def tf_readers(tree: Tree) -> dict[str, set[str]]:
    readers: dict[str, list[str]] = tree["modules/secrets"].locals.get("readers", {})
    return {secret: set(gsas) for secret, gsas in readers.items()}


def network_cidrs(doc: Doc) -> Iterator[tuple[Doc, Doc]]:
    """(ipBlock, rule) of every egress peer of a NetworkPolicy."""
    for rule in doc["spec"].get("egress", []) or []:
        for peer in rule.get("to", []) or []:
            if "ipBlock" in peer:
                yield peer["ipBlock"], rule


def rule_ports(rule: Doc) -> set[int]:
    return {int(p["port"]) for p in rule.get("ports", []) or [] if "port" in p}


def firewall(tree: Tree, name: str) -> Doc:
    body: Doc = tree["modules/network"].resources.get(("google_compute_firewall", name), {})
    return body


def firewall_ports(body: Doc) -> set[str]:
    return {str(p) for allow in body.get("allow", []) for p in allow.get("ports", [])}


def variable_default(tree: Tree, name: str) -> Any:
    return tree["."].variables.get(name, {}).get("default")


# --- the checks ----------------------------------------------------------------------------------


def check_workload_identity(s: Sources) -> list[str]:
    out = []
    bound = tf_workloads(s.tree)
    annotated = ksa_gsas(s.docs)
    iam = s.tree["modules/iam"]
    accounts = iam.resources.get(("google_service_account", "workload"), {})
    binding = iam.resources.get(("google_service_account_iam_member", "workload_identity"), {})
    if accounts.get("for_each") != "${local.workloads}" or binding.get("for_each") != (
        "${local.workloads}"
    ):
        out.append("workload identity: Terraform's GSAs and bindings are not local.workloads")
    if "[${each.value.namespace}/${each.value.ksa}]" not in str(binding.get("member")):
        out.append("workload identity: Terraform's binding does not name each namespace/KSA")
    for ksa, gsa in sorted(annotated.items(), key=lambda kv: kv[0]):
        if gsa is None:
            continue
        if gsa not in bound:
            out.append(f"workload identity: KSA {ksa} maps to GSA {gsa}, which Terraform lacks")
        elif bound[gsa] != ksa:
            out.append(
                f"workload identity: KSA {ksa} maps to GSA {gsa}, whose binding names {bound[gsa]}"
            )
    for gsa, ksa in sorted(bound.items()):
        if ksa not in annotated:
            out.append(f"workload identity: Terraform binds {gsa} to {ksa}, no such KSA")
        elif annotated[ksa] != gsa:
            out.append(
                f"workload identity: Terraform binds {gsa} to {ksa}, annotated {annotated[ksa]}"
            )
    for name, _, spec in pods(s.docs):
        namespace = name.split("/")[0]
        if f"{namespace}/{spec.get('serviceAccountName', 'default')}" not in annotated:
            out.append(f"workload identity: {name} runs as a KSA the manifests do not create")
    return out


def check_secrets(s: Sources) -> list[str]:
    out = []
    readers = tf_readers(s.tree)
    mounted: dict[str, set[str]] = {}  # secret -> GSAs of the pods that mount it
    vault_secrets: set[str] = set()
    classes = {key(doc): doc for doc in of_kind(s.docs, "SecretProviderClass")}
    for spc_key, spc in sorted(classes.items()):
        listed = yaml.safe_load(str(spc["spec"].get("parameters", {}).get("secrets", ""))) or []
        secret_ids = []
        for entry in listed:
            match = SECRET_RESOURCE.match(str(entry.get("resourceName", "")))
            if match is None:
                out.append(f"secrets: {spc_key} names {entry.get('resourceName')!r}")
                continue
            secret_ids.append(match.group(1))
            if match.group(1) not in readers:
                out.append(f"secrets: {spc_key} names {match.group(1)}, not in Terraform")
        namespace, name = spc_key.split("/")
        mounters = [
            (pod, spec)
            for pod, _, spec in pods(s.docs)
            if pod.startswith(f"{namespace}/")
            and any(
                (volume.get("csi") or {}).get("volumeAttributes", {}).get("secretProviderClass")
                == name
                for volume in spec.get("volumes", []) or []
            )
        ]
        for pod, spec in mounters:
            gsa = pod_gsa(s.docs, namespace, spec)
            if gsa is None:
                out.append(f"secrets: {pod} mounts {spc_key} without a Google identity")
                continue
            for secret in secret_ids:
                mounted.setdefault(secret, set()).add(gsa)
            if pod == "tessera-cde/tessera-vault":
                vault_secrets.update(secret_ids)
    for secret in sorted(set(readers) | set(mounted)):
        can, need = readers.get(secret, set()), mounted.get(secret, set())
        for gsa in sorted(need - can):
            if secret in readers:
                out.append(f"secrets: {gsa} mounts {secret} but Terraform does not let it read it")
        for gsa in sorted(can - need):
            whose = "the vault's secret" if secret in vault_secrets else "secret"
            out.append(f"secrets: {whose} {secret} is readable by {gsa}, which never mounts it")
        if not need:
            out.append(f"secrets: Terraform's {secret} is mounted by no pod")
    return out


def check_kms_key(s: Sources) -> list[str]:
    kms = s.tree["modules/kms"]
    ring = kms.resources.get(("google_kms_key_ring", "tessera"), {}).get("name")
    kek = kms.resources.get(("google_kms_crypto_key", "vault_kek"), {})
    names = {
        str(doc.get("data", {}).get("TESSERA_VAULT_GCP_KMS_KEY_NAME"))
        for doc in of_kind(s.docs, "ConfigMap")
        if "TESSERA_VAULT_GCP_KMS_KEY_NAME" in doc.get("data", {})
    }
    if not names:
        return ["kms: no ConfigMap sets TESSERA_VAULT_GCP_KMS_KEY_NAME"]
    out = []
    for name in sorted(names):
        match = KMS_KEY.match(name)
        if match is None:
            out.append(f"kms: TESSERA_VAULT_GCP_KMS_KEY_NAME {name!r} is not a key's full name")
        elif (match.group(1), match.group(2)) != (ring, kek.get("name")):
            out.append(
                f"kms: the vault's key {match.group(1)}/{match.group(2)} is not Terraform's "
                f"{ring}/{kek.get('name')}"
            )
    if kek.get("key_ring") != "${google_kms_key_ring.tessera.id}":
        out.append("kms: Terraform's KEK is not in the key ring the vault names")
    return out


def settings_of(docs: list[Doc], namespace: str, spec: Doc) -> dict[str, str]:
    """Every value the pod's containers take from ConfigMaps (envFrom) of its namespace."""
    maps = {key(doc): doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")}
    values: dict[str, str] = {}
    for container in spec.get("containers", []) or []:
        for source in container.get("envFrom", []) or []:
            ref = (source.get("configMapRef") or {}).get("name")
            values.update(maps.get(f"{namespace}/{ref}", {}))
    return values


def check_cloud_sql(s: Sources) -> list[str]:
    out = []
    sql = s.tree["modules/cloudsql"]
    instances = {
        body.get("name"): instance
        for instance, body in terraform.instances(sql, "google_sql_database_instance").items()
    }
    databases = {
        instance: body.get("name")
        for instance, body in terraform.instances(sql, "google_sql_database").items()
    }
    users = {(u["instance"], u["gsa"]) for u in sql.locals.get("iam_users", {}).values()}
    for pod, _, spec in pods(s.docs):
        namespace = pod.split("/")[0]
        proxies = [
            c for c in spec.get("initContainers", []) or [] if c["name"] == "cloud-sql-proxy"
        ]
        if not proxies:
            continue
        args = [str(a) for a in proxies[0].get("args", [])]
        instance_name = args[-1].split(":")[-1]
        instance = instances.get(instance_name)
        gsa = pod_gsa(s.docs, namespace, spec)
        if instance is None:
            out.append(f"cloud sql: {pod}'s proxy names {instance_name}, not a Terraform instance")
            continue
        if "--auto-iam-authn" not in args or "--private-ip" not in args:
            out.append(f"cloud sql: {pod}'s proxy must use --auto-iam-authn --private-ip")
        if (instance, gsa) not in users:
            out.append(f"cloud sql: {pod} logs in as {gsa}, not an IAM user of {instance_name}")
        for setting, value in sorted(settings_of(s.docs, namespace, spec).items()):
            if not setting.endswith(("_DATABASE_URL", "_MIGRATION_URL")):
                continue
            url = urlsplit(value)
            login = unquote(url.username or "")
            if login.split("@")[0] != gsa or not login.endswith(".iam"):
                out.append(f"cloud sql: {pod}'s {setting} logs in as {login!r}, its GSA is {gsa}")
            if url.path.lstrip("/") != databases.get(instance):
                out.append(
                    f"cloud sql: {pod}'s {setting} opens {url.path.lstrip('/')!r}, "
                    f"{instance_name} has {databases.get(instance)!r}"
                )
    return out


def check_cde_pool(s: Sources) -> list[str]:
    gke = s.tree["modules/gke"]
    pool = terraform.instances(gke, "google_container_node_pool").get("cde", {})
    node = terraform.first(pool.get("node_config", {}))
    labels = node.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    taint = terraform.first(node.get("taint", {}))
    toleration = {
        "key": taint.get("key"),
        "operator": "Equal",
        "value": taint.get("value"),
        "effect": TAINT_EFFECTS.get(str(taint.get("effect")), taint.get("effect")),
    }
    out = []
    for pod, _, spec in pods(s.docs):
        tolerates = toleration in (spec.get("tolerations") or [])
        selects = labels and labels.items() <= (spec.get("nodeSelector") or {}).items()
        vault = pod.startswith("tessera-cde/")  # the vault, its worker and its migration
        if vault and not (tolerates and selects):
            out.append(
                f"cde pool: {pod} must select {labels} and tolerate {toleration} (Terraform's pool)"
            )
        if not vault and tolerates:
            out.append(f"cde pool: {pod} tolerates the CDE pool's taint")
    return out


def check_google_apis(s: Sources) -> list[str]:
    out = []
    vip = str(s.tree["modules/network"].locals.get("restricted_vip_cidr"))
    segment = s.segments.get("kubernetes_segments", {}).get("google-apis", {}).get("cidr")
    if segment != vip:
        out.append(f"google apis: segments.yaml says {segment}, Terraform's VIP is {vip}")
    allow = firewall(s.tree, "allow_egress_restricted_googleapis")
    if allow.get("destination_ranges") != ["${local.restricted_vip_cidr}"] or (
        "443" not in firewall_ports(allow)
    ):
        out.append("google apis: Terraform's firewall does not allow the VIP on 443")
    vault_reaches_vip = False
    for policy in of_kind(s.docs, "NetworkPolicy"):
        for block, rule in network_cidrs(policy):
            cidr = ipaddress.IPv4Network(block["cidr"])
            if cidr.prefixlen == 0:
                if vip not in (block.get("except") or []):
                    out.append(
                        f"google apis: {key(policy)} reaches the internet but not less {vip}"
                    )
                continue
            if cidr.subnet_of(GOOGLE_VIPS) and block["cidr"] != vip:
                out.append(f"google apis: {key(policy)} allows {block['cidr']}, the VIP is {vip}")
            if block["cidr"] == vip and rule_ports(rule) != {443}:
                out.append(f"google apis: {key(policy)} reaches the VIP on {rule_ports(rule)}")
            if key(policy) == "tessera-cde/tessera-vault-managed-services" and block["cidr"] == vip:
                vault_reaches_vip = True
    if not vault_reaches_vip:
        out.append(f"google apis: the vault cannot reach Cloud KMS at {vip}")
    return out


def check_managed_service_ports(s: Sources) -> list[str]:
    out = []
    redis = terraform.instances(s.tree["modules/memorystore"], "google_redis_instance")
    private = ipaddress.IPv4Network(str(variable_default(s.tree, "private_services_cidr")))
    allowed = firewall_ports(firewall(s.tree, "allow_egress_private_services"))
    expected: dict[str, int] = {}
    for env_key, instance in (("VAULT_REDIS_CIDR", "vault"), ("API_REDIS_CIDR", "api")):
        body = redis.get(instance, {})
        port = REDIS_PORT.get(str(body.get("transit_encryption_mode")))
        if port is None:
            out.append(f"memorystore: tessera-{instance}'s transit_encryption_mode is unknown")
            continue
        expected[s.env.get(env_key, "")] = port
        segment = s.segments["segments"].get(f"{instance}-redis", {})
        if segment.get("ports", {}).get(6379) != port:
            out.append(f"memorystore: segments.yaml maps {instance}-redis to {segment}, not {port}")
    for env_key in ("VAULT_DB_CIDR", "API_DB_CIDR"):
        expected[s.env.get(env_key, "")] = CLOUD_SQL_PROXY_PORT
    for cidr in sorted(expected):
        if not cidr or not ipaddress.IPv4Network(cidr).subnet_of(private):
            out.append(f"managed services: {cidr!r} is outside Terraform's {private}")
    for port in sorted(set(expected.values())):
        if str(port) not in allowed:
            out.append(f"managed services: Terraform's firewall does not allow {port} to {private}")
    seen = set()
    for policy in of_kind(s.docs, "NetworkPolicy"):
        for block, rule in network_cidrs(policy):
            if block["cidr"] in expected:
                seen.add(block["cidr"])
                port = expected[block["cidr"]]
                if rule_ports(rule) != {port}:
                    out.append(
                        f"managed services: {key(policy)} reaches {block['cidr']} on "
                        f"{sorted(rule_ports(rule))}, the service listens on {port}"
                    )
    for cidr in sorted(set(expected) - seen):
        out.append(f"managed services: no NetworkPolicy reaches {cidr}")
    return out


def check_edge_load_balancer(s: Sources) -> list[str]:
    out = []
    edge = s.tree["."].locals.get("edge_load_balancer", {})
    tags = s.tree["."].locals.get("node_tags", {})
    exposed = [
        doc
        for doc in of_kind(s.docs, "Service")
        if doc["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    if [key(doc) for doc in exposed] != ["tessera-edge/tessera-ingressgateway"]:
        names = [key(doc) for doc in exposed]
        out.append(f"edge: Terraform's firewall admits only the edge gateway, not {names}")
    for service in exposed:
        spec = service["spec"]
        ports = {int(p["port"]) for p in spec.get("ports", [])}
        if ports != {edge.get("port")}:
            out.append(f"edge: {key(service)} listens on {ports}, the firewall on {edge}")
        if spec.get("externalTrafficPolicy") != "Local" or spec.get(
            "healthCheckNodePort"
        ) != edge.get("health_check_node_port"):
            out.append(
                f"edge: {key(service)}'s health check node port {spec.get('healthCheckNodePort')} "
                f"is not the firewall's {edge.get('health_check_node_port')}"
            )
    if s.tree["."].calls.get("network", {}).get("edge_node_tag") != "${local.node_tags.general}":
        out.append("edge: the firewall does not target the general pool the gateway runs on")
    pools = terraform.instances(s.tree["modules/gke"], "google_container_node_pool")
    general = terraform.first(pools.get("general", {}).get("node_config", {}))
    if general.get("tags") != ['${var.node_tags["general"]}'] or not tags.get("general"):
        out.append("edge: the general pool's nodes do not carry the firewall's target tag")
    for pod, _, spec in pods(s.docs):
        if pod == "tessera-edge/tessera-ingressgateway" and spec.get("tolerations"):
            out.append("edge: the gateway's pods may leave the general pool the firewall targets")
    return out


CHECKS: list[Callable[[Sources], list[str]]] = [
    check_workload_identity,
    check_secrets,
    check_kms_key,
    check_cloud_sql,
    check_cde_pool,
    check_google_apis,
    check_managed_service_ports,
    check_edge_load_balancer,
]


def inconsistencies(s: Sources) -> list[str]:
    return [problem for check in CHECKS for problem in check(s)]


# --- the real trees agree ------------------------------------------------------------------------


def test_kubernetes_and_terraform_agree() -> None:
    assert inconsistencies(sources()) == []


def test_the_checks_see_what_they_compare() -> None:
    """Guards against a check that passes because it found nothing to compare."""
    s = sources()
    assert len([gsa for gsa in ksa_gsas(s.docs).values() if gsa]) == 7
    assert len(tf_readers(s.tree)) == 11
    assert len(list(of_kind(s.docs, "SecretProviderClass"))) == 5
    assert sum(1 for _, _, spec in pods(s.docs) if spec.get("initContainers")) >= 6


# --- each check bites ----------------------------------------------------------------------------


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(docs: list[Doc], kind: str, name: str) -> Doc:
    spec: Doc = find(docs, kind, name)["spec"]["template"]["spec"]
    return spec


def rename_secret(s: Sources) -> None:
    spc = find(s.docs, "SecretProviderClass", "tessera-vault")
    spc["spec"]["parameters"]["secrets"] = spc["spec"]["parameters"]["secrets"].replace(
        "tessera-vault-redis-auth", "tessera-vault-redis-url"
    )


def drop_edge_binding(s: Sources) -> None:
    del s.tree["modules/iam"].locals["workloads"]["tessera-edge"]


def rebind_worker(s: Sources) -> None:
    s.tree["modules/iam"].locals["workloads"]["tessera-worker"]["ksa"] = "worker"


def annotate_unknown_gsa(s: Sources) -> None:
    account = next(
        d
        for d in s.docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "tessera-api-migrate"
    )
    account["metadata"]["annotations"][GSA_ANNOTATION] = "tessera-migrate@P.iam.gserviceaccount.com"


def change_taint(s: Sources) -> None:
    s.tree["modules/gke"].locals["node_pools"]["cde"]["taints"][0]["value"] = "yes"


def vault_on_any_node(s: Sources) -> None:
    del pod_spec(s.docs, "Deployment", "tessera-vault")["nodeSelector"]


def api_tolerates_cde(s: Sources) -> None:
    spec = pod_spec(s.docs, "Deployment", "tessera-api")
    spec["tolerations"] = copy.deepcopy(
        pod_spec(s.docs, "Deployment", "tessera-vault")["tolerations"]
    )


def api_reads_vault_redis(s: Sources) -> None:
    s.tree["modules/secrets"].locals["readers"]["tessera-vault-redis-auth"].append("tessera-api")


def worker_cannot_read_ca(s: Sources) -> None:
    s.tree["modules/secrets"].locals["readers"]["tessera-redis-server-ca"].remove("tessera-worker")


def unmounted_secret(s: Sources) -> None:
    s.tree["modules/secrets"].locals["readers"]["tessera-api-spare-key"] = ["tessera-api"]


def edge_without_gsa(s: Sources) -> None:
    account = next(
        d
        for d in s.docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "tessera-ingressgateway"
    )
    del account["metadata"]["annotations"][GSA_ANNOTATION]


def kms_ring_renamed(s: Sources) -> None:
    s.tree["modules/kms"].resources[("google_kms_key_ring", "tessera")]["name"] = "tessera-prod"


def kms_key_in_settings(s: Sources) -> None:
    for doc in s.docs:
        data = doc.get("data", {})
        if "TESSERA_VAULT_GCP_KMS_KEY_NAME" in data:
            data["TESSERA_VAULT_GCP_KMS_KEY_NAME"] = data["TESSERA_VAULT_GCP_KMS_KEY_NAME"].replace(
                "tessera-vault-kek", "tessera-kek"
            )


def proxy_to_other_instance(s: Sources) -> None:
    proxy = pod_spec(s.docs, "Deployment", "tessera-vault")["initContainers"][0]
    proxy["args"][-1] = "PROJECT_ID:REGION:tessera-cde"


def admin_not_an_iam_user(s: Sources) -> None:
    del s.tree["modules/cloudsql"].locals["iam_users"]["api/tessera-admin"]


def admin_logs_in_as_api(s: Sources) -> None:
    for doc in s.docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["namespace"] == "tessera-admin":
            url = doc.get("data", {}).get("TESSERA_API_DATABASE_URL")
            if url:
                doc["data"]["TESSERA_API_DATABASE_URL"] = url.replace(
                    "tessera-admin%40", "tessera-api%40"
                )


def database_renamed(s: Sources) -> None:
    s.tree["modules/cloudsql"].locals["instances"]["vault"]["database"] = "vault"


def vip_moved(s: Sources) -> None:
    s.tree["modules/network"].locals["restricted_vip_cidr"] = "199.36.153.8/30"


def redis_without_tls(s: Sources) -> None:
    redis = s.tree["modules/memorystore"].resources[("google_redis_instance", "this")]
    redis["transit_encryption_mode"] = "DISABLED"


def firewall_without_redis(s: Sources) -> None:
    body = firewall(s.tree, "allow_egress_private_services")
    body["allow"][0]["ports"] = ["3307", "5432"]


def redis_outside_private_range(s: Sources) -> None:
    s.env["API_REDIS_CIDR"] = "10.60.1.21/32"


def health_check_port_moved(s: Sources) -> None:
    find(s.docs, "Service", "tessera-ingressgateway")["spec"]["healthCheckNodePort"] = 31021


def second_load_balancer(s: Sources) -> None:
    find(s.docs, "Service", "tessera-api")["spec"]["type"] = "LoadBalancer"


def edge_port_moved(s: Sources) -> None:
    s.tree["."].locals["edge_load_balancer"]["port"] = 8443


MUTATIONS: dict[str, tuple[Callable[[Sources], None], str]] = {
    "a secret renamed in a SecretProviderClass": (
        rename_secret,
        "names tessera-vault-redis-url, not in Terraform",
    ),
    "the edge's Workload Identity binding dropped": (drop_edge_binding, "which Terraform lacks"),
    "a binding names another KSA": (rebind_worker, "whose binding names tessera-app/worker"),
    "a KSA annotated with a GSA Terraform lacks": (annotate_unknown_gsa, "which Terraform lacks"),
    "the CDE taint changed in Terraform": (change_taint, "must select"),
    "the vault without the CDE node selector": (vault_on_any_node, "must select"),
    "the API tolerates the CDE taint": (api_tolerates_cde, "tessera-api tolerates the CDE"),
    "the API may read the vault's Redis URL": (
        api_reads_vault_redis,
        "the vault's secret tessera-vault-redis-auth is readable by tessera-api",
    ),
    "the worker may not read what it mounts": (
        worker_cannot_read_ca,
        "tessera-worker mounts tessera-redis-server-ca but",
    ),
    "a Terraform secret no pod mounts": (
        unmounted_secret,
        "tessera-api-spare-key is mounted by no",
    ),
    "the gateway mounts secrets without a GSA": (edge_without_gsa, "without a Google identity"),
    "the key ring renamed in Terraform": (kms_ring_renamed, "is not Terraform's tessera-prod"),
    "the vault names another key": (kms_key_in_settings, "tessera/tessera-kek is not"),
    "a proxy names an instance Terraform lacks": (proxy_to_other_instance, "not a Terraform"),
    "the admin toolbox not an IAM database user": (
        admin_not_an_iam_user,
        "logs in as tessera-admin, not an IAM user of tessera-api",
    ),
    "the admin toolbox logs in as the API": (admin_logs_in_as_api, "its GSA is tessera-admin"),
    "the vault database renamed in Terraform": (database_renamed, "tessera-vault has 'vault'"),
    "the restricted VIP moved in Terraform": (vip_moved, "segments.yaml says 199.36.153.4/30"),
    "Memorystore without TLS (6379)": (redis_without_tls, "the service listens on 6379"),
    "the firewall drops Memorystore's port": (firewall_without_redis, "does not allow 6378"),
    "a Redis address outside private services": (redis_outside_private_range, "is outside"),
    "the health check node port moved": (health_check_port_moved, "health check node port 31021"),
    "another Service exposed to the internet": (second_load_balancer, "admits only the edge"),
    "the firewall opens another port": (edge_port_moved, "listens on {443}"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_disagreement_is_reported(mutation: str) -> None:
    mutate, expected = MUTATIONS[mutation]
    s = sources()
    mutate(s)
    found = inconsistencies(s)
    assert any(expected in problem for problem in found), found
    assert inconsistencies(sources()) == []  # the copy, not the cached sources, was changed
