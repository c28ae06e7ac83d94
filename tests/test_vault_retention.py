"""Card retention (PCI DSS 3.2.1): the vault's worker crypto-shreds tokens unused longer than
their merchant's period, each shredding audited; a forward keeps a card alive.

Tokens are made through the session's vault and aged by moving `last_used_at` back as the owner
role (the runtime role may only move it forward). The sweep runs in-process against the real
database, Redis and keyring (`open_context`, as `python -m vault worker` builds it), and as real
worker processes for the lease, the heartbeat and SIGTERM.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from core.ids import new_id
from tessera.dbsetup import AUDITOR_ROLE, ServiceDatabase
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.evidence import load_check, run_check
from tessera.pci.model import ControlResult, Status
from tessera.runtime.settings import SettingsError, load_settings
from tests.conftest import dsn
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from vault import retention
from vault.settings import VaultWorkerSettings
from vault.worker import JobResult, WorkerContext, jobs, open_context, run_job

EXP_YEAR = datetime.date.today().year + 3


# --- helpers ---------------------------------------------------------------------------------


def register(vault: ServiceProcess, admin_token: str, days: int | None) -> tuple[str, str]:
    """A merchant of the vault's own registry, with its retention period (None: the default)."""
    merchant_id = new_id("mer")
    publishable = f"pk_test_{secrets.token_hex(24)}"
    body: dict[str, Any] = {"id": merchant_id, "publishable_key": publishable}
    if days is not None:
        body["card_retention_days"] = days
    response = httpx.post(
        vault.url + "/v1/merchants", json=body, headers={"authorization": f"Bearer {admin_token}"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["card_retention_days"] == days
    return merchant_id, publishable


def tokenize(vault: ServiceProcess, publishable: str, *, cvc: str | None = None) -> str:
    card: dict[str, Any] = {"number": "4242424242424242", "exp_month": 12, "exp_year": EXP_YEAR}
    if cvc:
        card["cvc"] = cvc
    response = httpx.post(
        vault.url + "/v1/tokens", json=card, headers={"authorization": f"Bearer {publishable}"}
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["id"]
    return token


async def owner(databases: dict[str, ServiceDatabase]) -> asyncpg.Connection:
    db = databases["vault"]
    return await asyncpg.connect(dsn(db.owner, db.database))


async def age(databases: dict[str, ServiceDatabase], token_ids: list[str], days: float) -> None:
    """Make the tokens look unused for `days` (as the owner: only it may move the clock back)."""
    conn = await owner(databases)
    try:
        await conn.execute(
            "UPDATE tokens SET last_used_at = now() - make_interval(secs => $2) WHERE id = ANY($1)",
            token_ids,
            days * 86400,
        )
    finally:
        await conn.close()


async def rows(databases: dict[str, ServiceDatabase], token_ids: list[str]) -> dict[str, Any]:
    conn = await owner(databases)
    try:
        found = await conn.fetch("SELECT * FROM tokens WHERE id = ANY($1)", token_ids)
    finally:
        await conn.close()
    return {row["id"]: row for row in found}


async def shred_records(
    databases: dict[str, ServiceDatabase], ctx: WorkerContext, token_id: str
) -> list[Any]:
    conn = await owner(databases)
    try:
        return list(
            await conn.fetch(
                "SELECT actor, action, outcome, request_id, detail::text AS detail FROM audit_log "
                "WHERE token_hmac = $1 ORDER BY occurred_at",
                ctx.audit.token_hmac(token_id),
            )
        )
    finally:
        await conn.close()


async def sweeps_since(
    databases: dict[str, ServiceDatabase], since: datetime.datetime
) -> list[Any]:
    conn = await owner(databases)
    try:
        return list(
            await conn.fetch(
                "SELECT outcome, detail::text AS detail FROM audit_log "
                "WHERE action = 'retention.sweep' AND occurred_at >= $1 ORDER BY occurred_at",
                since,
            )
        )
    finally:
        await conn.close()


def worker_settings(
    databases: dict[str, ServiceDatabase], redis_urls: dict[str, str], kms_path: str
) -> VaultWorkerSettings:
    db = databases["vault"]
    return VaultWorkerSettings(
        database_url=dsn(db.runtime, db.database),
        redis_url=redis_urls["vault"],
        local_kms_path=kms_path,
    )


async def sweep(ctx: WorkerContext) -> JobResult:
    (job,) = [job for job in jobs(ctx.settings) if job.name == "retention"]
    result = await run_job(ctx, job)
    assert result is not None, "the sweep failed (see the log)"
    return result


@pytest.fixture(scope="module")
async def ctx(
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    local_kms_path: str,
    vault: ServiceProcess,
) -> AsyncIterator[WorkerContext]:
    settings = worker_settings(databases, redis_urls, local_kms_path)
    async with open_context(settings, asyncio.Event()) as context:
        yield context


@pytest.fixture(scope="module")
def vault_redis(redis_urls: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(redis_urls["vault"])


# --- the sweep -------------------------------------------------------------------------------


async def test_a_token_past_retention_is_shredded_by_one_run_audited_and_its_cvc_gone(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    ctx: WorkerContext,
    vault_redis: redis.Redis,
) -> None:
    merchant_id, publishable = register(vault, tokens["admin"], None)
    expired = tokenize(vault, publishable, cvc="123")
    almost = tokenize(vault, publishable)
    fresh = tokenize(vault, publishable)
    assert vault_redis.exists(f"vault:cvc:{expired}")
    await age(databases, [expired], 401)
    await age(databases, [almost], 399)
    started = datetime.datetime.now(datetime.UTC)

    result = await sweep(ctx)

    assert result.done >= 1
    assert result.detail["default_days"] == 400
    after = await rows(databases, [expired, almost, fresh])
    gone = after[expired]
    assert gone["deleted_at"] is not None
    assert (gone["ciphertext"], gone["nonce"], gone["data_key_id"]) == (None, None, None)
    assert (gone["merchant_id"], gone["last4"]) == (merchant_id, "4242"), "the tombstone stays"
    assert not vault_redis.exists(f"vault:cvc:{expired}"), "the held CVC goes with the card"
    for kept in (almost, fresh):
        assert after[kept]["deleted_at"] is None
        assert after[kept]["ciphertext"] is not None

    (record,) = await shred_records(databases, ctx, expired)
    assert (record["actor"], record["action"], record["outcome"]) == (
        "worker:retention",
        "token.shred",
        "retention_expired",
    )
    assert json.loads(record["detail"]) == {"days_unused": 401, "retention_days": 400}
    assert await shred_records(databases, ctx, almost) == []
    (summary,) = await sweeps_since(databases, started)
    assert summary["outcome"] == "ok"
    assert json.loads(summary["detail"])["shredded"] == result.done
    metadata = httpx.get(
        f"{vault.url}/v1/tokens/{expired}",
        headers={"authorization": f"Bearer {tokens['service']}", "tessera-merchant": merchant_id},
    )
    assert metadata.status_code == 404


async def test_a_merchants_own_period_is_honoured_shorter_and_longer(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    ctx: WorkerContext,
) -> None:
    _, short_key = register(vault, tokens["admin"], 30)
    _, long_key = register(vault, tokens["admin"], 1000)
    _, default_key = register(vault, tokens["admin"], None)
    short, short_fresh = tokenize(vault, short_key), tokenize(vault, short_key)
    long, default = tokenize(vault, long_key), tokenize(vault, default_key)
    await age(databases, [short, long, default], 401)
    await age(databases, [short_fresh], 29)

    await sweep(ctx)

    after = await rows(databases, [short, short_fresh, long, default])
    assert after[short]["deleted_at"] is not None
    assert after[default]["deleted_at"] is not None
    assert after[short_fresh]["deleted_at"] is None, "29 days is within the merchant's 30"
    assert after[long]["deleted_at"] is None, "401 days is within the merchant's 1000"
    (record,) = await shred_records(databases, ctx, short)
    assert json.loads(record["detail"]) == {"days_unused": 401, "retention_days": 30}

    await age(databases, [long], 1001)
    await sweep(ctx)
    assert (await rows(databases, [long]))[long]["deleted_at"] is not None


async def test_two_sweeps_at_once_shred_each_token_once_with_one_record_each(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    ctx: WorkerContext,
    redis_urls: dict[str, str],
    local_kms_path: str,
) -> None:
    _, publishable = register(vault, tokens["admin"], 7)
    due = [tokenize(vault, publishable) for _ in range(40)]
    await age(databases, due, 8)
    settings = worker_settings(databases, redis_urls, local_kms_path)

    async with open_context(settings, asyncio.Event()) as other:
        first, second = await asyncio.gather(
            retention.sweep(ctx), retention.sweep(other), return_exceptions=False
        )

    assert first.done + second.done >= len(due)
    after = await rows(databases, due)
    assert all(row["deleted_at"] is not None for row in after.values())
    for token_id in due:
        assert len(await shred_records(databases, ctx, token_id)) == 1, token_id


async def test_a_sweep_told_to_stop_records_an_interrupted_sweep(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    local_kms_path: str,
) -> None:
    _, publishable = register(vault, tokens["admin"], 7)
    due = tokenize(vault, publishable)
    await age(databases, [due], 8)
    started = datetime.datetime.now(datetime.UTC)
    stop = asyncio.Event()
    settings = worker_settings(databases, redis_urls, local_kms_path)
    async with open_context(settings, stop) as stopping:
        stop.set()
        result = await retention.sweep(stopping)
    assert result.detail["complete"] is False
    (summary,) = await sweeps_since(databases, started)
    assert summary["outcome"] == "interrupted"
    assert (await rows(databases, [due]))[due]["deleted_at"] is None, "left for the next sweep"
    await age(databases, [due], 0)  # no longer due: the other tests' sweeps leave it alone


# --- the worker process ----------------------------------------------------------------------


def worker_env(
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    kms_path: str,
    heartbeat: Path,
    port: int,
) -> dict[str, str]:
    db = databases["vault"]
    return {
        "TESSERA_MODE": "development",
        "TESSERA_VAULT_DATABASE_URL": dsn(db.runtime, db.database),
        "TESSERA_VAULT_REDIS_URL": redis_urls["vault"],
        "TESSERA_VAULT_LOCAL_KMS_PATH": kms_path,
        "TESSERA_VAULT_WORKER_POLL_SECONDS": "0.1",
        "TESSERA_VAULT_WORKER_HEARTBEAT_PATH": str(heartbeat),
        "TESSERA_VAULT_PORT": str(port),
    }


async def test_two_worker_processes_run_the_sweep_once_per_interval_and_stop_on_sigterm(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    redis_urls: dict[str, str],
    local_kms_path: str,
    ctx: WorkerContext,
    tmp_path: Path,
) -> None:
    _, publishable = register(vault, tokens["admin"], None)
    due = [tokenize(vault, publishable) for _ in range(5)]
    await age(databases, due, 500)
    conn = await owner(databases)
    try:
        # Due now, whatever ran before (the other jobs keep their schedule).
        await conn.execute("DELETE FROM worker_jobs WHERE name = 'retention'")
    finally:
        await conn.close()
    started = datetime.datetime.now(datetime.UTC)
    workers = [
        ServiceProcess(
            "vault",
            worker_env(databases, redis_urls, local_kms_path, tmp_path / f"beat-{n}", vault.port),
            0,
            tmp_path / f"worker-{n}.log",
            args=["worker"],
        ).start(ready_path="")
        for n in range(2)
    ]
    try:
        beats = [tmp_path / f"beat-{n}" for n in range(2)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = await rows(databases, due)
            if all(row["deleted_at"] is not None for row in after.values()) and all(
                beat.exists() for beat in beats
            ):
                break
            await asyncio.sleep(0.1)
        assert all(row["deleted_at"] is not None for row in after.values()), workers[0].output()
        for beat, worker in zip(beats, workers, strict=True):  # alive and polling every 0.1 s
            first = beat.stat().st_mtime_ns
            await asyncio.sleep(0.5)
            assert beat.stat().st_mtime_ns > first, worker.output()
    finally:
        codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], [worker.output() for worker in workers]
    assert len(await sweeps_since(databases, started)) == 1, (
        "one sweep per interval, not per worker"
    )
    for token_id in due:
        assert len(await shred_records(databases, ctx, token_id)) == 1
    conn = await owner(databases)
    try:
        job = await conn.fetchrow("SELECT * FROM worker_jobs WHERE name = 'retention'")
    finally:
        await conn.close()
    assert job is not None
    assert job["last_outcome"] == "ok"
    assert job["next_run_at"] - job["last_started_at"] == datetime.timedelta(hours=1)
    lines = [json.loads(line) for w in workers for line in w.output().splitlines()]
    assert sum(line["message"] == "worker_stopped" for line in lines) == 2
    assert [
        line for line in lines if line.get("job") == "retention" and line["level"] != "info"
    ] == []


# --- a forward keeps a card ------------------------------------------------------------------


async def test_a_forward_refreshes_last_used_at_at_most_once_a_day(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    psp_echo: EchoServer,
) -> None:
    merchant_id, publishable = register(vault, tokens["admin"], None)
    token_id = tokenize(vault, publishable)

    def forward() -> None:
        response = httpx.post(
            vault.url + "/v1/forward",
            json={
                "destination": "echo",
                "method": "POST",
                "path": "/v1/authorizations",
                "token": token_id,
                "body": {"amount": 100, "card": {"number": "{{card.number}}"}},
            },
            headers={
                "authorization": f"Bearer {tokens['service']}",
                "tessera-merchant": merchant_id,
            },
            timeout=15,
        )
        assert response.status_code == 200, response.text

    async def last_used() -> datetime.datetime:
        value: datetime.datetime = (await rows(databases, [token_id]))[token_id]["last_used_at"]
        return value

    await age(databases, [token_id], 2)
    aged = await last_used()
    forward()
    bumped = await last_used()
    assert bumped - aged > datetime.timedelta(days=1, hours=23), "a forward is a use"
    forward()
    assert await last_used() == bumped, "at most one write a day"

    await age(databases, [token_id], 0.9)
    within_a_day = await last_used()
    forward()
    assert await last_used() == within_a_day


# --- what may set and change it --------------------------------------------------------------


@pytest.mark.parametrize("days", [0, 6, 3651])
def test_a_merchants_period_out_of_range_is_refused(
    vault: ServiceProcess, tokens: dict[str, str], days: Any
) -> None:
    response = httpx.post(
        vault.url + "/v1/merchants",
        json={
            "id": new_id("mer"),
            "publishable_key": f"pk_test_{secrets.token_hex(24)}",
            "card_retention_days": days,
        },
        headers={"authorization": f"Bearer {tokens['admin']}"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "card_retention_days"


async def test_the_runtime_role_moves_last_use_only_forward_and_changes_nothing_else(
    vault: ServiceProcess, tokens: dict[str, str], databases: dict[str, ServiceDatabase]
) -> None:
    _, publishable = register(vault, tokens["admin"], None)
    token_id = tokenize(vault, publishable)
    await age(databases, [token_id], 3)
    db = databases["vault"]
    runtime = await asyncpg.connect(dsn(db.runtime, db.database))
    try:
        for change in (
            "last_used_at = last_used_at - interval '1 day'",
            "last_used_at = now() + interval '1 hour'",
            "last_used_at = now(), ciphertext = '\\x00'::bytea",
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await runtime.execute(f"UPDATE tokens SET {change} WHERE id = $1", token_id)
        # brand is updatable since migration 0006 (a card update), never on its own
        with pytest.raises(asyncpg.CheckViolationError):
            await runtime.execute("UPDATE tokens SET brand = 'amex' WHERE id = $1", token_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute("UPDATE merchants SET card_retention_days = 3650")
        assert (
            await runtime.execute("UPDATE tokens SET last_used_at = now() WHERE id = $1", token_id)
            == "UPDATE 1"
        )
    finally:
        await runtime.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TESSERA_VAULT_CARD_RETENTION_DAYS", "6"),
        ("TESSERA_VAULT_CARD_RETENTION_DAYS", "3651"),
        ("TESSERA_VAULT_RETENTION_INTERVAL_SECONDS", "10"),
    ],
)
def test_the_workers_settings_refuse_a_period_out_of_range(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(VaultWorkerSettings, {variable: value})


def test_production_refuses_the_workers_development_parts() -> None:
    env = {"TESSERA_MODE": "production", "TESSERA_VAULT_REDIS_URL": "redis://10.0.0.5:6379/0"}
    with pytest.raises(SettingsError) as refused:
        load_settings(VaultWorkerSettings, env)
    assert "TESSERA_VAULT_KMS_PROVIDER=local" in str(refused.value)
    assert "TESSERA_VAULT_REDIS_URL must use TLS" in str(refused.value)


# --- the assessor's kit: control `retention` -------------------------------------------------


async def judge(
    databases: dict[str, ServiceDatabase], now: datetime.datetime, tmp_path: Path
) -> ControlResult:
    db = databases["vault"]
    settings = EvidenceSettings(vault_database_url=dsn(AUDITOR_ROLE, db.database))
    ctx = EvidenceContext(settings, now, tmp_path, tmp_path / "out")
    try:
        return await run_check(load_check("retention"), ctx)
    finally:
        await ctx.close()


async def test_the_control_fails_a_token_past_retention_until_one_sweep_shreds_it(
    vault: ServiceProcess,
    tokens: dict[str, str],
    databases: dict[str, ServiceDatabase],
    ctx: WorkerContext,
    tmp_path: Path,
) -> None:
    await sweep(ctx)  # whatever earlier tests left, and a fresh retention.sweep record
    merchant_id, publishable = register(vault, tokens["admin"], 30)
    token_id = tokenize(vault, publishable)
    await age(databases, [token_id], 45)

    result = await judge(databases, datetime.datetime.now(datetime.UTC), tmp_path)

    assert result.status == Status.FAILED, result.summary
    assert "1 live token(s) of 1 merchant(s)" in result.summary
    assert "overdue for shredding" in result.summary
    (entry,) = result.evidence["overdue"]["by_merchant"]
    assert (entry["merchant_id"], entry["retention_days"], entry["overdue"]) == (
        merchant_id,
        30,
        1,
    )
    assert "tok_" not in json.dumps(result.evidence), "no token id in the evidence"
    assert {"merchant_id": merchant_id, "retention_days": 30} in result.evidence["policy"][
        "own_periods"
    ]

    await sweep(ctx)
    result = await judge(databases, datetime.datetime.now(datetime.UTC), tmp_path)

    assert result.status == Status.PASSED, result.summary
    assert result.evidence["overdue"]["tokens"] == 0
    assert result.evidence["last_sweep"]["outcome"] == "ok"
    assert result.evidence["last_30_days"]["retention_shreds"] >= 1


async def test_the_control_fails_when_the_sweep_has_not_run_for_two_intervals(
    databases: dict[str, ServiceDatabase], ctx: WorkerContext, tmp_path: Path
) -> None:
    await sweep(ctx)
    now = datetime.datetime.now(datetime.UTC)

    assert (await judge(databases, now + datetime.timedelta(hours=1), tmp_path)).status == (
        Status.PASSED
    )
    late = await judge(databases, now + datetime.timedelta(hours=2, minutes=1), tmp_path)

    assert late.status == Status.FAILED
    assert late.summary.startswith("the sweep is not running: the last retention.sweep was")
    before = await judge(databases, now - datetime.timedelta(days=31), tmp_path)
    assert "no retention.sweep record in the last 30 days" in before.summary
