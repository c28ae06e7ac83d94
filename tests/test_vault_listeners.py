"""The vault's three listeners: browsers, the payment API and administrators each on a port of
their own, so a network policy can admit each caller to its own listener only (deploy/flows.yaml,
deploy/k8s/). A route asked for on another listener's port answers 404, whatever credential the
request carries, and changes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ApiMerchant,
    VaultMerchant,
    create_merchant,
    register_vault_merchant,
    start_service,
)
from tests.support.payments import pay
from tests.support.processes import ServiceProcess, free_port
from tests.support.vault_helpers import acting_for, bearer, card, tokenize


@dataclasses.dataclass(frozen=True)
class SplitVault:
    public: ServiceProcess
    service: ServiceProcess
    admin: ServiceProcess

    def all(self) -> dict[str, ServiceProcess]:
        return {"public": self.public, "service": self.service, "admin": self.admin}


@pytest.fixture(scope="module")
def split_vault(
    vault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SplitVault]:
    service_port, admin_port = free_port(), free_port()
    extra = {
        "TESSERA_VAULT_SERVICE_PORT": str(service_port),
        "TESSERA_VAULT_ADMIN_PORT": str(admin_port),
    }
    public = start_service("vault", vault_env, tmp_path_factory.mktemp("split-vault"), extra)
    # One process, three ports: the views differ only in the port they call.
    yield SplitVault(
        public,
        dataclasses.replace(public, port=service_port),
        dataclasses.replace(public, port=admin_port),
    )
    public.stop()


@pytest.fixture(scope="module")
def split_shop(split_vault: SplitVault, tokens: dict[str, str]) -> VaultMerchant:
    return register_vault_merchant(split_vault.admin, tokens["admin"], ("https://shop.example",))


def test_probes_answer_on_every_listener(split_vault: SplitVault) -> None:
    for name, view in split_vault.all().items():
        for path in ("/healthz", "/readyz"):
            assert httpx.get(view.url + path).status_code == 200, (name, path)


def test_metrics_and_the_document_are_for_operators_not_browsers(split_vault: SplitVault) -> None:
    for path in ("/metrics", "/schema/openapi.json"):
        assert httpx.get(split_vault.public.url + path).status_code == 404, path
        assert httpx.get(split_vault.service.url + path).status_code == 200, path
        assert httpx.get(split_vault.admin.url + path).status_code == 200, path


def test_cards_are_tokenized_on_the_public_listener_only(
    split_vault: SplitVault, split_shop: VaultMerchant
) -> None:
    token = tokenize(split_vault.public, split_shop)
    assert token["id"].startswith("tok_")
    for other in (split_vault.service, split_vault.admin):
        response = httpx.post(
            other.url + "/v1/tokens",
            json=card(),
            headers=bearer(split_shop.publishable_key),
        )
        assert response.status_code == 404, response.text
        # Exactly what an unknown route answers: nothing tells that the route exists elsewhere.
        assert response.json()["error"]["code"] == "unknown_route", response.text
    page = f"/elements/v1/card.html?key={split_shop.publishable_key}&origin=https://shop.example"
    assert httpx.get(split_vault.public.url + page).status_code == 200
    assert httpx.get(split_vault.service.url + page).status_code == 404
    assert httpx.get(split_vault.public.url + "/elements/v1/integrity.json").status_code == 200
    assert httpx.get(split_vault.admin.url + "/elements/v1/integrity.json").status_code == 404


def test_token_metadata_is_on_the_service_listener_only(
    split_vault: SplitVault, split_shop: VaultMerchant, tokens: dict[str, str]
) -> None:
    token = tokenize(split_vault.public, split_shop)["id"]
    headers = acting_for(tokens["service"], split_shop)
    assert (
        httpx.get(f"{split_vault.service.url}/v1/tokens/{token}", headers=headers).status_code
        == 200
    )
    for other in (split_vault.public, split_vault.admin):
        response = httpx.get(f"{other.url}/v1/tokens/{token}", headers=headers)
        assert response.status_code == 404, response.text
        # Deleting on the wrong listener deletes nothing: the token still reads on its own.
        assert httpx.delete(f"{other.url}/v1/tokens/{token}", headers=headers).status_code == 404
    assert (
        httpx.get(f"{split_vault.service.url}/v1/tokens/{token}", headers=headers).status_code
        == 200
    )
    forward = httpx.post(split_vault.public.url + "/v1/forward", json={}, headers=headers)
    assert forward.status_code == 404


def test_administration_is_on_the_admin_listener_only(
    split_vault: SplitVault, tokens: dict[str, str]
) -> None:
    headers = bearer(tokens["admin"])
    assert httpx.get(split_vault.admin.url + "/v1/audit/verify", headers=headers).status_code == 200
    for other in (split_vault.public, split_vault.service):
        assert httpx.get(other.url + "/v1/audit/verify", headers=headers).status_code == 404
        # A merchant registration sent to the wrong listener registers nothing.
        body = {"id": "mer_wronglistener0001", "publishable_key": "pk_test_" + "ab" * 24}
        assert (
            httpx.post(other.url + "/v1/merchants", json=body, headers=headers).status_code == 404
        )
        rotated = httpx.post(other.url + "/v1/keys/rotate", headers=headers)
        assert rotated.status_code == 404


def test_a_payment_runs_end_to_end_with_the_api_on_the_service_listener(
    split_vault: SplitVault,
    api_env: dict[str, str],
    tokens: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    log_dir: Path = tmp_path_factory.mktemp("split-api")
    api = start_service("api", api_env, log_dir, {"TESSERA_API_VAULT_URL": split_vault.service.url})
    try:
        merchant: ApiMerchant = create_merchant(api_env, split_vault.admin, tokens["admin"])
        response = pay(api, split_vault.public, merchant)
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "captured"
    finally:
        api.stop()


def test_the_admin_toolbox_onboards_a_merchant_with_only_its_own_settings(
    split_vault: SplitVault, api_env: dict[str, str], tokens: dict[str, str], tmp_path: Path
) -> None:
    """What deploy/k8s's admin toolbox holds: the API database's URL, the vault's admin
    listener and the admin token as a file; no service token, no processor keys."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(tokens["admin"] + "\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")} | {
        "TESSERA_MODE": "production",
        "TESSERA_API_DATABASE_URL": api_env["TESSERA_API_DATABASE_URL"],
        "TESSERA_VAULT_ADMIN_URL": split_vault.admin.url,
        "TESSERA_VAULT_ADMIN_TOKEN_FILE": str(token_file),
    }
    command = [sys.executable, "-m", "tessera.cli", "merchants", "create", "--name", "Toolbox"]
    result = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["secret_key"].startswith("sk_live_")
    # Registered at the vault: its publishable key makes tokens on the public listener.
    merchant = VaultMerchant(created["merchant_id"], created["publishable_key"], ())
    assert tokenize(split_vault.public, merchant)["id"].startswith("tok_")
    # Without the admin token nothing is made, and the message says what to set.
    del env["TESSERA_VAULT_ADMIN_TOKEN_FILE"]
    refused = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "TESSERA_VAULT_ADMIN_TOKEN" in refused.stderr
