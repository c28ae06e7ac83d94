"""The payment API may authenticate to the vault by its mTLS identity, as reported by the mesh
sidecar that terminated mTLS (`X-Forwarded-Client-Cert`), instead of the bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import VaultMerchant, start_service
from tests.support.processes import ServiceProcess

API_IDENTITY = "spiffe://cluster.local/ns/tessera-app/sa/tessera-api"


def xfcc(uri: str) -> dict[str, str]:
    return {
        "x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/tessera-cde/sa/vault;Hash=ab;URI={uri}"
    }


@pytest.fixture(scope="module")
def mesh_vault(
    vault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    extra = {
        "TESSERA_VAULT_TRUST_FORWARDED_CLIENT_CERT": "true",
        "TESSERA_VAULT_SERVICE_IDENTITIES": API_IDENTITY,
    }
    process = start_service("vault", vault_env, Path(tmp_path_factory.mktemp("mesh")), extra)
    yield process
    process.stop()


def tokenize(vault: ServiceProcess, shop: VaultMerchant) -> str:
    response = httpx.post(
        vault.url + "/v1/tokens",
        json={"number": "4242424242424242", "exp_month": 12, "exp_year": 2040},
        headers={"authorization": f"Bearer {shop.publishable_key}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def test_the_api_identity_from_the_mesh_reads_token_metadata(
    mesh_vault: ServiceProcess, shop: VaultMerchant
) -> None:
    token = tokenize(mesh_vault, shop)
    response = httpx.get(
        f"{mesh_vault.url}/v1/tokens/{token}",
        headers={**xfcc(API_IDENTITY), "tessera-merchant": shop.id},
    )
    assert response.status_code == 200, response.text
    assert response.json()["card"]["last4"] == "4242"


def test_another_workload_identity_is_refused(
    mesh_vault: ServiceProcess, shop: VaultMerchant
) -> None:
    token = tokenize(mesh_vault, shop)
    other = "spiffe://cluster.local/ns/tessera-load/sa/locust"
    response = httpx.get(
        f"{mesh_vault.url}/v1/tokens/{token}", headers={**xfcc(other), "tessera-merchant": shop.id}
    )
    assert response.status_code == 401


def test_only_the_last_hop_counts(mesh_vault: ServiceProcess, shop: VaultMerchant) -> None:
    token = tokenize(mesh_vault, shop)
    spoofed = f"URI={API_IDENTITY},URI=spiffe://cluster.local/ns/tessera-load/sa/locust"
    response = httpx.get(
        f"{mesh_vault.url}/v1/tokens/{token}",
        headers={"x-forwarded-client-cert": spoofed, "tessera-merchant": shop.id},
    )
    assert response.status_code == 401


def test_a_vault_that_does_not_trust_the_mesh_ignores_the_header(
    vault: ServiceProcess, shop: VaultMerchant
) -> None:
    token = tokenize(vault, shop)
    response = httpx.get(
        f"{vault.url}/v1/tokens/{token}",
        headers={**xfcc(API_IDENTITY), "tessera-merchant": shop.id},
    )
    assert response.status_code == 401
