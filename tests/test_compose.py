"""deploy/compose.yaml, checked without a Docker engine against what the services really read:
their settings classes, the migration command, the simulator's variables and tessera/dbsetup.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest
import yaml

from api.settings import ApiSettings
from tessera import dbsetup, devstack
from tessera.dbsetup import default_databases
from tessera.runtime import commands
from tessera.runtime.settings import BaseSettings, ServiceSettings, load_settings
from tests.support.processes import free_port
from vault.settings import VaultSettings, VaultWorkerSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
INITDB = DEPLOY / "compose" / "initdb"
INIT_SCRIPT = INITDB / "10-tessera-roles.sh"
SIMULATORS = {"psp-a": ROOT / "sandbox" / "psp_a.py", "psp-b": ROOT / "sandbox" / "psp_b.py"}

SERVICES = {
    "postgres",
    "redis",
    "migrate-vault",
    "migrate-api",
    "vault",
    "api",
    "worker",
    "vault-worker",
    "psp-a",
    "psp-b",
}
LONG_RUNNING = ["postgres", "redis", "vault", "psp-a", "psp-b", "api", "worker", "vault-worker"]
APPLICATIONS = ["api", "worker", "vault", "vault-worker", "psp-a", "psp-b"]
HTTP_SERVICES = ["api", "vault", "psp-a", "psp-b"]

#: The variable compose passes to Postgres for each role's password (read by the init script).
ROLE_PASSWORD = {
    "tessera_api": "TESSERA_PG_API_PASSWORD",
    "tessera_api_owner": "TESSERA_PG_API_OWNER_PASSWORD",
    "tessera_vault": "TESSERA_PG_VAULT_PASSWORD",
    "tessera_vault_owner": "TESSERA_PG_VAULT_OWNER_PASSWORD",
    "tessera_auditor": "TESSERA_PG_AUDITOR_PASSWORD",
}


# --- reading the file as compose does ---------------------------------------------------------

_DEFAULTED = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*):?-(?P<default>[^}]*)\}")
_ANY_VARIABLE = re.compile(r"\$\{?[A-Za-z_]")


def resolve(text: str) -> str:
    """`${VAR:-default}` becomes the default; a variable without a default fails the test."""
    done = _DEFAULTED.sub(lambda m: m["default"], text.replace("$$", "\0"))
    assert not _ANY_VARIABLE.search(done), f"{text!r}: every variable needs a default"
    return done.replace("\0", "$")


def _resolved(node: Any) -> Any:
    if isinstance(node, str):
        return resolve(node)
    if isinstance(node, list):
        return [_resolved(item) for item in node]
    if isinstance(node, dict):
        return {key: _resolved(value) for key, value in node.items()}
    return node


@cache
def raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@cache
def compose() -> dict[str, Any]:
    resolved: dict[str, Any] = _resolved(raw_compose())
    return resolved


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose has no service {name!r}"
    found: dict[str, Any] = services[name]
    return found


def _environment(entry: Mapping[str, Any] | list[str] | None) -> dict[str, str]:
    if entry is None:
        return {}
    if isinstance(entry, list):
        return dict(item.split("=", 1) for item in entry)
    return {key: "" if value is None else str(value) for key, value in entry.items()}


def environment(name: str) -> dict[str, str]:
    return _environment(service(name).get("environment"))


def raw_environment(name: str) -> dict[str, str]:
    return _environment(raw_compose()["services"][name].get("environment"))


# --- what each service reads ------------------------------------------------------------------


def simulator_variables(name: str) -> set[str]:
    source = SIMULATORS[name].read_text()
    return set(re.findall(r"os\.environ(?:\.get\(|\[)\"(TESSERA_\w+)\"", source))


SETTINGS: dict[str, type[ServiceSettings]] = {
    "api": ApiSettings,
    "worker": ApiSettings,
    "vault": VaultSettings,
}
MIGRATION_VARIABLE = {
    "migrate-api": "TESSERA_API_MIGRATION_URL",
    "migrate-vault": "TESSERA_VAULT_MIGRATION_URL",
}


#: Services with no listener, and the settings they read.
WORKER_SETTINGS: dict[str, type[BaseSettings]] = {"vault-worker": VaultWorkerSettings}


def variables_read_by(name: str) -> set[str]:
    if name in WORKER_SETTINGS:
        return set(WORKER_SETTINGS[name].env_names().values())
    if name in SETTINGS:
        return set(SETTINGS[name].env_names().values())
    if name in MIGRATION_VARIABLE:
        return {MIGRATION_VARIABLE[name]}
    return simulator_variables(name)


def settings_of(name: str) -> ServiceSettings:
    return load_settings(SETTINGS[name], environment(name))


def listening_port(name: str) -> int:
    if name in SETTINGS:
        return settings_of(name).port
    prefix = name.upper().replace("-", "_")
    return int(environment(name)[f"TESSERA_{prefix}_PORT"])


# --- the file and its services ----------------------------------------------------------------


def test_the_file_follows_the_compose_spec_without_a_version_key() -> None:
    top_level = {key for key in raw_compose() if not key.startswith("x-")}
    assert "version" not in top_level, "`version` is obsolete in the compose spec"
    assert top_level <= {"name", "services", "volumes", "networks"}


def test_the_stack_runs_exactly_the_expected_services() -> None:
    assert set(compose()["services"]) == SERVICES


@pytest.mark.parametrize(
    ("name", "dockerfile", "command"),
    [
        ("api", "Dockerfile.api", ["python", "-m", "api", "serve"]),
        ("migrate-api", "Dockerfile.api", ["python", "-m", "api", "migrate"]),
        ("vault", "Dockerfile.vault", ["python", "-m", "vault", "serve"]),
        ("migrate-vault", "Dockerfile.vault", ["python", "-m", "vault", "migrate"]),
        ("worker", "Dockerfile.api", ["python", "-m", "api", "worker"]),
        ("vault-worker", "Dockerfile.vault", ["python", "-m", "vault", "worker"]),
        ("psp-a", "deploy/Dockerfile.sandbox", ["python", "-m", "sandbox.psp_a"]),
        ("psp-b", "deploy/Dockerfile.sandbox", ["python", "-m", "sandbox.psp_b"]),
    ],
)
def test_each_tessera_service_is_built_from_its_own_dockerfile(
    name: str, dockerfile: str, command: list[str]
) -> None:
    build = service(name)["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT, "the images are built with the repository root as context"
    assert (context / build["dockerfile"]).is_file()
    assert build["dockerfile"] == dockerfile
    assert service(name)["command"] == command


def test_services_built_from_one_dockerfile_share_one_image_so_compose_builds_it_once() -> None:
    assert service("api")["image"] == service("migrate-api")["image"]
    assert service("api")["image"] == service("worker")["image"]
    assert service("psp-a")["image"] == service("psp-b")["image"]
    assert service("vault")["image"] == service("migrate-vault")["image"]
    assert service("vault")["image"] == service("vault-worker")["image"]
    assert service("api")["image"] != service("vault")["image"]


def test_the_backing_services_are_postgres_15_and_redis_7() -> None:
    assert re.fullmatch(r"postgres:15([.\d]*)(-\w+)?", service("postgres")["image"])
    assert re.fullmatch(r"redis:7([.\d]*)(-\w+)?", service("redis")["image"])
    assert "build" not in service("postgres")
    assert "build" not in service("redis")


# --- environment against the settings ---------------------------------------------------------


@pytest.mark.parametrize("name", [*APPLICATIONS, "migrate-api", "migrate-vault"])
def test_every_variable_set_for_a_service_is_one_it_reads(name: str) -> None:
    unknown = set(environment(name)) - variables_read_by(name)
    assert not unknown, f"{name} never reads {sorted(unknown)}"


def test_the_simulators_variables_are_found_in_their_source() -> None:
    assert simulator_variables("psp-b") >= {
        "TESSERA_PSP_B_HOST",
        "TESSERA_PSP_B_PORT",
        "TESSERA_PSP_B_NOTIFY_URL",
        "TESSERA_PSP_B_HMAC_KEY",
    }
    assert simulator_variables("psp-a") == {
        "TESSERA_PSP_A_HOST",
        "TESSERA_PSP_A_PORT",
        "TESSERA_PSP_A_API_KEY",
        "TESSERA_PSP_A_LATENCY_MS",
        "TESSERA_PSP_A_JITTER_MS",
        "TESSERA_PSP_A_SLOW_SECONDS",
    }


@pytest.mark.parametrize("name", ["api", "worker", "vault"])
def test_every_required_setting_is_provided(name: str) -> None:
    cls = SETTINGS[name]
    required = {cls.env_name(f.name) for f in msgspec.structs.fields(cls) if f.required}
    assert required, "the check below would prove nothing"
    assert required <= set(environment(name))


@pytest.mark.parametrize("name", ["api", "vault"])
def test_the_settings_load_from_the_compose_environment(name: str) -> None:
    settings = settings_of(name)
    assert settings.mode == "development"
    assert settings.host == "0.0.0.0"


def test_the_api_sends_the_service_token_the_vault_expects() -> None:
    sent = ApiSettings.env_name("vault_service_token")
    expected = VaultSettings.env_name("service_token")
    assert environment("api")[sent] == environment("vault")[expected]
    # One variable behind both, so overriding it from the shell keeps them equal.
    assert raw_environment("api")[sent] == raw_environment("vault")[expected]


def test_the_vault_admin_token_stays_with_the_vault() -> None:
    admin = VaultSettings.env_name("admin_token")
    assert admin not in environment("api")
    vault = environment("vault")
    assert vault[admin] != vault[VaultSettings.env_name("service_token")]


def test_the_api_reaches_the_vault_by_its_service_name_and_port() -> None:
    url = urlsplit(environment("api")[ApiSettings.env_name("vault_url")])
    assert url.scheme == "http"
    assert url.hostname == "vault"
    assert url.port == listening_port("vault")


def test_the_worker_reads_the_same_database_cache_vault_and_processors_as_the_api() -> None:
    """It settles the API's payments: any difference here would split the record in two."""
    local = {ApiSettings.env_name(n) for n in ("host", "port", "worker_heartbeat_path")}
    api = {k: v for k, v in raw_environment("api").items() if k not in local}
    worker = {k: v for k, v in raw_environment("worker").items() if k not in local}
    assert worker == api


def test_the_worker_healthcheck_watches_the_heartbeat_file_it_is_told_to_touch() -> None:
    path = environment("worker")[ApiSettings.env_name("worker_heartbeat_path")]
    assert path.startswith("/tmp/"), "the containers are read-only but for /tmp"
    test = service("worker")["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "worker healthcheck", "exec")
    assert f"os.stat('{path}')" in test[3]


def test_the_vault_worker_reads_the_vaults_database_redis_and_keyring_and_no_credential() -> None:
    """It shreds the vault's cards and audits it under the vault's audit key."""
    worker, vault = raw_environment("vault-worker"), raw_environment("vault")
    shared = ("database_url", "redis_url", "kms_provider", "local_kms_path")
    for name in shared:
        variable = VaultWorkerSettings.env_name(name)
        assert worker[variable] == vault[variable], variable
    assert "kms:/var/lib/tessera/kms" in service("vault-worker")["volumes"]
    for credential in ("service_token", "admin_token"):
        assert VaultSettings.env_name(credential) not in worker
    settings = load_settings(VaultWorkerSettings, environment("vault-worker"))
    assert settings.mode == "development"
    path = settings.worker_heartbeat_path
    assert path.startswith("/tmp/"), "the containers are read-only but for /tmp"
    test = service("vault-worker")["healthcheck"]["test"]
    compile(test[3], "vault-worker healthcheck", "exec")
    assert f"os.stat('{path}')" in test[3]


@pytest.mark.parametrize(("processor", "name"), [("psp_a", "psp-a"), ("psp_b", "psp-b")])
def test_the_api_and_the_vault_reach_each_processor_by_its_service_name_and_port(
    processor: str, name: str
) -> None:
    api_url = urlsplit(environment("api")[ApiSettings.env_name(f"{processor}_url")])
    assert (api_url.hostname, api_url.port) == (name, listening_port(name))
    vault = environment("vault")
    destinations = json.loads(vault[VaultSettings.env_name("forward_destinations")])
    forward_url = urlsplit(destinations[processor]["url"])
    assert (forward_url.hostname, forward_url.port) == (name, listening_port(name))


def test_psp_b_sends_its_notifications_to_the_api_endpoint() -> None:
    url = urlsplit(environment("psp-b")["TESSERA_PSP_B_NOTIFY_URL"])
    assert (url.hostname, url.port) == ("api", listening_port("api"))
    assert url.path == "/v1/notifications/psp_b"


@pytest.mark.parametrize(
    ("name", "published"), [("api", 8000), ("vault", 8100), ("psp-a", 8201), ("psp-b", 8202)]
)
def test_the_published_port_is_the_port_the_service_listens_on_and_only_on_loopback(
    name: str, published: int
) -> None:
    (mapping,) = service(name)["ports"]
    host_ip, host_port, container_port = str(mapping).split(":")
    assert host_ip == "127.0.0.1"
    assert int(host_port) == published
    assert int(container_port) == listening_port(name)


@pytest.mark.parametrize(
    "name", ["postgres", "redis", "migrate-api", "migrate-vault", "worker", "vault-worker"]
)
def test_internal_services_publish_no_port(name: str) -> None:
    assert "ports" not in service(name)


# --- databases and Redis ----------------------------------------------------------------------


DBS = default_databases()
DATABASES = {db.service: db for db in DBS}


@pytest.mark.parametrize("name", ["api", "vault"])
def test_each_service_logs_in_as_its_runtime_role_on_its_own_database(name: str) -> None:
    db = DATABASES[name]
    url = urlsplit(environment(name)[SETTINGS[name].env_name("database_url")])
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{db.database}")
    assert url.username == db.runtime
    assert url.password == environment("postgres")[ROLE_PASSWORD[db.runtime]]


@pytest.mark.parametrize("name", ["api", "vault"])
def test_migrations_run_as_the_owner_role(name: str) -> None:
    db = DATABASES[name]
    url = urlsplit(environment(f"migrate-{name}")[MIGRATION_VARIABLE[f"migrate-{name}"]])
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{db.database}")
    assert url.username == db.owner
    assert url.password == environment("postgres")[ROLE_PASSWORD[db.owner]]


@pytest.mark.parametrize("name", ["api", "vault"])
def test_the_migrate_command_uses_the_url_compose_gives_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    async def fake_migrate(dsn: str, package: str) -> list[Any]:
        seen.append(dsn)
        return []

    monkeypatch.setattr(commands, "migrate", fake_migrate)
    for key in [key for key in os.environ if key.endswith("_MIGRATION_URL")]:
        monkeypatch.delenv(key)
    for key, value in environment(f"migrate-{name}").items():
        monkeypatch.setenv(key, value)
    commands.migrate_service(name, f"{name}.migrations", "postgresql://nobody@nowhere/none")
    assert seen == [environment(f"migrate-{name}")[MIGRATION_VARIABLE[f"migrate-{name}"]]]


@pytest.mark.parametrize(("name", "index"), [("api", 0), ("vault", 1)])
def test_each_service_has_its_own_redis_database(name: str, index: int) -> None:
    url = urlsplit(settings_of(name).redis_url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, f"/{index}")


def test_redis_keeps_nothing_on_disk() -> None:
    command = service("redis")["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert "volumes" not in service("redis")


# --- start order, health and shutdown ---------------------------------------------------------


def test_each_service_waits_for_what_it_needs() -> None:
    healthy, done = "service_healthy", "service_completed_successfully"
    expected = {
        "postgres": {},
        "redis": {},
        "psp-a": {},
        "psp-b": {},
        "migrate-vault": {"postgres": healthy},
        "migrate-api": {"postgres": healthy},
        "vault": {"postgres": healthy, "redis": healthy, "migrate-vault": done},
        "api": {
            "postgres": healthy,
            "redis": healthy,
            "migrate-api": done,
            "vault": healthy,
            "psp-a": healthy,
            "psp-b": healthy,
        },
        "worker": {
            "postgres": healthy,
            "redis": healthy,
            "migrate-api": done,
            "vault": healthy,
            "psp-a": healthy,
            "psp-b": healthy,
        },
        "vault-worker": {
            "postgres": healthy,
            "redis": healthy,
            "migrate-vault": done,
            "vault": healthy,
        },
    }
    actual = {
        name: {dep: spec["condition"] for dep, spec in (svc.get("depends_on") or {}).items()}
        for name, svc in compose()["services"].items()
    }
    assert actual == expected


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    check = service(name).get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable")
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert check.get("interval")
    assert check.get("retries")


@pytest.mark.parametrize("name", HTTP_SERVICES)
def test_http_healthchecks_ask_a_health_endpoint_on_the_service_port(name: str) -> None:
    test = service(name)["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "the images have no curl: use python"
    code = test[3]
    compile(code, f"{name} healthcheck", "exec")
    assert "urllib.request" in code
    assert re.search(rf"http://127\.0\.0\.1:{listening_port(name)}/(healthz|readyz)\b", code)


def test_postgres_turns_healthy_only_once_the_databases_exist() -> None:
    test = service("postgres")["healthcheck"]["test"]
    assert "pg_isready" in test
    # TCP, not the socket: the image's temporary init-time server listens on the socket only.
    assert "--host=127.0.0.1" in test
    assert any(arg.startswith("--dbname=tessera_") for arg in test)


@pytest.mark.parametrize("name", ["migrate-api", "migrate-vault"])
def test_migrations_are_one_shot(name: str) -> None:
    assert service(name).get("restart") == "no"
    assert "ports" not in service(name)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("name", ["api", "worker", "vault"])
def test_compose_waits_longer_than_the_services_graceful_shutdown(name: str) -> None:
    grace = _seconds(service(name)["stop_grace_period"])
    assert grace > settings_of(name).shutdown_timeout_seconds


@pytest.mark.parametrize("name", APPLICATIONS)
def test_application_containers_run_read_only_without_capabilities(name: str) -> None:
    svc = service(name)
    assert svc.get("read_only") is True
    assert svc.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in svc.get("security_opt", [])
    assert "user" not in svc, "the images set their own unprivileged user"


# --- Postgres's roles and databases -----------------------------------------------------------


def test_postgres_runs_the_init_script_and_gives_it_every_password() -> None:
    volumes = service("postgres")["volumes"]
    assert "./compose/initdb:/docker-entrypoint-initdb.d:ro" in volumes
    assert INIT_SCRIPT.is_file()
    # Executed, not sourced: a sourced script's `set -u` would leak into the image's entrypoint.
    assert os.access(INIT_SCRIPT, os.X_OK), f"chmod +x {INIT_SCRIPT.relative_to(ROOT)}"
    assert INIT_SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    script = INIT_SCRIPT.read_text()
    for role, variable in ROLE_PASSWORD.items():
        assert variable in environment("postgres"), f"{variable} (password of {role})"
        assert f"${{{variable}:?}}" in script
    passwords = {environment("postgres")[v] for v in ROLE_PASSWORD.values()}
    assert len(passwords) == len(ROLE_PASSWORD)


CATALOG_STATE = """
SELECT json_build_object(
  'roles', (SELECT json_object_agg(rolname, json_build_array(rolcanlogin, rolsuper,
              rolcreatedb, rolcreaterole, rolreplication, rolbypassrls))
            FROM pg_roles WHERE rolname LIKE 'tessera\\_%'),
  'databases', (SELECT json_object_agg(datname, json_build_array(
                  pg_get_userbyid(datdba), datacl::text[], pg_encoding_to_char(encoding)))
                FROM pg_database WHERE datname LIKE 'tessera\\_%')
)::text
"""
SCHEMA_STATE = """
SELECT json_build_array(pg_get_userbyid(nspowner), nspacl::text[])::text
FROM pg_namespace WHERE nspname = 'public'
"""


async def catalog_state(dsn: str) -> dict[str, Any]:
    """What the roles and databases look like: attributes, owners, ACLs (not passwords)."""
    conn = await asyncpg.connect(dsn)
    try:
        state: dict[str, Any] = json.loads(await conn.fetchval(CATALOG_STATE))
    finally:
        await conn.close()
    for db in DBS:
        conn = await asyncpg.connect(dsn, database=db.database)
        try:
            state[f"schema:{db.database}"] = json.loads(await conn.fetchval(SCHEMA_STATE))
        finally:
            await conn.close()
    return state


async def drop_tessera(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for db in DBS:
            await conn.execute(f'DROP DATABASE IF EXISTS "{db.database}"')
        for db in DBS:
            for role in (db.owner, db.runtime):
                await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


@pytest.mark.slow
def test_the_init_script_makes_the_roles_and_databases_dbsetup_makes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Both run for real on a throwaway Postgres cluster; the catalogs they leave must match."""
    base = Path(tmp_path_factory.mktemp("initdb"))
    for parent in [base, *base.parents]:
        if parent != Path("/"):
            parent.chmod(parent.stat().st_mode | 0o011)
    port = free_port()
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    devstack.start_private_postgres(dsn, base=base / "pg")
    try:
        passwords = {v: environment("postgres")[v] for v in ROLE_PASSWORD.values()}
        result = subprocess.run(
            [str(INIT_SCRIPT)],
            env={**os.environ, **passwords, "PGHOST": "127.0.0.1", "PGPORT": str(port),
                 "POSTGRES_USER": "postgres"},
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        from_script = asyncio.run(catalog_state(dsn))
        asyncio.run(drop_tessera(dsn))
        asyncio.run(dbsetup.ensure_roles_and_databases(dsn, DBS))
        from_dbsetup = asyncio.run(catalog_state(dsn))
    finally:
        devstack.stop_private_postgres(base=base / "pg")
    assert from_script == from_dbsetup
    assert set(from_script["roles"]) == {
        dbsetup.AUDITOR_ROLE,
        *(r for db in DBS for r in (db.owner, db.runtime)),
    }
