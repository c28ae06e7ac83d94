"""The controls matrix (docs/pci/controls.yaml) and the cardholder-data flow diagram are honest.

The committed controls.md and data-flow diagram are what the generator gives today; every code
path, `#symbol` and test the matrix names exists (read from the files' syntax trees: no pytest
collection, so this stays fast); every evidence id is a control of the assessor's kit that names
the requirement, and the other way round. Then each guard is shown to bite on a damaged copy,
with a message that names the entry.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from tessera.pci import controls, dataflow
from tessera.pci.controls import ControlsError, ControlsFile, Entry, NoEvidence
from tessera.pci.model import Control

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "pci" / "assessor-guide.md"


@cache
def matrix() -> ControlsFile:
    """docs/pci/controls.yaml, parsed once (the document is immutable)."""
    return controls.load()


def kit_agreeing_with(document: ControlsFile) -> dict[str, Control]:
    """A kit whose controls name exactly the requirements that list them as evidence."""
    named: dict[str, list[str]] = defaultdict(list)
    for entry in document.requirements:
        if not isinstance(entry.evidence, NoEvidence):
            for control_id in entry.evidence:
                named[control_id].append(entry.requirement)
    return {c: Control(c, f"{c} (stand-in)", tuple(r)) for c, r in named.items()}


def entry(document: ControlsFile, requirement: str) -> Entry:
    return next(e for e in document.requirements if e.requirement == requirement)


# --- the committed files --------------------------------------------------------------------


def test_the_committed_controls_md_is_what_the_generator_gives() -> None:
    assert controls.CONTROLS_MD.read_text() == controls.render(matrix()), (
        "docs/pci/controls.md is stale: run `make pci-docs`"
    )


def test_the_committed_data_flow_diagram_is_what_flows_yaml_gives() -> None:
    assert dataflow.DOT_PATH.read_text() == dataflow.render_dot(dataflow.load()), (
        "docs/pci/img/cardholder-data-flow.dot is stale: run `make pci-docs`"
    )


def test_the_rendered_data_flow_diagram_shows_every_flow() -> None:
    svg = dataflow.SVG_PATH.read_text()
    # dot escapes '-' as &#45; and '>' as &gt; in titles: an edge is "source->destination".
    titles = {
        title.replace("&#45;", "-").replace("&gt;", ">")
        for title in re.findall(r"<title>([^<]*)</title>", svg)
    }
    model = dataflow.load()
    assert set(model.segments) | {"edge"} <= titles
    for flow in model.flows:
        for source, destination in model.hops(flow):
            assert f"{source}->{destination}" in titles, flow
    assert "PAN (encrypted)" in svg
    assert "CVC (sealed)" in svg


def test_a_stale_generated_file_is_named_with_how_to_fix_it(tmp_path: Path) -> None:
    for relative in (
        "docs/pci/controls.yaml",
        "docs/pci/controls.md",
        "docs/pci/img/cardholder-data-flow.dot",
        "deploy/flows.yaml",
        "deploy/k8s/segments.yaml",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    assert controls.stale(tmp_path) == []
    (tmp_path / "docs/pci/controls.md").write_text("edited by hand\n")
    flows = tmp_path / "deploy/flows.yaml"
    flows.write_text(flows.read_text().replace("data: [cvc-sealed]", "data: [cvc-sealed, none]"))
    with pytest.raises(dataflow.DataflowError, match="`none` cannot be listed"):
        controls.stale(tmp_path)
    flows.write_text(flows.read_text().replace("data: [cvc-sealed, none]", "data: [tokens]"))
    assert controls.stale(tmp_path) == [
        "docs/pci/controls.md",
        "docs/pci/img/cardholder-data-flow.dot",
    ]


def test_the_check_command_exits_1_on_a_stale_file_and_0_when_current(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The matrix's own checks are the tests above; this is the command's wiring.
    monkeypatch.setattr(controls, "check", lambda document: None)
    monkeypatch.setattr(controls, "stale", lambda: [])
    assert controls.main(["--check"]) == 0
    monkeypatch.setattr(controls, "stale", lambda: ["docs/pci/controls.md"])
    assert controls.main(["--check"]) == 1
    assert "stale: docs/pci/controls.md: run `make pci-docs`" in capsys.readouterr().err


# --- what the matrix names exists -----------------------------------------------------------


def test_the_matrix_answers_for_every_required_requirement_in_order() -> None:
    document = matrix()
    assert controls.structure_problems(document) == []
    claimed = [e.requirement for e in document.requirements]
    assert set(controls.REQUIRED) <= set(claimed)
    assert claimed == sorted(claimed, key=controls.number_key)


def test_every_code_path_exists_and_every_symbol_is_defined() -> None:
    document = matrix()
    syntax = controls._Syntax(ROOT)
    assert [
        f"{e.requirement}: {problem}"
        for e in document.requirements
        for reference in e.code
        if (problem := controls.code_problem(ROOT, reference, syntax))
    ] == []


def test_every_test_named_by_the_matrix_exists() -> None:
    document = matrix()
    syntax = controls._Syntax(ROOT)
    assert [
        f"{e.requirement}: {problem}"
        for e in document.requirements
        for node_id in e.tests
        if (problem := controls.test_problem(ROOT, node_id, syntax))
    ] == []


def test_every_evidence_id_is_a_control_of_the_kit_that_names_the_requirement() -> None:
    """Needs every module of tessera.pci.checks.CHECKS; each control's `requirements` and the
    matrix's evidence must agree both ways."""
    kit, import_problems = controls.kit_controls()
    assert import_problems == []
    document = matrix()
    evidence_problems = [
        p
        for p in controls.reference_problems(document, ROOT, kit)
        if "evidence" in p or "kit's control" in p
    ]
    assert evidence_problems == []


def test_the_assessor_guide_has_a_section_for_every_evidence_id() -> None:
    guide = GUIDE.read_text()
    ids = {
        control_id
        for e in matrix().requirements
        if not isinstance(e.evidence, NoEvidence)
        for control_id in e.evidence
    }
    assert ids
    assert [i for i in sorted(ids) if f'<a id="{i}"></a>' not in guide] == []


# --- each guard bites -----------------------------------------------------------------------


def damaged(requirement: str, **changes: Any) -> ControlsFile:
    """A matrix of one real entry, changed."""
    document = matrix()
    changed = msgspec.structs.replace(entry(document, requirement), **changes)
    return msgspec.structs.replace(document, requirements=(changed,))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"code": ("vault/no_such_module.py",)}, "no such file or directory"),
        ({"code": ("vault/crypto.py#NoSuchCipher",)}, "NoSuchCipher is not defined"),
        ({"code": ("vault/crypto.py#EnvelopeCipher.no_such_method",)}, "is not defined"),
        ({"code": ("deploy/flows.yaml#no_such_word",)}, "does not appear"),
        ({"code": ("../outside/the/repository.py",)}, "no such file or directory"),
        ({"code": ("vault#AuditLog",)}, "a symbol must be a name"),
        ({"tests": ("tests/test_no_such_file.py::test_anything",)}, "does not exist"),
        ({"tests": ("tests/test_audit.py::test_no_such_test",)}, "no test function"),
        ({"tests": ("tests/test_audit.py::TestNoSuchClass::test_x",)}, "no class"),
        ({"tests": ("tests/test_segmentation.py::pci_violations",)}, "no test function"),
        ({"tests": ("vault/audit.py::verify",)}, "not a node id"),
        ({"evidence": ("no-such-control",)}, "is not a control of the kit"),
    ],
    ids=lambda value: str(value)[:60] if isinstance(value, dict) else None,
)
def test_a_reference_to_nothing_fails_naming_the_entry(
    changes: dict[str, Any], message: str
) -> None:
    document = damaged("3.5.1", **changes)
    kit = kit_agreeing_with(matrix())
    found = controls.reference_problems(document, ROOT, kit)
    assert [p for p in found if p.startswith("3.5.1: ") and message in p], found
    with pytest.raises(ControlsError, match=re.escape("3.5.1: ")):
        controls.check(document, ROOT, kit)


def test_the_kit_and_the_matrix_must_agree_on_each_controls_requirements() -> None:
    document = damaged("3.6.1")
    assert entry(document, "3.6.1").evidence == ("keys",)
    kit = kit_agreeing_with(document)
    assert controls.reference_problems(document, ROOT, kit) == []
    title = kit["keys"].title
    narrower = {**kit, "keys": Control("keys", title, ("3.7.1",))}
    assert any(
        p.startswith("3.6.1: evidence 'keys', but that control names only 3.7.1")
        for p in controls.reference_problems(document, ROOT, narrower)
    )
    wider = {**kit, "keys": Control("keys", title, ("3.6.1", "9.4.1"))}
    assert any(
        p.startswith("9.4.1: the kit's control 'keys' names it, but the matrix has no entry")
        for p in controls.reference_problems(document, ROOT, wider)
    )
    elsewhere = {**kit, "audit-log": Control("audit-log", "audit", ("3.6.1",))}
    assert any(
        p.startswith("3.6.1: the kit's control 'audit-log' names it, but the entry's evidence")
        for p in controls.reference_problems(document, ROOT, elsewhere)
    )


def test_a_module_of_the_kit_that_cannot_be_imported_is_a_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(controls, "CHECKS", ("no_such_check",))
    kit, problems = controls.kit_controls()
    assert kit == {}
    assert len(problems) == 1
    assert "tessera.pci.checks.no_such_check cannot be imported" in problems[0]


def _structure(document: ControlsFile, **changes: Any) -> list[str]:
    return controls.structure_problems(msgspec.structs.replace(document, **changes))


def test_the_structure_guards_bite() -> None:
    document = matrix()
    entries = document.requirements
    first, second = entries[0], entries[1]
    assert f"{first.requirement}: listed twice" in _structure(
        document, requirements=(first, *entries)
    )
    swapped = (second, first, *entries[2:])
    assert f"{first.requirement}: out of order (after {second.requirement})" in _structure(
        document, requirements=swapped
    )
    without = tuple(e for e in entries if e.requirement != "3.7.6")
    assert "the matrix must answer for 3.7.6: missing" in _structure(document, requirements=without)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"evidence": NoEvidence("because")}, "must say why and where instead"),
        ({"evidence": ()}, "`evidence` is empty"),
        ({"tests": ()}, "a claim needs a test"),
        ({"code": ()}, "a claim needs the code"),
        ({"operator": "someone"}, "`operator` must say it in a sentence"),
        ({"requirement": "3.x"}, "not a requirement number"),
        ({"requirement": "13.1.1"}, "no principal requirement 13"),
    ]
    for changed, message in changes:
        broken = msgspec.structs.replace(entries[-1], **changed)
        found = _structure(document, requirements=(*entries[:-1], broken))
        assert [p for p in found if message in p], (changed, found)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["requirements"][0].update(risk="high"), "unknown field `risk`"),
        (lambda raw: raw["requirements"][0]["claim"].update(coverage="most"), "coverage"),
        (lambda raw: raw["requirements"][0].pop("operator"), "operator"),
        (lambda raw: raw.update(standard="PCI DSS v3.2.1"), "standard"),
    ],
    ids=["unknown-field", "coverage", "missing-operator", "standard"],
)
def test_the_file_shape_is_strict(edit: Any, message: str) -> None:
    raw = yaml.load(controls.CONTROLS_YAML.read_text(), Loader=yaml.CSafeLoader)
    edit(raw)
    with pytest.raises(ControlsError, match=re.escape(message)):
        controls.parse(yaml.dump(raw, Dumper=yaml.CSafeDumper))


def test_a_key_given_twice_is_refused() -> None:
    text = controls.CONTROLS_YAML.read_text().replace(
        "standard: PCI DSS v4.0.1\n", "standard: PCI DSS v4.0.1\nstandard: PCI DSS v4.0.1\n"
    )
    with pytest.raises(ControlsError, match="'standard' is given twice"):
        controls.parse(text)


def test_a_test_node_id_resolves_functions_methods_and_parameters(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "class TestVault:\n"
        "    def test_seals(self): ...\n"
        "    def helper(self): ...\n"
        "async def test_async(): ...\n"
        "test_alias = 1\n"
    )
    syntax = controls._Syntax(tmp_path)

    def resolves(node_id: str) -> bool:
        return controls.test_problem(tmp_path, node_id, syntax) is None

    assert resolves("tests/test_x.py::TestVault::test_seals")
    assert resolves("tests/test_x.py::TestVault::test_seals[psp_a-visa]")
    assert resolves("tests/test_x.py::test_async[a::b]")
    assert not resolves("tests/test_x.py::TestVault::helper")
    assert not resolves("tests/test_x.py::test_seals")
    assert not resolves("tests/test_x.py::test_alias")
    assert not resolves("tests/test_x.py::TestVault::test_seals::deeper")
    assert not resolves("tests/test_x.py")


# --- the data view of flows.yaml ------------------------------------------------------------


def test_every_flow_says_what_data_it_carries() -> None:
    model = dataflow.load()
    assert all(flow.data for flow in model.flows)
    raw = yaml.safe_load(dataflow.FLOWS_PATH.read_text())
    del raw["flows"][0]["data"]
    segments = yaml.safe_load(dataflow.SEGMENTS_PATH.read_text())
    with pytest.raises(dataflow.DataflowError, match=r"flow 1 \(browser -> cde 8100/tcp\)"):
        dataflow.parse(raw, segments)
    raw["flows"][0]["data"] = ["card-number"]
    with pytest.raises(dataflow.DataflowError, match="card-number"):
        dataflow.parse(raw, segments)


def test_account_data_flows_only_to_or_from_the_vault() -> None:
    model = dataflow.load()
    assert dataflow.card_data_violations(model) == []
    carrying = {str(f) for f in model.flows if f.carries_account_data}
    assert carrying == {
        "browser -> cde 8100/tcp",
        "admin -> cde 8102/tcp",
        "cde -> vault-db 5432/tcp",
        "cde -> vault-redis 6379/tcp",
        "cde -> psp-card 8201/tcp",
        "cde -> psp-card 8202/tcp",
    }, "the flows that carry account data changed: review docs/pci/scope.md"
    in_scope = [name for name in [*model.segments, "edge"] if model.in_cde(name)]
    assert in_scope == ["cde", "vault-db", "vault-redis", "kms", "admin", "edge"], (
        "the CDE's components changed: review docs/pci/scope.md"
    )


@pytest.mark.parametrize(
    ("source", "destination", "data", "message"),
    [
        ("app", "api-db", ("pan",), "not to or from the vault"),
        ("merchant", "app", ("cvc",), "not to or from the vault"),
        ("cde", "api-db", ("pan-encrypted",), "stored account data outside the CDE zone"),
        ("cde", "dns", ("keys",), "data keys move only between the vault and the CDE zone"),
        ("app", "kms", ("keys",), "data keys move only between the vault and the CDE zone"),
    ],
)
def test_the_data_view_catches_card_data_where_it_must_never_be(
    source: str, destination: str, data: tuple[dataflow.DataClass, ...], message: str
) -> None:
    model = dataflow.load()
    extra = dataflow.Flow(source, destination, 9999, "tcp", "a mistake to catch", data)
    mutated = dataflow.DataflowModel(model.segments, (*model.flows, extra), model.through)
    assert [p for p in dataflow.card_data_violations(mutated) if message in p]
