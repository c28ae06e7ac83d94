"""Control `audit-log`: the vault's audit trail is whole, covers what it must, and only grows.

Three things, from the vault's database (read-only, as the auditor role):

- **Tamper evidence** (10.3.4): `vault.audit.verify` walks every hash chain end to end in one
  snapshot; any edited, deleted or reordered record, or a head that disagrees, fails the
  control, naming the chain and seq. Every chain's head (seq, hash) is in the evidence, so the
  assessor can keep them and compare a later run: a rewrite of the whole table shows there.
- **Coverage** (10.2.1, 10.2.2): the latest record of each action the vault audits
  (`vault.audit.AUDITED_ACTIONS`), with its time, actor and outcome. An action never performed
  on this stack is listed as "no record yet", not failed: a young stack has rotated no key.
- **Append-only** (10.3.2, 10.5.1): the runtime role's privileges on `audit_log` and
  `audit_chain_heads` as Postgres decides them (`has_table_privilege` and
  `has_column_privilege`, so grants through PUBLIC or a role membership count too): SELECT and
  INSERT on the log, never UPDATE, DELETE, TRUNCATE or TRIGGER; on the heads SELECT, and UPDATE
  only on `last_seq` and `last_hash` (an append advances its head).

This control owns the audit tables' privileges of the vault's runtime role; `least-privilege`
leaves exactly those cells to it (see its docstring), so one wrong grant fails one control.
"""

from __future__ import annotations

import datetime
from typing import Any

import asyncpg

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult
from vault.audit import AUDITED_ACTIONS, verify

CONTROL = Control(
    "audit-log",
    "The vault's audit log: hash chains intact, every audited action recorded, append-only",
    ("10.2.1", "10.2.2", "10.3.2", "10.3.4", "10.5.1"),
)

#: Table privileges, and whether the vault's runtime role must (True) or must not (False) hold
#: each one. REFERENCES is left out: it lets a role point a foreign key at the table, which
#: changes none of its rows.
TABLE_PRIVILEGES: dict[str, dict[str, bool]] = {
    "audit_log": {
        "SELECT": True,
        "INSERT": True,
        "UPDATE": False,
        "DELETE": False,
        "TRUNCATE": False,
        "TRIGGER": False,
    },
    "audit_chain_heads": {
        "SELECT": True,
        "INSERT": False,
        "UPDATE": False,
        "DELETE": False,
        "TRUNCATE": False,
        "TRIGGER": False,
    },
}
#: The only columns the runtime role may UPDATE, per table (the heads' two moving columns).
UPDATABLE_COLUMNS: dict[str, frozenset[str]] = {
    "audit_log": frozenset(),
    "audit_chain_heads": frozenset({"last_seq", "last_hash"}),
}

_PRIVILEGES = """
SELECT t.name AS table_name, p.privilege,
       has_table_privilege($1::name, t.name::regclass, p.privilege) AS held
FROM unnest($2::text[]) AS t(name), unnest($3::text[]) AS p(privilege)
"""
_UPDATABLE = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = current_schema() AND c.relname = ANY($2::text[])
  AND has_column_privilege($1::name, c.oid, a.attnum, 'UPDATE')
ORDER BY 1, 2
"""
_LATEST = """
SELECT DISTINCT ON (action) action, occurred_at, actor, outcome, chain_id, seq,
       request_id IS NOT NULL AS has_request_id, token_hmac IS NOT NULL AS has_token_hmac
FROM audit_log ORDER BY action, occurred_at DESC, chain_id, seq DESC
"""
_COUNTS = """
SELECT action, count(*) AS records, min(occurred_at) AS first FROM audit_log GROUP BY action
"""


def judge_privileges(
    role: str, held: dict[str, dict[str, bool]], updatable: dict[str, set[str]]
) -> list[str]:
    """One line per privilege that differs from `TABLE_PRIVILEGES` / `UPDATABLE_COLUMNS`."""
    failures = []
    for table, wanted in TABLE_PRIVILEGES.items():
        for privilege, must in wanted.items():
            has = held.get(table, {}).get(privilege, False)
            if must and not has:
                failures.append(f"{role} lacks {privilege} on {table}")
            elif has and not must:
                failures.append(f"{role} may {privilege} {table}")
        extra = sorted(updatable.get(table, set()) - UPDATABLE_COLUMNS[table])
        if extra and not held.get(table, {}).get("UPDATE", False):  # else reported above
            failures.append(f"{role} may UPDATE {table} columns {', '.join(extra)}")
        missing = sorted(UPDATABLE_COLUMNS[table] - updatable.get(table, set()))
        if missing:
            failures.append(f"{role} cannot UPDATE {table} columns {', '.join(missing)}")
    return failures


def coverage(
    latest: dict[str, dict[str, Any]], counts: dict[str, int], now: datetime.datetime
) -> dict[str, Any]:
    """Each audited action's latest record (or "no record yet"), and actions outside the list."""
    actions: dict[str, Any] = {}
    for action in AUDITED_ACTIONS:
        row = latest.get(action)
        if row is None:
            actions[action] = "no record yet"
            continue
        occurred: datetime.datetime = row["occurred_at"]
        actions[action] = {
            "latest": occurred.isoformat(),
            "seconds_before_report": round((now - occurred).total_seconds(), 1),
            "actor": row["actor"],
            "outcome": row["outcome"],
            "chain_id": row["chain_id"],
            "seq": row["seq"],
            "has_request_id": row["has_request_id"],
            "has_token_hmac": row["has_token_hmac"],
            "records": counts.get(action, 0),
        }
    return {
        "actions": actions,
        "not_in_the_list": {a: n for a, n in sorted(counts.items()) if a not in AUDITED_ACTIONS},
    }


async def run(ctx: EvidenceContext) -> ControlResult:
    role = ctx.settings.vault_runtime_role
    tables = list(TABLE_PRIVILEGES)
    privileges = sorted({p for wanted in TABLE_PRIVILEGES.values() for p in wanted})
    async with ctx.database("vault") as conn:
        report = await verify(conn)
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            return CONTROL.failed(
                f"the vault's runtime role {role} does not exist on the vault's database server "
                "(TESSERA_PCI_VAULT_RUNTIME_ROLE names it)",
                {"verify": report.to_dict()},
            )
        held: dict[str, dict[str, bool]] = {}
        for row in await conn.fetch(_PRIVILEGES, role, tables, privileges):
            held.setdefault(row["table_name"], {})[row["privilege"]] = row["held"]
        updatable: dict[str, set[str]] = {t: set() for t in tables}
        for row in await conn.fetch(_UPDATABLE, role, tables):
            updatable[row["table_name"]].add(row["column_name"])
        latest = {r["action"]: dict(r) for r in await conn.fetch(_LATEST)}
        counted: list[asyncpg.Record] = await conn.fetch(_COUNTS)
    counts = {r["action"]: int(r["records"]) for r in counted}
    failures = [
        f"audit chain {b.chain_id} is broken at seq {b.seq}: {b.problem} ({b.message})"
        for b in report.broken
    ]
    failures += judge_privileges(role, held, updatable)
    covered = coverage(latest, counts, ctx.now)
    recorded = [a for a, v in covered["actions"].items() if v != "no record yet"]
    first = min((r["first"] for r in counted), default=None)
    evidence = {
        "chains_verified": len(report.chains),
        "records_verified": report.records,
        "intact": report.ok,
        "broken": [
            {"chain_id": b.chain_id, "seq": b.seq, "problem": str(b.problem), "message": b.message}
            for b in report.broken
        ],
        #: Keep these outside the database: a later run whose chains do not extend them shows a
        #: rewritten or truncated history that the chains alone cannot.
        "chain_heads": [
            {"chain_id": c.chain_id, "seq": c.head_seq, "hash": c.head_hash, "records": c.records}
            for c in report.chains
        ],
        "oldest_record": first.isoformat() if first else None,
        "coverage": covered,
        "runtime_role": role,
        "privileges": {
            table: {
                "table": held.get(table, {}),
                "updatable_columns": sorted(updatable[table]),
                "expected_table": TABLE_PRIVILEGES[table],
                "expected_updatable_columns": sorted(UPDATABLE_COLUMNS[table]),
            }
            for table in tables
        },
    }
    summary = (
        f"{len(report.chains)} chains, {report.records} records verified end to end; "
        f"{len(recorded)} of {len(AUDITED_ACTIONS)} audited actions have records "
        f"({', '.join(recorded) or 'none'}); {role} may only SELECT and INSERT audit_log and "
        "advance the chain heads"
    )
    return CONTROL.judged(failures, summary, evidence)
