"""Terraform steps of make deploy-check, and the checker of what deploy/terraform must say.

`load_tree` parses every .tf file with python-hcl2; `problems` reads the parsed tree and lists
every property of issue 11 it does not hold (tests/test_deploy_terraform.py shows each check
bites by mutating a copy). `check` runs the parse, `terraform fmt -check`, checkov and `problems`.
A resource written once with `for_each` over a local map is read per instance (`instances`), so
every property is still checked for each Cloud SQL instance, Redis instance and node pool.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

from tests.deploy.tools import DEPLOY, DeployCheck

TERRAFORM_DIR = DEPLOY / "terraform"

Block = dict[str, Any]

#: GSA -> namespace/KSA; deploy/k8s names exactly these Kubernetes service accounts.
WORKLOADS = {
    "tessera-vault": "tessera-cde/tessera-vault",
    "tessera-vault-migrate": "tessera-cde/tessera-vault-migrate",
    "tessera-api": "tessera-app/tessera-api",
    "tessera-worker": "tessera-app/tessera-worker",
    "tessera-api-migrate": "tessera-app/tessera-api-migrate",
    "tessera-admin": "tessera-admin/tessera-admin",
    "tessera-edge": "tessera-edge/tessera-ingressgateway",
}
API_GSAS = ("tessera-api", "tessera-worker", "tessera-api-migrate")
SECRETS = {
    "tessera-vault-service-token",
    "tessera-vault-admin-token",
    "tessera-api-webhook-secret-key",
    "tessera-api-psp-a-api-key",
    "tessera-api-psp-b-api-key",
    "tessera-api-psp-b-hmac-key",
    "tessera-redis-auth",
    "tessera-vault-redis-auth",
    "tessera-redis-server-ca",
    "tessera-edge-tls-cert",
    "tessera-edge-tls-key",
}
#: Secrets both the vault and the API's GSAs read: the token one presents and the other checks,
#: and the Memorystore CA certificates.
SHARED_SECRETS = {"tessera-vault-service-token", "tessera-redis-server-ca"}
EDGE_SECRETS = {"tessera-edge-tls-cert", "tessera-edge-tls-key"}
#: Health-check sources of an external passthrough Network Load Balancer.
NLB_HEALTH_CHECK_RANGES = {"35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"}
PERIMETER_SERVICES = {
    "cloudkms.googleapis.com",
    "sqladmin.googleapis.com",
    "secretmanager.googleapis.com",
}
#: Former address -> for_each instance, by module: what the `moved` blocks must say.
FORMER_ADDRESSES = {
    "modules/cloudsql": {
        **{
            f"google_sql_database_instance.{key}": f'google_sql_database_instance.this["{key}"]'
            for key in ("api", "vault")
        },
        **{
            f"google_sql_database.{key}": f'google_sql_database.this["{key}"]'
            for key in ("api", "vault")
        },
    },
    "modules/memorystore": {
        f"google_redis_instance.{key}": f'google_redis_instance.this["{key}"]'
        for key in ("api", "vault")
    },
    "modules/gke": {
        f"google_container_node_pool.{key}": f'google_container_node_pool.this["{key}"]'
        for key in ("cde", "general")
    },
}
NINETY_DAYS = 90 * 24 * 3600
MIN_LOG_DAYS = 365
CRYPTO_ROLES = re.compile(r"roles/cloudkms\.(cryptoKey\w*(Encrypter|Decrypter)\w*|.*[Dd]ecrypt.*)")
_OPTIONS = hcl2.SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, preserve_heredocs=False
)


@dataclass
class Module:
    """One directory of .tf files, as Terraform sees it."""

    resources: dict[tuple[str, str], Block] = field(default_factory=dict)
    variables: dict[str, Block] = field(default_factory=dict)
    outputs: dict[str, Block] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, Block] = field(default_factory=dict)
    #: `moved` blocks: former address -> current address.
    moved: dict[str, str] = field(default_factory=dict)


#: Directory relative to deploy/terraform ("." is the root module) -> its module.
Tree = dict[str, Module]


def parse_file(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        parsed: dict[str, Any] = hcl2.load(handle, serialization_options=_OPTIONS)
    return parsed


def load_tree(root: Path = TERRAFORM_DIR) -> Tree:
    tree: Tree = {}
    for path in sorted(root.rglob("*.tf")):
        if ".terraform" in path.parts:
            continue
        module = tree.setdefault(str(path.parent.relative_to(root)), Module())
        parsed = parse_file(path)
        for entry in parsed.get("resource", []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    module.resources[(rtype, name)] = body
        for entry in parsed.get("variable", []):
            module.variables.update(entry)
        for entry in parsed.get("output", []):
            module.outputs.update(entry)
        for entry in parsed.get("locals", []):
            module.locals.update(entry)
        for entry in parsed.get("module", []):
            module.calls.update(entry)
        for entry in parsed.get("moved", []):
            module.moved[unwrap(entry["from"])] = unwrap(entry["to"])
    return tree


# --- small readers of parsed HCL -------------------------------------------------------------


def first(value: Any) -> Any:
    """A nested block parses as a list of bodies; the checks read the first."""
    if isinstance(value, list):
        return value[0] if value else {}
    return value


def get(body: Block, *path: str) -> Any:
    value: Any = body
    for key in path:
        value = first(value).get(key) if isinstance(first(value), dict) else None
        if value is None:
            return None
    return value


# --- for_each and dynamic blocks, resolved as far as the module's own locals allow -------------
# Enough of Terraform's expressions for what deploy/terraform writes: references into
# each/local/a dynamic block's iterator, try(), concat(), null and []. Anything else (var.*,
# other functions) stays as its text, so a check comparing it to an expected text still works.


class _Unknown:
    """An expression this reader does not evaluate (a variable, a function it lacks)."""


UNKNOWN = _Unknown()
_STEP = re.compile(r'\.([A-Za-z_][\w-]*)|\["([^"]*)"\]|\[each\.key\]')
_ROOT = re.compile(r"[A-Za-z_][\w-]*")
_EACH = re.compile(r"\beach\.(?:key|value(?:\.[A-Za-z_][\w-]*)*)")


def unwrap(text: Any) -> str:
    """`${x}` -> `x`: python-hcl2 wraps a bare expression in an interpolation."""
    value = str(text)
    return value[2:-1] if value.startswith("${") and value.endswith("}") else value


def _split_arguments(text: str) -> list[str]:
    args, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return [*args, tail] if tail else args


def _reference(expr: str, scope: dict[str, Any]) -> Any:
    root = _ROOT.match(expr)
    if root is None or root.group(0) not in scope:
        return UNKNOWN
    value, at = scope[root.group(0)], root.end()
    while at < len(expr):
        step = _STEP.match(expr, at)
        if step is None:
            return UNKNOWN
        if step.group(0) == "[each.key]":
            name = scope.get("each", {}).get("key")
        else:
            name = step.group(1) if step.group(1) is not None else step.group(2)
        if not isinstance(value, dict) or name not in value:
            return UNKNOWN
        value, at = value[name], step.end()
    return value


def evaluate(expr: str, scope: dict[str, Any]) -> Any:
    """The value of one expression, or UNKNOWN."""
    expr = expr.strip()
    if expr == "null":
        return None
    if expr == "[]":
        return []
    call = re.fullmatch(r"(try|concat)\((.*)\)", expr, re.DOTALL)
    if call is not None:
        args = [evaluate(arg, scope) for arg in _split_arguments(call.group(2))]
        if call.group(1) == "try":
            return next((arg for arg in args if arg is not UNKNOWN), UNKNOWN)
        if all(isinstance(arg, list) for arg in args):
            return [item for arg in args for item in arg]
        return UNKNOWN
    value = _reference(expr, scope)
    return UNKNOWN if value is UNKNOWN else render(value, scope)


def _literal_each(expr: str, scope: dict[str, Any]) -> str:
    """each.key in an expression left unevaluated, as the literal it stands for."""

    def literal(match: re.Match[str]) -> str:
        value = _reference(match.group(0), scope)
        return json.dumps(value) if isinstance(value, str | int | float) else match.group(0)

    return _EACH.sub(literal, expr) if "each" in scope else expr


def _render_text(text: str, scope: dict[str, Any]) -> Any:
    whole = re.fullmatch(r"\$\{(.*)\}", text, re.DOTALL)
    if whole is not None and "${" not in whole.group(1):
        value = evaluate(whole.group(1), scope)
        return "${" + _literal_each(whole.group(1), scope) + "}" if value is UNKNOWN else value

    def part(match: re.Match[str]) -> str:
        value = evaluate(match.group(1), scope)
        if value is UNKNOWN or not isinstance(value, str | int | float):
            return "${" + _literal_each(match.group(1), scope) + "}"
        return str(value)

    return re.sub(r"\$\{([^{}]*)\}", part, text)


def _iterate(collection: Any) -> list[tuple[Any, Any]]:
    if isinstance(collection, dict):
        return list(collection.items())
    return list(enumerate(collection))


def render(value: Any, scope: dict[str, Any]) -> Any:
    """value with every expression this reader can evaluate replaced by its value; a dynamic
    block it can expand becomes blocks of its type (after the static ones: the checks read
    blocks as a set)."""
    if isinstance(value, str):
        return _render_text(value, scope)
    if isinstance(value, list):
        return [render(item, scope) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key != "dynamic":
            out[key] = render(item, scope)
    for entry in value.get("dynamic", []):
        for block, spec in entry.items():
            collection = evaluate(unwrap(spec.get("for_each")), scope)
            if not isinstance(collection, dict | list):
                out.setdefault("dynamic", []).append(entry)
                continue
            blocks = out.setdefault(block, [])
            for each_key, each_value in _iterate(collection):
                iterator = {block: {"key": each_key, "value": each_value}}
                blocks.append(render(first(spec.get("content", {})), scope | iterator))
    return out


def instances(module: Module, rtype: str) -> dict[str, Block]:
    """Every resource of rtype in the module, rendered: one per for_each key (by that key) for a
    for_each over a local map or set, or the resource itself (by its name)."""
    out: dict[str, Block] = {}
    scope: dict[str, Any] = {"local": module.locals}
    for (kind, name), body in module.resources.items():
        if kind != rtype:
            continue
        template = {k: v for k, v in body.items() if k != "for_each"}
        keys = evaluate(unwrap(body["for_each"]), scope) if "for_each" in body else UNKNOWN
        if not isinstance(keys, dict | list):
            out[name] = render(body, scope)
            continue
        pairs = keys.items() if isinstance(keys, dict) else ((k, k) for k in keys)
        for each_key, each_value in pairs:
            each = {"each": {"key": each_key, "value": copy.deepcopy(each_value)}}
            out[str(each_key)] = render(template, scope | each)
    return out


def flags(instance: Block) -> dict[str, str]:
    settings = first(instance.get("settings", {}))
    return {first(f)["name"]: str(first(f)["value"]) for f in settings.get("database_flags", [])}


def duration_seconds(value: Any) -> int | None:
    match = re.fullmatch(r"(\d+)s", str(value))
    return int(match.group(1)) if match else None


def every_resource(tree: Tree) -> Iterator[tuple[str, str, str, Block]]:
    for where, module in tree.items():
        for (rtype, name), body in module.resources.items():
            yield where, rtype, name, body


def min_from_validation(variable: Block, name: str) -> int | None:
    """The N of `var.NAME >= N` in the variable's validation, if there is one."""
    for validation in variable.get("validation", []):
        condition = str(first(validation).get("condition", ""))
        match = re.search(rf"var\.{name}\s*>=\s*(\d+)", condition)
        if match:
            return int(match.group(1))
    return None


# --- the checks ------------------------------------------------------------------------------


def check_kek(tree: Tree) -> list[str]:
    kms = tree["modules/kms"]
    found = [b for (t, _), b in kms.resources.items() if t == "google_kms_crypto_key"]
    keks = [b for b in found if b.get("name") == "tessera-vault-kek"]
    if len(keks) != 1:
        return ["kms: exactly one crypto key named tessera-vault-kek"]
    kek = keks[0]
    out = []
    if kek.get("purpose") != "ENCRYPT_DECRYPT":
        out.append("kms: the KEK's purpose is ENCRYPT_DECRYPT")
    if get(kek, "version_template", "protection_level") != "HSM":
        out.append("kms: the KEK's protection_level is HSM")
    rotation = duration_seconds(kek.get("rotation_period"))
    if rotation is None or rotation > NINETY_DAYS:
        out.append("kms: the KEK rotates at least every 90 days (rotation_period <= 7776000s)")
    if get(kek, "lifecycle", "prevent_destroy") is not True:
        out.append("kms: the KEK has lifecycle prevent_destroy = true")
    for body in found:
        if "fingerprint" in str(body.get("name", "")):
            out.append("kms: no separate fingerprint key (the vault wraps them under the KEK)")
        if get(body, "version_template", "protection_level") != "HSM":
            out.append(f"kms: key {body.get('name')} is HSM-protected")
        if get(body, "lifecycle", "prevent_destroy") is not True:
            out.append(f"kms: key {body.get('name')} has prevent_destroy")
    return out


def check_kms_iam(tree: Tree) -> list[str]:
    out = []
    kms = tree["modules/kms"]
    root = tree["."]
    vault_email = str(root.calls["kms"].get("vault_service_account_email", ""))
    if vault_email != '${module.iam.emails["tessera-vault"]}':
        out.append("kms: the KEK's encrypt/decrypt goes to the tessera-vault GSA")
    for (rtype, name), body in kms.resources.items():
        role = str(body.get("role", ""))
        if rtype.endswith("_iam_member") and "vault_kek" in str(body.get("crypto_key_id", "")):
            allowed = {"roles/cloudkms.cryptoKeyEncrypterDecrypter", "roles/cloudkms.viewer"}
            if role not in allowed:
                out.append(f"kms: {name} grants {role} on the KEK (only encrypt/decrypt, viewer)")
        if "key_ring_id" in body and CRYPTO_ROLES.fullmatch(role):
            out.append(f"kms: {name} grants a crypto role on the whole key ring")
    admins = [b for (t, _), b in kms.resources.items() if t == "google_kms_key_ring_iam_member"]
    if not admins or any(b.get("role") != "roles/cloudkms.admin" for b in admins):
        out.append("kms: key administrators get roles/cloudkms.admin (manage, no crypto)")
    kek_crypto = kms.resources.get(("google_kms_crypto_key_iam_member", "kek_crypto"), {})
    conditions = " ".join(
        str(first(p).get("condition", ""))
        for p in first(kek_crypto.get("lifecycle", {})).get("precondition", [])
    )
    if "setintersection" not in conditions or "var.key_admins" not in conditions:
        out.append("kms: a precondition keeps key admins and KEK crypto members disjoint")
    prefixes = set(kms.locals.get("human_prefixes", []))
    if "crypto_humans" not in conditions or not {"user:", "group:"} <= prefixes:
        out.append("kms: a precondition refuses user:/group: members with KEK crypto roles")
    extra = root.variables.get("kek_crypto_members", {})
    rules = " ".join(str(first(v).get("condition")) for v in extra.get("validation", []))
    if 'startswith(m, "serviceAccount:")' not in rules or extra.get("default") != []:
        out.append("kms: kek_crypto_members admits serviceAccount: members only, none by default")
    # The payment API's identities have no Cloud KMS role anywhere.
    for where, rtype, name, body in every_resource(tree):
        role = str(body.get("role", ""))
        member = str(body.get("member", "")) + str(body.get("members", ""))
        if not rtype.endswith(("_iam_member", "_iam_binding")) or "cloudkms" not in role:
            continue
        if any(f'"{gsa}"' in member or f"{gsa}@" in member for gsa in API_GSAS):
            out.append(f"kms: {where} {name} gives an API GSA a Cloud KMS role ({role})")
        if rtype.startswith("google_project_iam"):
            out.append(f"kms: {where} {name} grants {role} project-wide")
    return out


def check_cloudsql(tree: Tree) -> list[str]:
    sql = tree["modules/cloudsql"]
    out = []
    found = instances(sql, "google_sql_database_instance")
    databases = instances(sql, "google_sql_database")
    for key, name, database in (
        ("api", "tessera-api", "tessera_api"),
        ("vault", "tessera-vault", "tessera_vault"),
    ):
        body = found.get(key)
        if body is None or body.get("name") != name:
            out.append(f"cloudsql: instance {name} exists")
            continue
        settings = first(body.get("settings", {}))
        if not str(body.get("database_version", "")).startswith("POSTGRES_"):
            out.append(f"cloudsql: {name} is PostgreSQL")
        if settings.get("availability_type") != "REGIONAL":
            out.append(f"cloudsql: {name} is availability_type REGIONAL")
        ip = first(settings.get("ip_configuration", {}))
        if ip.get("ipv4_enabled") is not False or not ip.get("private_network"):
            out.append(f"cloudsql: {name} has a private IP only (ipv4_enabled = false)")
        if ip.get("authorized_networks"):
            out.append(f"cloudsql: {name} has no authorized networks")
        if ip.get("ssl_mode") not in ("ENCRYPTED_ONLY", "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"):
            out.append(f"cloudsql: {name} refuses connections without TLS")
        if not body.get("encryption_key_name"):
            out.append(f"cloudsql: {name} is encrypted with CMEK")
        backup = first(settings.get("backup_configuration", {}))
        if (
            backup.get("enabled") is not True
            or backup.get("point_in_time_recovery_enabled") is not True
        ):
            out.append(f"cloudsql: {name} has backups and point-in-time recovery")
        if body.get("deletion_protection") is not True:
            out.append(f"cloudsql: {name} has deletion_protection")
        instance_flags = flags(body)
        if instance_flags.get("cloudsql.iam_authentication") != "on":
            out.append(f"cloudsql: {name} has IAM database authentication on")
        for flag in ("log_connections", "log_disconnections", "log_checkpoints", "log_lock_waits"):
            if instance_flags.get(flag) != "on":
                out.append(f"cloudsql: {name} sets {flag} on")
        if key == "vault" and (
            instance_flags.get("cloudsql.enable_pgaudit") != "on"
            or instance_flags.get("pgaudit.log", "none") in ("", "none")
        ):
            out.append(
                "cloudsql: tessera-vault has pgaudit on (cloudsql.enable_pgaudit, pgaudit.log)"
            )
        db = databases.get(key, {})
        if db.get("name") != database:
            out.append(f"cloudsql: {name} has the database {database}")
    users = sql.locals.get("iam_users", {})
    pairs = {f"{u['instance']}/{u['gsa']}" for u in users.values()}
    if pairs != {
        "api/tessera-api",
        "api/tessera-worker",
        "api/tessera-api-migrate",
        "api/tessera-admin",
        "vault/tessera-vault",
        "vault/tessera-vault-migrate",
    }:
        out.append("cloudsql: IAM users are exactly the services' GSAs, each on its own instance")
    user = sql.resources.get(("google_sql_user", "iam"), {})
    if user.get("type") != "CLOUD_IAM_SERVICE_ACCOUNT":
        out.append("cloudsql: the database users are CLOUD_IAM_SERVICE_ACCOUNT")
    access = sql.resources.get(("google_project_iam_member", "instance_access"), {})
    if "resource.name ==" not in str(get(access, "condition", "expression")):
        out.append("cloudsql: cloudsql.client/instanceUser are conditioned on one instance")
    return out


def check_memorystore(tree: Tree) -> list[str]:
    redis = tree["modules/memorystore"]
    out = []
    found = instances(redis, "google_redis_instance")
    for key in ("api", "vault"):
        body = found.get(key, {})
        name = f"tessera-{key}"
        if body.get("name") != name:
            out.append(f"memorystore: instance {name} exists")
            continue
        if body.get("tier") != "STANDARD_HA":
            out.append(f"memorystore: {name} is STANDARD_HA")
        if body.get("auth_enabled") is not True:
            out.append(f"memorystore: {name} has AUTH enabled")
        if body.get("transit_encryption_mode") != "SERVER_AUTHENTICATION":
            out.append(f"memorystore: {name} has in-transit TLS (SERVER_AUTHENTICATION)")
        if body.get("connect_mode") != "PRIVATE_SERVICE_ACCESS":
            out.append(f"memorystore: {name} is reached by private services access")
        if not body.get("customer_managed_key"):
            out.append(f"memorystore: {name} is encrypted with CMEK")
    if get(found.get("vault", {}), "persistence_config", "persistence_mode") != "DISABLED":
        out.append("memorystore: the vault's Redis (CVCs) never persists to disk")
    return out


def check_logging(tree: Tree) -> list[str]:
    logging = tree["modules/logging"]
    root = tree["."]
    out = []
    buckets = [
        b for (t, _), b in logging.resources.items() if t == "google_logging_project_bucket_config"
    ]
    if not buckets:
        out.append("logging: the vault's log buckets exist")
    for bucket in buckets:
        retention = bucket.get("retention_days")
        if isinstance(retention, int):
            if retention < MIN_LOG_DAYS:
                out.append(f"logging: a log bucket keeps {retention} days (< {MIN_LOG_DAYS})")
        elif retention != "${var.retention_days}":
            out.append("logging: bucket retention_days is var.retention_days or a literal")
        if not get(bucket, "cmek_settings", "kms_key_name"):
            out.append("logging: log buckets are encrypted with CMEK")
    floor = min_from_validation(logging.variables.get("retention_days", {}), "retention_days")
    if floor is None or floor < MIN_LOG_DAYS:
        out.append("logging: module variable retention_days is validated >= 365")
    variable = root.variables.get("log_retention_days", {})
    root_floor = min_from_validation(variable, "log_retention_days")
    default = variable.get("default")
    if root_floor is None or root_floor < MIN_LOG_DAYS:
        out.append("logging: log_retention_days is validated >= 365")
    if not isinstance(default, int) or default < MIN_LOG_DAYS:
        out.append(f"logging: log_retention_days defaults to >= 365 days (is {default})")
    if root.calls.get("logging", {}).get("retention_days") != "${var.log_retention_days}":
        out.append("logging: the root passes log_retention_days to the logging module")
    filters = " ".join(str(v.get("filter", "")) for v in logging.locals.get("buckets", {}).values())
    filters = filters.replace("\\", "")
    for needle in (
        'namespace_name="tessera-cde"',
        "PgAuditEntry",
        'database_id="${local.sql_vault}"',
    ):
        if needle not in filters:
            out.append(f"logging: the vault's sinks select {needle}")
    if logging.locals.get("sql_vault") != "${var.project_id}:tessera-vault":
        out.append("logging: the pgaudit filter names the tessera-vault instance")
    audit = logging.resources.get(("google_project_iam_audit_config", "data_access"), {})
    if "cloudkms.googleapis.com" not in str(audit.get("for_each")):
        out.append("logging: Cloud KMS data access audit logs are on")
    return out


def check_vpc_sc(tree: Tree) -> list[str]:
    vpc_sc = tree["modules/vpc-sc"]
    out = []
    services = set(vpc_sc.variables.get("restricted_services", {}).get("default", []))
    if not services >= PERIMETER_SERVICES:
        out.append(f"vpc-sc: the perimeter restricts {sorted(PERIMETER_SERVICES - services)}")
    perimeter = vpc_sc.resources.get(("google_access_context_manager_service_perimeter", "tessera"))
    if perimeter is None or "var.restricted_services" not in str(vpc_sc.locals.get("perimeter")):
        out.append("vpc-sc: the perimeter uses restricted_services")
    rules = " ".join(
        str(first(v).get("condition"))
        for v in vpc_sc.variables.get("restricted_services", {}).get("validation", [])
    )
    if not all(service in rules for service in PERIMETER_SERVICES):
        out.append("vpc-sc: restricted_services cannot drop KMS, Cloud SQL or Secret Manager")
    return out


def check_workload_identity(tree: Tree) -> list[str]:
    iam = tree["modules/iam"]
    out = []
    workloads = {
        gsa: f"{w.get('namespace')}/{w.get('ksa')}"
        for gsa, w in iam.locals.get("workloads", {}).items()
    }
    if workloads != WORKLOADS:
        out.append(f"iam: Workload Identity maps {workloads}, expected {WORKLOADS}")
    binding = iam.resources.get(("google_service_account_iam_member", "workload_identity"), {})
    if binding.get("role") != "roles/iam.workloadIdentityUser" or binding.get("member") != (
        "serviceAccount:${var.workload_pool}[${each.value.namespace}/${each.value.ksa}]"
    ):
        out.append(
            "iam: each GSA admits serviceAccount:POOL[namespace/ksa] as workloadIdentityUser"
        )
    if tree["."].calls.get("iam", {}).get("workload_pool") != "${module.gke.workload_pool}":
        out.append("iam: the Workload Identity pool comes from the cluster")
    gke = tree["modules/gke"].resources.get(("google_container_cluster", "tessera"), {})
    if get(gke, "workload_identity_config", "workload_pool") != "${var.project_id}.svc.id.goog":
        out.append("gke: Workload Identity pool is PROJECT.svc.id.goog")
    return out


def check_gke(tree: Tree) -> list[str]:
    gke = tree["modules/gke"]
    cluster = gke.resources.get(("google_container_cluster", "tessera"), {})
    out = []
    private = first(cluster.get("private_cluster_config", {}))
    if (
        private.get("enable_private_nodes") is not True
        or private.get("enable_private_endpoint") is not True
    ):
        out.append("gke: private nodes and a private endpoint")
    if cluster.get("datapath_provider") != "ADVANCED_DATAPATH":
        out.append("gke: Dataplane V2 (ADVANCED_DATAPATH)")
    if cluster.get("enable_shielded_nodes") is not True:
        out.append("gke: Shielded Nodes")
    if (
        get(cluster, "binary_authorization", "evaluation_mode")
        != "PROJECT_SINGLETON_POLICY_ENFORCE"
    ):
        out.append("gke: Binary Authorization PROJECT_SINGLETON_POLICY_ENFORCE")
    if get(cluster, "database_encryption", "state") != "ENCRYPTED":
        out.append("gke: etcd secrets encrypted with CMEK")
    if get(cluster, "monitoring_config", "managed_prometheus", "enabled") is not True:
        out.append("gke: Managed Prometheus")
    if not str(cluster.get("location", "")).startswith("${var.region"):
        out.append("gke: a regional cluster")
    policy = gke.resources.get(("google_binary_authorization_policy", "tessera"), {})
    rule = first(policy.get("cluster_admission_rules", {}))
    if rule.get("evaluation_mode") != "REQUIRE_ATTESTATION" or not rule.get(
        "require_attestations_by"
    ):
        out.append("gke: the cluster's admission rule requires an attestation")
    if cluster.get("disable_l4_lb_firewall_reconciliation") is not True:
        out.append(
            "gke: disable_l4_lb_firewall_reconciliation (GKE's own rules would open every node)"
        )
    cde = instances(gke, "google_container_node_pool").get("cde", {})
    node = first(cde.get("node_config", {}))
    labels = node.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    taint = first(node.get("taint", {}))
    if labels.get("tessera.dev/pool") != "cde":
        out.append("gke: the CDE pool is labelled tessera.dev/pool=cde")
    if (taint.get("key"), taint.get("value"), taint.get("effect")) != (
        "tessera.dev/cde",
        "true",
        "NO_SCHEDULE",
    ):
        out.append("gke: the CDE pool is tainted tessera.dev/cde=true:NoSchedule")
    return out


def check_secrets(tree: Tree) -> list[str]:
    secrets = tree["modules/secrets"]
    out = []
    readers: dict[str, list[str]] = secrets.locals.get("readers", {})
    if set(readers) != SECRETS:
        out.append(f"secrets: containers are {sorted(SECRETS)}")
    for container, gsas in readers.items():
        if "tessera-admin" in gsas and container != "tessera-vault-admin-token":
            out.append(f"secrets: the admin GSA reads only the admin token, not {container}")
        if ("tessera-edge" in gsas or container in EDGE_SECRETS) and (
            container not in EDGE_SECRETS or set(gsas) != {"tessera-edge"}
        ):
            out.append(f"secrets: the edge GSA reads the edge TLS secrets alone ({container})")
        if container in SHARED_SECRETS or container in EDGE_SECRETS:
            continue
        if container.startswith("tessera-api-") or container == "tessera-redis-auth":
            if "tessera-vault" in gsas:
                out.append(f"secrets: the vault does not read the API's {container}")
        elif set(gsas) & set(API_GSAS):
            out.append(f"secrets: the API's GSAs do not read the vault's {container}")
    for where, rtype, name, _ in every_resource(tree):
        if rtype == "google_secret_manager_secret_version":
            out.append(f"secrets: {where} {name} puts a secret value in Terraform")
    return out


def check_network(tree: Tree) -> list[str]:
    network = tree["modules/network"]
    out = []
    firewalls = {n: b for (t, n), b in network.resources.items() if t == "google_compute_firewall"}
    deny = firewalls.get("deny_all_egress", {})
    if deny.get("direction") != "EGRESS" or get(deny, "deny", "protocol") != "all":
        out.append("network: a default deny of all egress")
    for name, body in firewalls.items():
        opens = "allow" in body and "0.0.0.0/0" in str(body.get("destination_ranges"))
        if body.get("direction") == "EGRESS" and opens:
            out.append(f"network: {name} allows egress to 0.0.0.0/0")
    for name, body in firewalls.items():
        if body.get("direction") != "INGRESS" or "allow" not in body:
            continue
        listed = body.get("source_ranges")
        sources = set(listed) if isinstance(listed, list) else {str(listed)}
        internal = name == "allow_ingress_intra_cluster"
        if not internal and body.get("target_tags") != ["${var.edge_node_tag}"]:
            out.append(
                f"network: {name} admits from outside the VPC to nodes other than the edge's"
            )
        if "0.0.0.0/0" in sources and (
            name != "allow_ingress_edge"
            or get(body, "allow", "ports") != ["${tostring(var.edge_load_balancer.port)}"]
        ):
            out.append(f"network: {name} admits the internet to more than the edge's port")
    health = firewalls.get("allow_ingress_health_checks", {})
    ranges = network.locals.get("health_check_ranges")
    if (
        health.get("source_ranges") != "${local.health_check_ranges}"
        or set(ranges or []) != NLB_HEALTH_CHECK_RANGES
    ):
        out.append("network: the edge load balancer's health checks come from the NLB ranges")
    if get(health, "allow", "ports") != [
        "${tostring(var.edge_load_balancer.health_check_node_port)}"
    ]:
        out.append("network: health checks reach the edge Service's healthCheckNodePort only")
    root = tree["."]
    if root.calls.get("network", {}).get("edge_node_tag") != "${local.node_tags.general}":
        out.append("network: the edge's ingress targets the general pool's nodes")
    if network.locals.get("restricted_vip_cidr") != "199.36.153.4/30":
        out.append("network: restricted.googleapis.com is 199.36.153.4/30")
    subnet = network.resources.get(("google_compute_subnetwork", "nodes"), {})
    if subnet.get("private_ip_google_access") is not True:
        out.append("network: Private Google Access on the nodes' subnet")
    nat = network.resources.get(("google_compute_router_nat", "tessera"), {})
    if nat.get("nat_ip_allocate_option") != "MANUAL_ONLY":
        out.append("network: Cloud NAT uses static addresses (what PSPs allowlist)")
    return out


def check_moves(tree: Tree) -> list[str]:
    """Resources once written out one by one and now one for_each: each former address is moved
    to its instance, or Terraform would destroy the instance (a database, its data) and create
    an empty one."""
    out = []
    for where, moves in FORMER_ADDRESSES.items():
        module = tree.get(where, Module())
        for former, current in moves.items():
            if module.moved.get(former) != current:
                out.append(f"moves: {where} moves {former} to {current} (else it is replaced)")
            rtype, _, rest = current.partition(".")
            key = rest.partition("[")[2].strip('"]')
            if key not in instances(module, rtype):
                out.append(f"moves: {where} {current} is not an instance of its resource")
    return out


def check_documentation(tree: Tree) -> list[str]:
    out = []
    for where, module in tree.items():
        for kind, blocks in (("variable", module.variables), ("output", module.outputs)):
            for name, body in blocks.items():
                if not str(body.get("description", "")).strip():
                    out.append(f"docs: {where} {kind} {name} has no description")
    return out


CHECKS: list[Callable[[Tree], list[str]]] = [
    check_kek,
    check_kms_iam,
    check_cloudsql,
    check_memorystore,
    check_logging,
    check_vpc_sc,
    check_workload_identity,
    check_gke,
    check_secrets,
    check_network,
    check_moves,
    check_documentation,
]


def problems(tree: Tree) -> list[str]:
    """Every property of issue 11's Terraform section the tree does not hold."""
    return [problem for check in CHECKS for problem in check(tree)]


# --- make deploy-check -----------------------------------------------------------------------


def parse_step(check: DeployCheck, root: Path = TERRAFORM_DIR) -> None:
    files = sorted(p for p in root.rglob("*.tf") if ".terraform" not in p.parts)
    if not files:
        check.fail("hcl2 parse", f"no .tf files under {root}")
        return
    broken = 0
    for path in files:
        try:
            parse_file(path)
        except Exception as exc:  # python-hcl2 raises lark errors of several kinds
            broken += 1
            check.fail("hcl2 parse", f"{path.relative_to(root)}: {exc}")
    if not broken:
        check.ok("hcl2 parse", f"{len(files)} .tf files")


def fmt_step(check: DeployCheck, root: Path = TERRAFORM_DIR) -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        check.fail(
            "terraform fmt",
            "terraform is not on PATH: install Terraform >= 1.6 (HashiCorp's apt repository, "
            "package `terraform`, or the release zip into /usr/local/bin); fmt needs no providers",
        )
        return
    argv = [terraform, "fmt", "-check", "-recursive", "-diff", str(root)]
    if check.run("terraform fmt", argv).returncode == 0:
        check.ok("terraform fmt", "every file formatted")


def checkov_step(check: DeployCheck, root: Path = TERRAFORM_DIR) -> None:
    argv = [check.tool("checkov"), "-d", str(root), "--framework", "terraform"]
    argv += ["--quiet", "--compact", "--skip-download"]
    result = check.run("checkov terraform", argv)
    if result.returncode != 0:
        return
    summary = re.search(
        r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", result.stdout
    )
    if summary is None or int(summary.group(1)) == 0:
        check.fail("checkov terraform", "no check ran (did checkov find the tree?)")
        return
    passed, failed, skipped = summary.groups()
    check.ok(
        "checkov terraform", f"{passed} passed, {failed} failed, {skipped} skipped (reasons inline)"
    )


def properties_step(check: DeployCheck, root: Path = TERRAFORM_DIR) -> None:
    found = problems(load_tree(root))
    for problem in found:
        check.fail("terraform properties", problem)
    if not found:
        check.ok("terraform properties", f"{len(CHECKS)} groups of issue 11's properties hold")


def check(check: DeployCheck) -> None:
    parse_step(check)
    fmt_step(check)
    checkov_step(check)
    properties_step(check)
