"""The vault's callers beyond the authorization matrix (docs/authz_matrix.yaml, walked by
tests/test_authz_matrix.py for every route of both services and every kind of caller):
break-glass gives the administrator the card, and every malformed or wrong `Authorization`
header is a 401.

It runs against a vault of its own (its own database, its own local KMS keyring, a high
break-glass limit), as the matrix does.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import (
    PG_ADMIN_URL,
    VaultMerchant,
    dsn,
    register_vault_merchant,
    start_service,
)
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import assert_error, bearer, tokenize

CARD = "4242424242424242"


@dataclass
class Matrix:
    """This module's own vault, a merchant of it and the credentials."""

    vault: ServiceProcess
    shop: VaultMerchant
    tokens: dict[str, str]

    def fresh_token(self) -> str:
        token_id: str = tokenize(self.vault, self.shop, CARD, cvc="123")["id"]
        return token_id


@pytest.fixture(scope="module")
async def matrix_db() -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_callers_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(scope="module")
def matrix(
    matrix_db: ServiceDatabase,
    vault_env: dict[str, str],
    tokens: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Matrix]:
    from vault.kms.local import LocalKms

    directory = tmp_path_factory.mktemp("callers")
    keyring = directory / "keyring.json"
    LocalKms.create_keyring(keyring)
    env = {
        **vault_env,
        "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring),
        "TESSERA_VAULT_DATABASE_URL": dsn(matrix_db.runtime, matrix_db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(matrix_db.owner, matrix_db.database),
        "TESSERA_VAULT_DETOKENIZE_PER_MINUTE": "1000",
    }
    process = start_service("vault", env, directory)
    try:
        shop = register_vault_merchant(process, tokens["admin"], ("https://matrix.example",))
        yield Matrix(process, shop, tokens)
    finally:
        process.stop()


def test_break_glass_detokenize_gives_the_administrator_the_card(matrix: Matrix) -> None:
    body = {"token": matrix.fresh_token(), "reason": "caller matrix check"}
    response = httpx.post(
        matrix.vault.url + "/v1/detokenize", json=body, headers=bearer(matrix.tokens["admin"])
    )
    assert response.status_code == 200, response.text
    assert response.json()["number"] == CARD


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Token {service}",
        "{service}",
        "Bearer {service}x",
        "Bearer x{service}",
        "Bearer {service_prefix}",
    ],
)
def test_a_malformed_or_wrong_authorization_header_is_a_401(
    matrix: Matrix, authorization: str
) -> None:
    token_id = matrix.fresh_token()
    response = httpx.get(
        f"{matrix.vault.url}/v1/tokens/{token_id}",
        headers={
            "authorization": authorization.format(
                service=matrix.tokens["service"], service_prefix=matrix.tokens["service"][:-1]
            ),
            "tessera-merchant": matrix.shop.id,
        },
    )
    assert_error(response, 401, "authentication_error", "invalid_credentials")
