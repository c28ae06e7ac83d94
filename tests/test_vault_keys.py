"""The key hierarchy, proven end to end: ciphertexts bound to their row (AAD), KMS calls counted
(once per key, not per card), KEK rotation + rewrap + disabling the old version, the key CLI,
and a vault running on Cloud KMS (the real client against the suite's gRPC fake).

Everything that writes keys under a keyring or KMS other than the session's runs in a throwaway
vault database, so the shared `tessera_vault_test` only ever holds keys the session's keyring
can unwrap (a rewrap there would otherwise trip over foreign keys).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from core.cards import luhn_valid
from core.ids import new_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import PG_ADMIN_URL, VaultMerchant, dsn, register_vault_merchant, start_service
from tests.support.echo_server import EchoServer
from tests.support.fake_kms import FakeKms
from tests.support.processes import ROOT, ServiceProcess
from vault.crypto import DataKeyPolicy, dek_aad
from vault.keys import KeyRepository, KeyService
from vault.kms.base import KeyManagementService, KmsError, WrappedKey
from vault.kms.gcp import CloudKms
from vault.kms.local import LocalKms
from vault.tokens import CreateToken, CvcStore, TokenRepository, TokenService

PATH = "/v1/authorizations"
EXP_MONTH, EXP_YEAR = 7, datetime.date.today().year + 3
GCP_KEY = "projects/p/locations/l/keyRings/r/cryptoKeys/k"
CARDS = 500


# --- helpers ---------------------------------------------------------------------------------


def random_pan() -> str:
    body = "4" + "".join(secrets.choice("0123456789") for _ in range(14))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def tokenize(
    vault: ServiceProcess, merchant: VaultMerchant, pan: str, cvc: str | None = None
) -> str:
    card: dict[str, Any] = {"number": pan, "exp_month": EXP_MONTH, "exp_year": EXP_YEAR}
    if cvc is not None:
        card["cvc"] = cvc
    response = httpx.post(
        vault.url + "/v1/tokens",
        json=card,
        headers={"authorization": f"Bearer {merchant.publishable_key}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


def forward(
    vault: ServiceProcess, service_token: str, merchant_id: str, token: str
) -> httpx.Response:
    request = {
        "destination": "echo",
        "path": PATH,
        "token": token,
        "body": {"card": {"number": "{{card.number}}", "cvc": "{{card.cvc}}"}},
    }
    return httpx.post(
        vault.url + "/v1/forward",
        json=request,
        headers={"authorization": f"Bearer {service_token}", "tessera-merchant": merchant_id},
        timeout=15,
    )


def admin_post(vault: ServiceProcess, admin_token: str, path: str) -> dict[str, Any]:
    response = httpx.post(
        vault.url + path, headers={"authorization": f"Bearer {admin_token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def last_sent_card(psp_echo: EchoServer) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(psp_echo.received[-1].body)["card"]
    return card


def kms_calls_metric(vault: ServiceProcess) -> float:
    for line in httpx.get(vault.url + "/metrics").text.splitlines():
        if line.startswith("vault_kms_calls "):
            return float(line.split()[1])
    raise AssertionError("no vault_kms_calls in /metrics")


@asynccontextmanager
async def throwaway_database(label: str) -> AsyncIterator[ServiceDatabase]:
    """A vault database of its own, made as the set-up makes one, dropped afterwards."""
    db = ServiceDatabase("vault", f"tessera_vault_{label}_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    try:
        yield db
    finally:
        await drop_database(PG_ADMIN_URL, db.database)


def database_env(db: ServiceDatabase) -> dict[str, str]:
    return {
        "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(db.owner, db.database),
    }


@dataclass
class DedicatedVault:
    """A vault process of a test's own, with its own database; restartable (cold caches)."""

    db: ServiceDatabase
    env: dict[str, str]
    log_dir: Path
    process: ServiceProcess

    def restart(self) -> None:
        self.process.stop()
        self.process = start_service("vault", self.env, self.log_dir)


@pytest.fixture(autouse=True)
def clean_echo(psp_echo: EchoServer) -> Iterator[None]:
    psp_echo.reset()
    yield
    psp_echo.reset()


# --- (a) associated data binds a ciphertext to its row ---------------------------------------


async def card_columns(owner: asyncpg.Connection, token_id: str) -> asyncpg.Record:
    row = await owner.fetchrow(
        "SELECT ciphertext, nonce, data_key_id FROM tokens WHERE id = $1", token_id
    )
    assert row is not None
    return row


async def write_card_columns(owner: asyncpg.Connection, token_id: str, source: Any) -> None:
    """Put `source`'s ciphertext, nonce and key id on `token_id`'s row, as only someone with the
    table owner's rights could (the trigger refuses it even to them until switched off)."""
    async with owner.transaction():
        await owner.execute("ALTER TABLE tokens DISABLE TRIGGER tokens_only_shred")
        await owner.execute(
            "UPDATE tokens SET ciphertext = $2, nonce = $3, data_key_id = $4 WHERE id = $1",
            token_id,
            source["ciphertext"],
            source["nonce"],
            source["data_key_id"],
        )
        await owner.execute("ALTER TABLE tokens ENABLE TRIGGER tokens_only_shred")


async def test_a_ciphertext_copied_onto_another_token_does_not_decrypt(
    vault: ServiceProcess,
    shop: VaultMerchant,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    psp_echo: EchoServer,
) -> None:
    pan_a, pan_b = random_pan(), random_pan()
    token_a, token_b = tokenize(vault, shop, pan_a), tokenize(vault, shop, pan_b)
    db = databases["vault"]
    owner = await asyncpg.connect(dsn(db.owner, db.database))
    try:
        row_a, row_b = await card_columns(owner, token_a), await card_columns(owner, token_b)
        assert row_a["data_key_id"] == row_b["data_key_id"]  # same DEK: only the AAD differs
        with pytest.raises(asyncpg.CheckViolationError):
            await owner.execute("UPDATE tokens SET nonce = nonce WHERE id = $1", token_b)

        await write_card_columns(owner, token_b, row_a)
        response = forward(vault, tokens["service"], shop.id, token_b)

        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "internal_error"
        assert pan_a not in response.text
        assert "Traceback" not in response.text
        assert psp_echo.received == []

        # The same bytes written back where they belong decrypt again: the copy, not the
        # rewrite, is what fails.
        await write_card_columns(owner, token_a, row_a)
        await write_card_columns(owner, token_b, row_b)
        assert forward(vault, tokens["service"], shop.id, token_a).status_code == 200
        assert last_sent_card(psp_echo)["number"] == pan_a
        assert forward(vault, tokens["service"], shop.id, token_b).status_code == 200
        assert last_sent_card(psp_echo)["number"] == pan_b
    finally:
        await owner.close()


# --- (b) KMS calls: once per key, not per card -------------------------------------------------


@pytest.fixture(scope="module")
async def counting_db() -> AsyncIterator[ServiceDatabase]:
    async with throwaway_database("kmscount") as db:
        yield db


@pytest.fixture(scope="module")
async def pool(counting_db: ServiceDatabase) -> AsyncIterator[asyncpg.Pool]:
    """As the vault connects: the runtime role, a small pool."""
    created = await asyncpg.create_pool(
        dsn(counting_db.runtime, counting_db.database), min_size=2, max_size=10
    )
    yield created
    await created.close()


@pytest.fixture(scope="module")
async def cvc_redis(redis_urls: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_urls["vault"])
    yield client
    await client.aclose()


@pytest.fixture
def keyring(tmp_path: Path) -> str:
    path = tmp_path / "keyring.json"
    LocalKms.create_keyring(path)
    return str(path)


async def new_merchant(pool: asyncpg.Pool) -> str:
    merchant_id = new_id("mer")
    await pool.execute(
        "INSERT INTO merchants (id, publishable_key_sha256) VALUES ($1, $2)",
        merchant_id,
        secrets.token_bytes(32),
    )
    return merchant_id


def token_service(
    kms: KeyManagementService,
    pool: asyncpg.Pool,
    cvc_redis: aioredis.Redis,
    policy: DataKeyPolicy | None = None,
) -> TokenService:
    return TokenService(
        KeyService(kms, KeyRepository(pool), policy),
        TokenRepository(pool),
        CvcStore(cvc_redis, 60),
    )


async def tokenize_many(service: TokenService, merchant_id: str, count: int) -> dict[str, str]:
    """token id -> PAN, one card after another, as a steady stream of checkouts."""
    today = datetime.date.today()
    created: dict[str, str] = {}
    for _ in range(count):
        pan = random_pan()
        view = await service.create(merchant_id, CreateToken(pan, EXP_MONTH, EXP_YEAR), today)
        created[view.id] = pan
    return created


async def reveal_all(service: TokenService, merchant_id: str, cards: dict[str, str]) -> None:
    """Decrypt every card at once (as concurrent forwards would) and check each PAN."""
    revealed = await asyncio.gather(
        *(service.reveal(token, merchant_id, take_cvc=False) for token in cards)
    )
    assert [card.number for card in revealed] == list(cards.values())


async def data_keys_of(pool: asyncpg.Pool, cards: dict[str, str]) -> Counter[str]:
    rows = await pool.fetch("SELECT data_key_id FROM tokens WHERE id = ANY($1)", list(cards))
    return Counter(row["data_key_id"] for row in rows)


async def test_500_cards_cost_one_wrap_per_key_and_a_cold_process_one_unwrap_per_key(
    pool: asyncpg.Pool, cvc_redis: aioredis.Redis, keyring: str
) -> None:
    kms = LocalKms.open(keyring)
    service = token_service(kms, pool, cvc_redis)
    merchant = await new_merchant(pool)

    cards = await tokenize_many(service, merchant, CARDS)
    await reveal_all(service, merchant, cards)
    await reveal_all(service, merchant, cards)

    # One card DEK wrapped, one fingerprint key wrapped; every reveal hit the cache.
    assert kms.calls == 2
    assert len(await data_keys_of(pool, cards)) == 1

    cold_kms = LocalKms.open(keyring)  # a restart: a new process, nothing cached
    cold = token_service(cold_kms, pool, cvc_redis)
    await reveal_all(cold, merchant, cards)
    await reveal_all(cold, merchant, cards)
    assert cold_kms.calls == 1  # concurrent misses for the one key shared one unwrap


async def test_a_data_key_encrypts_at_most_max_records_then_a_new_one_is_made(
    pool: asyncpg.Pool, cvc_redis: aioredis.Redis, keyring: str
) -> None:
    kms = LocalKms.open(keyring)
    service = token_service(kms, pool, cvc_redis, DataKeyPolicy(max_records=100))
    merchant = await new_merchant(pool)

    cards = await tokenize_many(service, merchant, CARDS)

    per_key = await data_keys_of(pool, cards)
    assert sorted(per_key.values()) == [100] * 5
    assert kms.calls == 5 + 1  # five card DEKs, one fingerprint key

    cold_kms = LocalKms.open(keyring)
    await reveal_all(token_service(cold_kms, pool, cvc_redis), merchant, cards)
    assert cold_kms.calls == 5  # one unwrap per distinct data key


async def test_concurrent_first_tokenizations_for_a_new_merchant_wrap_one_fingerprint_key(
    pool: asyncpg.Pool, cvc_redis: aioredis.Redis, keyring: str
) -> None:
    """docs/vault.md: "the KMS is called once per cache miss; concurrent misses for the same key
    share one KMS call". A merchant's first checkouts arriving together are such misses."""
    kms = LocalKms.open(keyring)
    service = token_service(kms, pool, cvc_redis)
    merchant = await new_merchant(pool)
    today = datetime.date.today()
    card = CreateToken("4242424242424242", EXP_MONTH, EXP_YEAR)

    views = await asyncio.gather(*(service.create(merchant, card, today) for _ in range(50)))

    assert len({view.card.fingerprint for view in views}) == 1
    assert kms.calls == 2, f"{kms.calls} KMS calls for 50 tokens: one card DEK, one fingerprint key"


async def test_on_cloud_kms_the_service_sees_one_encrypt_per_key_and_one_decrypt_per_cold_key(
    pool: asyncpg.Pool, cvc_redis: aioredis.Redis
) -> None:
    with FakeKms.start(GCP_KEY) as fake:
        kms = await CloudKms.connect(GCP_KEY, endpoint=fake.address)
        cold_kms = await CloudKms.connect(GCP_KEY, endpoint=fake.address)
        try:
            service = token_service(kms, pool, cvc_redis)
            merchant = await new_merchant(pool)

            cards = await tokenize_many(service, merchant, CARDS)
            await reveal_all(service, merchant, cards)
            assert (fake.calls["Encrypt"], fake.calls["Decrypt"]) == (2, 0)
            assert kms.calls == 2

            await reveal_all(token_service(cold_kms, pool, cvc_redis), merchant, cards)
            assert (fake.calls["Encrypt"], fake.calls["Decrypt"]) == (2, 1)
            assert cold_kms.calls == 1
        finally:
            await kms.close()
            await cold_kms.close()


# --- (c) rotation, rewrap, disabling the old version; the CLI ----------------------------------


@pytest.fixture(scope="module")
async def rotating(
    vault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DedicatedVault]:
    """A vault with a keyring and a database of its own: rotating it disturbs nobody."""
    keyring = tmp_path_factory.mktemp("rotation-kms") / "keyring.json"
    LocalKms.create_keyring(keyring)
    log_dir = tmp_path_factory.mktemp("rotation-vault")
    async with throwaway_database("rotation") as db:
        env = {**vault_env, **database_env(db), "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring)}
        dedicated = DedicatedVault(db, env, log_dir, start_service("vault", env, log_dir))
        try:
            yield dedicated
        finally:
            dedicated.process.stop()


async def test_after_rotation_and_rewrap_the_old_version_can_be_disabled_and_every_token_works(
    rotating: DedicatedVault, tokens: dict[str, str], psp_echo: EchoServer
) -> None:
    admin, service = tokens["admin"], tokens["service"]
    keyring = rotating.env["TESSERA_VAULT_LOCAL_KMS_PATH"]
    merchant = register_vault_merchant(rotating.process, admin)
    cards: dict[str, str] = {}
    for _ in range(3):
        pan = random_pan()
        cards[tokenize(rotating.process, merchant, pan)] = pan
    old_primary = await LocalKms.open(keyring).primary_version()

    rotated = admin_post(rotating.process, admin, "/v1/keys/rotate")

    new_primary = rotated["primary_version"]
    assert int(new_primary) == int(old_primary) + 1
    assert await LocalKms.open(keyring).primary_version() == new_primary
    for _ in range(2):
        pan = random_pan()
        cards[tokenize(rotating.process, merchant, pan)] = pan

    owner = await asyncpg.connect(dsn(rotating.db.owner, rotating.db.database))
    try:
        keys_query = "SELECT id, purpose, merchant_id, kek_version, wrapped_key FROM data_keys"
        tokens_query = "SELECT id, data_key_id, nonce, ciphertext FROM tokens ORDER BY id"
        keys_before = {row["id"]: row for row in await owner.fetch(keys_query)}
        tokens_before = [tuple(row) for row in await owner.fetch(tokens_query)]
        under_old = {k for k, row in keys_before.items() if row["kek_version"] != new_primary}
        # Audit key, fingerprint key and the first card DEK under the old version; the card
        # DEK made after the rotation under the new one.
        assert Counter(row["purpose"] for k, row in keys_before.items() if k in under_old) == {
            "audit": 1,
            "fingerprint": 1,
            "card": 1,
        }
        assert len(keys_before) == len(under_old) + 1

        rewrapped = admin_post(rotating.process, admin, "/v1/keys/rewrap")

        assert rewrapped == {
            "primary_version": new_primary,
            "rewrapped": len(under_old),
            "skipped": 0,
        }
        keys_after = {row["id"]: row for row in await owner.fetch(keys_query)}
        assert {row["kek_version"] for row in keys_after.values()} == {new_primary}
        for key_id, row in keys_after.items():
            changed = row["wrapped_key"] != keys_before[key_id]["wrapped_key"]
            assert changed == (key_id in under_old)
        assert [tuple(row) for row in await owner.fetch(tokens_query)] == tokens_before
        # Resumable: nothing is left for a second run.
        again = admin_post(rotating.process, admin, "/v1/keys/rewrap")
        assert (again["rewrapped"], again["skipped"]) == (0, 0)
    finally:
        await owner.close()

    await LocalKms.open(keyring).disable_version(old_primary)
    old_card_key = next(keys_before[k] for k in under_old if keys_before[k]["purpose"] == "card")
    with pytest.raises(KmsError, match="disabled"):
        await LocalKms.open(keyring).unwrap(
            WrappedKey(old_card_key["wrapped_key"], old_primary),
            aad=dek_aad(old_card_key["id"], "card", None),
        )
    rotating.restart()  # no data key cached any more: each must unwrap under the new version

    for token, pan in cards.items():
        response = forward(rotating.process, service, merchant.id, token)
        assert response.status_code == 200, response.text
        assert last_sent_card(psp_echo)["number"] == pan
    # The restarted process asked the KMS once per key: the audit key and the two card DEKs.
    assert kms_calls_metric(rotating.process) == 3


def run_cli(env: dict[str, str], command: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "vault", command],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


async def test_the_cli_rotates_rewraps_and_verifies_with_the_vaults_own_settings(
    rotating: DedicatedVault, tokens: dict[str, str], psp_echo: EchoServer
) -> None:
    merchant = register_vault_merchant(rotating.process, tokens["admin"])
    pan = random_pan()
    token = tokenize(rotating.process, merchant, pan)
    keyring = rotating.env["TESSERA_VAULT_LOCAL_KMS_PATH"]
    before = await LocalKms.open(keyring).primary_version()
    owner = await asyncpg.connect(dsn(rotating.db.owner, rotating.db.database))
    try:
        data_keys = await owner.fetchval("SELECT count(*) FROM data_keys")

        rotated = run_cli(rotating.env, "rotate-keys")
        rewrapped = run_cli(rotating.env, "rewrap")
        verified = run_cli(rotating.env, "audit-verify")

        assert rotated == {"primary_version": str(int(before) + 1)}
        assert rewrapped["primary_version"] == rotated["primary_version"]
        assert (rewrapped["rewrapped"], rewrapped["skipped"]) == (data_keys, 0)
        assert verified["ok"] is True
        assert verified["broken"] == []
        versions = await owner.fetch("SELECT DISTINCT kek_version FROM data_keys")
        assert [row["kek_version"] for row in versions] == [rotated["primary_version"]]
        actions = await owner.fetch(
            "SELECT action, outcome FROM audit_log WHERE actor = 'admin:cli' ORDER BY occurred_at"
        )
        assert [tuple(row) for row in actions][-3:] == [
            ("keys.rotate", "requested"),
            ("keys.rewrap", "requested"),
            ("audit.verify", "ok"),
        ]
    finally:
        await owner.close()
    # The running vault picks the rotated keyring up and still serves the card.
    assert forward(rotating.process, tokens["service"], merchant.id, token).status_code == 200
    assert last_sent_card(psp_echo)["number"] == pan


# --- (d) the vault on Cloud KMS ------------------------------------------------------------------


async def test_a_vault_on_cloud_kms_forwards_cards_and_fails_closed_when_the_kms_is_down(
    vault_env: dict[str, str],
    tokens: dict[str, str],
    psp_echo: EchoServer,
    tmp_path: Path,
) -> None:
    admin, service = tokens["admin"], tokens["service"]
    with FakeKms.start(GCP_KEY) as fake:
        async with throwaway_database("gcp") as db:
            env = {
                **vault_env,
                **database_env(db),
                "TESSERA_VAULT_KMS_PROVIDER": "gcp",
                "TESSERA_VAULT_GCP_KMS_KEY_NAME": GCP_KEY,
                "TESSERA_VAULT_GCP_KMS_ENDPOINT": fake.address,
            }
            gcp = DedicatedVault(db, env, tmp_path, start_service("vault", env, tmp_path))
            try:
                merchant = register_vault_merchant(gcp.process, admin)
                pan = random_pan()
                token = tokenize(gcp.process, merchant, pan, cvc="404")

                response = forward(gcp.process, service, merchant.id, token)

                assert response.status_code == 200, response.text
                assert last_sent_card(psp_echo) == {"number": pan, "cvc": "404"}
                # Audit key, fingerprint key, card DEK: each wrapped once, none unwrapped.
                assert (fake.calls["Encrypt"], fake.calls["Decrypt"]) == (3, 0)
                owner = await asyncpg.connect(dsn(db.owner, db.database))
                try:
                    versions = await owner.fetch("SELECT DISTINCT kek_version FROM data_keys")
                finally:
                    await owner.close()
                assert [row["kek_version"] for row in versions] == [fake.primary_of(GCP_KEY)]

                # A restart empties the cache; the metadata read unwraps the audit key only.
                gcp.restart()
                read = httpx.get(
                    f"{gcp.process.url}/v1/tokens/{token}",
                    headers={"authorization": f"Bearer {service}", "tessera-merchant": merchant.id},
                )
                assert read.status_code == 200, read.text
                assert fake.calls["Decrypt"] == 1

                fake.fail_next(50, grpc.StatusCode.UNAVAILABLE)
                psp_echo.reset()
                down = forward(gcp.process, service, merchant.id, token)

                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "kms_unavailable"
                assert pan not in down.text
                assert psp_echo.received == []
                assert fake.calls["Decrypt"] == 1 + 5  # bounded: five attempts, then 503

                fake.reset_faults()
                back = forward(gcp.process, service, merchant.id, token)
                assert back.status_code == 200, back.text
                assert last_sent_card(psp_echo) == {"number": pan}  # the CVC was used once
            finally:
                gcp.process.stop()
