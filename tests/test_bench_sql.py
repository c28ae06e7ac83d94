"""The benchmark's pgbench ceiling runs "the SQL one payment executes": this keeps that script
valid against the real schema, and its effect the same as a real payment's."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg

from tessera.dbsetup import ServiceDatabase
from tests.bench.database import payment_script, pgbench_binary, statements_in
from tests.conftest import ApiMerchant, dsn
from tests.support.payments import pay
from tests.support.processes import ServiceProcess


def test_the_pgbench_payment_makes_what_an_api_payment_makes(
    api: ServiceProcess,
    vault: ServiceProcess,
    merchant: ApiMerchant,
    databases: dict[str, ServiceDatabase],
    tmp_path: Path,
) -> None:
    real = pay(api, vault, merchant).json()
    db = databases["api"]
    url = dsn(db.runtime, db.database)

    async def fee_of_real_payment() -> int:
        conn = await asyncpg.connect(url)
        try:
            fee: int = await conn.fetchval(
                "SELECT coalesce(-sum(l.amount), 0)::bigint FROM ledger_entries l "
                "JOIN ledger_postings lp ON lp.id = l.posting_id "
                "WHERE lp.merchant_id = $1 AND lp.payment_id = $2 AND l.account = 'fees'",
                merchant.id,
                real["id"],
            )
            return fee
        finally:
            await conn.close()

    script = payment_script(merchant.id, "tok_" + "0" * 26, fee=asyncio.run(fee_of_real_payment()))
    assert statements_in(script) == 10
    path = tmp_path / "payment.sql"
    path.write_text(script)
    run = subprocess.run(
        [pgbench_binary(), "-n", "-M", "prepared", "-t", "3", "-c", "1", "-f", str(path), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "number of failed transactions: 0" in run.stdout

    async def shapes() -> list[tuple[str, str, int, int, int, int]]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT p.id, p.status, p.amount_captured, "
                "(SELECT count(*) FROM events e WHERE e.merchant_id = p.merchant_id "
                "  AND e.object_id = p.id) AS events, "
                "(SELECT count(*) FROM ledger_entries l JOIN ledger_postings lp "
                "  ON lp.id = l.posting_id WHERE lp.merchant_id = p.merchant_id "
                "  AND lp.payment_id = p.id) AS entries, "
                "(SELECT coalesce(sum(l.amount), 0) FROM ledger_entries l JOIN ledger_postings lp "
                "  ON lp.id = l.posting_id WHERE lp.merchant_id = p.merchant_id "
                "  AND lp.payment_id = p.id) AS balance "
                "FROM payments p WHERE p.merchant_id = $1 "
                # pgbench's ids are zero-padded numbers; real ones start with a timestamp.
                "AND (p.id = $2 OR p.id LIKE 'pay_0000000%')",
                merchant.id,
                real["id"],
            )
        finally:
            await conn.close()
        return [
            (r["id"], r["status"], r["amount_captured"], r["events"], r["entries"], r["balance"])
            for r in rows
        ]

    found = asyncio.run(shapes())
    api_rows = [row[1:] for row in found if row[0] == real["id"]]
    bench_rows = [row[1:] for row in found if row[0] != real["id"]]
    assert len(bench_rows) == 3
    # Same status and captured amount, one event, as many ledger entries, balanced.
    assert api_rows == [("captured", 1050, 1, api_rows[0][3], 0)]
    assert bench_rows == api_rows * 3
