"""deploy/terraform says what issue 11 asks, read from the parsed HCL; each check shown to bite."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy import terraform
from tests.deploy.terraform import Tree
from tests.deploy.tools import DeployCheck


@pytest.fixture(scope="module")
def parsed() -> Tree:
    return terraform.load_tree()


def test_the_tree_holds_every_property(parsed: Tree) -> None:
    assert terraform.problems(parsed) == []


def test_every_module_of_the_layout_is_there(parsed: Tree) -> None:
    expected = {"network", "gke", "kms", "cloudsql", "memorystore", "logging", "iam", "secrets"}
    assert {f"modules/{m}" for m in expected | {"vpc-sc"}} <= set(parsed)
    assert {call["source"] for call in parsed["."].calls.values()} == {
        f"./modules/{m}" for m in expected
    }
    # The perimeter is applied apart from the root (an org admin's role), from org/.
    assert parsed["org"].calls["vpc_sc"]["source"] == "../modules/vpc-sc"


def test_the_readme_documents_every_root_variable_and_output(parsed: Tree) -> None:
    readme = (terraform.TERRAFORM_DIR / "README.md").read_text()
    names = [*parsed["."].variables, *parsed["."].outputs]
    assert [name for name in names if f"| `{name}` |" not in readme] == []


def test_the_kek_output_is_the_full_key_name_the_vault_wants(parsed: Tree) -> None:
    assert parsed["."].outputs["vault_kms_key_name"]["value"] == "${module.kms.vault_kek_name}"
    kek_output = parsed["modules/kms"].outputs["vault_kek_name"]["value"]
    # google_kms_crypto_key.id is projects/P/locations/L/keyRings/R/cryptoKeys/K, the form
    # vault/kms/gcp.py requires of TESSERA_VAULT_GCP_KMS_KEY_NAME.
    assert kek_output == "${google_kms_crypto_key.vault_kek.id}"


def test_each_instance_provisions_what_its_own_resource_did(parsed: Tree) -> None:
    """The for_each instances say, key by key, what the resources written out one by one said
    (the values differing between them; the shared ones are checked by `problems`)."""
    sql = terraform.instances(parsed[SQL], "google_sql_database_instance")
    said = {
        key: (
            body["name"],
            body["settings"][0]["tier"],
            body["settings"][0]["backup_configuration"][0]["start_time"],
            body["settings"][0]["maintenance_window"][0]["hour"],
            body["settings"][0]["user_labels"],
            {k: v for k, v in terraform.flags(body).items() if k.startswith("pgaudit.")},
            len(body["settings"][0]["database_flags"]),
        )
        for key, body in sql.items()
    }
    assert said == {
        "api": (
            "tessera-api",
            "${var.api_tier}",
            "02:00",
            3,
            {"app": "tessera", "pci-scope": "connected"},
            {"pgaudit.log": "ddl,role"},
            17,
        ),
        "vault": (
            "tessera-vault",
            "${var.vault_tier}",
            "02:30",
            4,
            {"app": "tessera", "pci-scope": "cde"},
            {"pgaudit.log": "all", "pgaudit.log_parameter": "off", "pgaudit.log_relation": "on"},
            19,
        ),
    }
    databases = terraform.instances(parsed[SQL], "google_sql_database")
    assert {k: b["name"] for k, b in databases.items()} == {
        "api": "tessera_api",
        "vault": "tessera_vault",
    }
    redis = terraform.instances(parsed[REDIS], "google_redis_instance")
    assert {
        key: (
            body["name"],
            body["memory_size_gb"],
            body["redis_configs"]["maxmemory-policy"],
            body["maintenance_policy"][0]["weekly_maintenance_window"][0]["start_time"][0],
            body["labels"]["pci-scope"],
        )
        for key, body in redis.items()
    } == {
        "api": (
            "tessera-api",
            "${var.api_memory_size_gb}",
            "volatile-lru",
            {"hours": 3, "minutes": 0},
            "connected",
        ),
        "vault": (
            "tessera-vault",
            "${var.vault_memory_size_gb}",
            "noeviction",
            {"hours": 4, "minutes": 0},
            "cde",
        ),
    }
    pools = terraform.instances(parsed[GKE], "google_container_node_pool")
    assert {
        key: (
            body["name"],
            body["node_config"][0]["labels"],
            body["node_config"][0]["tags"],
            body["node_config"][0].get("taint", []),
            body["node_config"][0]["resource_labels"]["pci-scope"],
        )
        for key, body in pools.items()
    } == {
        "cde": (
            "cde",
            {"tessera.dev/pool": "cde"},
            ['${var.node_tags["cde"]}'],
            [{"key": "tessera.dev/cde", "value": "true", "effect": "NO_SCHEDULE"}],
            "cde",
        ),
        "general": (
            "general",
            {"tessera.dev/pool": "general"},
            ['${var.node_tags["general"]}'],
            [],
            "connected",
        ),
    }


# --- each check bites: a mutated copy of the parsed tree is reported ---------------------------


def res(tree: Tree, where: str, rtype: str, name: str) -> dict[str, object]:
    body: dict[str, object] = tree[where].resources[(rtype, name)]
    return body


def sql_flags_without(name: str) -> Callable[[Tree], None]:
    """Drops a flag wherever it is written: the instances' shared blocks, the vault's own."""

    def mutate(tree: Tree) -> None:
        settings = res(tree, "modules/cloudsql", "google_sql_database_instance", "this")["settings"]
        assert isinstance(settings, list)
        shared = settings[0]["database_flags"]
        settings[0]["database_flags"] = [f for f in shared if f["name"] != name]
        vault = tree["modules/cloudsql"].locals["instances"]["vault"]
        vault["pgaudit_flags"] = [f for f in vault["pgaudit_flags"] if f["name"] != name]
        assert len(settings[0]["database_flags"]) < len(shared) or name.startswith("pgaudit.")

    return mutate


def set_local(where: str, *path: str, value: object) -> Callable[[Tree], None]:
    """A mutation that sets one entry of a module's locals (what one for_each instance says)."""

    def mutate(tree: Tree) -> None:
        entry: object = tree[where].locals
        for key in path[:-1]:
            assert isinstance(entry, dict)
            entry = entry[key]
        assert isinstance(entry, dict)
        assert path[-1] in entry
        entry[path[-1]] = value

    return mutate


def drop_move(where: str, former: str) -> Callable[[Tree], None]:
    def mutate(tree: Tree) -> None:
        del tree[where].moved[former]

    return mutate


def rename_general_pool(tree: Tree) -> None:
    pools = tree["modules/gke"].locals["node_pools"]
    pools["default"] = pools.pop("general")


def set_path(
    where: str, rtype: str, name: str, *path: str, value: object
) -> Callable[[Tree], None]:
    """A mutation that sets one (possibly nested-block) attribute of a resource."""

    def mutate(tree: Tree) -> None:
        body: object = res(tree, where, rtype, name)
        for key in path[:-1]:
            assert isinstance(body, dict)
            body = body[key]
            body = body[0] if isinstance(body, list) else body
        assert isinstance(body, dict)
        body[path[-1]] = value

    return mutate


def add_resource(
    where: str, rtype: str, name: str, body: dict[str, object]
) -> Callable[[Tree], None]:
    def mutate(tree: Tree) -> None:
        tree[where].resources[(rtype, name)] = body

    return mutate


def drop_description(where: str, kind: str, name: str) -> Callable[[Tree], None]:
    def mutate(tree: Tree) -> None:
        blocks = tree[where].variables if kind == "variable" else tree[where].outputs
        del blocks[name]["description"]

    return mutate


def edit_root_variable(name: str, key: str, value: object) -> Callable[[Tree], None]:
    def mutate(tree: Tree) -> None:
        tree["."].variables[name][key] = value

    return mutate


def move_workload(tree: Tree) -> None:
    tree["modules/iam"].locals["workloads"]["tessera-vault"]["namespace"] = "tessera-app"


def kek_to_api_gsa(tree: Tree) -> None:
    tree["."].calls["kms"]["vault_service_account_email"] = '${module.iam.emails["tessera-api"]}'


def drop_kms_precondition(tree: Tree) -> None:
    body = res(tree, "modules/kms", "google_kms_crypto_key_iam_member", "kek_crypto")
    lifecycle = body["lifecycle"]
    assert isinstance(lifecycle, list)
    lifecycle[0]["precondition"] = lifecycle[0]["precondition"][:1]


def drop_perimeter_service(tree: Tree) -> None:
    variable = tree["modules/vpc-sc"].variables["restricted_services"]
    variable["default"] = ["cloudkms.googleapis.com", "sqladmin.googleapis.com"]


def admin_reads_psp_key(tree: Tree) -> None:
    tree["modules/secrets"].locals["readers"]["tessera-api-psp-a-api-key"].append("tessera-admin")


def edge_reads_a_psp_key(tree: Tree) -> None:
    tree["modules/secrets"].locals["readers"]["tessera-api-psp-a-api-key"].append("tessera-edge")


def api_reads_edge_key(tree: Tree) -> None:
    tree["modules/secrets"].locals["readers"]["tessera-edge-tls-key"].append("tessera-api")


def admin_not_a_database_user(tree: Tree) -> None:
    del tree["modules/cloudsql"].locals["iam_users"]["api/tessera-admin"]


def edge_unbound(tree: Tree) -> None:
    del tree["modules/iam"].locals["workloads"]["tessera-edge"]


KMS = "modules/kms"
SQL = "modules/cloudsql"
REDIS = "modules/memorystore"
GKE = "modules/gke"
API_KMS_GRANT: dict[str, object] = {
    "role": "roles/cloudkms.cryptoKeyDecrypter",
    "member": 'serviceAccount:${var.service_account_emails["tessera-api"]}',
}

MUTATIONS: dict[str, tuple[Callable[[Tree], None], str]] = {
    "kek in software": (
        set_path(
            KMS,
            "google_kms_crypto_key",
            "vault_kek",
            "version_template",
            "protection_level",
            value="SOFTWARE",
        ),
        "the KEK's protection_level is HSM",
    ),
    "kek rotated yearly": (
        set_path(KMS, "google_kms_crypto_key", "vault_kek", "rotation_period", value="31536000s"),
        "rotates at least every 90 days",
    ),
    "kek destroyable": (
        set_path(
            KMS, "google_kms_crypto_key", "vault_kek", "lifecycle", "prevent_destroy", value=False
        ),
        "the KEK has lifecycle prevent_destroy",
    ),
    "a fingerprint key nobody uses": (
        add_resource(
            KMS,
            "google_kms_crypto_key",
            "fingerprint",
            {
                "name": "tessera-vault-fingerprint",
                "version_template": [{"protection_level": "HSM"}],
            },
        ),
        "no separate fingerprint key",
    ),
    "the API's GSA gets the KEK": (kek_to_api_gsa, "goes to the tessera-vault GSA"),
    "the API's GSA gets a KMS role elsewhere": (
        add_resource(SQL, "google_kms_crypto_key_iam_member", "api", API_KMS_GRANT),
        "gives an API GSA a Cloud KMS role",
    ),
    "key admins may decrypt": (
        set_path(
            KMS,
            "google_kms_key_ring_iam_member",
            "admins",
            "role",
            value="roles/cloudkms.cryptoKeyEncrypterDecrypter",
        ),
        "grants a crypto role on the whole key ring",
    ),
    "admins and crypto members may overlap": (drop_kms_precondition, "disjoint"),
    "a person may get encrypt/decrypt": (
        edit_root_variable("kek_crypto_members", "validation", []),
        "admits serviceAccount: members only",
    ),
    "cloud sql with a public IP": (
        set_path(
            SQL,
            "google_sql_database_instance",
            "this",
            "settings",
            "ip_configuration",
            "ipv4_enabled",
            value=True,
        ),
        "tessera-vault has a private IP only",
    ),
    "cloud sql zonal": (
        set_path(
            SQL,
            "google_sql_database_instance",
            "this",
            "settings",
            "availability_type",
            value="ZONAL",
        ),
        "tessera-api is availability_type REGIONAL",
    ),
    "cloud sql without PITR": (
        set_path(
            SQL,
            "google_sql_database_instance",
            "this",
            "settings",
            "backup_configuration",
            "point_in_time_recovery_enabled",
            value=False,
        ),
        "point-in-time recovery",
    ),
    "cloud sql without CMEK": (
        set_path(SQL, "google_sql_database_instance", "this", "encryption_key_name", value=None),
        "tessera-api is encrypted with CMEK",
    ),
    "cloud sql without TLS": (
        set_path(
            SQL,
            "google_sql_database_instance",
            "this",
            "settings",
            "ip_configuration",
            "ssl_mode",
            value="ALLOW_UNENCRYPTED_AND_ENCRYPTED",
        ),
        "refuses connections without TLS",
    ),
    "vault database without pgaudit": (sql_flags_without("cloudsql.enable_pgaudit"), "pgaudit on"),
    "vault database with password logins only": (
        sql_flags_without("cloudsql.iam_authentication"),
        "IAM database authentication",
    ),
    "redis basic tier": (
        set_path(REDIS, "google_redis_instance", "this", "tier", value="BASIC"),
        "tessera-api is STANDARD_HA",
    ),
    "redis without AUTH": (
        set_path(REDIS, "google_redis_instance", "this", "auth_enabled", value=False),
        "tessera-vault has AUTH enabled",
    ),
    "redis without TLS": (
        set_path(
            REDIS, "google_redis_instance", "this", "transit_encryption_mode", value="DISABLED"
        ),
        "in-transit TLS",
    ),
    "CVCs persisted to disk": (
        set_path(
            REDIS,
            "google_redis_instance",
            "this",
            "persistence_config",
            "persistence_mode",
            value="RDB",
        ),
        "never persists to disk",
    ),
    "logs kept 30 days in the bucket": (
        set_path(
            "modules/logging",
            "google_logging_project_bucket_config",
            "vault",
            "retention_days",
            value=30,
        ),
        "keeps 30 days",
    ),
    "logs kept 30 days by default": (
        edit_root_variable("log_retention_days", "default", 30),
        "defaults to >= 365 days",
    ),
    "retention floor dropped": (
        edit_root_variable("log_retention_days", "validation", []),
        "log_retention_days is validated >= 365",
    ),
    "perimeter without Secret Manager": (drop_perimeter_service, "secretmanager.googleapis.com"),
    "vault GSA bound to the wrong namespace": (move_workload, "Workload Identity maps"),
    "variable without a description": (
        drop_description(".", "variable", "region"),
        "variable region has no description",
    ),
    "output without a description": (
        drop_description("modules/kms", "output", "vault_kek_name"),
        "output vault_kek_name has no description",
    ),
    "public control plane": (
        set_path(
            GKE,
            "google_container_cluster",
            "tessera",
            "private_cluster_config",
            "enable_private_endpoint",
            value=False,
        ),
        "a private endpoint",
    ),
    "no Dataplane V2": (
        set_path(
            GKE, "google_container_cluster", "tessera", "datapath_provider", value="LEGACY_DATAPATH"
        ),
        "ADVANCED_DATAPATH",
    ),
    "binary authorization off": (
        set_path(
            GKE,
            "google_container_cluster",
            "tessera",
            "binary_authorization",
            "evaluation_mode",
            value="DISABLED",
        ),
        "PROJECT_SINGLETON_POLICY_ENFORCE",
    ),
    "cde pool untainted": (
        set_local(GKE, "node_pools", "cde", "taints", value=[]),
        "tainted tessera.dev/cde=true:NoSchedule",
    ),
    "cde pool labelled general": (
        set_local(GKE, "node_pools", "cde", "labels", value={"tessera.dev/pool": "general"}),
        "the CDE pool is labelled tessera.dev/pool=cde",
    ),
    "the vault's pgaudit logs nothing": (
        set_local(
            SQL, "instances", "vault", "pgaudit_flags", value=[{"name": "pgaudit.log", "value": ""}]
        ),
        "tessera-vault has pgaudit on",
    ),
    "the vault's database renamed": (
        set_local(SQL, "instances", "vault", "database", value="vault"),
        "tessera-vault has the database tessera_vault",
    ),
    "the API's Cloud SQL instance dropped": (
        lambda tree: tree[SQL].locals["instances"].pop("api"),
        "instance tessera-api exists",
    ),
    "the vault's Redis dropped": (
        lambda tree: tree[REDIS].locals["instances"].pop("vault"),
        "instance tessera-vault exists",
    ),
    "the vault's database would be replaced": (
        drop_move(SQL, "google_sql_database_instance.vault"),
        "moves google_sql_database_instance.vault to",
    ),
    "the vault's Redis would be replaced": (
        drop_move(REDIS, "google_redis_instance.vault"),
        "moves google_redis_instance.vault to",
    ),
    "a node pool renamed without a move": (
        rename_general_pool,
        'google_container_node_pool.this["general"] is not an instance',
    ),
    "admin reads a PSP key": (admin_reads_psp_key, "the admin GSA reads only the admin token"),
    "a secret value in Terraform": (
        add_resource(
            "modules/secrets", "google_secret_manager_secret_version", "v1", {"secret_data": "x"}
        ),
        "puts a secret value in Terraform",
    ),
    "the edge GSA reads a PSP key": (edge_reads_a_psp_key, "the edge GSA reads the edge TLS"),
    "the API reads the edge's private key": (api_reads_edge_key, "the edge GSA reads the edge TLS"),
    "the admin toolbox cannot log in to the API database": (
        admin_not_a_database_user,
        "IAM users are exactly the services' GSAs",
    ),
    "the edge gateway without Workload Identity": (edge_unbound, "Workload Identity maps"),
    "the internet reaches every node": (
        set_path(
            "modules/network",
            "google_compute_firewall",
            "allow_ingress_edge",
            "target_tags",
            value=None,
        ),
        "admits from outside the VPC to nodes other than the edge's",
    ),
    "the internet reaches another port": (
        set_path(
            "modules/network",
            "google_compute_firewall",
            "allow_ingress_health_checks",
            "source_ranges",
            value=["0.0.0.0/0"],
        ),
        "admits the internet to more than the edge's port",
    ),
    "health checks on the old service ports": (
        set_path(
            "modules/network",
            "google_compute_firewall",
            "allow_ingress_health_checks",
            "allow",
            value=[{"protocol": "tcp", "ports": ["8000", "8100", "10256"]}],
        ),
        "healthCheckNodePort only",
    ),
    "GKE opens load balancer ports on every node": (
        set_path(
            GKE,
            "google_container_cluster",
            "tessera",
            "disable_l4_lb_firewall_reconciliation",
            value=False,
        ),
        "disable_l4_lb_firewall_reconciliation",
    ),
    "egress to the whole internet": (
        set_path(
            "modules/network",
            "google_compute_firewall",
            "allow_egress_psps",
            "destination_ranges",
            value=["0.0.0.0/0"],
        ),
        "allows egress to 0.0.0.0/0",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_weakened_copy_is_reported(parsed: Tree, mutation: str) -> None:
    mutate, expected = MUTATIONS[mutation]
    tree: Tree = copy.deepcopy(parsed)
    mutate(tree)
    found = terraform.problems(tree)
    assert any(expected in problem for problem in found), found
    assert terraform.problems(parsed) == []  # the copy, not the parsed tree, was changed


# --- the deploy-check steps themselves ---------------------------------------------------------


def test_fmt_step_fails_with_how_to_install_when_terraform_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    check = DeployCheck(out=tmp_path)
    terraform.fmt_step(check)
    assert len(check.failures) == 1
    assert "install Terraform" in check.failures[0]


def test_fmt_step_reports_a_misformatted_file(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text('variable "x" {\ntype=string\n  description = "x"\n}\n')
    check = DeployCheck(out=tmp_path)
    terraform.fmt_step(check, tmp_path)
    assert check.failures == ["terraform fmt: exit 3"]


def test_parse_step_reports_a_file_hcl2_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "broken.tf").write_text('resource "x" "y" {\n  a = \n')
    check = DeployCheck(out=tmp_path)
    terraform.parse_step(check, tmp_path)
    assert len(check.failures) == 1
    assert check.failures[0].startswith("hcl2 parse: broken.tf")
