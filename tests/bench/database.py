"""The database side of `make bench`: its own databases, the table-size seeding (COPY), and the
pgbench ceiling running the statements one authorize-and-capture payment executes.

The pgbench script is the payment's SQL as the repositories send it (api/storage/idempotency.py,
payments.py, events.py, ledger.py), in the same two transactions and the same order, with the
reads between them. Only what is cached in the API process (merchant key, routing config, fee)
is left out, as it is in the running API."""

from __future__ import annotations

import asyncio
import datetime
import glob
import json
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import redis

from api.storage.ledger import entry_columns
from core import ledger
from tessera.dbsetup import (
    ServiceDatabase,
    drop_database,
    ensure_roles_and_databases,
    service_dsn,
)
from tessera.devstack import StackConfig, service_env
from tessera.runtime.migrations import migrate

API_DB = ServiceDatabase("api", "tessera_api_bench")
VAULT_DB = ServiceDatabase("vault", "tessera_vault_bench")


def prepare_databases(admin_dsn: str) -> dict[str, str]:
    """Fresh, migrated bench databases; returns the services' runtime and migration URLs."""

    async def prepare() -> None:
        for db in (API_DB, VAULT_DB):
            await drop_database(admin_dsn, db.database)
        await ensure_roles_and_databases(admin_dsn, [API_DB, VAULT_DB])
        for db in (API_DB, VAULT_DB):
            await migrate(service_dsn(admin_dsn, db.owner, db.database), f"{db.service}.migrations")

    asyncio.run(prepare())
    env = {}
    for db in (API_DB, VAULT_DB):
        prefix = f"TESSERA_{db.service.upper()}_"
        env[prefix + "DATABASE_URL"] = service_dsn(admin_dsn, db.runtime, db.database)
        env[prefix + "MIGRATION_URL"] = service_dsn(admin_dsn, db.owner, db.database)
    return env


# The payment's JSON as the event and the stored response carry it (about 900 bytes), with a
# space after each colon: pgbench would read `:name` as one of its variables.
PAYMENT_JSON = json.dumps(
    {
        "id": "pay_01kmzqbc8a7d0r4y0bq7c9m3hx",
        "amount": 1050,
        "currency": "EUR",
        "status": "captured",
        "amount_authorized": 1050,
        "amount_captured": 1050,
        "amount_refunded": 0,
        "capture": True,
        "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2040},
        "processor": "psp_a",
        "processor_reference": "auth_3f9c2a1b7e6d5c4b3a291807",
        "decline_code": None,
        "failure_code": None,
        "description": None,
        "reference": None,
        "metadata": {},
        "created": 1795651200,
        "refunds": [],
        "attempts": [
            {
                "processor": "psp_a",
                "reference": "pay_01kmzqbc8a7d0r4y0bq7c9m3hx_1",
                "outcome": "approved",
                "processor_reference": "auth_3f9c2a1b7e6d5c4b3a291807",
                "decline_code": None,
                "latency_ms": 3,
                "late_reversal": None,
            }
        ],
        "object": "payment",
    },
    separators=(",", ": "),
)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _array(values: list[object], cast: str) -> str:
    return "ARRAY[" + ", ".join(_literal(str(v)) for v in values) + f"]::{cast}[]"


def payment_script(merchant_id: str, token: str, fee: int = 35) -> str:
    """pgbench's script: one authorize-and-capture payment's statements, with the ledger
    postings of a processing `fee` (the bench's merchant pays one, as merchants do)."""
    m = _literal(merchant_id)
    pay = "('pay_' || lpad(:n::text, 26, '0'))"
    key = "('pgb-' || :n::text)"
    postings = ledger.authorization_and_capture("EUR", 1050, fee)
    index, accounts, amounts, delays = entry_columns(postings, 86400.0)
    data = _literal(PAYMENT_JSON)
    lines = [
        r"\set n random(1, 9000000000000000000)",
        # Phase 1: claim the key, create the payment and its attempt.
        "BEGIN;",
        f"DELETE FROM idempotency_keys WHERE merchant_id = {m} AND key = {key} "
        "AND expires_at < now();",
        "INSERT INTO idempotency_keys (merchant_id, key, request_method, request_path, "
        "request_hash, recovery_point, locked_until, expires_at) "
        f"VALUES ({m}, {key}, 'POST', '/v1/payments', sha256(:n::text::bytea), 'started', "
        "now() + make_interval(secs => 40), now() + make_interval(secs => 86400)) "
        "ON CONFLICT (merchant_id, key) DO NOTHING RETURNING true;",
        "INSERT INTO payments (merchant_id, id, amount, currency, status, capture, token, "
        "card_brand, card_last4, card_exp_month, card_exp_year, processor, description, "
        "reference, metadata, card_country) "
        f"VALUES ({m}, {pay}, 1050, 'EUR', 'processing', true, {_literal(token)}, 'visa', "
        "'4242', 12, 2040, 'psp_a', NULL, NULL, '{}', 'US') RETURNING *;",
        "INSERT INTO payment_attempts (merchant_id, payment_id, attempt, processor, reference, "
        f"outcome) VALUES ({m}, {pay}, 1, 'psp_a', {pay} || '_1', 'pending') "
        "RETURNING attempt, processor, reference, outcome;",
        "UPDATE idempotency_keys SET recovery_point = 'payment_created', "
        f"payment_id = {pay} WHERE merchant_id = {m} AND key = {key};",
        "COMMIT;",
        # Phase 2 (the processor call) reads nothing: phase 1's rows are kept in memory.
        # Phase 3: record the answer, the event, the postings and the response.
        "BEGIN;",
        "WITH p AS (UPDATE payments SET status = 'captured', amount_authorized = 1050, "
        "amount_captured = 1050, processor_reference = 'auth_x', decline_code = NULL, "
        "failure_code = NULL, updated_at = now() "
        f"WHERE merchant_id = {m} AND id = {pay} AND status = 'processing' RETURNING *), "
        "a AS (UPDATE payment_attempts SET outcome = 'approved', processor_reference = 'auth_x', "
        "decline_code = NULL, finished_at = now(), "
        "latency_ms = (extract(epoch FROM now() - started_at) * 1000)::int "
        f"WHERE merchant_id = {m} AND payment_id = {pay} AND attempt = 1 "
        "AND EXISTS (SELECT 1 FROM p) RETURNING 1) "
        "SELECT p.* FROM p WHERE EXISTS (SELECT 1 FROM a);",
        "SELECT payment_id, attempt, processor, reference, outcome, processor_reference, "
        "decline_code, latency_ms, late_reversal FROM payment_attempts "
        f"WHERE merchant_id = {m} AND payment_id = ANY(ARRAY[{pay}]) "
        "ORDER BY payment_id, attempt;",
        "WITH e AS (INSERT INTO events (merchant_id, id, type, object_id, data, request_id, "
        f"idempotency_key) VALUES ({m}, 'evt_' || lpad(:n::text, 26, '0'), "
        f"'payment.captured', {pay}, {data}::jsonb, 'req_x', {key}) "
        "RETURNING merchant_id, id, type) "
        "INSERT INTO webhook_deliveries (merchant_id, event_id, endpoint_id) "
        "SELECT e.merchant_id, e.id, w.id FROM e JOIN webhook_endpoints w "
        "ON w.merchant_id = e.merchant_id AND w.deleted_at IS NULL AND w.status = 'enabled' "
        "AND (e.type = ANY(w.events) OR '*' = ANY(w.events));",
        "WITH ids AS ("
        "  SELECT u.n, u.kind, u.currency, "
        "  nextval(pg_get_serial_sequence('ledger_postings', 'id')) AS id "
        f"  FROM unnest({_array([p.kind for p in postings], 'text')}, "
        f"{_array([p.currency for p in postings], 'text')}) "
        "WITH ORDINALITY AS u(kind, currency, n)), "
        "p AS (INSERT INTO ledger_postings (id, merchant_id, payment_id, kind) "
        f"  OVERRIDING SYSTEM VALUE SELECT id, {m}, {pay}, kind FROM ids) "
        "INSERT INTO ledger_entries (posting_id, merchant_id, account, currency, amount, "
        f"available_on) SELECT ids.id, {m}, e.account, ids.currency, e.amount, "
        "now() + make_interval(secs => e.delay) "
        f"FROM unnest({_array(list(index), 'int')}, {_array(list(accounts), 'text')}, "
        f"{_array(list(amounts), 'bigint')}, {_array(list(delays), 'float8')}) "
        "AS e(n, account, amount, delay) JOIN ids ON ids.n = e.n;",
        "UPDATE idempotency_keys SET recovery_point = 'finished', locked_until = NULL, "
        f"response_status = 201, response_body = convert_to({data}, 'UTF8') "
        f"WHERE merchant_id = {m} AND key = {key};",
        "COMMIT;",
    ]
    return "\n".join(lines) + "\n"


def statements_in(script: str) -> int:
    """Statements sent, not counting BEGIN and COMMIT."""
    lines = [line for line in script.splitlines() if line and not line.startswith("\\")]
    return sum(1 for line in lines if line not in ("BEGIN;", "COMMIT;"))


def pgbench_binary() -> str:
    """Debian's wrapper, or the server's own copy (postgresql-NN ships it) when only the
    PostgreSQL binaries are installed."""
    found = shutil.which("pgbench") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)), None
    )
    if found is None:
        raise SystemExit("make bench needs pgbench (Debian: the postgresql-NN package)")
    return found


def run_pgbench(
    admin_dsn: str, merchant_id: str, token: str, clients: int, seconds: int
) -> dict[str, float]:
    """pgbench as the API's runtime role, prepared statements (as asyncpg sends them)."""
    url = urlsplit(service_dsn(admin_dsn, API_DB.runtime, API_DB.database))
    script = payment_script(merchant_id, token)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "payment.sql"
        path.write_text(script)
        command = [
            pgbench_binary(),
            "-n",
            "-M",
            "prepared",
            "-h",
            url.hostname or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or API_DB.runtime,
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(path),
            API_DB.database,
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    tps = re.search(r"tps = ([0-9.]+)", out)
    latency = re.search(r"latency average = ([0-9.]+) ms", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if tps is None:
        raise RuntimeError(f"pgbench printed no tps:\n{out}")
    return {
        "payments_per_second": float(tps[1]),
        "latency_average_ms": float(latency[1]) if latency else float("nan"),
        "failed": float(failed[1]) if failed else 0.0,
        "statements_per_payment": float(statements_in(script)),
        "clients": float(clients),
    }


async def _rows(merchant_id: str, start: int, count: int) -> AsyncIterator[bytes]:
    """Captured payments of a filler merchant, a year's worth of timestamps, as COPY text."""
    base = datetime.datetime(2025, 11, 25, tzinfo=datetime.UTC)
    chunk = 50_000
    for first in range(start, start + count, chunk):
        lines = []
        for i in range(first, min(first + chunk, start + count)):
            created = (base + datetime.timedelta(seconds=i % 31_536_000 * 1.0)).isoformat()
            lines.append(
                f"{merchant_id}\tpay_{i:026d}\t1050\tEUR\tcaptured\t1050\t1050\t0\tt\t"
                f"tok_{i:026d}\tvisa\t4242\t12\t2040\tpsp_a\t{{}}\t{created}\t{created}\n"
            )
        yield "".join(lines).encode()


SEED_COLUMNS = [
    "merchant_id",
    "id",
    "amount",
    "currency",
    "status",
    "amount_authorized",
    "amount_captured",
    "amount_refunded",
    "capture",
    "token",
    "card_brand",
    "card_last4",
    "card_exp_month",
    "card_exp_year",
    "processor",
    "metadata",
    "created_at",
    "updated_at",
]


def seed_payments(admin_dsn: str, filler_merchant: str, rows: int) -> int:
    """Grow the payments table to `rows` filler rows with COPY; returns the rows added."""

    async def seed() -> int:
        conn = await asyncpg.connect(service_dsn(admin_dsn, API_DB.owner, API_DB.database))
        try:
            await conn.execute(
                "INSERT INTO merchants (id, name) VALUES ($1, 'bench filler') "
                "ON CONFLICT DO NOTHING",
                filler_merchant,
            )
            have: int = await conn.fetchval(
                "SELECT count(*) FROM payments WHERE merchant_id = $1", filler_merchant
            )
            if have >= rows:
                return 0
            await conn.copy_to_table(
                "payments",
                source=_rows(filler_merchant, have, rows - have),
                columns=SEED_COLUMNS,
                format="text",
            )
            await conn.execute("VACUUM (ANALYZE) payments")
            return rows - have
        finally:
            await conn.close()

    return asyncio.run(seed())


def bench_env(
    base: dict[str, str], admin_dsn: str, api_redis: str, vault_redis: str
) -> dict[str, str]:
    """The stack's environment on fresh bench databases: quiet logs, one shared service token."""
    env = {
        **base,
        "TESSERA_API_LOG_LEVEL": "warning",
        "TESSERA_VAULT_LOG_LEVEL": "warning",
        "TESSERA_API_REDIS_URL": api_redis,
        "TESSERA_VAULT_REDIS_URL": vault_redis,
    }
    token = env.get("TESSERA_VAULT_SERVICE_TOKEN") or secrets.token_urlsafe(32)
    env["TESSERA_API_VAULT_SERVICE_TOKEN"] = env["TESSERA_VAULT_SERVICE_TOKEN"] = token
    env.update(prepare_databases(admin_dsn))
    return env


def fresh_bench_env() -> tuple[StackConfig, dict[str, str]]:
    """The dev stack's configuration, and its environment on fresh bench databases and flushed
    bench Redis databases (12 and 13): what every benchmark starts from."""
    config = StackConfig.from_env()
    print("\nfresh bench databases (tessera_api_bench, tessera_vault_bench) ...", flush=True)
    env = bench_env(
        service_env(config), config.pg_admin_url, config.redis_db(12), config.redis_db(13)
    )
    for db in (12, 13):
        client = redis.Redis.from_url(config.redis_db(db))
        client.flushdb()
        client.close()
    return config, env
