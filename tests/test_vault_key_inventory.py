"""`GET /v1/keys`, the key inventory (PCI DSS 3.6.1, 3.7.x), against a real vault process.

The vault is this module's own (a keyring and a database of its own, the session's other
settings): the tests rotate its KEK and damage a wrapped key, which the session's vault must
not see. Assertions are about what each test itself added, so the order does not matter.
"""

from __future__ import annotations

import base64
import datetime
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.pci.checks import keys as keys_check
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.model import Status
from tessera.runtime.migrations import migrate
from tessera.runtime.settings import load_settings
from tests.conftest import PG_ADMIN_URL, VaultMerchant, dsn, register_vault_merchant, start_service
from tests.support.fake_kms import FakeKms, State
from tests.support.processes import ROOT, ServiceProcess
from tests.support.vault_helpers import bearer, tokenize
from vault.kms.local import LocalKms
from vault.settings import VaultSettings

CARDS = ("4242424242424242", "5555555555554444", "378282246310005")


@asynccontextmanager
async def throwaway_database(label: str) -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_{label}_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    try:
        yield db
    finally:
        await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(scope="module")
async def inventory_db() -> AsyncIterator[ServiceDatabase]:
    async with throwaway_database("inventory") as db:
        yield db


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inventory-kms") / "keyring.json"
    LocalKms.create_keyring(path)
    return path


@pytest.fixture(scope="module")
def own_vault(
    vault_env: dict[str, str],
    inventory_db: ServiceDatabase,
    keyring: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    env = {
        **vault_env,
        "TESSERA_VAULT_DATABASE_URL": dsn(inventory_db.runtime, inventory_db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(inventory_db.owner, inventory_db.database),
        "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring),
    }
    process = start_service("vault", env, tmp_path_factory.mktemp("inventory-vault"))
    yield process
    process.stop()


@pytest.fixture
async def owner(inventory_db: ServiceDatabase) -> AsyncIterator[asyncpg.Connection]:
    """The table owner's connection: what only a DBA could do (damage a key, read the log)."""
    conn = await asyncpg.connect(dsn(inventory_db.owner, inventory_db.database))
    yield conn
    await conn.close()


def inventory(vault: ServiceProcess, admin_token: str) -> dict[str, Any]:
    response = httpx.get(vault.url + "/v1/keys", headers=bearer(admin_token), timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def admin_post(vault: ServiceProcess, admin_token: str, path: str) -> dict[str, Any]:
    response = httpx.post(vault.url + path, headers=bearer(admin_token), timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def merchant_with_cards(vault: ServiceProcess, admin_token: str, count: int) -> VaultMerchant:
    merchant = register_vault_merchant(vault, admin_token)
    for number in CARDS[:count]:
        tokenize(vault, merchant, number)
    return merchant


def per_version(body: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {v["name"]: v["data_keys"] for v in body["kek"]["versions"]}


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


async def test_a_rotation_shows_two_versions_with_their_keys_and_rewrap_moves_them(
    own_vault: ServiceProcess, tokens: dict[str, str], owner: asyncpg.Connection
) -> None:
    admin = tokens["admin"]
    started = datetime.datetime.now(datetime.UTC)
    merchant = merchant_with_cards(own_vault, admin, 3)
    before = inventory(own_vault, admin)
    old_primary = next(v for v in before["kek"]["versions"] if v["primary"])

    assert before["object"] == "key_inventory"
    assert before["kek"]["provider"] == "local"
    assert before["kek"]["cryptoperiod_days"] == 90
    assert before["kek"]["versions_error"] is None
    assert old_primary["state"] == "enabled"
    assert before["data_key_policy"] == {"max_records": 1 << 24, "max_age_seconds": 86400}
    [fingerprint] = [k for k in before["fingerprint_keys"] if k["merchant"] == merchant.id]
    assert fingerprint["kek_version"] == old_primary["name"]
    assert fingerprint["unwrap"] == "ok"
    assert fingerprint["created"] >= int(started.timestamp())
    [audit_key] = before["audit_keys"]
    assert audit_key["merchant"] is None
    # This vault makes one card DEK and uses it for every card since: our three are on it.
    current = max(before["card_keys"], key=lambda k: k["created"])
    assert current["records"] >= 3
    assert current["in_use"] is True
    assert current["first_record"] <= current["last_record"]
    assert current["last_record"] >= int(started.timestamp())
    assert before["unwrap"]["failed"] == 0
    assert (
        before["unwrap"]["checked"]
        == before["data_keys"]["total"]
        == len(before["card_keys"]) + len(before["fingerprint_keys"]) + len(before["audit_keys"])
    )
    assert before["data_keys"]["unknown_kek_versions"] == {}

    rotated = admin_post(own_vault, admin, "/v1/keys/rotate")["primary_version"]
    tokenize(own_vault, merchant, CARDS[0])  # a new card DEK, under the new version
    after_rotation = inventory(own_vault, admin)

    names = [v["name"] for v in after_rotation["kek"]["versions"]]
    assert names == [v["name"] for v in before["kek"]["versions"]] + [rotated]
    assert [v["primary"] for v in after_rotation["kek"]["versions"]] == [False] * (
        len(names) - 1
    ) + [True]
    counts = per_version(after_rotation)
    assert counts[rotated] == {"card": 1}
    assert counts[old_primary["name"]] == per_version(before)[old_primary["name"]]
    assert after_rotation["unwrap"]["failed"] == 0

    admin_post(own_vault, admin, "/v1/keys/rewrap")
    after_rewrap = inventory(own_vault, admin)

    counts = per_version(after_rewrap)
    assert {name: total(c) for name, c in counts.items()} == {
        **{name: 0 for name in names[:-1]},
        rotated: after_rewrap["data_keys"]["total"],
    }
    assert after_rewrap["data_keys"]["total"] == after_rotation["data_keys"]["total"]
    assert {k["kek_version"] for k in after_rewrap["card_keys"]} == {rotated}
    assert after_rewrap["unwrap"]["ok"] == after_rewrap["data_keys"]["total"]

    # Every call is in the audit log, before the unwraps and with the outcome.
    outcomes = await owner.fetch(
        "SELECT outcome, detail FROM audit_log WHERE action = 'keys.inventory' "
        "AND occurred_at >= $1 ORDER BY occurred_at, seq",
        started,
    )
    assert [r["outcome"] for r in outcomes] == ["requested", "ok"] * 3


async def test_a_damaged_wrapped_key_is_reported_as_failing_to_unwrap_until_undone(
    own_vault: ServiceProcess, tokens: dict[str, str], owner: asyncpg.Connection
) -> None:
    admin = tokens["admin"]
    merchant = merchant_with_cards(own_vault, admin, 1)
    key_id = await owner.fetchval(
        "SELECT id FROM data_keys WHERE purpose = 'fingerprint' AND merchant_id = $1", merchant.id
    )
    wrapped: bytes = await owner.fetchval("SELECT wrapped_key FROM data_keys WHERE id = $1", key_id)
    damaged = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    await owner.execute("UPDATE data_keys SET wrapped_key = $2 WHERE id = $1", key_id, damaged)
    try:
        response = httpx.get(own_vault.url + "/v1/keys", headers=bearer(admin), timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        [entry] = [k for k in body["fingerprint_keys"] if k["id"] == key_id]
        assert entry["unwrap"] == "kms_error"
        assert "decryption failed" in entry["unwrap_reason"]
        assert body["unwrap"]["failed"] == 1
        assert body["unwrap"]["errors"] == {"kms_error": 1}
        others = [k for k in body["card_keys"] + body["fingerprint_keys"] if k["id"] != key_id]
        assert {k["unwrap"] for k in others} == {"ok"}
        # Nothing of a key, wrapped or not, is in the answer.
        for form in (wrapped.hex(), damaged.hex(), base64.b64encode(wrapped).decode()):
            assert form not in response.text
        assert not re.search(r'"(wrapped_key|key|material|ciphertext)"', response.text)
        last = await owner.fetchrow(
            "SELECT outcome, detail FROM audit_log WHERE action = 'keys.inventory' "
            "ORDER BY occurred_at DESC, seq DESC LIMIT 1"
        )
        assert last is not None
        assert last["outcome"] == "unwrap_failed"
    finally:
        await owner.execute("UPDATE data_keys SET wrapped_key = $2 WHERE id = $1", key_id, wrapped)

    repaired = inventory(own_vault, admin)
    assert repaired["unwrap"]["failed"] == 0
    assert repaired["unwrap"]["errors"] == {}


async def test_a_data_key_under_a_version_the_kms_does_not_list_is_counted_apart(
    own_vault: ServiceProcess, tokens: dict[str, str], owner: asyncpg.Connection
) -> None:
    admin = tokens["admin"]
    merchant = merchant_with_cards(own_vault, admin, 1)
    row = await owner.fetchrow(
        "SELECT id, kek_version FROM data_keys WHERE purpose = 'fingerprint' AND merchant_id = $1",
        merchant.id,
    )
    assert row is not None
    key_id, version = row["id"], row["kek_version"]
    await owner.execute("UPDATE data_keys SET kek_version = '999' WHERE id = $1", key_id)
    try:
        body = inventory(own_vault, admin)
        assert body["data_keys"]["unknown_kek_versions"] == {"999": 1}
        [entry] = [k for k in body["fingerprint_keys"] if k["id"] == key_id]
        assert entry["unwrap"] == "kms_error"
        assert "unknown key version" in entry["unwrap_reason"]
    finally:
        await owner.execute("UPDATE data_keys SET kek_version = $2 WHERE id = $1", key_id, version)
    assert inventory(own_vault, admin)["data_keys"]["unknown_kek_versions"] == {}


def test_the_default_kek_cryptoperiod_is_terraforms_rotation_period() -> None:
    terraform = (ROOT / "deploy" / "terraform" / "modules" / "kms" / "main.tf").read_text()
    periods = {int(s) for s in re.findall(r'rotation_period\s*=\s*"(\d+)s"', terraform)}
    secret = "x" * 40  # pragma: allowlist secret
    settings = load_settings(
        VaultSettings,
        {"TESSERA_VAULT_SERVICE_TOKEN": secret, "TESSERA_VAULT_ADMIN_TOKEN": secret + "!"},
    )
    assert periods == {settings.kek_cryptoperiod_days * 86400} == {90 * 86400}


async def test_the_keys_control_passes_now_and_fails_once_the_kek_outlives_its_cryptoperiod(
    own_vault: ServiceProcess, tokens: dict[str, str], tmp_path: Path
) -> None:
    """The assessor's kit against this vault: the same inventory judged today and 91 days on."""
    merchant_with_cards(own_vault, tokens["admin"], 1)
    settings = EvidenceSettings(vault_url=own_vault.url, vault_admin_token=tokens["admin"])
    now = datetime.datetime.now(datetime.UTC)
    results = []
    for moment in (now, now + datetime.timedelta(days=91)):
        ctx = EvidenceContext(settings, moment, ROOT, tmp_path)
        try:
            results.append(await keys_check.run(ctx))
        finally:
            await ctx.close()
    today, later = results

    assert today.status == Status.PASSED, today.summary
    primary = next(v for v in today.evidence["kek"]["versions"] if v["primary"])
    assert primary["age_days"] < 1
    assert later.status == Status.FAILED
    aged = next(v for v in later.evidence["kek"]["versions"] if v["primary"])
    assert aged["name"] == primary["name"]
    assert 91 <= aged["age_days"] < 92
    assert later.summary == (
        f"the primary KEK version {primary['name']} is {aged['age_days']} days old, past its "
        "cryptoperiod of 90 days: the KEK was not rotated in time"
    )
    assert [line for line in later.evidence["judged"] if line.startswith("fail")] == [
        f"fail: {later.summary}"
    ]


async def test_the_keys_control_without_the_admin_credential_is_not_checked(
    own_vault: ServiceProcess, tmp_path: Path
) -> None:
    for token in ("", "not-the-admin-token-" + "x" * 20):
        settings = EvidenceSettings(vault_url=own_vault.url, vault_admin_token=token)
        ctx = EvidenceContext(settings, datetime.datetime.now(datetime.UTC), ROOT, tmp_path)
        try:
            result = await keys_check.run(ctx)
        finally:
            await ctx.close()
        assert result.status == Status.NOT_CHECKED
        assert ("no vault administrator credential" if not token else "answered 401") in (
            result.summary
        )


async def test_on_cloud_kms_the_inventory_names_full_versions_and_the_control_sees_a_disabled_one(
    vault_env: dict[str, str], tokens: dict[str, str], tmp_path: Path
) -> None:
    """The same inventory through the real Cloud KMS client (the suite's gRPC fake): versions by
    their full resource names with Cloud KMS's create_time; a KMS that refuses to list them; and
    an old version disabled before its keys were rewrapped, which the control fails."""
    admin = tokens["admin"]
    key_name = "projects/p/locations/l/keyRings/r/cryptoKeys/inventory"
    with FakeKms.start(key_name) as fake:
        first = fake.primary_of(key_name)
        made = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        fake.set_created(first, made)
        async with throwaway_database("inventory_gcp") as db:
            env = {
                **vault_env,
                "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database),
                "TESSERA_VAULT_MIGRATION_URL": dsn(db.owner, db.database),
                "TESSERA_VAULT_KMS_PROVIDER": "gcp",
                "TESSERA_VAULT_GCP_KMS_KEY_NAME": key_name,
                "TESSERA_VAULT_GCP_KMS_ENDPOINT": fake.address,
            }
            gcp = start_service("vault", env, tmp_path)
            try:
                merchant_with_cards(gcp, admin, 2)
                body = inventory(gcp, admin)
                [listed] = body["kek"]["versions"]
                assert (listed["name"], listed["state"], listed["primary"]) == (
                    first,
                    "enabled",
                    True,
                )
                assert listed["created"] == int(made.timestamp())
                assert listed["data_keys"] == {"audit": 1, "card": 1, "fingerprint": 1}
                assert body["kek"]["provider"] == "gcp"
                unwrapped = body["unwrap"]
                assert (unwrapped["checked"], unwrapped["ok"], unwrapped["failed"]) == (3, 3, 0)

                fake.fail_next(1, grpc.StatusCode.PERMISSION_DENIED, method="ListCryptoKeyVersions")
                refused = inventory(gcp, admin)
                assert refused["kek"]["versions"] == []
                assert refused["kek"]["versions_error"] == "kms_error"
                assert refused["unwrap"]["ok"] == 3  # the rest of the inventory still stands

                admin_post(gcp, admin, "/v1/keys/rotate")
                fake.set_state(first, State.DISABLED)  # too early: nothing was rewrapped
                settings = EvidenceSettings(vault_url=gcp.url, vault_admin_token=admin)
                ctx = EvidenceContext(settings, datetime.datetime.now(datetime.UTC), ROOT, tmp_path)
                try:
                    result = await keys_check.run(ctx)
                finally:
                    await ctx.close()
            finally:
                gcp.stop()
    assert result.status == Status.FAILED
    assert result.summary.startswith(
        f"3 data key(s) wrapped under KEK version {first}, which is disabled; "
        "3 of 3 data keys do not unwrap under the KMS (kms_error: 3)"
    )
    ages = {v["name"]: v["age_days"] for v in result.evidence["kek"]["versions"]}
    assert 30 <= ages[first] < 31
