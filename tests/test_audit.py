"""The vault's audit log: append-only by grants, hash-chained, fail-closed, free of token ids.

Runs against its own throwaway database (all vault migrations applied by the real runner), so
tampering here never disturbs the session's shared vault database.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from core.errors import ServiceUnavailable
from core.ids import IdPrefix, new_id
from tessera.dbsetup import ServiceDatabase, drop_database, ensure_roles_and_databases
from tessera.runtime.migrations import migrate
from tests.conftest import PG_ADMIN_URL, dsn
from tests.support.processes import free_port
from vault.audit import (
    CHAINS,
    GENESIS_HASH,
    AuditLog,
    AuditUnavailable,
    Problem,
    export,
    verify,
)

KEY = b"k" * 32
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
async def audit_db() -> AsyncIterator[ServiceDatabase]:
    db = ServiceDatabase("vault", f"tessera_vault_audit_{secrets.token_hex(4)}")
    await ensure_roles_and_databases(PG_ADMIN_URL, [db])
    await migrate(dsn(db.owner, db.database), "vault.migrations")
    yield db
    await drop_database(PG_ADMIN_URL, db.database)


@pytest.fixture(scope="module")
async def pool(audit_db: ServiceDatabase) -> AsyncIterator[asyncpg.Pool]:
    """The vault's runtime role, as the service connects: a small pool."""
    created = await asyncpg.create_pool(
        dsn(audit_db.runtime, audit_db.database), min_size=8, max_size=8
    )
    yield created
    await created.close()


@pytest.fixture(scope="module")
async def owner(audit_db: ServiceDatabase) -> AsyncIterator[asyncpg.Connection]:
    """The migration role: the one that can tamper (and clean up between tests)."""
    conn = await asyncpg.connect(dsn(audit_db.owner, audit_db.database))
    yield conn
    await conn.close()


@pytest.fixture
async def log(pool: asyncpg.Pool, owner: asyncpg.Connection) -> AuditLog:
    await owner.execute("TRUNCATE audit_log")
    await owner.execute("UPDATE audit_chain_heads SET last_seq = 0, last_hash = $1", GENESIS_HASH)
    return AuditLog(pool, KEY)


async def connect_runtime(db: ServiceDatabase) -> asyncpg.Connection:
    return await asyncpg.connect(dsn(db.runtime, db.database))


async def append_reads(log: AuditLog, count: int) -> None:
    for i in range(count):
        await log.append(
            actor="service",
            action="token.read",
            outcome="success",
            request_id=f"req_{i}",
            token_id=new_id(IdPrefix.TOKEN),
            detail={"attempt": i},
        )


async def test_appended_records_verify_as_an_intact_chain(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    token = new_id(IdPrefix.TOKEN)
    await log.append(
        actor="merchant:mer_0123456789abcdef",
        action="token.create",
        outcome="success",
        request_id="req_a",
        token_id=token,
        detail={"brand": "visa", "cvc_provided": True},
    )
    await log.append(actor="admin", action="keys.rotate", outcome="error", request_id=None)

    report = await log.verify()

    assert report.ok
    assert report.broken == ()
    assert report.records == 2
    assert report.to_dict()["records"] == 2
    assert len(report.chains) == CHAINS
    rows = await owner.fetch("SELECT * FROM audit_log ORDER BY occurred_at")
    assert [r["action"] for r in rows] == ["token.create", "keys.rotate"]
    assert rows[0]["token_hmac"] == log.token_hmac(token)
    assert rows[1]["token_hmac"] is None
    assert (rows[0]["seq"], rows[0]["prev_hash"]) == (1, GENESIS_HASH)


async def test_the_hash_is_sha256_of_prev_chain_seq_and_the_documented_json(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    token = new_id(IdPrefix.TOKEN)
    await log.append(
        actor="service",
        action="forward",
        outcome="success",
        request_id="req_1",
        token_id=token,
        detail={"stored": True, "retries": 2, "destination": "psp_a"},
    )
    row = await owner.fetchrow("SELECT * FROM audit_log")
    assert row is not None
    micros = (row["occurred_at"] - EPOCH) // datetime.timedelta(microseconds=1)
    mac = hmac.new(KEY, token.encode(), hashlib.sha256).hexdigest()
    payload = (
        '{"action":"forward","actor":"service",'
        '"detail":{"destination":"psp_a","retries":2,"stored":true},'
        f'"occurred_at":{micros},"outcome":"success","request_id":"req_1",'
        f'"token_hmac":"{mac}","v":1}}'
    ).encode()
    prefix = row["chain_id"].to_bytes(4, "big") + (1).to_bytes(8, "big")

    assert row["hash"] == hashlib.sha256(GENESIS_HASH + prefix + payload).digest()


async def test_two_hundred_concurrent_appends_land_in_contiguous_chains(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    await asyncio.gather(
        *(
            log.append(actor="service", action="forward", outcome="success", request_id=f"r{i}")
            for i in range(200)
        )
    )

    chains = await owner.fetch(
        "SELECT chain_id, array_agg(seq ORDER BY seq) AS seqs FROM audit_log GROUP BY chain_id"
    )
    assert sum(len(c["seqs"]) for c in chains) == 200
    assert all(c["seqs"] == list(range(1, len(c["seqs"]) + 1)) for c in chains)
    assert len(chains) > 1
    report = await verify(log._pool)
    assert report.ok
    assert report.records == 200
    assert sum(c.head_seq for c in report.chains) == 200


async def test_a_record_written_in_a_rolled_back_transaction_leaves_no_trace(
    log: AuditLog, audit_db: ServiceDatabase, owner: asyncpg.Connection
) -> None:
    conn = await connect_runtime(audit_db)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await log.append(
            actor="service", action="token.delete", outcome="success", request_id="r", conn=conn
        )
        await transaction.rollback()  # the operation failed after its record was written
    finally:
        await conn.close()

    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 0
    assert (await verify(owner)).ok


async def test_when_every_chain_is_busy_an_append_waits_for_one_instead_of_failing(
    log: AuditLog, audit_db: ServiceDatabase, owner: asyncpg.Connection
) -> None:
    holders = [await connect_runtime(audit_db) for _ in range(CHAINS)]
    try:
        transactions = [conn.transaction() for conn in holders]
        for conn, tr in zip(holders, transactions, strict=True):
            await tr.start()
            await log.append(
                actor="service", action="forward", outcome="success", request_id="r", conn=conn
            )
        waiting = asyncio.create_task(
            log.append(actor="service", action="forward", outcome="success", request_id="w")
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        for tr in transactions:
            await tr.commit()
        await asyncio.wait_for(waiting, 5)
    finally:
        for conn in holders:
            await conn.close()

    assert await owner.fetchval("SELECT count(DISTINCT chain_id) FROM audit_log") == CHAINS
    report = await verify(owner)
    assert report.ok
    assert report.records == CHAINS + 1


async def test_an_append_that_cannot_get_a_chain_in_time_is_refused(
    log: AuditLog, pool: asyncpg.Pool, audit_db: ServiceDatabase
) -> None:
    holders = [await connect_runtime(audit_db) for _ in range(CHAINS)]
    try:
        for conn in holders:
            await conn.execute("BEGIN")
            await log.append(
                actor="service", action="forward", outcome="success", request_id="r", conn=conn
            )
        impatient = AuditLog(pool, KEY, timeout=0.2)
        with pytest.raises(AuditUnavailable):
            await impatient.append(
                actor="service", action="forward", outcome="success", request_id="x"
            )
    finally:
        for conn in holders:
            await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET outcome = 'success'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "UPDATE audit_chain_heads SET chain_id = chain_id + 100",
        "DELETE FROM audit_chain_heads",
        "TRUNCATE audit_chain_heads",
        "INSERT INTO audit_chain_heads VALUES (99, 0, decode(repeat('00', 32), 'hex'))",
    ],
)
async def test_the_runtime_role_cannot_rewrite_or_erase_the_audit_tables(
    log: AuditLog, audit_db: ServiceDatabase, statement: str
) -> None:
    await append_reads(log, 1)
    conn = await connect_runtime(audit_db)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


TAMPERING: list[tuple[str, str, Callable[[int], int], Problem]] = [
    (
        "an edited action",
        "UPDATE audit_log SET action = 'token.create' WHERE chain_id = $1 AND seq = 2",
        lambda last: 2,
        Problem.HASH_MISMATCH,
    ),
    (
        "a shifted timestamp",
        "UPDATE audit_log SET occurred_at = occurred_at + interval '1 second' "
        "WHERE chain_id = $1 AND seq = 3",
        lambda last: 3,
        Problem.HASH_MISMATCH,
    ),
    (
        "a replaced token hmac",
        "UPDATE audit_log SET token_hmac = sha256('x') WHERE chain_id = $1 AND seq = 2",
        lambda last: 2,
        Problem.HASH_MISMATCH,
    ),
    (
        "a deleted middle record",
        "DELETE FROM audit_log WHERE chain_id = $1 AND seq = 2",
        lambda last: 2,
        Problem.GAP,
    ),
    (
        "swapped hashes",
        "UPDATE audit_log a SET hash = b.hash FROM audit_log b "
        "WHERE a.chain_id = $1 AND b.chain_id = $1 "
        "AND ((a.seq = 2 AND b.seq = 3) OR (a.seq = 3 AND b.seq = 2))",
        lambda last: 2,
        Problem.HASH_MISMATCH,
    ),
    (
        "a rewritten prev_hash",
        "UPDATE audit_log SET prev_hash = sha256('x') WHERE chain_id = $1 AND seq = 3",
        lambda last: 3,
        Problem.WRONG_PREV,
    ),
    (
        "an edited head",
        "UPDATE audit_chain_heads SET last_hash = sha256(last_hash) WHERE chain_id = $1",
        lambda last: last,
        Problem.HEAD_MISMATCH,
    ),
    (
        "a deleted last record",
        "DELETE FROM audit_log WHERE chain_id = $1 "
        "AND seq = (SELECT last_seq FROM audit_chain_heads WHERE chain_id = $1)",
        lambda last: last - 1,
        Problem.HEAD_MISMATCH,
    ),
]


@pytest.mark.parametrize(
    ("sql", "broken_seq", "problem"),
    [case[1:] for case in TAMPERING],
    ids=[case[0] for case in TAMPERING],
)
async def test_tampering_by_the_owner_is_reported_at_the_first_broken_link(
    log: AuditLog,
    owner: asyncpg.Connection,
    sql: str,
    broken_seq: Callable[[int], int],
    problem: Problem,
) -> None:
    # 64 records over 16 chains: at least one chain holds 4 or more.
    await append_reads(log, 64)
    fullest = await owner.fetchrow(
        "SELECT chain_id, last_seq FROM audit_chain_heads ORDER BY last_seq DESC LIMIT 1"
    )
    assert fullest is not None
    chain, last = fullest["chain_id"], fullest["last_seq"]
    assert last >= 4
    assert (await verify(owner)).ok

    await owner.execute(sql, chain)
    report = await verify(owner)

    assert not report.ok
    assert len(report.broken) == 1
    link = report.broken[0]
    assert (link.chain_id, link.seq, link.problem) == (chain, broken_seq(last), problem)


async def test_the_raw_token_id_never_reaches_the_table_only_its_hmac(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    token = new_id(IdPrefix.TOKEN)
    for action in ("token.create", "token.read", "forward", "token.delete"):
        await log.append(
            actor="service", action=action, outcome="success", request_id="r", token_id=token
        )

    dump = ""
    for table in ("audit_log", "audit_chain_heads"):
        rows = await owner.fetch(f"SELECT t::text AS line FROM {table} t")
        dump += "\n".join(r["line"] for r in rows)

    assert token not in dump
    assert token.encode().hex() not in dump
    assert log.token_hmac(token).hex() in dump
    assert log.token_hmac(token) != AuditLog(log._pool, b"o" * 32).token_hmac(token)


async def test_an_unreachable_database_refuses_the_append_with_audit_unavailable() -> None:
    nowhere = await asyncpg.create_pool(
        f"postgresql://tessera_vault@127.0.0.1:{free_port()}/tessera_vault",
        min_size=0,
        max_size=1,
    )
    try:
        with pytest.raises(AuditUnavailable) as caught:
            await AuditLog(nowhere, KEY).append(
                actor="service", action="forward", outcome="success", request_id="r"
            )
    finally:
        await nowhere.close()

    assert isinstance(caught.value, ServiceUnavailable)
    assert caught.value.code == "service_unavailable"
    assert caught.value.message == "The audit log cannot be written; the operation was refused."


async def test_a_closed_pool_refuses_the_append_with_audit_unavailable(
    audit_db: ServiceDatabase,
) -> None:
    closed = await asyncpg.create_pool(
        dsn(audit_db.runtime, audit_db.database), min_size=1, max_size=1
    )
    await closed.close()

    with pytest.raises(AuditUnavailable):
        await AuditLog(closed, KEY).append(
            actor="service", action="forward", outcome="success", request_id="r"
        )


@pytest.mark.parametrize(
    "detail",
    [
        {"note": "card 4242 4242 4242 4242 failed"},
        {"number": 4242424242424242},
        {"n4242424242424242": "x"},
    ],
    ids=["in a string", "as an integer", "in a key"],
)
async def test_a_card_number_in_detail_is_refused_and_nothing_is_written(
    log: AuditLog, owner: asyncpg.Connection, detail: dict[str, str | int | bool]
) -> None:
    with pytest.raises(ValueError, match="detail"):
        await log.append(
            actor="service", action="forward", outcome="error", request_id="r", detail=detail
        )

    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_a_request_id_that_looks_like_a_card_number_is_stored_masked(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    await log.append(
        actor="service", action="forward", outcome="success", request_id="4242424242424242"
    )

    assert await owner.fetchval("SELECT request_id FROM audit_log") == "[REDACTED PAN ****4242]"
    assert (await verify(owner)).ok


def test_an_hmac_key_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AuditLog(None, b"short")


async def test_export_streams_records_in_time_order_with_hex_hashes(
    log: AuditLog, owner: asyncpg.Connection
) -> None:
    await append_reads(log, 3)

    rows = [r async for r in export(owner)]
    later = [r async for r in export(owner, datetime.datetime.now(datetime.UTC))]

    assert [r["request_id"] for r in rows] == ["req_0", "req_1", "req_2"]
    assert all(len(r["hash"]) == 64 and len(r["token_hmac"]) == 64 for r in rows)
    assert rows[0]["detail"] == {"attempt": 0}
    assert later == []
