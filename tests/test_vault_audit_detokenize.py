"""The audit trail as the running vault writes it, and break-glass detokenize.

One vault process of this module's own, with its own database, keyring and Redis database, so
that tampering with the log, revoking the runtime role's INSERT, rotating keys and spending the
detokenize budget (2 a minute here) never disturb the session's vault.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from core.cards import luhn_valid
from core.ids import new_random_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import (
    PG_ADMIN_URL,
    REDIS_BASE,
    VaultMerchant,
    dsn,
    register_vault_merchant,
    start_service,
)
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from vault.crypto import dek_aad
from vault.kms.base import WrappedKey
from vault.kms.local import LocalKms

PATH = "/v1/authorizations"
EXP_MONTH, EXP_YEAR = 7, datetime.date.today().year + 3
#: This module's vault allows this many detokenizations a minute.
DETOKENIZE_PER_MINUTE = 2
#: A Redis database nobody else in the suite uses (the API has 0, the vault 1, the tests 14/15).
REDIS_DB = 13
REASON = "chargeback 7731 needs the full card number"


def random_pan() -> str:
    body = "4" + "".join(secrets.choice("0123456789") for _ in range(14))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@dataclass
class AuditVault:
    process: ServiceProcess
    db: ServiceDatabase
    keyring: str
    shop: VaultMerchant
    other: VaultMerchant
    service: str
    admin: str

    @property
    def url(self) -> str:
        return self.process.url

    def as_service(self, merchant: VaultMerchant, request_id: str | None) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.service}", "tessera-merchant": merchant.id}
        return {**headers, "request-id": request_id} if request_id else headers

    def as_admin(self, request_id: str | None = None) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.admin}"}
        return {**headers, "request-id": request_id} if request_id else headers

    def tokenize(self, pan: str, *, cvc: str | None = None, name: str | None = None) -> str:
        card: dict[str, Any] = {"number": pan, "exp_month": EXP_MONTH, "exp_year": EXP_YEAR}
        card.update({k: v for k, v in (("cvc", cvc), ("name", name)) if v is not None})
        response = httpx.post(
            self.url + "/v1/tokens",
            json=card,
            headers={"authorization": f"Bearer {self.shop.publishable_key}"},
        )
        assert response.status_code == 201, response.text
        token: str = response.json()["id"]
        return token

    def read(self, token: str, request_id: str | None = None) -> httpx.Response:
        return httpx.get(
            f"{self.url}/v1/tokens/{token}", headers=self.as_service(self.shop, request_id)
        )

    def delete(self, token: str, request_id: str | None = None) -> httpx.Response:
        return httpx.delete(
            f"{self.url}/v1/tokens/{token}", headers=self.as_service(self.shop, request_id)
        )

    def forward(
        self,
        token: str,
        request_id: str | None = None,
        merchant: VaultMerchant | None = None,
    ) -> httpx.Response:
        request = {
            "destination": "echo",
            "path": PATH,
            "token": token,
            "body": {"number": "{{card.number}}", "cvc": "{{card.cvc}}"},
        }
        return httpx.post(
            self.url + "/v1/forward",
            json=request,
            headers=self.as_service(merchant or self.shop, request_id),
            timeout=15,
        )

    def detokenize(self, body: dict[str, Any], request_id: str | None = None) -> httpx.Response:
        return httpx.post(self.url + "/v1/detokenize", json=body, headers=self.as_admin(request_id))

    def admin_call(self, method: str, path: str, request_id: str | None = None) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=self.as_admin(request_id), timeout=30)


@pytest.fixture(scope="module")
async def audit_vault(
    vault_env: dict[str, str],
    tokens: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AuditVault]:
    keyring = tmp_path_factory.mktemp("audit-kms") / "keyring.json"
    LocalKms.create_keyring(keyring)
    db = ServiceDatabase("vault", f"tessera_vault_auditlog_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    extra = {
        "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database),
        "TESSERA_VAULT_MIGRATION_URL": dsn(db.owner, db.database),
        "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring),
        "TESSERA_VAULT_REDIS_URL": f"{REDIS_BASE}/{REDIS_DB}",
        "TESSERA_VAULT_DETOKENIZE_PER_MINUTE": str(DETOKENIZE_PER_MINUTE),
    }
    process = start_service("vault", vault_env, tmp_path_factory.mktemp("audit-vault"), extra)
    try:
        yield AuditVault(
            process,
            db,
            str(keyring),
            register_vault_merchant(process, tokens["admin"]),
            register_vault_merchant(process, tokens["admin"]),
            tokens["service"],
            tokens["admin"],
        )
    finally:
        process.stop()
        await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(autouse=True)
def fresh_state(psp_echo: EchoServer) -> Iterator[None]:
    """A quiet echo PSP, and this module's Redis database empty: a new detokenize budget."""
    client = redis.Redis.from_url(f"{REDIS_BASE}/{REDIS_DB}")
    client.flushdb()
    client.close()
    psp_echo.reset()
    yield
    psp_echo.reset()


@pytest.fixture
async def owner(audit_vault: AuditVault) -> AsyncIterator[asyncpg.Connection]:
    """The table owner: can read everything, tamper, and change grants."""
    conn = await asyncpg.connect(dsn(audit_vault.db.owner, audit_vault.db.database))
    yield conn
    await conn.close()


def request_id(label: str) -> str:
    return f"test-{label}-{secrets.token_hex(6)}"


async def records(owner: asyncpg.Connection, rid: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await owner.fetch(
        "SELECT chain_id, seq, actor, action, outcome, token_hmac, detail::text AS detail "
        "FROM audit_log WHERE request_id = $1 ORDER BY occurred_at, chain_id, seq",
        rid,
    )
    return rows


async def audit_key(owner: asyncpg.Connection, keyring: str) -> bytes:
    row = await owner.fetchrow(
        "SELECT id, wrapped_key, kek_version FROM data_keys WHERE purpose = 'audit'"
    )
    assert row is not None
    return await LocalKms.open(keyring).unwrap(
        WrappedKey(row["wrapped_key"], row["kek_version"]), aad=dek_aad(row["id"], "audit", None)
    )


def verify(audit_vault: AuditVault) -> dict[str, Any]:
    response = audit_vault.admin_call("GET", "/v1/audit/verify")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


# --- every audited operation leaves its record ------------------------------------------------

OPERATIONS = ["metadata read", "forward", "detokenize", "delete", "rotation", "rewrap", "verify"]


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_each_audited_operation_appends_records_naming_the_token_only_by_hmac(
    audit_vault: AuditVault, owner: asyncpg.Connection, operation: str
) -> None:
    token = audit_vault.tokenize(random_pan(), cvc="123")
    rid = request_id(operation.replace(" ", "-"))
    expected: list[tuple[str, str, str, bool, dict[str, Any]]]  # actor, action, outcome, token?
    if operation == "metadata read":
        response = audit_vault.read(token, rid)
        expected = [("service", "token.read", "success", True, {})]
    elif operation == "forward":
        response = audit_vault.forward(token, rid)
        where = {"destination": "echo", "path": PATH}
        expected = [
            ("service", "forward", "started", True, where),
            ("service", "forward", "completed", True, {**where, "status": 200}),
        ]
    elif operation == "detokenize":
        response = audit_vault.detokenize({"token": token, "reason": REASON}, rid)
        expected = [("admin", "detokenize", "success", True, {"reason": REASON})]
    elif operation == "delete":
        response = audit_vault.delete(token, rid)
        expected = [("service", "token.delete", "requested", True, {})]
    elif operation == "rotation":
        response = audit_vault.admin_call("POST", "/v1/keys/rotate", rid)
        expected = [("admin", "keys.rotate", "requested", False, {})]
    elif operation == "rewrap":
        response = audit_vault.admin_call("POST", "/v1/keys/rewrap", rid)
        expected = [("admin", "keys.rewrap", "requested", False, {})]
    else:
        response = audit_vault.admin_call("GET", "/v1/audit/verify", rid)
        expected = [("admin", "audit.verify", "ok", False, {})]
    assert response.status_code == 200, response.text
    assert response.headers["request-id"] == rid

    rows = await records(owner, rid)

    mac = hmac.new(await audit_key(owner, audit_vault.keyring), token.encode(), hashlib.sha256)
    assert [
        (r["actor"], r["action"], r["outcome"], r["token_hmac"], json.loads(r["detail"]))
        for r in rows
    ] == [
        (actor, action, outcome, mac.digest() if names_token else None, detail)
        for actor, action, outcome, names_token, detail in expected
    ]
    raw = await owner.fetchval(
        "SELECT count(*) FROM audit_log AS a WHERE strpos(a::text, $1) > 0", token
    )
    assert raw == 0


async def test_a_forward_recorded_as_started_is_recorded_again_with_how_it_ended(
    audit_vault: AuditVault, owner: asyncpg.Connection, psp_echo: EchoServer
) -> None:
    """docs/vault.md: a forward is audited "before the card is decrypted, and again with the
    outcome". Here it ends in a 404 (another merchant's token) after the first record."""
    token = audit_vault.tokenize(random_pan())
    rid = request_id("forward-refused")

    response = audit_vault.forward(token, rid, merchant=audit_vault.other)

    assert response.status_code == 404, response.text
    assert psp_echo.received == []
    outcomes = [(r["action"], r["outcome"]) for r in await records(owner, rid)]
    assert outcomes[:1] == [("forward", "started")]
    assert len(outcomes) == 2, outcomes
    assert outcomes[1][1] != "started", outcomes


# --- verification and tampering ----------------------------------------------------------------


@pytest.mark.parametrize(("tampering", "problem"), [("edit", "hash_mismatch"), ("delete", "gap")])
async def test_verify_reports_the_first_broken_link_after_tampering(
    audit_vault: AuditVault, owner: asyncpg.Connection, tampering: str, problem: str
) -> None:
    token = audit_vault.tokenize(random_pan())
    for _ in range(20):  # enough records that every chain has more than one
        assert audit_vault.read(token).status_code == 200
    intact = verify(audit_vault)
    assert intact["ok"] is True
    assert intact["broken"] == []
    assert len(intact["chains"]) == 16
    assert intact["records"] >= 20
    # A record that is not the last of its chain.
    victim = await owner.fetchrow(
        "SELECT * FROM audit_log AS a WHERE a.action = 'token.read' AND EXISTS "
        "(SELECT 1 FROM audit_log AS b WHERE b.chain_id = a.chain_id AND b.seq = a.seq + 1) "
        "ORDER BY occurred_at DESC LIMIT 1"
    )
    assert victim is not None
    where = "WHERE chain_id = $1 AND seq = $2"
    try:
        if tampering == "edit":
            await owner.execute(
                f"UPDATE audit_log SET action = 'token.create' {where}",
                victim["chain_id"],
                victim["seq"],
            )
        else:
            await owner.execute(f"DELETE FROM audit_log {where}", victim["chain_id"], victim["seq"])

        report = verify(audit_vault)

        assert report["ok"] is False
        assert [(b["chain_id"], b["seq"], b["problem"]) for b in report["broken"]] == [
            (victim["chain_id"], victim["seq"], problem)
        ]
    finally:
        if tampering == "edit":
            await owner.execute(
                f"UPDATE audit_log SET action = $3 {where}",
                victim["chain_id"],
                victim["seq"],
                victim["action"],
            )
        else:
            columns = list(victim.keys())
            placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
            await owner.execute(
                f"INSERT INTO audit_log ({', '.join(columns)}) VALUES ({placeholders})",
                *victim.values(),
            )
    assert verify(audit_vault)["ok"] is True


# --- fail closed ---------------------------------------------------------------------------------


async def test_nothing_happens_while_the_audit_log_cannot_be_written(
    audit_vault: AuditVault, owner: asyncpg.Connection, psp_echo: EchoServer
) -> None:
    pan = random_pan()
    token = audit_vault.tokenize(pan, cvc="909")
    primary = await LocalKms.open(audit_vault.keyring).primary_version()
    await owner.execute("REVOKE INSERT ON audit_log FROM tessera_vault")
    try:
        refused = {
            "metadata read": audit_vault.read(token),
            "forward": audit_vault.forward(token),
            "detokenize": audit_vault.detokenize({"token": token, "reason": REASON}),
            "delete": audit_vault.delete(token),
            "rotation": audit_vault.admin_call("POST", "/v1/keys/rotate"),
            "rewrap": audit_vault.admin_call("POST", "/v1/keys/rewrap"),
        }
    finally:
        await owner.execute("GRANT INSERT ON audit_log TO tessera_vault")

    for name, response in refused.items():
        assert response.status_code == 503, (name, response.text)
        assert response.json()["error"]["code"] == "service_unavailable", name
        assert pan not in response.text, name
    assert psp_echo.received == []
    assert await LocalKms.open(audit_vault.keyring).primary_version() == primary
    # None of it happened: the token is alive, and its CVC still waits for the first charge.
    assert audit_vault.forward(token).status_code == 200
    assert json.loads(psp_echo.received[0].body) == {"number": pan, "cvc": "909"}


# --- break-glass detokenize ----------------------------------------------------------------


async def test_detokenize_gives_an_administrator_the_card_but_never_the_cvc(
    audit_vault: AuditVault, psp_echo: EchoServer
) -> None:
    pan = random_pan()
    token = audit_vault.tokenize(pan, cvc="555", name="Grace Hopper")

    response = audit_vault.detokenize({"token": token, "reason": REASON})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "detokenized_card",
        "token": token,
        "number": pan,
        "exp_month": EXP_MONTH,
        "exp_year": EXP_YEAR,
        "name": "Grace Hopper",
    }
    as_service = httpx.post(
        audit_vault.url + "/v1/detokenize",
        json={"token": token, "reason": REASON},
        headers=audit_vault.as_service(audit_vault.shop, None),
    )
    assert as_service.status_code == 403, as_service.text
    # The CVC was neither shown nor used up.
    assert audit_vault.forward(token).status_code == 200
    assert json.loads(psp_echo.received[0].body)["cvc"] == "555"


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (None, "parameter_missing"),
        ("", "parameter_invalid"),
        ("too short", "parameter_invalid"),  # 9 characters
        ("customer says 4111 1111 1111 1111 is theirs", "parameter_invalid"),
        ("x" * 501, "parameter_invalid"),
    ],
    ids=["missing", "empty", "shorter than 10", "with a card number", "longer than 500"],
)
async def test_detokenize_needs_a_reason_of_10_to_500_characters_without_card_data(
    audit_vault: AuditVault, reason: str | None, code: str
) -> None:
    pan = random_pan()
    token = audit_vault.tokenize(pan)
    body = {"token": token} if reason is None else {"token": token, "reason": reason}

    response = audit_vault.detokenize(body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        code,
        "reason",
    )
    assert pan not in response.text
    assert "4111 1111" not in response.text


@pytest.mark.parametrize("which", ["malformed", "unknown", "deleted"])
async def test_detokenize_of_a_token_that_is_not_live_is_not_found(
    audit_vault: AuditVault, which: str
) -> None:
    token = {"malformed": "tok_123", "unknown": new_random_id("tok")}.get(which)
    if token is None:
        token = audit_vault.tokenize(random_pan())
        assert audit_vault.delete(token).status_code == 200

    response = audit_vault.detokenize({"token": token, "reason": REASON})

    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "resource_missing"


async def test_detokenize_beyond_the_limit_per_minute_is_429_and_audited(
    audit_vault: AuditVault, owner: asyncpg.Connection
) -> None:
    token = audit_vault.tokenize(random_pan())
    if time.time() % 60 > 57:  # all calls must fall in one minute window
        time.sleep(60 - time.time() % 60 + 0.05)
    for _ in range(DETOKENIZE_PER_MINUTE):
        assert audit_vault.detokenize({"token": token, "reason": REASON}).status_code == 200
    rid = request_id("detokenize-limited")

    response = audit_vault.detokenize({"token": token, "reason": REASON}, rid)

    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limited")
    assert "number" not in response.json()
    outcomes = [(r["actor"], r["action"], r["outcome"]) for r in await records(owner, rid)]
    assert outcomes == [("admin", "detokenize", "rate_limited")]
