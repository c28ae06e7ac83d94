"""The vault's caller matrix: every kind of caller against every endpoint, with the status each
must get, and no effect from a refused call.

It runs against a vault of its own (its own database, its own local KMS keyring, a high
break-glass limit), because the matrix rotates the KEK and rewraps every data key: the session's
shared vault and the tests using it never see that.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core.ids import new_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import (
    PG_ADMIN_URL,
    VaultMerchant,
    dsn,
    register_vault_merchant,
    start_service,
)
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import acting_for, assert_error, bearer, card, tokenize

CARD = "4242424242424242"
API_IDENTITY = "spiffe://cluster.local/ns/tessera-app/sa/tessera-api"

#: Every kind of caller. The three "wrong" kinds share the table's `wrong` column.
CALLERS = (
    "none",
    "wrong_bearer",
    "unregistered_publishable_key",
    "untrusted_mesh_header",
    "publishable_key",
    "other_merchants_publishable_key",
    "service",
    "admin",
)
COLUMN = {
    "none": "none",
    "wrong_bearer": "wrong",
    "unregistered_publishable_key": "wrong",
    "untrusted_mesh_header": "wrong",
    "publishable_key": "pk",
    "other_merchants_publishable_key": "other_pk",
    "service": "service",
    "admin": "admin",
}


@dataclass
class Matrix:
    """The matrix's own vault, its merchants and credentials."""

    vault: ServiceProcess
    db: ServiceDatabase
    keyring: Path
    shop: VaultMerchant
    rival: VaultMerchant
    tokens: dict[str, str]
    echo: EchoServer

    def headers(self, caller: str) -> dict[str, str]:
        if caller == "none":
            return {}
        if caller == "wrong_bearer":
            return bearer(secrets.token_urlsafe(32))
        if caller == "unregistered_publishable_key":
            return bearer(f"pk_test_{secrets.token_hex(24)}")
        if caller == "untrusted_mesh_header":  # this vault does not trust the header
            return {"x-forwarded-client-cert": f"By=spiffe://x/vault;Hash=ab;URI={API_IDENTITY}"}
        if caller == "publishable_key":
            return bearer(self.shop.publishable_key)
        if caller == "other_merchants_publishable_key":
            return bearer(self.rival.publishable_key)
        return bearer(self.tokens[caller])

    def fresh_token(self) -> str:
        token_id: str = tokenize(self.vault, self.shop, CARD, cvc="123")["id"]
        return token_id

    def token_is_live(self, token_id: str) -> bool:
        response = httpx.get(
            f"{self.vault.url}/v1/tokens/{token_id}",
            headers=acting_for(self.tokens["service"], self.shop),
        )
        return response.status_code == 200

    def token_count(self) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(dsn(self.db.owner, self.db.database))
            try:
                value: int = await conn.fetchval("SELECT count(*) FROM tokens")
                return value
            finally:
                await conn.close()

        # In a thread of its own: asyncio.run must not touch the session's event loop.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, count()).result()

    def primary_kek_version(self) -> str:
        version: str = json.loads(self.keyring.read_text())["primary"]
        return version


@dataclass
class Call:
    """One prepared request, and how to tell afterwards whether it changed anything."""

    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    took_effect: Callable[[], bool] | None = None


def create_token(m: Matrix) -> Call:
    before = m.token_count()
    return Call("/v1/tokens", card(CARD), took_effect=lambda: m.token_count() > before)


def read_token(m: Matrix) -> Call:
    return Call(f"/v1/tokens/{m.fresh_token()}", headers={"tessera-merchant": m.shop.id})


def delete_token(m: Matrix) -> Call:
    token_id = m.fresh_token()
    return Call(
        f"/v1/tokens/{token_id}",
        headers={"tessera-merchant": m.shop.id},
        took_effect=lambda: not m.token_is_live(token_id),
    )


def forward(m: Matrix) -> Call:
    m.echo.reset()
    body = {
        "destination": "echo",
        "path": "/v1/authorizations",
        "token": m.fresh_token(),
        "body": {"pan": "{{card.number}}", "cvc": "{{card.cvc}}"},
    }
    return Call(
        "/v1/forward",
        body,
        headers={"tessera-merchant": m.shop.id},
        took_effect=lambda: bool(m.echo.received),
    )


def detokenize(m: Matrix) -> Call:
    return Call("/v1/detokenize", {"token": m.fresh_token(), "reason": "caller matrix check"})


def rotate(m: Matrix) -> Call:
    before = m.primary_kek_version()
    return Call("/v1/keys/rotate", took_effect=lambda: m.primary_kek_version() != before)


def rewrap(m: Matrix) -> Call:
    return Call("/v1/keys/rewrap")


def verify_audit(m: Matrix) -> Call:
    return Call("/v1/audit/verify")


def register_merchant(m: Matrix) -> Call:
    key = f"pk_test_{secrets.token_hex(24)}"
    body = {"id": new_id("mer"), "publishable_key": key, "allowed_origins": []}

    def registered() -> bool:
        probe = httpx.post(m.vault.url + "/v1/tokens", json=card(CARD), headers=bearer(key))
        return probe.status_code == 201

    return Call("/v1/merchants", body, took_effect=registered)


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    prepare: Callable[[Matrix], Call]
    none: int
    wrong: int
    pk: int
    other_pk: int
    service: int
    admin: int

    def expected(self, caller: str) -> int:
        status: int = getattr(self, COLUMN[caller])
        return status


# fmt: off
#    method    path                     prepare            none wrong  pk  other_pk service admin
MATRIX = (
    Row("POST",   "/v1/tokens",         create_token,      401, 401,  201, 201,     403,    403),
    Row("GET",    "/v1/tokens/{id}",    read_token,        401, 401,  403, 403,     200,    403),
    Row("DELETE", "/v1/tokens/{id}",    delete_token,      401, 401,  403, 403,     200,    403),
    Row("POST",   "/v1/forward",        forward,           401, 401,  403, 403,     200,    403),
    Row("POST",   "/v1/detokenize",     detokenize,        401, 401,  403, 403,     403,    200),
    Row("POST",   "/v1/merchants",      register_merchant, 401, 401,  403, 403,     403,    201),
    Row("GET",    "/v1/audit/verify",   verify_audit,      401, 401,  403, 403,     403,    200),
    Row("POST",   "/v1/keys/rewrap",    rewrap,            401, 401,  403, 403,     403,    200),
    Row("POST",   "/v1/keys/rotate",    rotate,            401, 401,  403, 403,     403,    200),
)
# fmt: on


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
    psp_echo: EchoServer,
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
        rival = register_vault_merchant(process, tokens["admin"], ("https://rival.example",))
        yield Matrix(process, matrix_db, keyring, shop, rival, tokens, psp_echo)
    finally:
        psp_echo.reset()
        process.stop()


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("row", MATRIX, ids=[f"{r.method} {r.path}" for r in MATRIX])
def test_each_caller_gets_exactly_the_status_the_matrix_says(
    matrix: Matrix, row: Row, caller: str
) -> None:
    call = row.prepare(matrix)
    response = httpx.request(
        row.method,
        matrix.vault.url + call.path,
        json=call.body,
        headers={**matrix.headers(caller), **call.headers},
    )
    expected = row.expected(caller)
    assert response.status_code == expected, response.text
    if expected == 401:
        assert_error(response, 401, "authentication_error", "invalid_credentials")
    elif expected == 403:
        assert_error(response, 403, "permission_error", "forbidden")
    if call.took_effect is not None:
        assert call.took_effect() == (200 <= expected < 300), "a refused call changed something"
    if row.path != "/v1/detokenize":  # only break-glass ever answers with the card number
        assert CARD not in response.text


def test_break_glass_detokenize_gives_the_administrator_the_card(matrix: Matrix) -> None:
    call = detokenize(matrix)
    response = httpx.post(
        matrix.vault.url + call.path, json=call.body, headers=matrix.headers("admin")
    )
    assert response.status_code == 200, response.text
    assert response.json()["number"] == CARD


def test_the_matrix_covers_every_endpoint_the_vault_serves(matrix: Matrix) -> None:
    schema = httpx.get(matrix.vault.url + "/schema/openapi.json").json()
    open_paths = {"/healthz", "/readyz"}
    served = {
        (method.upper(), path.replace("{token_id}", "{id}"))
        for path, operations in schema["paths"].items()
        if path not in open_paths
        for method in operations
    }
    assert served == {(row.method, row.path) for row in MATRIX}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_need_no_credential(matrix: Matrix, path: str) -> None:
    assert httpx.get(matrix.vault.url + path).status_code == 200


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
