"""Settings: read from the environment, checked at start-up, named in every message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import ApiSettings
from tessera.pci.context import EvidenceSettings
from tessera.runtime.settings import BaseSettings, SettingsError, load_settings
from vault.settings import VaultSettings, VaultWorkerSettings

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "TESSERA_VAULT_SERVICE_TOKEN": "s" * 40,
    "TESSERA_VAULT_ADMIN_TOKEN": "a" * 40,
    "TESSERA_API_VAULT_SERVICE_TOKEN": "s" * 40,
}


def test_defaults_match_the_documented_ports() -> None:
    assert load_settings(ApiSettings, SECRETS).port == 8000
    assert load_settings(VaultSettings, SECRETS).port == 8100


def test_a_variable_overrides_its_default() -> None:
    settings = load_settings(ApiSettings, {**SECRETS, "TESSERA_API_PORT": "9000"})
    assert settings.port == 9000


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TESSERA_API_PORT": "eighty"}, "TESSERA_API_PORT: Expected `int`"),
        ({"TESSERA_API_PORT": "70000"}, "TESSERA_API_PORT: must be a TCP port"),
        ({"TESSERA_MODE": "prod"}, "TESSERA_MODE: Invalid enum value 'prod'"),
        ({"TESSERA_API_VAULT_URL": "vault:8100"}, "TESSERA_API_VAULT_URL: expected a URL"),
        ({"TESSERA_API_REDIS_URL": "http://x"}, "TESSERA_API_REDIS_URL: expected a URL"),
        ({"TESSERA_API_VAULT_SERVICE_TOKEN": "short"}, "at least 32 characters"),
        ({"TESSERA_API_DB_POOL_MIN": "9"}, "TESSERA_API_DB_POOL_MIN"),
        ({"TESSERA_API_LOG_LEVEL": "loud"}, "TESSERA_API_LOG_LEVEL"),
    ],
)
def test_a_bad_value_is_refused_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(ApiSettings, {**SECRETS, **env})


def test_a_secret_is_read_from_the_file_its_FILE_variable_names(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("a" * 40 + "\n")  # as Secret Manager's CSI driver or an editor leaves it
    env = {"TESSERA_VAULT_SERVICE_TOKEN": "s" * 40, "TESSERA_VAULT_ADMIN_TOKEN_FILE": str(token)}
    assert load_settings(VaultSettings, env).admin_token == "a" * 40


def test_a_FILE_variable_that_cannot_be_read_or_doubles_the_variable_is_refused(
    tmp_path: Path,
) -> None:
    missing = {**SECRETS, "TESSERA_API_VAULT_SERVICE_TOKEN_FILE": str(tmp_path / "absent")}
    del missing["TESSERA_API_VAULT_SERVICE_TOKEN"]
    with pytest.raises(SettingsError, match="TESSERA_API_VAULT_SERVICE_TOKEN_FILE: cannot read"):
        load_settings(ApiSettings, missing)
    both = {**SECRETS, "TESSERA_API_VAULT_SERVICE_TOKEN_FILE": str(tmp_path / "absent")}
    with pytest.raises(SettingsError, match="both set"):
        load_settings(ApiSettings, both)


def test_a_missing_secret_is_named() -> None:
    with pytest.raises(SettingsError, match="TESSERA_VAULT_ADMIN_TOKEN is required"):
        load_settings(VaultSettings, {"TESSERA_VAULT_SERVICE_TOKEN": "s" * 40})


def test_the_vault_refuses_the_same_credential_for_service_and_admin() -> None:
    with pytest.raises(SettingsError, match="must differ"):
        load_settings(VaultSettings, {**SECRETS, "TESSERA_VAULT_ADMIN_TOKEN": "s" * 40})


DESTINATIONS = '{"psp_a": {"url": "http://127.0.0.1:8201", "paths": ["/v1/authorizations"]}}'


def test_production_mode_refuses_plaintext_or_loopback_forward_destinations() -> None:
    env = {
        **SECRETS,
        "TESSERA_MODE": "production",
        "TESSERA_VAULT_KMS_PROVIDER": "gcp",
        "TESSERA_VAULT_GCP_KMS_KEY_NAME": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "TESSERA_VAULT_REDIS_URL": "rediss://cde-redis.internal:6378/0",
        "TESSERA_VAULT_FORWARD_DESTINATIONS": DESTINATIONS,
    }
    with pytest.raises(SettingsError, match="psp_a must be https and not loopback"):
        load_settings(VaultSettings, env)


def test_forward_destinations_are_read_as_json() -> None:
    env = {**SECRETS, "TESSERA_VAULT_FORWARD_DESTINATIONS": '{"psp_a": {"url": "http://x:1"}}'}
    with pytest.raises(SettingsError, match="TESSERA_VAULT_FORWARD_DESTINATIONS"):
        load_settings(VaultSettings, env)
    env["TESSERA_VAULT_FORWARD_DESTINATIONS"] = "not json"
    with pytest.raises(SettingsError, match="expected a JSON object"):
        load_settings(VaultSettings, env)


def test_production_mode_refuses_development_only_parts() -> None:
    with pytest.raises(SettingsError) as vault_error:
        load_settings(VaultSettings, {**SECRETS, "TESSERA_MODE": "production"})
    assert "TESSERA_VAULT_KMS_PROVIDER=local" in str(vault_error.value)
    with pytest.raises(SettingsError, match="TESSERA_API_VAULT_URL must use https"):
        load_settings(ApiSettings, {**SECRETS, "TESSERA_MODE": "production"})


def test_production_mode_accepts_a_production_configuration() -> None:
    env = {
        **SECRETS,
        "TESSERA_MODE": "production",
        "TESSERA_VAULT_KMS_PROVIDER": "gcp",
        "TESSERA_VAULT_GCP_KMS_KEY_NAME": "projects/p/locations/l/keyRings/cde/cryptoKeys/kek",
        "TESSERA_VAULT_FORWARD_DESTINATIONS": DESTINATIONS.replace(
            "http://127.0.0.1:8201", "https://api.psp-a.example"
        ),
        "TESSERA_VAULT_REDIS_URL": "rediss://cde-redis.internal:6378/0",
        "TESSERA_VAULT_SERVICE_PORT": "8101",
        "TESSERA_VAULT_ADMIN_PORT": "8102",
        "TESSERA_API_VAULT_URL": "https://vault.tessera-cde.svc:8101",
        "TESSERA_API_PSP_A_URL": "https://api.psp-a.example",
        "TESSERA_API_PSP_A_API_KEY": "live_key_from_secret_manager",
        "TESSERA_API_PSP_B_URL": "https://checkout.psp-b.example",
        "TESSERA_API_PSP_B_API_KEY": "live_key_from_secret_manager",
        "TESSERA_API_PSP_B_HMAC_KEY": "00" * 32,
        "TESSERA_API_WEBHOOK_SECRET_KEY": "11" * 32,
    }
    assert load_settings(VaultSettings, env).production
    assert load_settings(ApiSettings, env).production
    # Behind the mesh the API names the vault by http://; only the mesh setting allows it.
    meshed = {**env, "TESSERA_API_VAULT_URL": "http://tessera-vault.tessera-cde.svc:8101"}
    with pytest.raises(SettingsError, match="TESSERA_API_VAULT_URL must use https"):
        load_settings(ApiSettings, meshed)
    assert load_settings(ApiSettings, {**meshed, "TESSERA_API_VAULT_MESH_MTLS": "true"}).production


def test_production_mode_refuses_a_vault_with_one_listener() -> None:
    env = {**SECRETS, "TESSERA_MODE": "production"}
    with pytest.raises(SettingsError, match="TESSERA_VAULT_SERVICE_PORT and TESSERA_VAULT_ADMIN"):
        load_settings(VaultSettings, env)


@pytest.mark.parametrize(
    "ports",
    [("8100", "8102"), ("8101", "8101"), ("8101", "70000")],
    ids=["service-on-the-public-port", "service-and-admin-share", "out-of-range"],
)
def test_the_vault_listeners_need_distinct_ports(ports: tuple[str, str]) -> None:
    env = {**SECRETS, "TESSERA_VAULT_SERVICE_PORT": ports[0], "TESSERA_VAULT_ADMIN_PORT": ports[1]}
    with pytest.raises(SettingsError, match="distinct from each other"):
        load_settings(VaultSettings, env)


def test_the_vault_serves_each_listener_on_its_port() -> None:
    split = {**SECRETS, "TESSERA_VAULT_SERVICE_PORT": "8101", "TESSERA_VAULT_ADMIN_PORT": "8102"}
    assert load_settings(VaultSettings, split).listeners_by_port() == {
        8100: {"public"},
        8101: {"service"},
        8102: {"admin"},
    }
    assert load_settings(VaultSettings, SECRETS).listeners_by_port() == {
        8100: {"public", "service", "admin"}
    }


@pytest.mark.parametrize("module", ["api", "vault"])
def test_a_service_started_with_a_bad_setting_exits_with_the_message(module: str) -> None:
    variable = f"TESSERA_{module.upper()}_PORT"
    result = subprocess.run(
        [sys.executable, "-m", module, "serve"],
        env={"PATH": "/usr/bin:/bin", **SECRETS, variable: "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert f"{variable}: Expected `int`" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cls", [ApiSettings, VaultSettings, VaultWorkerSettings, EvidenceSettings])
def test_every_setting_is_documented_in_the_readme(cls: type[BaseSettings]) -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in cls.env_names().values() if f"`{name}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
