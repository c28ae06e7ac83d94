"""Control `least-privilege`: every role holds exactly its documented privileges, and every
caller gets exactly its documented answer.

- **Grant matrix** (7.2.1, 7.2.5): for each database, the live privileges from
  pg_catalog (`aclexplode` over the database, its schemas, every table, view and sequence,
  every column grant and every function; owners and SECURITY DEFINER functions; the roles'
  attributes and memberships) against docs/pci/roles.yaml. Any difference, either way, fails
  the control, listed ("unexpected: relation tokens: runtime DELETE").
- **Separation** (7.2.1): neither service's roles can CONNECT to the other's database
  (`has_database_privilege`, no password needed); a role that does not exist on the other
  server cannot either.
- **Caller matrix** (7.2.2, 7.2.6, 8.3.1): docs/authz_matrix.yaml walked live for the columns
  the kit can walk without changing anything (`none`, `invalid`, `admin`, see
  `tessera.pci.authz`): every route that needs a credential refuses none and a wrong one.

Ownership of one cell: the vault runtime role's privileges on `audit_log` and
`audit_chain_heads` (the rows of roles.yaml with `judged_by: audit-log`) are judged by the
control `audit-log`, which asks for that role's effective privileges, grants through PUBLIC or
memberships included. This control leaves exactly those cells out of its comparison (they are
listed in its evidence as delegated), so an UPDATE granted on the audit log fails `audit-log`
alone, and any other difference fails this control alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml

from tessera.pci import authz
from tessera.pci.context import Database, EvidenceContext
from tessera.pci.model import Control, ControlResult

CONTROL = Control(
    "least-privilege",
    "Database roles hold exactly the documented grants; every caller gets exactly its status",
    ("7.2.1", "7.2.2", "7.2.5", "7.2.6", "8.3.1"),
)

ROLES_FILE = Path("docs") / "pci" / "roles.yaml"
#: Role attributes that matter to least privilege (pg_roles columns, by Postgres's words).
ATTRIBUTES = {
    "SUPERUSER": "rolsuper",
    "CREATEROLE": "rolcreaterole",
    "CREATEDB": "rolcreatedb",
    "REPLICATION": "rolreplication",
    "BYPASSRLS": "rolbypassrls",
    "LOGIN": "rolcanlogin",
}
# Each query gives one row per ACL entry (`aclexplode`; an object without an ACL has its
# default one, `acldefault`), or one row with a NULL grantee for an object with no entries.
_RELATIONS = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END
           AS name,
       c.relkind::text AS kind, pg_get_userbyid(c.relowner) AS owner,
       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee) END AS grantee,
       x.privilege_type AS privilege, x.is_grantable AS grantable
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL aclexplode(coalesce(
    c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner)
)) x ON true
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""
_COLUMNS = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END
           AS name,
       a.attname AS column_name,
       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee) END AS grantee,
       x.privilege_type AS privilege, x.is_grantable AS grantable
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(a.attacl) x
WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""
_SCHEMAS = """
SELECT n.nspname AS name, pg_get_userbyid(n.nspowner) AS owner,
       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee) END AS grantee,
       x.privilege_type AS privilege, x.is_grantable AS grantable
FROM pg_namespace n
LEFT JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) x ON true
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""
# Functions that belong to an extension are the extension's, not the schema's.
_FUNCTIONS = """
SELECT CASE WHEN n.nspname = 'public' THEN p.oid::regprocedure::text
            ELSE n.nspname || '.' || p.oid::regprocedure::text END AS name,
       pg_get_userbyid(p.proowner) AS owner, p.prosecdef AS security_definer,
       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee) END AS grantee,
       x.privilege_type AS privilege, x.is_grantable AS grantable
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
LEFT JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) x ON true
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
"""
_DATABASE = """
SELECT d.datname AS name, pg_get_userbyid(d.datdba) AS owner,
       CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee) END AS grantee,
       x.privilege_type AS privilege, x.is_grantable AS grantable
FROM pg_database d
LEFT JOIN LATERAL aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) x ON true
WHERE d.datname = current_database()
"""
#: What an owner holds by default, per kind of object (the same for every owner).
_DEFAULTS = """
SELECT k.kind::text AS kind, array_agg(x.privilege_type ORDER BY x.privilege_type) AS privileges
FROM unnest(ARRAY['r', 's', 'n', 'f', 'd']::"char"[]) AS k(kind),
     LATERAL aclexplode(acldefault(k.kind, 10)) x
WHERE x.grantee = 10
GROUP BY k.kind
"""
_ROLES = """
SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin
FROM pg_roles WHERE rolname = ANY($1::text[])
"""
_MEMBERSHIPS = """
SELECT r.rolname AS role, m.rolname AS member
FROM pg_auth_members am
JOIN pg_roles r ON r.oid = am.roleid
JOIN pg_roles m ON m.oid = am.member
WHERE r.rolname = ANY($1::text[]) OR m.rolname = ANY($1::text[])
"""
_CONNECT = """
SELECT r.name AS role, EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) AS role_exists,
       CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name)
            THEN has_database_privilege(r.name, current_database(), 'CONNECT') END AS can_connect
FROM unnest($1::text[]) AS r(name)
"""
_DEFAULT_KIND = {"relation": "r", "schema": "n", "function": "f", "database": "d"}


# --- the documented side --------------------------------------------------------------------


def load_roles(root: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((root / ROLES_FILE).read_text())
    return spec


def _privileges(value: Any, where: str) -> list[str]:
    if value == "owns":
        return ["owns"]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{ROLES_FILE}: {where}: a list of privileges or `owns`")
    return [p.upper() for p in value]


def _object_cells(kind: str, name: str, entry: Mapping[str, Any]) -> set[str]:
    cells = set()
    for grantee, value in entry.items():
        if grantee in ("why", "columns", "judged_by"):
            continue
        for privilege in _privileges(value, f"{kind} {name}: {grantee}"):
            if privilege == "owns":
                cells |= {f"{kind} {name}: owned by {grantee}", f"{kind} {name}: {grantee} ALL"}
            else:
                cells.add(f"{kind} {name}: {grantee} {privilege}")
    for grantee, by_privilege in (entry.get("columns") or {}).items():
        for privilege, columns in by_privilege.items():
            for column in columns:
                cells.add(f"column {name}.{column}: {grantee} {privilege.upper()}")
    return cells


def expected_cells(spec: Mapping[str, Any], database: str) -> set[str]:
    """The documented matrix of one database (and of its three roles) as comparable lines."""
    documented = spec["databases"][database]
    cells = _object_cells("database", database, documented["database"])
    for name, entry in (documented.get("schemas") or {}).items():
        cells |= _object_cells("schema", name, entry)
    for name, entry in (documented.get("relations") or {}).items():
        cells |= _object_cells("relation", name, entry)
    for name, entry in (documented.get("functions") or {}).items():
        cells |= _object_cells("function", name, entry)
    for role, entry in spec["roles"].items():
        cells |= {f"role {role}: {a}" for a in entry.get("attributes") or []}
        cells |= {f"role {role}: member of {m}" for m in entry.get("member_of") or []}
    return cells


def delegated_objects(spec: Mapping[str, Any], database: str) -> dict[str, str]:
    """Relations whose runtime-role cells another control judges: name -> control id."""
    relations = spec["databases"][database].get("relations") or {}
    return {name: e["judged_by"] for name, e in relations.items() if e.get("judged_by")}


def _is_delegated(cell: str, delegated: Mapping[str, str]) -> bool:
    """The runtime role's table and column privileges on a delegated relation."""
    for name in delegated:
        if cell.startswith(f"relation {name}: runtime "):
            return True
        if cell.startswith(f"column {name}.") and ": runtime " in cell:
            return True
    return False


@dataclass(frozen=True)
class GrantDiff:
    missing: list[str]
    unexpected: list[str]
    delegated: list[str]

    def failures(self, database: str) -> list[str]:
        return [f"{database}: unexpected: {c}" for c in self.unexpected] + [
            f"{database}: missing: {c}" for c in self.missing
        ]


def compare(expected: set[str], live: set[str], delegated: Mapping[str, str]) -> GrantDiff:
    """Both directions of the difference, without the cells another control judges."""
    left = {c for c in expected | live if _is_delegated(c, delegated)}
    return GrantDiff(
        missing=sorted(expected - live - left),
        unexpected=sorted(live - expected - left),
        delegated=sorted(live & left),
    )


# --- the live side --------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleNames:
    """The real role names of one database's owner, runtime and auditor."""

    owner: str
    runtime: str
    auditor: str

    def symbol(self, name: str | None) -> str:
        by_name = {self.owner: "owner", self.runtime: "runtime", self.auditor: "auditor"}
        return by_name.get(name or "", name or "nobody")

    @property
    def names(self) -> list[str]:
        return [self.owner, self.runtime, self.auditor]


def acl_cells(
    kind: str,
    rows: Iterable[Mapping[str, Any]],
    names: RoleNames,
    defaults: Mapping[str, frozenset[str]],
) -> set[str]:
    """Cells from catalog rows (name, owner, grantee, privilege, grantable; one row per ACL
    entry, or one with a NULL grantee for an object with no entries at all). An owner holding
    exactly an owner's default privileges is one cell, `<owner> ALL`."""
    cells = set()
    held: dict[tuple[str, str], set[str]] = {}
    owner_of: dict[str, str] = {}
    default_of: dict[str, frozenset[str]] = {}
    for row in rows:
        name = row["name"]
        owner_of[name] = row["owner"]
        default_kind = "s" if row.get("kind") == "S" else _DEFAULT_KIND[kind]
        default_of[name] = defaults.get(default_kind, frozenset())
        cells.add(f"{kind} {name}: owned by {names.symbol(row['owner'])}")
        if row.get("security_definer"):
            cells.add(f"{kind} {name}: SECURITY DEFINER")
        if row["grantee"] is not None:
            privilege = row["privilege"] + (" WITH GRANT OPTION" if row["grantable"] else "")
            held.setdefault((name, row["grantee"]), set()).add(privilege)
    for (name, grantee), privileges in held.items():
        symbol = names.symbol(grantee)
        if grantee == owner_of[name] and privileges == default_of[name]:
            cells.add(f"{kind} {name}: {symbol} ALL")
        else:
            cells |= {f"{kind} {name}: {symbol} {p}" for p in privileges}
    return cells


def column_cells(rows: Iterable[Mapping[str, Any]], names: RoleNames) -> set[str]:
    return {
        f"column {r['name']}.{r['column_name']}: {names.symbol(r['grantee'])} {r['privilege']}"
        + (" WITH GRANT OPTION" if r["grantable"] else "")
        for r in rows
    }


def role_cells(
    roles: Iterable[Mapping[str, Any]], memberships: Iterable[Mapping[str, Any]], names: RoleNames
) -> set[str]:
    cells = set()
    for row in roles:
        role = names.symbol(row["rolname"])
        cells |= {f"role {role}: {a}" for a, column in ATTRIBUTES.items() if row[column]}
    documented = set(names.names)
    for row in memberships:
        if row["member"] in documented:
            cells.add(f"role {names.symbol(row['member'])}: member of {names.symbol(row['role'])}")
        else:
            cells.add(f"role {names.symbol(row['role'])}: has member {row['member']}")
    return cells


async def live_cells(
    conn: asyncpg.Connection[Any], database: str, names: RoleNames
) -> tuple[set[str], int]:
    """Every privilege of the connected database (`database` names it in the cells, as
    roles.yaml does) as cells; and how many objects were read."""
    defaults = {str(r["kind"]): frozenset(r["privileges"]) for r in await conn.fetch(_DEFAULTS)}
    relations = [dict(r) for r in await conn.fetch(_RELATIONS)]
    schemas = [dict(r) for r in await conn.fetch(_SCHEMAS)]
    functions = [dict(r) for r in await conn.fetch(_FUNCTIONS)]
    database_rows = [dict(r) for r in await conn.fetch(_DATABASE)]
    for row in database_rows:
        row["name"] = database
    cells = acl_cells("relation", relations, names, defaults)
    cells |= acl_cells("schema", schemas, names, defaults)
    cells |= acl_cells("function", functions, names, defaults)
    cells |= column_cells([dict(r) for r in await conn.fetch(_COLUMNS)], names)
    cells |= role_cells(
        [dict(r) for r in await conn.fetch(_ROLES, names.names)],
        [dict(r) for r in await conn.fetch(_MEMBERSHIPS, names.names)],
        names,
    )
    cells |= acl_cells("database", database_rows, names, defaults)
    objects = len({r["name"] for r in relations + schemas + functions}) + 1
    return cells, objects


# --- the check ------------------------------------------------------------------------------


def _names(ctx: EvidenceContext, database: Database, auditor: str) -> RoleNames:
    s = ctx.settings
    if database == "vault":
        return RoleNames(s.vault_owner_role, s.vault_runtime_role, auditor)
    return RoleNames(s.api_owner_role, s.api_runtime_role, auditor)


async def _grants(
    ctx: EvidenceContext, spec: Mapping[str, Any], database: Database
) -> dict[str, Any]:
    other: Database = "api" if database == "vault" else "vault"
    async with ctx.database(database) as conn:
        auditor: str = await conn.fetchval("SELECT current_user")
        names = _names(ctx, database, auditor)
        live, objects = await live_cells(conn, database, names)
        others = _names(ctx, other, auditor)
        connect = [dict(r) for r in await conn.fetch(_CONNECT, [others.owner, others.runtime])]
        actual_name: str = await conn.fetchval("SELECT current_database()")
    delegated = delegated_objects(spec, database)
    diff = compare(expected_cells(spec, database), live, delegated)
    failures = diff.failures(database)
    for row in connect:
        if row["can_connect"]:
            failures.append(
                f"{database}: {other}'s role {row['role']} can CONNECT to {actual_name}"
            )
    return {
        "database": actual_name,
        "roles": {"owner": names.owner, "runtime": names.runtime, "auditor": names.auditor},
        "objects_read": objects,
        "entries_compared": len(live) - len(diff.delegated),
        "missing": diff.missing,
        "unexpected": diff.unexpected,
        "delegated": {cell: "audit-log" for cell in diff.delegated},
        "other_service_connect": connect,
        "failures": failures,
        "live": sorted(live),
    }


async def run(ctx: EvidenceContext) -> ControlResult:
    spec = load_roles(ctx.root)
    databases: dict[str, Any] = {}
    for database in ("vault", "api"):
        databases[database] = await _grants(ctx, spec, database)
    matrix = authz.load_matrix(ctx.root)
    s = ctx.settings
    urls = {"public": s.vault_url, "service": s.service_url, "admin": s.admin_url}
    targets = authz.Targets(
        api_url=s.api_url.rstrip("/"),
        vault_urls={k: v.rstrip("/") for k, v in urls.items()},
        admin_token=s.vault_admin_token,
        publishable_key=s.publishable_key,
        checkout_origin=s.checkout_origin,
        vault_listeners=authz.vault_route_listeners() if len(set(urls.values())) > 1 else {},
    )
    failures = [f for d in databases.values() for f in d.pop("failures")]
    compared = sum(d["entries_compared"] for d in databases.values())
    grants = (
        f"{compared} grant-matrix entries (privileges, owners, role attributes) of 2 "
        "databases equal docs/pci/roles.yaml "
        f"({sum(len(d['delegated']) for d in databases.values())} audit-table cells left to "
        "audit-log); neither service's roles can connect to the other's database"
    )
    evidence: dict[str, Any] = {"grants": databases}
    # Without the admin credential its column cannot be walked (every cell would be a 401).
    columns = authz.KIT_COLUMNS if s.vault_admin_token else ("none", "invalid")
    try:
        walked = await authz.walk(ctx.http, matrix, targets, columns=columns)
    except httpx.TransportError as exc:
        # The grants were read: a difference there fails whether or not the services answer.
        reason = f"the caller matrix could not be walked: {type(exc).__name__}: {exc}"
        if failures:
            return CONTROL.failed("; ".join([*failures, reason]), evidence)
        return CONTROL.not_checked(f"{reason} ({grants})", evidence)
    evidence["caller_matrix"] = walked.to_dict()
    failures += [
        f"{m['service']} {m['row']} <- {m['caller']} ({m['credential']}): "
        f"expected {m['expected']}, got {m['got']}"
        for m in walked.mismatches
    ]
    matrix_summary = (
        f"caller matrix: {walked.cells} cells, {walked.requests} requests, 0 mismatches "
        f"({len(walked.not_walked)} cells not walked, each with its reason)"
    )
    if failures:
        return CONTROL.failed("; ".join(failures), evidence)
    if not s.vault_admin_token:
        return CONTROL.not_checked(
            "no admin credential (TESSERA_VAULT_ADMIN_TOKEN): the matrix's admin column was not "
            f"walked; {grants}; {matrix_summary}",
            evidence,
        )
    return CONTROL.passed(f"{grants}; {matrix_summary}", evidence)
