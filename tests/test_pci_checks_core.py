"""The pure parts of the assessor's kit's checks (no stack, fast): the audited actions kept equal
to the vault's code, the audit tables' privilege rule, the grant matrix's comparison, the caller
matrix's requests, the segmentation result's age rule, the SBOM's validation against uv.lock.
The checks against a running stack, and their planted faults: tests/test_pci_evidence.py."""

from __future__ import annotations

import ast
import datetime
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tessera.pci import authz
from tessera.pci.checks import audit_log, least_privilege, segmentation, software_inventory
from tessera.pci.context import EvidenceContext, EvidenceSettings
from tessera.pci.model import Status
from tests.segmentation.agent import FILTERED, OPEN
from tests.segmentation.campaign import Check, Report, Round, result_record
from tests.segmentation.model import load
from vault.audit import AUDITED_ACTIONS

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.datetime(2031, 6, 1, 12, 0, tzinfo=datetime.UTC)


# --- audit-log ------------------------------------------------------------------------------


def _constant(name: str, scopes: list[ast.AST]) -> set[str] | None:
    """The string values `name` is assigned in the first scope that assigns it (a function,
    then its module): a literal, or a literal dict's values (`{...}[command]`)."""
    for scope in scopes:
        found: set[str] = set()
        assigned = False
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                value: ast.expr | None = node.value
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == name
            ):
                value = node.value
            else:
                continue
            assigned = True
            if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Dict):
                values = value.value.values
            else:
                values = [value] if value is not None else []
            for v in values:
                if not (isinstance(v, ast.Constant) and isinstance(v.value, str)):
                    return None
                found.add(v.value)
        if assigned:
            return found
    return None


def _argument(call: ast.Call, index: int | None, keyword: str) -> ast.expr | None:
    for k in call.keywords:
        if k.arg == keyword:
            return k.value
    if index is not None and len(call.args) > index:
        return call.args[index]
    return None


def _called(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def written_actions() -> tuple[set[str], list[str]]:
    """Every action vault/ writes to the audit log, and the calls whose action could not be
    read. Writers are `AuditLog.append(action=...)` and, found as they appear, every function
    that passes an `action` parameter of its own on to a writer (vault.routes.record, the
    worker's helpers), whose callers are then read in turn."""
    modules = {
        path: ast.parse(path.read_text())
        for path in sorted((ROOT / "vault").rglob("*.py"))
        if path.name != "audit.py"
    }
    writers: dict[str, tuple[int | None, str]] = {"append": (None, "action")}
    actions: set[str] = set()
    unreadable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for path, tree in modules.items():
            for function in ast.walk(tree):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                positional = [a.arg for a in function.args.args]
                if positional[:1] in (["self"], ["cls"]):
                    positional = positional[1:]
                parameters = set(positional) | {a.arg for a in function.args.kwonlyargs}
                for node in ast.walk(function):
                    if not isinstance(node, ast.Call) or _called(node) not in writers:
                        continue
                    index, keyword = writers[str(_called(node))]
                    value = _argument(node, index, keyword)
                    if value is None:
                        continue
                    if isinstance(value, ast.Name) and value.id in parameters:
                        if function.name not in writers:  # a pass-through: read its callers
                            at = positional.index(value.id) if value.id in positional else None
                            writers[function.name] = (at, value.id)
                            changed = True
                        continue
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found: set[str] | None = {value.value}
                    elif isinstance(value, ast.Name):
                        found = _constant(value.id, [function, tree])
                    else:
                        found = None
                    if found is None:
                        unreadable.add(f"{path.relative_to(ROOT)}:{node.lineno}")
                    else:
                        actions |= found
    return actions, sorted(unreadable)


def test_the_audited_actions_are_exactly_the_ones_the_vault_writes() -> None:
    actions, unreadable = written_actions()
    assert unreadable == [], "write the action as a literal so the kit's list can be checked"
    assert {"forward", "token.read", "detokenize", "keys.rotate", "audit.verify"} <= actions
    assert actions - set(AUDITED_ACTIONS) == set(), "add it to vault.audit.AUDITED_ACTIONS"
    assert set(AUDITED_ACTIONS) - actions == set(), "no code writes it any more"
    assert len(AUDITED_ACTIONS) == len(set(AUDITED_ACTIONS))


def _held(**overrides: bool) -> dict[str, dict[str, bool]]:
    held = {t: dict(p) for t, p in audit_log.TABLE_PRIVILEGES.items()}
    for key, value in overrides.items():
        table, privilege = key.rsplit("_", 1)
        held[table][privilege.upper()] = value
    return held


def test_the_audit_tables_rule_passes_the_migrations_grants_and_names_each_deviation() -> None:
    columns = {"audit_log": set(), "audit_chain_heads": {"last_seq", "last_hash"}}
    assert audit_log.judge_privileges("tessera_vault", _held(), columns) == []
    assert audit_log.judge_privileges("tessera_vault", _held(audit_log_update=True), columns) == [
        "tessera_vault may UPDATE audit_log"
    ]
    assert audit_log.judge_privileges("r", _held(audit_log_insert=False), columns) == [
        "r lacks INSERT on audit_log"
    ]
    assert audit_log.judge_privileges("r", _held(audit_chain_heads_truncate=True), columns) == [
        "r may TRUNCATE audit_chain_heads"
    ]
    wider = {**columns, "audit_chain_heads": {"last_seq", "last_hash", "chain_id"}}
    assert audit_log.judge_privileges("r", _held(), wider) == [
        "r may UPDATE audit_chain_heads columns chain_id"
    ]
    narrower = {**columns, "audit_chain_heads": {"last_seq"}}
    assert audit_log.judge_privileges("r", _held(), narrower) == [
        "r cannot UPDATE audit_chain_heads columns last_hash"
    ]


def test_coverage_lists_every_audited_action_and_marks_the_ones_never_performed() -> None:
    latest = {
        "forward": {
            "occurred_at": NOW - datetime.timedelta(minutes=2),
            "actor": "service",
            "outcome": "completed",
            "chain_id": 3,
            "seq": 9,
            "has_request_id": True,
            "has_token_hmac": True,
        }
    }
    covered = audit_log.coverage(latest, {"forward": 4, "token.create": 1}, NOW)
    assert list(covered["actions"]) == list(AUDITED_ACTIONS)
    assert covered["actions"]["forward"]["seconds_before_report"] == 120.0
    assert covered["actions"]["forward"]["records"] == 4
    assert covered["actions"]["detokenize"] == "no record yet"
    assert covered["not_in_the_list"] == {"token.create": 1}


# --- least-privilege: the grant matrix --------------------------------------------------------

NAMES = least_privilege.RoleNames("db_owner", "db_runtime", "kit")
TABLE_DEFAULT = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)
DEFAULTS = {"r": TABLE_DEFAULT, "s": frozenset({"SELECT", "UPDATE", "USAGE"})}


def _rows(name: str, owner: str, grants: dict[str, set[str]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "kind": "r", "owner": owner, "grantee": grantee, "privilege": p}
        | {"grantable": False}
        for grantee, privileges in grants.items()
        for p in sorted(privileges)
    ]


def test_an_owner_with_its_default_privileges_is_one_cell_and_anything_else_is_listed() -> None:
    rows = _rows("tokens", "db_owner", {"db_owner": set(TABLE_DEFAULT), "db_runtime": {"SELECT"}})
    assert least_privilege.acl_cells("relation", rows, NAMES, DEFAULTS) == {
        "relation tokens: owned by owner",
        "relation tokens: owner ALL",
        "relation tokens: runtime SELECT",
    }
    revoked = _rows("tokens", "db_owner", {"db_owner": set(TABLE_DEFAULT - {"TRUNCATE"})})
    cells = least_privilege.acl_cells("relation", revoked, NAMES, DEFAULTS)
    assert "relation tokens: owner ALL" not in cells
    assert "relation tokens: owner DELETE" in cells
    stranger = _rows("tokens", "someone", {"someone": set(TABLE_DEFAULT), "PUBLIC": {"SELECT"}})
    cells = least_privilege.acl_cells("relation", stranger, NAMES, DEFAULTS)
    assert cells == {
        "relation tokens: owned by someone",
        "relation tokens: someone ALL",
        "relation tokens: PUBLIC SELECT",
    }


SPEC: dict[str, Any] = {
    "roles": {
        "owner": {"attributes": ["LOGIN"], "member_of": []},
        "runtime": {"attributes": ["LOGIN"], "member_of": []},
        "auditor": {"attributes": ["LOGIN"], "member_of": ["pg_read_all_data"]},
    },
    "databases": {
        "vault": {
            "database": {"owner": "owns", "runtime": ["CONNECT"]},
            "relations": {
                "tokens": {
                    "owner": "owns",
                    "runtime": ["SELECT", "INSERT"],
                    "columns": {"runtime": {"UPDATE": ["deleted_at"]}},
                    "why": "cards",
                },
                "audit_log": {
                    "owner": "owns",
                    "runtime": ["SELECT", "INSERT"],
                    "judged_by": "audit-log",
                    "why": "trail",
                },
            },
        }
    },
}


def test_the_comparison_lists_both_directions_and_leaves_the_audit_cells_to_audit_log() -> None:
    expected = least_privilege.expected_cells(SPEC, "vault")
    assert {
        "database vault: owned by owner",
        "database vault: owner ALL",
        "database vault: runtime CONNECT",
        "relation tokens: runtime INSERT",
        "column tokens.deleted_at: runtime UPDATE",
        "role auditor: member of pg_read_all_data",
    } <= expected
    delegated = least_privilege.delegated_objects(SPEC, "vault")
    assert delegated == {"audit_log": "audit-log"}
    live = (expected - {"relation tokens: runtime INSERT"}) | {
        "relation tokens: runtime DELETE",
        "relation audit_log: runtime UPDATE",
        "column audit_log.outcome: runtime UPDATE",
        "relation audit_log: PUBLIC SELECT",
    }
    diff = least_privilege.compare(expected, live, delegated)
    assert diff.missing == ["relation tokens: runtime INSERT"]
    assert diff.unexpected == [
        "relation audit_log: PUBLIC SELECT",  # another role's grant: judged here
        "relation tokens: runtime DELETE",
    ]
    assert "relation audit_log: runtime UPDATE" in diff.delegated
    assert "column audit_log.outcome: runtime UPDATE" in diff.delegated
    assert diff.failures("vault")[0] == "vault: unexpected: relation audit_log: PUBLIC SELECT"
    assert least_privilege.compare(expected, expected, delegated).failures("vault") == []


def test_role_cells_name_attributes_memberships_and_members() -> None:
    roles = [
        {"rolname": "db_runtime", **{c: False for c in least_privilege.ATTRIBUTES.values()}}
        | {"rolcanlogin": True, "rolbypassrls": True}
    ]
    memberships = [
        {"role": "db_owner", "member": "db_runtime"},
        {"role": "db_owner", "member": "alice"},
    ]
    assert least_privilege.role_cells(roles, memberships, NAMES) == {
        "role runtime: LOGIN",
        "role runtime: BYPASSRLS",
        "role runtime: member of owner",
        "role owner: has member alice",
    }


def test_roles_yaml_explains_every_entry_and_documents_both_databases() -> None:
    spec = least_privilege.load_roles(ROOT)
    assert set(spec["databases"]) == {"api", "vault"}
    for database, documented in spec["databases"].items():
        for section in ("database", "schemas", "relations", "functions"):
            entries = documented[section]
            items = [entries] if section == "database" else list(entries.values())
            assert all(str(e.get("why", "")).strip() for e in items), (database, section)
        cells = least_privilege.expected_cells(spec, database)
        assert f"database {database}: runtime CONNECT" in cells
        assert least_privilege.delegated_objects(spec, database) == (
            {"audit_log": "audit-log", "audit_chain_heads": "audit-log"}
            if database == "vault"
            else {}
        )


# --- least-privilege: the caller matrix -------------------------------------------------------

TARGETS = authz.Targets(
    api_url="http://api",
    vault_urls={"public": "http://public", "service": "http://service", "admin": "http://admin"},
    admin_token="admin-token",
    publishable_key="pk_test_x",
    checkout_origin="https://shop.example",
    vault_listeners={"POST /v1/detokenize": frozenset({"admin"})},
)


def test_every_row_of_the_matrix_can_be_asked_without_touching_an_object() -> None:
    matrix = authz.load_matrix(ROOT)
    for cell in authz.cells(matrix):
        if cell.caller not in authz.KIT_COLUMNS:
            continue
        prepared = authz.requests_for(cell, TARGETS)
        if isinstance(prepared, str):
            assert authz.not_walked(cell), cell  # only the documented exceptions
            continue
        for request in prepared:
            assert "{" not in request.url, request.url
            if request.method not in ("GET", "OPTIONS"):
                assert request.body is not None  # a body the route refuses, always
                assert b"number" not in request.body
                assert b"token" not in request.body
    rotate = authz.Cell("vault", "POST /v1/keys/rotate", "admin", 200)
    assert "rotate" in str(authz.requests_for(rotate, TARGETS))
    invalid = authz.Cell("vault", "POST /v1/detokenize", "invalid", 401)
    variants = authz.requests_for(invalid, TARGETS)
    assert isinstance(variants, list)
    assert len(variants) == 4
    assert {r.url for r in variants} == {"http://admin/v1/detokenize"}


def test_a_refused_body_proves_authorization_only_where_the_matrix_expects_success() -> None:
    detokenize = authz.Cell("vault", "POST /v1/detokenize", "admin", 200)
    assert authz.matches(detokenize, 400)
    assert authz.matches(detokenize, 422)
    assert not authz.matches(detokenize, 403)
    assert not authz.matches(authz.Cell("vault", "POST /v1/detokenize", "none", 401), 400)
    assert not authz.matches(authz.Cell("vault", "GET /v1/audit/verify", "admin", 200), 400)


def test_path_parameters_become_well_formed_ids_that_name_nothing() -> None:
    first = authz.fill_path("/v1/payments/{payment}/refunds")
    assert first.startswith("/v1/payments/pay_")
    assert first.endswith("/refunds")
    assert first != authz.fill_path("/v1/payments/{payment}/refunds")
    assert authz.fill_path("/elements/v1/{name}") == "/elements/v1/tessera.js"
    with pytest.raises(ValueError, match="card"):
        authz.fill_path("/v1/{card}")


def test_the_vaults_own_listener_map_covers_every_vault_row_but_the_preflight() -> None:
    routes = authz.vault_route_listeners()
    rows = {authz.route_of(row) for row in authz.load_matrix(ROOT)["vault"]}
    assert rows - set(routes) == {"OPTIONS /v1/tokens"}
    assert routes["POST /v1/detokenize"] == {"admin"}
    assert routes["POST /v1/tokens"] == {"public"}


# --- segmentation ---------------------------------------------------------------------------


def _report(*, passed: bool = True) -> Report:
    model = load()
    probes = model.probes()
    checked = {p: OPEN if model.allows(p) else FILTERED for p in probes}
    opened = {p: OPEN for p in probes}
    report = Report(
        model, rounds={"policy": Round("policy", checked), "open": Round("open", opened)}
    )
    report.checks.append(Check("the probe matrix equals flows.yaml", passed))
    return report


def test_a_campaigns_result_file_says_what_the_kit_judges() -> None:
    result = result_record(_report(), NOW, "abc123")
    assert result["passed"] is True
    assert result["commit"] == "abc123"
    assert result["probes"] == result["allowed"] + result["denied"] > 0
    assert result["denied_blocked"] == result["denied"]
    assert result["negative_control"]["through_with_policy_off"] == result["denied"]
    failures, summary = segmentation.judge(result, NOW + datetime.timedelta(days=30))
    assert failures == []
    assert "30 days before the report" in summary
    failed = result_record(_report(passed=False), NOW, None)
    assert segmentation.judge(failed, NOW)[0] == [
        f"the last run ({NOW.date()}) failed: the probe matrix equals flows.yaml"
    ]


def test_a_result_older_than_six_months_or_incomplete_fails() -> None:
    result = result_record(_report(), NOW, "abc123")
    old, _ = segmentation.judge(result, NOW + datetime.timedelta(days=184))
    assert len(old) == 1
    assert "184 days old" in old[0]
    assert "11.4.6" in old[0]
    assert segmentation.judge(result, NOW + datetime.timedelta(days=183))[0] == []
    ahead, _ = segmentation.judge(result, NOW - datetime.timedelta(days=1))
    assert ahead == [f"the result is dated after the report ({NOW.isoformat()})"]
    partial = {k: v for k, v in result.items() if k != "denied_blocked"}
    assert "not a complete run" in segmentation.judge(partial, NOW)[0][0]
    leaky = {**result, "denied_blocked": result["denied"] - 1}
    assert segmentation.judge(leaky, NOW)[0] == [
        f"denied probes blocked {result['denied'] - 1}/{result['denied']}"
    ]


# --- software-inventory ---------------------------------------------------------------------

LOCK: dict[str, Any] = {
    "package": [
        {
            "name": "shop",
            "version": "1.0",
            "source": {"editable": "."},
            "dependencies": [{"name": "web", "extra": ["fast"]}],
            "dev-dependencies": {"dev": [{"name": "pytest"}]},
        },
        {
            "name": "web",
            "version": "2.0",
            "dependencies": [{"name": "Typing_Extensions"}],
            "optional-dependencies": {"fast": [{"name": "uvloop"}], "slow": [{"name": "gevent"}]},
        },
        {"name": "typing-extensions", "version": "4.0"},
        {"name": "uvloop", "version": "0.2"},
        {"name": "gevent", "version": "9"},
        {"name": "pytest", "version": "8"},
    ]
}


def test_the_runtime_closure_follows_dependencies_and_asked_extras_but_not_dev_groups() -> None:
    assert software_inventory.runtime_closure(LOCK) == {
        "web": "2.0",
        "typing-extensions": "4.0",
        "uvloop": "0.2",
    }
    real = software_inventory.runtime_closure(tomllib.loads((ROOT / "uv.lock").read_text()))
    assert {"litestar", "asyncpg", "cryptography", "uvloop"} <= set(real)
    assert not {"pytest", "mypy", "ruff", "pip-audit"} & set(real)


def test_the_sbom_must_list_every_locked_package_at_its_version_and_nothing_else() -> None:
    locked = software_inventory.runtime_closure(LOCK)
    components = [{"name": n, "version": v} for n, v in locked.items()]
    good = {"bomFormat": "CycloneDX", "specVersion": "1.5", "components": components}
    failures, compared = software_inventory.validate_sbom(good, locked)
    assert failures == []
    assert compared["components"] == 3
    bad = {
        **good,
        "components": [
            {"name": "web", "version": "2.1"},
            {"name": "typing_extensions", "version": "4.0"},
            {"name": "pytest", "version": "8"},
        ],
    }
    failures, _ = software_inventory.validate_sbom(bad, locked)
    assert failures == [
        "locked runtime packages missing from the SBOM: uvloop",
        "SBOM versions differ from the lock: web 2.1 (locked 2.0)",
        "SBOM components outside the lock's runtime closure: pytest",
    ]
    empty, _ = software_inventory.validate_sbom({"bomFormat": "SPDX", "components": []}, {})
    assert empty == ["the SBOM is not CycloneDX 1.5 (SPDX None)", "the SBOM lists no component"]


async def test_running_the_campaign_needs_root_and_a_missing_result_is_never_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = EvidenceSettings(segmentation_result=str(tmp_path / "latest.json"))
    ctx = EvidenceContext(settings, NOW, ROOT, tmp_path / "out")
    try:
        missing = await segmentation.run(ctx)
        assert missing.status == Status.NOT_CHECKED
        assert missing.summary.startswith("never run on this machine: run `make segmentation`")
        ctx.run_segmentation = True
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        unprivileged = await segmentation.run(ctx)
        assert unprivileged.status == Status.NOT_CHECKED
        assert "needs root" in unprivileged.summary
    finally:
        await ctx.close()
