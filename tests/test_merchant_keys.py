"""Every API table is keyed merchant first, and every hot query names its merchant.

That is what makes the move past one Postgres primary (Citus or AlloyDB, tables distributed by
`merchant_id`) a migration rather than a rewrite: a query that names its merchant goes to one
shard, a join on `merchant_id` stays on it. The schema is read from the migrated test database
(pg_index, information_schema), the SQL from the API's source (every statement in a string
literal), and the plans from EXPLAIN on that database. The exceptions are listed here, each with
why and what a distributed database would do with it; an exception that stops being one, or a
new table or query that breaks the rule, fails the test until this file says what it is.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import dsn

ROOT = Path(__file__).resolve().parents[1]

#: Tables that are not keyed merchant first, why, and what a distributed database does with them.
NOT_MERCHANT_FIRST = {
    "schema_migrations": "the migration log: global, one row per migration (stays local to the "
    "coordinator)",
    "card_update_cursors": "one row per processor: where the worker is in that processor's "
    "account-updater list, which belongs to no merchant (a reference table)",
    "processed_notifications": "a processor's notification is identified by the processor's own "
    "reference and carries no merchant: deduplication must find it before any merchant is "
    "known (distributed by psp_reference, or a reference table)",
    "processor_operations": "found by the processor's reference when its notification arrives, "
    "before the merchant is known; it carries merchant_id for everything after (distributed by "
    "processor_reference, not co-located)",
}

#: Unique keys without merchant_id on merchant tables: a distributed table cannot enforce them.
GLOBAL_UNIQUE_KEYS = {
    "merchant_api_keys_active": "authentication finds the merchant from its key's hash; the "
    "table is small and rarely written (a reference table)",
    "payment_attempts_processor_reference_key": "our reference (payment id + attempt) is "
    "unique by construction; under Citus the constraint becomes (merchant_id, processor, "
    "reference)",
}

#: Functions whose statements read across merchants on purpose.
CROSS_MERCHANT = {
    ("api/auth.py", "merchant_for"): "authentication: the merchant is what it finds",
    ("api/storage/merchants.py", "merchant_for_secret_key"): "authentication, as above",
    ("api/storage/payments.py", "pending_operation"): "a notification, by processor reference",
    ("api/storage/payments.py", "settle_operation"): "a notification, by processor reference",
    ("api/storage/ledger.py", "unbalanced_postings"): "`tessera ledger check`: the whole ledger",
    ("api/storage/ledger.py", "totals_by_currency"): "`tessera ledger check`",
    ("api/storage/ledger.py", "payments_against_ledger"): "`tessera ledger check`",
    ("api/storage/webhooks.py", "claim"): "worker: due deliveries of every merchant",
    ("api/storage/webhooks.py", "failing_endpoints"): "worker: failing endpoints of every merchant",
    ("api/storage/webhooks.py", "purge_events"): "worker: expired events of every merchant",
    ("api/storage/worker.py", "claim_unknown_attempts"): "worker: due inquiries",
    ("api/storage/worker.py", "claim_late_checks"): "worker: due late-authorization checks",
    ("api/storage/worker.py", "claim_abandoned_keys"): "worker: requests whose process died",
    ("api/storage/worker.py", "expired_authorizations"): "worker: authorizations to cancel",
    ("api/storage/worker.py", "purge_expired_keys"): "worker: expired idempotency keys",
    ("api/storage/card_updates.py", "candidates"): "worker: an account update names a card, not "
    "a merchant: the live payment methods of every merchant at that processor with its last four "
    "(index payment_methods_by_processor_last4)",
    ("api/storage/recovery.py", "claim_due"): "worker: the recoveries of every merchant due now "
    "(index payments_recovery_due)",
    ("api/storage/recovery.py", "retry_outcomes"): "worker: the learned schedule learns from the "
    "retry outcomes of every merchant (decline kinds, times and outcomes; no card data)",
}

#: Statements whose plan may use an index that does not start with merchant_id, and why.
PLAN_EXCEPTIONS = {
    ("api/storage/events.py", "insert"): "the new event (one row, from a data-modifying CTE) is "
    "joined to the merchant's live endpoints on merchant_id as a join filter over the partial "
    "index webhook_endpoints_live (led by merchant_id); the join is on merchant_id, so it stays "
    "on one shard",
    ("api/storage/merchants.py", "roll_secret_key"): "`merchant_id = $1 AND revoked_at IS NULL` "
    "may read the partial index of active keys (a handful of rows per merchant) instead of the "
    "primary key (merchant_id, key_sha256); either way the statement names its merchant, so it "
    "goes to one shard",
}

SQL_START = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\s", re.IGNORECASE)
TABLE_REF = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE)\s+([a-z_]+)", re.IGNORECASE)
MERCHANT_PARAM = re.compile(r"\b(?:\w+\.)?merchant_id\s*=\s*(?:\$\d+|ANY\s*\(\s*\$\d+)")
MERCHANT_JOIN = re.compile(r"\b\w+\.merchant_id\s*=\s*\w+\.merchant_id\b")
INSERT_COLUMNS = re.compile(r"INSERT\s+INTO\s+([a-z_]+)\s*\(([^)]*)\)", re.IGNORECASE)


@dataclass(frozen=True)
class Statement:
    path: str
    function: str
    sql: str

    @property
    def where(self) -> tuple[str, str]:
        return self.path, self.function

    def tables(self) -> set[str]:
        return {name.lower() for name in TABLE_REF.findall(self.sql)}


def own_nodes(function: ast.AST) -> list[ast.AST]:
    """The nodes of `function`, without those of functions defined inside it."""
    nodes = []
    pending = list(ast.iter_child_nodes(function))
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        nodes.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def api_statements() -> list[Statement]:
    """Every SQL statement in a string literal of the API's Python source (adjacent literals are
    one constant once parsed), with the function it is in; docstrings are skipped."""
    found = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            docstrings = {
                id(node.value)
                for node in own_nodes(function)
                if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            }
            for node in own_nodes(function):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in docstrings
                    and SQL_START.match(node.value)
                ):
                    relative = str(path.relative_to(ROOT))
                    found.append(Statement(relative, function.name, node.value))
    return found


@dataclass(frozen=True)
class Schema:
    columns: dict[str, list[str]]
    #: index name -> (table, columns in order, unique, primary)
    indexes: dict[str, tuple[str, list[str], bool, bool]]

    def merchant_tables(self) -> set[str]:
        """Tables a merchant's rows live in: those with a merchant_id, and merchants itself."""
        return {t for t, cols in self.columns.items() if "merchant_id" in cols} | {"merchants"}

    def merchant_first(self, table: str) -> bool:
        lead = "id" if table == "merchants" else "merchant_id"
        return any(
            t == table and unique and cols[0] == lead
            for t, cols, unique, _ in self.indexes.values()
        )


@pytest.fixture(scope="module")
async def owner(databases: dict[str, ServiceDatabase]) -> AsyncIterator[asyncpg.Connection]:
    db = databases["api"]
    conn = await asyncpg.connect(dsn(db.owner, db.database))
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def schema(owner: asyncpg.Connection) -> Schema:
    columns: dict[str, list[str]] = {}
    for row in await owner.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    ):
        columns.setdefault(row["table_name"], []).append(row["column_name"])
    indexes = {}
    for row in await owner.fetch(
        "SELECT i.relname AS index, t.relname AS table, ix.indisunique, ix.indisprimary, "
        "array(SELECT a.attname FROM unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n) "
        "      JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
        "      ORDER BY k.n) AS columns "
        "FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid "
        "JOIN pg_class t ON t.oid = ix.indrelid JOIN pg_namespace s ON s.oid = t.relnamespace "
        "WHERE s.nspname = 'public'"
    ):
        indexes[row["index"]] = (
            row["table"],
            list(row["columns"]),
            row["indisunique"],
            row["indisprimary"],
        )
    return Schema(columns, indexes)


def test_every_table_is_keyed_merchant_first_but_the_listed_exceptions(schema: Schema) -> None:
    tables = set(schema.columns)
    assert {"payments", "payment_attempts", "idempotency_keys", "refunds", "events"} <= tables
    not_first = {table for table in tables if not schema.merchant_first(table)}
    assert not_first == set(NOT_MERCHANT_FIRST), (
        "a table is not keyed merchant first and not listed, or a listed one now is: "
        f"{sorted(not_first ^ set(NOT_MERCHANT_FIRST))}"
    )
    global_tables = {"schema_migrations", "processed_notifications", "card_update_cursors"}
    for table in tables - global_tables:
        assert table in schema.merchant_tables(), f"{table} has no merchant_id"


def test_unique_keys_without_the_merchant_are_the_listed_ones(schema: Schema) -> None:
    merchant_tables = schema.merchant_tables() - {"merchants"} - set(NOT_MERCHANT_FIRST)
    global_unique = {
        name
        for name, (table, cols, unique, _) in schema.indexes.items()
        if table in merchant_tables and unique and "merchant_id" not in cols
    }
    assert global_unique == set(GLOBAL_UNIQUE_KEYS)


def carries_merchant(statement: Statement, merchant_tables: set[str]) -> bool:
    """Names its merchant (`merchant_id = $n`, `merchants.id = $n`, or an INSERT of the
    merchant_id column), and joins merchant tables on merchant_id."""
    sql = statement.sql
    touched = statement.tables() & merchant_tables
    if not touched:
        return True
    if touched == {"merchants"}:  # its key is the merchant's id
        return bool(re.search(r"\bWHERE\s+id\s*=\s*\$\d+", sql)) or sql.lstrip().startswith(
            "INSERT INTO merchants (id"
        )
    named = bool(MERCHANT_PARAM.search(sql))
    inserted = [
        table
        for table, columns in INSERT_COLUMNS.findall(sql)
        if table in merchant_tables and "merchant_id" in [c.strip() for c in columns.split(",")]
    ]
    named = named or bool(inserted)
    # Each merchant table of a statement is tied to the merchant: by its own predicate, its
    # insert, or a join on merchant_id (one shard either way).
    ties = len(MERCHANT_PARAM.findall(sql)) + len(inserted) + len(MERCHANT_JOIN.findall(sql))
    return named and ties >= len(touched)


def test_every_statement_on_merchant_tables_names_its_merchant(schema: Schema) -> None:
    statements = api_statements()
    assert len(statements) > 60, "the API's SQL was found"
    merchant_tables = schema.merchant_tables()
    unnamed = {s.where for s in statements if not carries_merchant(s, merchant_tables)}
    assert unnamed - set(CROSS_MERCHANT) == set(), "statements that name no merchant"
    assert set(CROSS_MERCHANT) - unnamed == set(), "listed as cross-merchant but names one"


def dummy(type_name: str) -> Any:
    """A value of the parameter's type: EXPLAIN plans, it never runs the statement."""
    if type_name.endswith("[]"):
        return [dummy(type_name[:-2])]
    values: dict[str, Any] = {
        "text": "mer_0000000000000000",
        "int2": 1,
        "int4": 1,
        "int8": 1,
        "float8": 1.0,
        "numeric": 1,
        "bool": True,
        "bytea": b"\0" * 32,
        "jsonb": "{}",
        "timestamptz": datetime.datetime.now(datetime.UTC),
        "bigint": 1,
        "integer": 1,
    }
    return values[type_name]


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


async def test_hot_queries_use_an_index_that_starts_with_merchant_id(
    owner: asyncpg.Connection, schema: Schema
) -> None:
    """With sequential scans priced out (the test tables are tiny), every statement that names
    its merchant searches an index led by merchant_id with it (an Index Cond on merchant_id, not
    a full scan of the index): one shard's index under Citus."""
    merchant_tables = schema.merchant_tables()
    hot = [
        s
        for s in api_statements()
        if s.where not in CROSS_MERCHANT and s.tables() & merchant_tables
    ]
    checked = 0
    excused: set[tuple[str, str]] = set()
    async with owner.transaction():
        await owner.execute("SET LOCAL enable_seqscan = off")
        for statement in hot:
            prepared = await owner.prepare(statement.sql)
            args = [dummy(t.name) for t in prepared.get_parameters()]
            explained = await owner.fetchval(f"EXPLAIN (FORMAT JSON) {statement.sql}", *args)
            nodes = plan_nodes(json.loads(explained)[0]["Plan"])
            for node in nodes:
                relation = node.get("Relation Name")
                where = f"{statement.where}: {statement.sql[:90]}"
                if node["Node Type"] == "Seq Scan" and relation in merchant_tables:
                    assert statement.where in PLAN_EXCEPTIONS, f"sequential scan: {where}"
                    excused.add(statement.where)
                index = node.get("Index Name")
                if index is None:
                    continue
                table, cols, _, _ = schema.indexes[index]
                lead = "id" if table == "merchants" else "merchant_id"
                searched = lead in node.get("Index Cond", "")
                if table in merchant_tables and (cols[0] != lead or not searched):
                    assert statement.where in PLAN_EXCEPTIONS, f"{index} ({cols}): {where}"
                    excused.add(statement.where)
                checked += 1
    assert checked > 30, "the plans were read"
    assert excused == set(PLAN_EXCEPTIONS), "an exception no plan needs any more"
