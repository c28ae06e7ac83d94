"""The controls matrix: docs/pci/controls.yaml, checked, rendered as docs/pci/controls.md.

controls.yaml says, per PCI DSS v4.0.1 requirement Tessera claims (fully or in part), what
Tessera does, the code that does it, the tests that prove it, the kit's controls that show it on
a running system and what stays the operator's. A matrix an assessor cannot trust is worse than
none, so every reference is checked: each code path exists (and its `#symbol` is defined there),
each test node id names a test function that exists (by reading the file's syntax tree: fast,
no collection), each evidence id is a control of the kit, and each kit control's requirements
are entries that name it.

`python -m tessera.pci.controls` (`make pci-docs`) writes controls.md and the cardholder-data
flow diagram (docs/pci/img/cardholder-data-flow.dot and .svg, tessera/pci/dataflow.py);
`--check` exits 1 when the matrix is wrong or a committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from tessera.pci import dataflow
from tessera.pci.checks import CHECKS
from tessera.pci.model import Control

ROOT = Path(__file__).resolve().parents[2]
CONTROLS_YAML = ROOT / "docs" / "pci" / "controls.yaml"
CONTROLS_MD = ROOT / "docs" / "pci" / "controls.md"

#: Every requirement the matrix must answer for (issue 12); more may be claimed.
REQUIRED: tuple[str, ...] = (
    "1.2.1", "1.2.5", "1.3.1", "1.3.2", "2.2.5", "3.2.1", "3.3.1", "3.3.1.2", "3.4.1", "3.5.1",
    "3.5.1.1", "3.6.1", "3.6.1.2", "3.7.1", "3.7.2", "3.7.3", "3.7.4", "3.7.5", "3.7.6",
    "3.7.7", "4.2.1", "6.2.4", "6.3.2", "6.4.3", "7.2.1", "7.2.5", "7.2.6", "8.3.1", "8.6.2",
    "10.2.1", "10.2.2", "10.3.2", "10.3.4", "10.5.1", "10.7.2", "11.4.5", "11.6.1", "12.5.2",
)  # fmt: skip
#: PCI DSS v4.0.1's twelve principal requirements, the matrix's sections.
PRINCIPAL = {
    "1": "Install and Maintain Network Security Controls",
    "2": "Apply Secure Configurations to All System Components",
    "3": "Protect Stored Account Data",
    "4": "Protect Cardholder Data with Strong Cryptography During Transmission Over Open, "
    "Public Networks",
    "5": "Protect All Systems and Networks from Malicious Software",
    "6": "Develop and Maintain Secure Systems and Software",
    "7": "Restrict Access to System Components and Cardholder Data by Business Need to Know",
    "8": "Identify Users and Authenticate Access to System Components",
    "9": "Restrict Physical Access to Cardholder Data",
    "10": "Log and Monitor All Access to System Components and Cardholder Data",
    "11": "Test Security of Systems and Networks Regularly",
    "12": "Support Information Security with Organizational Policies and Programs",
}
_NUMBER = re.compile(r"[1-9][0-9]?(\.[0-9]{1,2}){1,3}")
_CONTROL_ID = re.compile(r"[a-z][a-z0-9-]*")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


class ControlsError(ValueError):
    """controls.yaml is wrong; the message names each entry and what is wrong with it."""


class Claim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: `full`: Tessera does all the requirement asks of a system; `partial`: the rest is the
    #: operator's (the `operator` column says what).
    coverage: Literal["full", "partial"]
    text: str


class NoEvidence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """No kit control shows it on a running system; `none` says why and where it is shown."""

    none: str


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    requirement: str
    title: str
    claim: Claim
    #: Repository paths (files or directories), each with an optional `#symbol`.
    code: tuple[str, ...]
    #: pytest node ids: tests/test_x.py::test_name, tests/test_x.py::Class::test_name[...].
    tests: tuple[str, ...]
    evidence: tuple[str, ...] | NoEvidence
    operator: str

    @property
    def key(self) -> tuple[int, ...]:
        return number_key(self.requirement)


class ControlsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    standard: Literal["PCI DSS v4.0.1"]
    requirements: tuple[Entry, ...]


def number_key(requirement: str) -> tuple[int, ...]:
    return tuple(int(part) for part in requirement.split("."))


class _StrictLoader(yaml.CSafeLoader):
    """PyYAML keeps the last of two equal keys silently; a matrix must not lose a claim.
    (libyaml's parser, PyYAML's safe constructors: plain data only.)"""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    for key in keys:
        if keys.count(key) > 1:
            raise ControlsError(f"line {node.start_mark.line + 1}: {key!r} is given twice")
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def parse(text: str, where: str = "docs/pci/controls.yaml") -> ControlsFile:
    """The file's shape only (`problems` checks what it says); raises ControlsError."""
    try:
        loader = _StrictLoader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
        return msgspec.convert(raw, ControlsFile)
    except ControlsError as exc:
        raise ControlsError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ControlsError(f"{where}: not YAML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ControlsError(f"{where}: {exc}") from None


def load(path: Path = CONTROLS_YAML) -> ControlsFile:
    return parse(path.read_text())


# --- what the entries say ------------------------------------------------------------------


def _few_words(text: str, least: int = 4) -> bool:
    return len(text.split()) < least


def structure_problems(document: ControlsFile) -> list[str]:
    """Numbers well-formed, unique and in order; every required requirement; no empty text."""
    problems = []
    seen: set[str] = set()
    previous: Entry | None = None
    for entry in document.requirements:
        here = entry.requirement
        if not _NUMBER.fullmatch(here):
            problems.append(f"{here!r}: not a requirement number like 3.5.1.1")
            continue
        if here in seen:
            problems.append(f"{here}: listed twice")
        seen.add(here)
        if previous is not None and entry.key <= previous.key and here != previous.requirement:
            problems.append(f"{here}: out of order (after {previous.requirement})")
        previous = entry
        if here.split(".")[0] not in PRINCIPAL:
            problems.append(f"{here}: PCI DSS has no principal requirement {here.split('.')[0]}")
        for name, text in (
            ("title", entry.title),
            ("claim", entry.claim.text),
            ("operator", entry.operator),
        ):
            if _few_words(text):
                problems.append(f"{here}: `{name}` must say it in a sentence")
        if not entry.code:
            problems.append(f"{here}: `code` names no path: a claim needs the code that does it")
        if not entry.tests:
            problems.append(f"{here}: `tests` names no test: a claim needs a test that proves it")
        if isinstance(entry.evidence, NoEvidence):
            if _few_words(entry.evidence.none):
                problems.append(f"{here}: `evidence: {{none: ...}}` must say why and where instead")
        elif not entry.evidence:
            problems.append(f"{here}: `evidence` is empty: name kit controls, or none with why")
        for name, values in (("code", entry.code), ("tests", entry.tests)):
            if len(set(values)) != len(values):
                problems.append(f"{here}: `{name}` names something twice")
    missing = [r for r in REQUIRED if r not in seen]
    if missing:
        problems.append(f"the matrix must answer for {', '.join(missing)}: missing")
    return problems


@dataclass
class _Syntax:
    """Parsed Python files, each once per check."""

    root: Path
    trees: dict[Path, ast.Module | None] = field(default_factory=dict)

    def tree(self, path: Path) -> ast.Module | None:
        if path not in self.trees:
            try:
                self.trees[path] = ast.parse(path.read_text(), str(path))
            except (OSError, SyntaxError, UnicodeDecodeError):
                self.trees[path] = None
        return self.trees[path]


def _defined(body: Iterable[ast.stmt]) -> dict[str, ast.stmt]:
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def _python_symbol(tree: ast.Module, symbol: str) -> bool:
    """`name` defined at module level, or `Class.name` defined in a module-level class."""
    outer, _, inner = symbol.partition(".")
    node = _defined(tree.body).get(outer)
    if node is None:
        return False
    if not inner:
        return True
    return isinstance(node, ast.ClassDef) and inner in _defined(node.body)


def _inside(root: Path, relative: str) -> Path | None:
    if not relative or relative.startswith("/") or "\\" in relative:
        return None
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def code_problem(root: Path, reference: str, syntax: _Syntax) -> str | None:
    """Why `path` or `path#symbol` is not a real place in the repository, or None."""
    relative, _, symbol = reference.partition("#")
    path = _inside(root, relative.rstrip("/"))
    if path is None or not path.exists():
        return f"code {reference!r}: no such file or directory"
    if not symbol:
        return None
    if not _SYMBOL.fullmatch(symbol) or path.is_dir():
        return f"code {reference!r}: a symbol must be a name (or Class.name) in a file"
    if path.suffix == ".py":
        tree = syntax.tree(path)
        if tree is None or not _python_symbol(tree, symbol):
            return f"code {reference!r}: {symbol} is not defined in {relative}"
    # Other files (SQL, YAML, Terraform): the name must appear as a word.
    elif not re.search(rf"(?<![\w-]){re.escape(symbol)}(?![\w-])", path.read_text()):
        return f"code {reference!r}: {symbol} does not appear in {relative}"
    return None


def test_problem(root: Path, node_id: str, syntax: _Syntax) -> str | None:
    """Why a pytest node id names no test, or None: the file exists and defines the function
    (module level, or a method of a module-level class); a parameter suffix `[...]` is ignored."""
    base = node_id.split("[", 1)[0]
    relative, *names = base.split("::")
    path = _inside(root, relative)
    if (
        path is None
        or not relative.startswith("tests/")
        or path.suffix != ".py"
        or not 1 <= len(names) <= 2
    ):
        return f"test {node_id!r}: not a node id like tests/test_x.py::test_name"
    if not path.is_file():
        return f"test {node_id!r}: {relative} does not exist"
    tree = syntax.tree(path)
    if tree is None:
        return f"test {node_id!r}: {relative} cannot be parsed"
    scope = _defined(tree.body)
    *classes, function = names
    if classes:
        owner = scope.get(classes[0])
        if not isinstance(owner, ast.ClassDef):
            return f"test {node_id!r}: no class {classes[0]} in {relative}"
        scope = _defined(owner.body)
    node = scope.get(function)
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not function.startswith(
        "test"
    ):
        return f"test {node_id!r}: no test function {function} in {relative}"
    return None


def kit_controls() -> tuple[dict[str, Control], list[str]]:
    """The kit's controls by id, from every module of tessera.pci.checks.CHECKS."""
    controls: dict[str, Control] = {}
    problems = []
    for name in CHECKS:
        try:
            module = importlib.import_module(f"tessera.pci.checks.{name}")
        except ImportError as exc:
            problems.append(f"the kit's check tessera.pci.checks.{name} cannot be imported: {exc}")
            continue
        control = getattr(module, "CONTROL", None)
        if not isinstance(control, Control):
            problems.append(f"tessera.pci.checks.{name} has no CONTROL")
            continue
        controls[control.id] = control
    return controls, problems


def reference_problems(
    document: ControlsFile, root: Path = ROOT, controls: dict[str, Control] | None = None
) -> list[str]:
    """Every code path, test and evidence id refers to something real, and the kit's controls
    and the matrix agree on which requirements each control shows."""
    problems = []
    if controls is None:
        controls, import_problems = kit_controls()
        problems += import_problems
    syntax = _Syntax(root)
    for entry in document.requirements:
        here = entry.requirement
        problems += [f"{here}: {p}" for ref in entry.code if (p := code_problem(root, ref, syntax))]
        problems += [
            f"{here}: {p}" for node in entry.tests if (p := test_problem(root, node, syntax))
        ]
        if isinstance(entry.evidence, NoEvidence):
            continue
        for control_id in entry.evidence:
            control = controls.get(control_id)
            if control is None:
                known = ", ".join(sorted(controls)) or "none importable"
                problems.append(
                    f"{here}: evidence {control_id!r} is not a control of the kit ({known})"
                )
            elif here not in control.requirements:
                problems.append(
                    f"{here}: evidence {control_id!r}, but that control names only "
                    f"{', '.join(control.requirements)} (tessera/pci/checks)"
                )
    claimed = {entry.requirement: entry for entry in document.requirements}
    for control in controls.values():
        for requirement in control.requirements:
            named = claimed.get(requirement)
            if named is None:
                problems.append(
                    f"{requirement}: the kit's control {control.id!r} names it, "
                    "but the matrix has no entry for it"
                )
            elif isinstance(named.evidence, NoEvidence) or control.id not in named.evidence:
                problems.append(
                    f"{requirement}: the kit's control {control.id!r} names it, "
                    "but the entry's evidence does not list that control"
                )
    return problems


def problems(
    document: ControlsFile, root: Path = ROOT, controls: dict[str, Control] | None = None
) -> list[str]:
    return structure_problems(document) + reference_problems(document, root, controls)


def check(
    document: ControlsFile, root: Path = ROOT, controls: dict[str, Control] | None = None
) -> None:
    found = problems(document, root, controls)
    if found:
        raise ControlsError("docs/pci/controls.yaml:\n  - " + "\n  - ".join(found))


# --- controls.md ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _link(reference: str) -> str:
    relative = reference.partition("#")[0]
    return f"[`{reference}`](../../{relative})"


def _test_link(node_id: str) -> str:
    relative = node_id.partition("::")[0]
    return f"[`{node_id.removeprefix('tests/')}`](../../{relative})"


def _evidence(entry: Entry) -> str:
    if isinstance(entry.evidence, NoEvidence):
        return "none: " + _cell(entry.evidence.none)
    return "<br>".join(f"[`{c}`](assessor-guide.md#{c})" for c in entry.evidence)


def render(document: ControlsFile) -> str:
    entries = sorted(document.requirements, key=lambda e: e.key)
    full = sum(e.claim.coverage == "full" for e in entries)
    lines = [
        "# PCI DSS v4.0.1 controls matrix",
        "",
        "<!-- Generated by `make pci-docs` (python -m tessera.pci.controls) from controls.yaml: "
        "do not edit. -->",
        "",
        f"Tessera claims {len(entries)} requirements of {document.standard}: "
        f"{full} in full, {len(entries) - full} in part. For each: what Tessera does, the code "
        "that does it, the tests that prove it (all in `make test`), the controls of the "
        "assessor's kit (`tessera pci evidence`) that show it on a running system, and what "
        "stays the operator's. What is in scope and why: [scope.md](scope.md); how to run the "
        "kit and re-verify each control by hand: [assessor-guide.md](assessor-guide.md); "
        "the cardholder-data flows: [img/cardholder-data-flow.svg](img/cardholder-data-flow.svg).",
        "",
        "`tests/test_pci_controls.py` fails when this file is not what controls.yaml gives, when "
        "a code path or `#symbol` does not exist, when a test named here does not exist, and "
        "when an evidence id is not a control of the kit or the kit's controls and this matrix "
        "disagree on which requirements a control shows.",
        "",
    ]
    for principal, title in PRINCIPAL.items():
        group = [e for e in entries if e.requirement.split(".")[0] == principal]
        if not group:
            continue
        lines += [
            f"## Requirement {principal}: {title}",
            "",
            "| Req. | Title | Claim | Code | Tests | Evidence | Operator |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in group:
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"**{e.requirement}**",
                        _cell(e.title),
                        f"**{e.claim.coverage}**: {_cell(e.claim.text)}",
                        "<br>".join(_link(c) for c in e.code),
                        "<br>".join(_test_link(t) for t in e.tests),
                        _evidence(e),
                        _cell(e.operator),
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------


def outputs(root: Path = ROOT) -> dict[Path, str]:
    """What `make pci-docs` writes (the SVG aside: Graphviz renders it from the .dot)."""
    model = dataflow.load(root / "deploy" / "flows.yaml", root / "deploy" / "k8s" / "segments.yaml")
    return {
        root / "docs" / "pci" / "controls.md": render(
            load(root / "docs" / "pci" / "controls.yaml")
        ),
        root / "docs" / "pci" / "img" / "cardholder-data-flow.dot": dataflow.render_dot(model),
    }


def stale(root: Path = ROOT) -> list[str]:
    return [
        str(path.relative_to(root))
        for path, text in outputs(root).items()
        if not path.is_file() or path.read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.pci.controls",
        description="Check docs/pci/controls.yaml; write controls.md and the data-flow diagram.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if anything is wrong or stale"
    )
    args = parser.parse_args(argv)
    try:
        check(load())
        written = outputs()
    except (ControlsError, dataflow.DataflowError) as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        old = stale()
        if old:
            print(f"stale: {', '.join(old)}: run `make pci-docs`", file=sys.stderr)
            return 1
        print("docs/pci: the matrix checks out and every generated file is current")
        return 0
    for path, text in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    dot = shutil.which("dot")
    if dot is None:
        print("dot (Graphviz) is missing: apt-get install graphviz, then run this again")
        return 1
    subprocess.run([dot, "-Tsvg", str(dataflow.DOT_PATH), "-o", str(dataflow.SVG_PATH)], check=True)
    for path in (*written, dataflow.SVG_PATH):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
