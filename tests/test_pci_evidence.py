"""The assessor's kit (`tessera pci evidence`) against a whole stack of this module's own, after
the demo flow: on the clean stack no control fails; with one fault planted, exactly the control
that owns it fails, and says what it found.

The stack (tests/support/pci_stack.py, started once for the module): fresh databases
`tessera_{api,vault}_pci<TESSERA_TEST_DB_SUFFIX>`, Redis databases 10 and 11 (or
TESSERA_TEST_PCI_REDIS_DBS, e.g. `6,7` when two people run this module at once), PSP A and B,
vault, API and the API's worker, every log in one directory; then a merchant tokenizes a card
with its CVC from its checkout origin, pays, captures, refunds part, and a second merchant pays
through PSP B. `pci.settings` is the kit's `EvidenceSettings` for it (the auditor role's DSNs,
the Redis URLs, the log directory, the admin token, the CVC TTL, the merchant's publishable key
and origin).

Adding a planted-fault test (about fifteen lines): plant the fault, call `assert_only_failing`
with the control that must catch it and words its summary or evidence must contain, and undo the
fault in a `finally`, so the module's other tests still see a clean stack:

    def test_<control>_notices_<fault>(pci: PciStack, tmp_path: Path) -> None:
        rows = pci.as_owner("vault", "UPDATE ... RETURNING id")   # SQL as the owner role
        try:
            assert_only_failing(pci.settings, tmp_path, "<control-id>", names=(rows[0]["id"],))
        finally:
            pci.as_owner("vault", "UPDATE ... /* back as it was */")

`assert_only_failing(settings, out, expected, *, now=None, names=())` runs the whole kit (with
`now`, judged at that time: an injected clock for cryptoperiods and retention) and asserts that
the failing controls are exactly `{expected}` and that every one of `names` appears in its
summary or evidence. Settings can be changed per test with `msgspec.structs.replace`
(e.g. a log directory holding a planted line). Controls whose check module nobody has written
yet are left out of every assertion (see `not_written`), until their module exists.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis

from tessera.pci import authz
from tessera.pci.checks import CHECKS
from tessera.pci.context import EvidenceSettings
from tessera.pci.evidence import evidence
from tests.segmentation.agent import FILTERED, OPEN
from tests.segmentation.campaign import Report, Round, result_record
from tests.segmentation.model import load
from tests.support.pci_stack import CARD, ORIGIN, PciStack, start_pci_stack
from tests.support.tampering_edge import SKIMMER, TamperingEdge
from vault.elements.inventory import committed, sri

ROOT = Path(__file__).resolve().parents[1]

#: Controls allowed to be "not checked" on this machine, and why. Not checked is never a pass:
#: each is listed in the report with its reason; this list only says which reasons are expected
#: here.
EXPECTED_NOT_CHECKED_HERE: dict[str, str] = {
    "software-inventory": (
        "pip-audit needs PyPI's advisory data, which these machines cannot reach; where it is "
        "reachable the control passes or fails"
    ),
    "segmentation": (
        "the module's stack points the kit at a result file of its own that no run wrote "
        "(a campaign needs root and half a minute): the control passes on a real campaign's "
        "result in tests/test_segmentation.py's end-to-end test, and its age and verdict rules "
        "are tested below with a written result"
    ),
}


def not_written(data: dict[str, Any]) -> set[str]:
    """Controls whose check module does not exist yet (another engineer's, in progress): the
    runner reports them as broken checks that could not be imported."""
    return {
        c["control"]
        for c in data["controls"]
        if c["summary"].startswith("the check itself broke: ModuleNotFoundError: No module named")
        and "tessera.pci.checks." in c["summary"]
    }


def run_kit(
    settings: EvidenceSettings, out: Path, *, now: datetime.datetime | None = None
) -> dict[str, Any]:
    return asyncio.run(evidence(settings, out, now=now, root=ROOT))


def failing(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c["control"]: c
        for c in data["controls"]
        if c["status"] == "fail" and c["control"] not in not_written(data)
    }


def assert_only_failing(
    settings: EvidenceSettings,
    out: Path,
    expected: str,
    *,
    now: datetime.datetime | None = None,
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the whole kit; exactly `expected` fails, and its summary or evidence contains every
    one of `names`. Returns the report (report.json's content) for further assertions."""
    data = run_kit(settings, out, now=now)
    failed = failing(data)
    assert set(failed) == {expected}, {c: f["summary"][:300] for c, f in failed.items()}
    control = failed[expected]
    said = control["summary"] + json.dumps(control["evidence"], default=str)
    for name in names:
        assert str(name) in said, f"{expected} does not name {name!r}: {control['summary']}"
    assert data["verdict"] == "fail"
    assert json.loads((out / "report.json").read_text())["verdict"] == "fail"
    return data


@pytest.fixture(scope="module")
def pci(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PciStack]:
    stack = start_pci_stack(Path(tmp_path_factory.mktemp("pci-stack")))
    # No segmentation run on this stack: its own result file, which nothing has written.
    stack.settings = msgspec.structs.replace(
        stack.settings, segmentation_result=str(stack.log_dir.parent / "segmentation.json")
    )
    try:
        yield stack
    finally:
        stack.stop()


def _counts(pci: PciStack) -> dict[str, Any]:
    """Row counts of what a write by the kit would change, and the vault's audit actions."""
    queries = {
        "vault": [
            "merchants",
            "tokens",
            "data_keys",
            "tokens WHERE deleted_at IS NOT NULL",
        ],
        "api": ["merchants", "merchant_api_keys", "payments", "refunds", "webhook_endpoints"],
    }

    async def read() -> dict[str, Any]:
        counts: dict[str, Any] = {}
        for service, tables in queries.items():
            conn = await asyncpg.connect(pci.owner_dsn(service), timeout=10)
            try:
                for table in tables:
                    counts[f"{service} {table}"] = await conn.fetchval(
                        f"SELECT count(*) FROM {table}"
                    )
                if service == "vault":  # what callers did (the worker's own runs aside)
                    rows = await conn.fetch(
                        "SELECT actor || ' ' || action AS what, count(*) FROM audit_log "
                        "WHERE actor NOT LIKE 'worker:%' GROUP BY 1"
                    )
                    counts["audit"] = {r["what"]: r["count"] for r in rows}
            finally:
                await conn.close()
        return counts

    return asyncio.run(read())


def test_clean_stack_has_no_failing_control(pci: PciStack, tmp_path: Path) -> None:
    before = _counts(pci)
    started = time.monotonic()
    data = run_kit(pci.settings, tmp_path)
    seconds = time.monotonic() - started
    after = _counts(pci)

    print(f"\nthe kit on the clean stack: {seconds:.1f} s")
    for c in data["controls"]:
        print(
            f"  {c['status']:<12} {c['control']:<20} {c['seconds']:>6.2f} s  {c['summary'][:110]}"
        )

    assert failing(data) == {}, {c: f["summary"] for c, f in failing(data).items()}
    if not not_written(data):
        assert data["verdict"] == "pass"
    md, js = tmp_path / "report.md", tmp_path / "report.json"
    assert md.exists()
    written = json.loads(js.read_text())
    assert written["verdict"] == data["verdict"]
    assert [(c["control"], c["status"]) for c in written["controls"]] == [
        (c["control"], c["status"]) for c in data["controls"]
    ]
    ids = [c["control"] for c in data["controls"]]  # one per check module, in CHECKS order
    assert len(ids) == len(set(ids)) == len(CHECKS)
    for entry in data["not_checked"]:
        assert entry["control"] in EXPECTED_NOT_CHECKED_HERE, entry
        assert len(entry["reason"]) > 20, entry
    statuses = {c["control"]: c["status"] for c in data["controls"]}
    assert statuses["audit-log"] == "pass"
    assert statuses["least-privilege"] == "pass"

    # The demo flow is what the audit log shows; the kit's own admin reads are audited too,
    # and they are all it added: it changed nothing else.
    audit = next(c for c in data["controls"] if c["control"] == "audit-log")["evidence"]
    assert audit["intact"] is True
    assert len(audit["chain_heads"]) == 16
    actions = audit["coverage"]["actions"]
    assert actions["merchant.register"]["actor"] == "admin"
    assert actions["forward"]["outcome"] == "completed"
    assert actions["detokenize"] == "no record yet"
    added = {a: n - before["audit"].get(a, 0) for a, n in after.pop("audit").items()}
    assert {a for a, n in added.items() if n} <= {"admin keys.inventory"}, added
    before.pop("audit")
    assert after == before

    grants = next(c for c in data["controls"] if c["control"] == "least-privilege")["evidence"]
    assert grants["grants"]["vault"]["delegated"]  # the audit tables' cells: audit-log's
    matrix = grants["caller_matrix"]
    assert matrix["mismatches"] == []
    assert matrix["requests"] > matrix["cells_walked"] > 100
    assert matrix["authorization_passed_body_refused"] >= 2  # detokenize, merchants
    sbom = tmp_path / "sbom.cdx.json"
    assert json.loads(sbom.read_text())["bomFormat"] == "CycloneDX"


def test_audit_log_notices_an_edited_record(pci: PciStack, tmp_path: Path) -> None:
    edited = pci.as_owner(
        "vault",
        "UPDATE audit_log AS a SET outcome = 'tampered' FROM ("
        " SELECT chain_id, seq, outcome FROM audit_log WHERE action = 'forward'"
        " ORDER BY occurred_at LIMIT 1) AS o"
        " WHERE (a.chain_id, a.seq) = (o.chain_id, o.seq)"
        " RETURNING a.chain_id, a.seq, o.outcome AS original",
    )
    chain, seq, original = edited[0]["chain_id"], edited[0]["seq"], edited[0]["original"]
    try:
        data = assert_only_failing(
            pci.settings, tmp_path, "audit-log", names=(f"chain {chain}", f"seq {seq}")
        )
        control = next(c for c in data["controls"] if c["control"] == "audit-log")
        assert control["evidence"]["broken"] == [
            {
                "chain_id": chain,
                "seq": seq,
                "problem": "hash_mismatch",
                "message": "the record does not match its hash",
            }
        ]
    finally:
        pci.as_owner(
            "vault",
            f"UPDATE audit_log SET outcome = '{original}' "
            f"WHERE chain_id = {int(chain)} AND seq = {int(seq)}",
        )


def test_audit_log_alone_notices_the_runtime_role_may_update_the_log(
    pci: PciStack, tmp_path: Path
) -> None:
    pci.as_owner("vault", "GRANT UPDATE ON audit_log TO tessera_vault")
    try:
        data = assert_only_failing(
            pci.settings, tmp_path, "audit-log", names=("tessera_vault may UPDATE audit_log",)
        )
        # least-privilege saw the grant and left it to audit-log, as roles.yaml says
        grants = next(c for c in data["controls"] if c["control"] == "least-privilege")
        assert (
            "relation audit_log: runtime UPDATE"
            in grants["evidence"]["grants"]["vault"]["delegated"]
        )
    finally:
        pci.as_owner("vault", "REVOKE UPDATE ON audit_log FROM tessera_vault")


def test_least_privilege_notices_an_undocumented_grant(pci: PciStack, tmp_path: Path) -> None:
    pci.as_owner("vault", "GRANT DELETE ON tokens TO tessera_vault")
    try:
        assert_only_failing(
            pci.settings,
            tmp_path,
            "least-privilege",
            names=("vault: unexpected: relation tokens: runtime DELETE",),
        )
    finally:
        pci.as_owner("vault", "REVOKE DELETE ON tokens FROM tessera_vault")


def test_pan_outside_vault_notices_a_card_number_in_an_api_table(
    pci: PciStack, tmp_path: Path
) -> None:
    """The card the demo tokenized, typed into a payment's description: the evidence names
    the table and the masked number, and the vault says it holds that card."""
    payment = pci.demo.payment["id"]
    (before,) = pci.as_owner("api", f"SELECT description FROM payments WHERE id = '{payment}'")
    grouped = " ".join(CARD[i : i + 4] for i in range(0, 16, 4))
    pci.as_owner(
        "api",
        f"UPDATE payments SET description = 'paid by phone, card {grouped}' WHERE id = '{payment}'",
    )
    try:
        data = assert_only_failing(
            pci.settings,
            tmp_path,
            "pan-outside-vault",
            names=("public.payments", f"{CARD[:6]}…{CARD[-4:]}", "the vault holds this card"),
        )
        control = next(c for c in data["controls"] if c["control"] == "pan-outside-vault")
        (number,) = control["evidence"]["numbers"]
        assert number["vault"]["stored"] is True
        assert number["vault"]["tokens"] >= 2  # the demo's two merchants tokenized it
        (finding,) = control["evidence"]["findings"]
        assert finding["source"] == "api_database"
        assert finding["encoding"] == "clear"
        assert finding["location"].startswith("public.payments (dump line ")
        assert CARD not in (tmp_path / "report.json").read_text()
        assert CARD not in (tmp_path / "report.md").read_text()
    finally:
        pci.as_owner(
            "api",
            "UPDATE payments SET description = "
            + ("NULL" if before["description"] is None else f"'{before['description']}'")
            + f" WHERE id = '{payment}'",
        )


def test_pan_outside_vault_notices_card_numbers_in_log_files(pci: PciStack, tmp_path: Path) -> None:
    """Two rotated logs of the stack: one with a number in clear on line 3, one compressed with
    a number in base64 on line 2; neither card is one the vault holds."""
    in_clear, in_base64 = "5555555555554444", "6011111111111117"
    rotated = pci.log_dir / "api.log.1"
    compressed = pci.log_dir / "worker.log.2.gz"
    rotated.write_text(
        '{"event": "request", "status": 200}\n'
        '{"event": "request", "status": 201}\n'
        f'{{"event": "debug", "body": "{{\\"number\\": \\"{in_clear}\\"}}"}}\n'
    )
    body = base64.b64encode(f'{{"number": "{in_base64}"}}'.encode()).decode()
    compressed.write_bytes(gzip.compress(f'{{"ok": 1}}\n{{"payload": "{body}"}}\n'.encode()))
    try:
        data = assert_only_failing(
            pci.settings,
            tmp_path,
            "pan-outside-vault",
            names=(f"{rotated}:3", f"{compressed}:2", "555555…4444", "601111…1117"),
        )
        control = next(c for c in data["controls"] if c["control"] == "pan-outside-vault")
        found = {
            (f["masked"], f["encoding"], f["location"]) for f in control["evidence"]["findings"]
        }
        assert found == {
            ("555555…4444", "clear", f"{rotated}:3"),
            ("601111…1117", "base64", f"{compressed}:2"),
        }
        assert [n["vault"] for n in control["evidence"]["numbers"]] == [
            {"stored": False, "tokens": 0},
            {"stored": False, "tokens": 0},
        ]
        assert "the vault does not hold this card" in control["summary"]
    finally:
        rotated.unlink()
        compressed.unlink()


def test_no_sad_stored_notices_a_cvc_column_a_cvc_kept_forever_and_one_in_clear(
    pci: PciStack, tmp_path: Path
) -> None:
    """A `cvv` column in the vault's tokens table, a held CVC made persistent, and a CVC in
    clear under a key of its own in the vault's Redis: all three named, and nothing else fails."""
    year = datetime.datetime.now(datetime.UTC).year + 2
    card = {"number": "378282246310005", "exp_month": 12, "exp_year": year, "cvc": "1234"}
    made = httpx.post(
        pci.settings.vault_url + "/v1/tokens",
        json=card,
        headers={"authorization": f"Bearer {pci.merchant['publishable_key']}", "origin": ORIGIN},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    held = f"vault:cvc:{made.json()['id']}"
    client = redis.Redis.from_url(pci.settings.vault_redis_url)
    pci.as_owner("vault", "ALTER TABLE tokens ADD COLUMN cvv text")
    try:
        assert client.persist(held)
        client.set("vault:debug:last", "1234", ex=600)
        assert_only_failing(
            pci.settings,
            tmp_path,
            "no-sad-stored",
            names=(
                "column tokens.cvv (text) is named like SAD",
                f"held CVC {held} has no TTL",
                "string vault:debug:last holds a value of exactly 3 or 4 digits",
            ),
        )
    finally:
        pci.as_owner("vault", "ALTER TABLE tokens DROP COLUMN cvv")
        client.delete(held, "vault:debug:last")
        client.close()


def test_segmentation_fails_on_a_result_older_than_six_months(
    pci: PciStack, tmp_path: Path
) -> None:
    model = load()
    probes = model.probes()
    report = Report(
        model,
        rounds={
            "policy": Round("policy", {p: OPEN if model.allows(p) else FILTERED for p in probes}),
            "open": Round("open", dict.fromkeys(probes, OPEN)),
        },
    )
    ran = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=200)
    result = tmp_path / "latest.json"
    result.write_text(json.dumps(result_record(report, ran, "0" * 40)))
    settings = msgspec.structs.replace(pci.settings, segmentation_result=str(result))
    assert_only_failing(settings, tmp_path / "out", "segmentation", names=("200 days old",))


def test_the_caller_matrix_walk_reports_a_route_answering_otherwise(pci: PciStack) -> None:
    """A matrix that disagrees with the services (here: the vault's audit verification said to
    be open to everyone) is reported cell by cell, with what came back."""
    matrix = authz.load_matrix(ROOT)
    row = list(matrix["vault"]["GET /v1/audit/verify"])
    row[:2] = [200, 200]  # none, invalid
    wrong = {**matrix, "vault": {**matrix["vault"], "GET /v1/audit/verify": row}}
    s = pci.settings
    targets = authz.Targets(
        api_url=s.api_url,
        vault_urls={"public": s.vault_url, "service": s.vault_url, "admin": s.vault_url},
        admin_token=s.vault_admin_token,
        publishable_key=s.publishable_key,
        checkout_origin=s.checkout_origin,
    )

    async def walk() -> authz.Walk:
        async with httpx.AsyncClient(timeout=30) as http:
            return await authz.walk(http, wrong, targets)

    walked = asyncio.run(walk())
    assert {(m["row"], m["caller"], m["got"]) for m in walked.mismatches} == {
        ("GET /v1/audit/verify", "none", 401),
        ("GET /v1/audit/verify", "invalid", 401),
    }
    assert len(walked.mismatches) == 5  # none, and each of the four invalid credentials


def replace_file(path: Path, text: str) -> None:
    """Swap a whole new file in (the vault and its worker may read the keyring meanwhile)."""
    staged = path.with_name(path.name + ".planted")
    staged.write_text(text)
    staged.chmod(0o600)
    staged.replace(path)


def test_keys_notices_a_kek_version_older_than_its_cryptoperiod(
    pci: PciStack, tmp_path: Path
) -> None:
    """The KEK version the stack was made with, dated 91 days back in the local KMS's keyring
    (as a key never rotated would be): past its 90-day cryptoperiod, only `keys` fails, naming
    the version and its age. (Moving the clock 91 days instead fails retention,
    payment-page-scripts and critical-alerts too, rightly: their periodic jobs would not have
    run for 91 days. The clock's effect on `keys` is tested in test_vault_key_inventory.py.)"""
    keyring = Path(pci.stack.env["TESSERA_VAULT_LOCAL_KMS_PATH"])
    original = keyring.read_text()
    document = json.loads(original)
    [version] = document["versions"]
    made = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=91)
    document["created"][version] = made.isoformat()
    replace_file(keyring, json.dumps(document))
    try:
        data = assert_only_failing(
            pci.settings,
            tmp_path,
            "keys",
            names=(
                f"the primary KEK version {version} is 91.0 days old",
                "past its cryptoperiod of 90 days: the KEK was not rotated in time",
            ),
        )
    finally:
        replace_file(keyring, original)
    control = next(c for c in data["controls"] if c["control"] == "keys")
    [primary] = control["evidence"]["kek"]["versions"]
    assert (primary["name"], primary["primary"], primary["age_days"]) == (version, True, 91.0)


def test_payment_page_scripts_notices_a_script_altered_at_the_edge(
    pci: PciStack, tmp_path: Path
) -> None:
    """A compromised edge (a CDN or ingress in front of the vault's public listener) appends a
    skimmer to tessera.js; the kit reaches the vault through it as browsers do. Only
    `payment-page-scripts` fails, naming the asset and both hashes; nothing in the repository
    changed, and the vault itself serves the reviewed file."""
    vault_url = pci.settings.vault_url
    edge = TamperingEdge(vault_url, tamper={"/elements/v1/tessera.js": SKIMMER}).start()
    try:
        served = sri(httpx.get(vault_url + "/elements/v1/tessera.js").content + SKIMMER)
        reviewed = committed().asset("tessera.js")
        assert reviewed is not None
        through_edge = msgspec.structs.replace(
            pci.settings,
            vault_url=edge.url,
            vault_service_url=vault_url,
            vault_admin_url=vault_url,
        )
        assert_only_failing(
            through_edge,
            tmp_path,
            "payment-page-scripts",
            names=("tessera.js", reviewed.integrity, served),
        )
    finally:
        edge.stop()


def test_retention_notices_a_token_past_its_period_until_one_sweep(
    pci: PciStack, tmp_path: Path
) -> None:
    """A token unused past the merchant's period (last used 401 days ago, moved back as the
    owner) that the sweep has not shredded yet fails `retention` alone; one run of the
    retention job (`python -m vault worker --once retention`) shreds it, and the control passes."""
    merchant = pci.merchant["merchant_id"]
    year = datetime.datetime.now(datetime.UTC).year + 3
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": year}
    answer = httpx.post(
        pci.stack.urls["vault"] + "/v1/tokens",
        json=card,
        headers={"authorization": f"Bearer {pci.merchant['publishable_key']}"},
    )
    assert answer.status_code == 201, answer.text
    token = answer.json()["id"]
    pci.as_owner(
        "vault",
        f"UPDATE tokens SET last_used_at = now() - interval '401 days' WHERE id = '{token}'",
    )
    data = assert_only_failing(
        pci.settings, tmp_path / "planted", "retention", names=("overdue for shredding", merchant)
    )
    assert token not in json.dumps(data), "the evidence names no token"

    swept = subprocess.run(
        [sys.executable, "-m", "vault", "worker", "--once", "retention"],
        env={**os.environ, **pci.stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert json.loads(swept.stdout)["retention"]["shredded"] == 1

    after = run_kit(pci.settings, tmp_path / "swept")
    assert failing(after) == {}, {c: f["summary"][:300] for c, f in failing(after).items()}
    (control,) = [c for c in after["controls"] if c["control"] == "retention"]
    assert control["status"] == "pass"
    assert control["evidence"]["last_30_days"]["retention_shreds"] == 1
