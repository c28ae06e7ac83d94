"""The container images, checked without a Docker engine: hadolint, the Dockerfiles' structure,
the build context, and that the files each image copies are enough to run its service.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from api.settings import ApiSettings
from vault.settings import VaultSettings

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"
SANDBOX_SOURCE = ROOT / "sandbox" / "psp_a.py"


# --- a small Dockerfile reader ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    text: str
    line: int

    def words(self) -> list[str]:
        """Shell-like words, or the JSON array of the exec form."""
        if self.text.startswith("["):
            return list(json.loads(self.text))
        return shlex.split(self.text)

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        words = self.words()
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.text):
                key, _, value = word.partition("=")
                values[key] = value
        return values

    def args(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ARG"):
            key, _, value = instruction.text.partition("=")
            values[key.strip()] = value.strip()
        return values

    def copies(self) -> list[tuple[dict[str, str], list[str], str]]:
        """(flags, sources, destination) of every COPY/ADD."""
        found = []
        for instruction in self.instructions:
            if instruction.keyword in ("COPY", "ADD"):
                flags, words = instruction.flags_and_rest()
                found.append((flags, words[:-1], words[-1]))
        return found

    def context_sources(self) -> list[str]:
        """What the stage copies from the build context (not from another stage)."""
        return [s for flags, sources, _ in self.copies() if "from" not in flags for s in sources]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def builder(self) -> Stage:
        return self.stages[0]

    def expand(self, text: str, stage: Stage | None = None) -> str:
        values = {**self.global_args, **(stage.args() if stage else {})}
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], m[0]), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(part for part in pending if part)))
        pending = []
    assert not pending, f"{path}: a line continuation runs off the end of the file"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path}:{number}: only ARG may come before the first FROM"
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, number))
    return Dockerfile(path, global_args, stages)


# --- what each image is -----------------------------------------------------------------------


def _psp_a_default_port() -> int:
    match = re.search(r'"TESSERA_PSP_A_PORT",\s*"(\d+)"', SANDBOX_SOURCE.read_text())
    assert match, "sandbox/psp_a.py no longer reads TESSERA_PSP_A_PORT with a default"
    return int(match[1])


def _default_port(cls: type[msgspec.Struct]) -> int:
    (port,) = [f.default for f in msgspec.structs.fields(cls) if f.name == "port"]
    assert isinstance(port, int)
    return port


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: Path
    command: tuple[str, ...]
    host_variable: str
    port_variable: str
    port: int
    #: Exactly what the final stage copies from the build context.
    sources: frozenset[str]
    #: Python code run inside the image's files; it must succeed.
    smoke: str


VAULT_SMOKE = """
from tessera.runtime.migrations import discover
from tessera.runtime.settings import load_settings
from vault.app import create_app
from vault.settings import VaultSettings
import vault.cli
settings = load_settings(VaultSettings, {
    "TESSERA_VAULT_SERVICE_TOKEN": "s" * 40, "TESSERA_VAULT_ADMIN_TOKEN": "a" * 40,
})
create_app(settings)
assert discover("vault.migrations"), "no migrations in the image"
absent = ("api", "sandbox")
"""

API_SMOKE = """
from api.app import create_app
from api.settings import ApiSettings
from tessera.runtime.migrations import discover
from tessera.runtime.settings import load_settings
import api.cli
create_app(load_settings(ApiSettings, {"TESSERA_API_VAULT_SERVICE_TOKEN": "s" * 40}))
assert discover("api.migrations"), "no migrations in the image"
absent = ("vault", "sandbox")
"""

SANDBOX_SMOKE = """
from sandbox.psp_a import create_app
create_app()
absent = ("api", "vault", "core")
"""

IMAGES = [
    Image(
        name="api",
        dockerfile=ROOT / "Dockerfile.api",
        command=("python", "-m", "api", "serve"),
        host_variable=ApiSettings.env_name("host"),
        port_variable=ApiSettings.env_name("port"),
        port=_default_port(ApiSettings),
        sources=frozenset({"core/", "api/", "tessera/"}),
        smoke=API_SMOKE,
    ),
    Image(
        name="vault",
        dockerfile=ROOT / "Dockerfile.vault",
        command=("python", "-m", "vault", "serve"),
        host_variable=VaultSettings.env_name("host"),
        port_variable=VaultSettings.env_name("port"),
        port=_default_port(VaultSettings),
        sources=frozenset({"core/", "vault/", "tessera/__init__.py", "tessera/runtime/"}),
        smoke=VAULT_SMOKE,
    ),
    Image(
        name="sandbox",
        dockerfile=ROOT / "deploy" / "Dockerfile.sandbox",
        command=("python", "-m", "sandbox.psp_a"),
        host_variable="TESSERA_PSP_A_HOST",
        port_variable="TESSERA_PSP_A_PORT",
        port=_psp_a_default_port(),
        sources=frozenset({"sandbox/"}),
        smoke=SANDBOX_SMOKE,
    ),
]

BY_NAME = {image.name: image for image in IMAGES}


@pytest.fixture(params=IMAGES, ids=[image.name for image in IMAGES])
def image(request: pytest.FixtureRequest) -> Image:
    chosen: Image = request.param
    return chosen


def parsed(image: Image) -> Dockerfile:
    return parse_dockerfile(image.dockerfile)


# --- hadolint ---------------------------------------------------------------------------------


def test_hadolint_reports_no_finding(image: Image) -> None:
    assert HADOLINT.exists(), f"hadolint is not installed next to {sys.executable}"
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", str(image.dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_report_findings_so_its_silence_means_something(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install uv\n")
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", str(bad)], capture_output=True, text=True, check=False
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3013"} <= codes
    assert result.returncode != 0


# --- the stages -------------------------------------------------------------------------------


def test_every_image_is_built_in_stages_on_one_pinned_python_311_slim_base(image: Image) -> None:
    dockerfile = parsed(image)
    assert len(dockerfile.stages) >= 2, "the image must be multi-stage"
    bases = {dockerfile.expand(stage.base) for stage in dockerfile.stages}
    # One base for every stage: the venv's interpreter link must exist in the final image.
    assert len(bases) == 1, bases
    (base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base


def test_the_builder_installs_the_uv_version_the_makefile_pins(image: Image) -> None:
    dockerfile = parsed(image)
    builder = dockerfile.builder
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^UV_VERSION \?= (\S+)$", makefile, re.MULTILINE)
    assert pinned, "the Makefile no longer pins UV_VERSION"
    installs = [
        dockerfile.expand(run.text, builder)
        for run in builder.all("RUN")
        if "pip install" in run.text
    ]
    assert installs, "the builder does not install uv with pip"
    assert all("--no-cache-dir" in text for text in installs)
    assert any(f"uv=={pinned[1]}" in text for text in installs), installs


def test_dependencies_come_from_the_lock_before_any_source_is_copied(image: Image) -> None:
    builder = parsed(image).builder
    copies = builder.copies()
    assert [sorted(sources) for _, sources, _ in copies] == [["pyproject.toml", "uv.lock"]]
    syncs = [run for run in builder.all("RUN") if "uv sync" in run.text]
    assert len(syncs) == 1, "the builder runs `uv sync` exactly once"
    (sync,) = syncs
    for option in ("--frozen", "--no-dev", "--no-install-project"):
        assert option in sync.words(), f"`uv sync` without {option}"
    copy_line = next(i.line for i in builder.instructions if i.keyword == "COPY")
    assert copy_line < sync.line


def test_the_final_stage_runs_as_an_unprivileged_numeric_user(image: Image) -> None:
    users = parsed(image).final.all("USER")
    assert users, "the final stage never leaves root"
    user, _, group = users[-1].text.partition(":")
    assert user.isdigit(), f"USER {users[-1].text}: use a numeric uid (runAsNonRoot can check it)"
    assert int(user) >= 1000
    if group:
        assert group.isdigit()
        assert int(group) != 0


def test_the_final_stage_installs_no_build_tools(image: Image) -> None:
    final = parsed(image).final
    forbidden = re.compile(
        r"\b(gcc|g\+\+|cc|make|build-essential|apt-get|apt|apk|uv|uvx|pip|pip3)\b"
    )
    for run in final.all("RUN"):
        found = forbidden.search(run.text)
        assert not found, f"line {run.line}: the final stage runs {found[0]!r}"
    for flags, sources, _ in final.copies():
        assert not any(Path(source).name in ("uv", "uvx") for source in sources), flags


def test_the_final_stage_copies_the_venv_from_the_builder_first_on_path(image: Image) -> None:
    dockerfile = parsed(image)
    venv = dockerfile.builder.env().get("UV_PROJECT_ENVIRONMENT")
    assert venv, "the builder does not say where uv puts the venv (UV_PROJECT_ENVIRONMENT)"
    builder_refs = {dockerfile.builder.name, "0"}
    from_builder = [
        (sources, destination)
        for flags, sources, destination in dockerfile.final.copies()
        if flags.get("from") in builder_refs
    ]
    assert from_builder == [([venv], venv)]
    path = dockerfile.final.env().get("PATH", "")
    assert path.split(":")[0] == f"{venv}/bin"


def test_the_final_stage_copies_exactly_the_service_packages(image: Image) -> None:
    sources = parsed(image).final.context_sources()
    assert len(sources) == len(set(sources))
    assert set(sources) == image.sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_the_vault_image_never_copies_api_or_simulator_code() -> None:
    dockerfile = parsed(BY_NAME["vault"])
    for stage in dockerfile.stages:
        for source in stage.context_sources():
            normalised = source.strip("/") or "."
            assert normalised not in (".", "*", "tessera"), f"COPY {source} takes everything"
            assert not normalised.startswith(("api", "sandbox")), f"COPY {source}"


def test_the_final_stage_sets_the_runtime_environment(image: Image) -> None:
    final = parsed(image).final
    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONPATH") == "/app"
    assert env.get(image.host_variable) == "0.0.0.0"
    assert env.get(image.port_variable, str(image.port)) == str(image.port)
    assert [w.text for w in final.all("WORKDIR")][-1:] == ["/app"]
    assert [e.text for e in final.all("EXPOSE")] == [str(image.port)]
    assert [s.text for s in final.all("STOPSIGNAL")] == ["SIGTERM"]
    (cmd,) = final.all("CMD")
    assert tuple(cmd.words()) == image.command
    assert not final.all("ENTRYPOINT")


def test_the_healthcheck_asks_healthz_with_the_standard_library(image: Image) -> None:
    checks = parsed(image).final.all("HEALTHCHECK")
    assert len(checks) == 1, "exactly one HEALTHCHECK in the final stage"
    flags, words = checks[0].flags_and_rest()
    assert {"interval", "timeout", "retries"} <= flags.keys()
    assert words[0] == "CMD"
    command = json.loads(checks[0].text.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"], "slim images have no curl: use python"
    code = command[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "urllib.request" in code
    assert "/healthz" in code
    assert image.port_variable in code
    assert f"'{image.port}'" in code


def test_every_image_carries_oci_labels(image: Image) -> None:
    labels: dict[str, str] = {}
    for label in parsed(image).final.all("LABEL"):
        for word in shlex.split(label.text):
            key, _, value = word.partition("=")
            labels[key] = value
    for key in ("title", "description", "version"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"no {key} label"
    assert labels["org.opencontainers.image.title"] == f"tessera-{image.name}"


# --- the image's files are enough to run the service ------------------------------------------


def _materialise(sources: frozenset[str], app: Path) -> None:
    """Lay out /app as the final stage's COPY instructions do."""
    for source in sources:
        origin, target = ROOT / source, app / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, target)


SMOKE_PRELUDE = """
import importlib.util, sys
from pathlib import Path
root, app = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
# The dev venv has the whole project installed (editable); the image does not.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != root]
"""

SMOKE_EPILOGUE = """
for name in absent:
    assert importlib.util.find_spec(name) is None, f"{name} is importable inside the image"
for name, module in list(sys.modules.items()):
    origin = getattr(module, "__file__", None) or ""
    if name.split(".")[0] in ("api", "vault", "sandbox", "core", "tessera"):
        assert Path(origin).resolve().is_relative_to(app), f"{name} came from {origin}"
print("ok")
"""


def test_the_files_the_image_copies_are_enough_to_start_the_service(
    image: Image, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    _materialise(frozenset(parsed(image).final.context_sources()), app)
    result = subprocess.run(
        [sys.executable, "-c", SMOKE_PRELUDE + image.smoke + SMOKE_EPILOGUE, str(ROOT), str(app)],
        cwd=app,
        env={"PYTHONPATH": str(app), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# --- the build context ------------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        glob = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**", i):
                regex += ".*"
                i += 2
                if glob.startswith("/", i):
                    regex = regex[:-2] + "(.*/)?"
                    i += 1
                continue
            char = glob[i]
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif char == "[":
                end = glob.index("]", i)
                regex += glob[i : end + 1]
                i = end
            else:
                regex += re.escape(char)
            i += 1
        patterns.append((keep, re.compile(regex)))
    return patterns


def _sent_to_the_builder(path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent of it) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    sent = True
    for keep, pattern in _dockerignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            sent = keep
    return sent


@pytest.mark.parametrize(
    "path",
    [
        ".run/dev.env",
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "loadtests/results/run.json",
        "docs/index.md",
        "deploy/compose.yaml",
        "core/__pycache__/money.cpython-311.pyc",
        "vault/migrations/__pycache__/__init__.cpython-311.pyc",
        ".mypy_cache/3.11/core/money.data.json",
        "Makefile",
    ],
)
def test_the_build_context_leaves_out(path: str) -> None:
    assert not _sent_to_the_builder(path)


def test_the_build_context_holds_everything_the_images_copy() -> None:
    wanted = {"pyproject.toml", "uv.lock"}
    for image in IMAGES:
        wanted |= set(parse_dockerfile(image.dockerfile).final.context_sources())
    for source in sorted(wanted):
        origin = ROOT / source
        files = [origin] if origin.is_file() else list(origin.rglob("*.py"))
        files += list(origin.rglob("*.sql")) if origin.is_dir() else []
        assert files, f"{source}: nothing to copy"
        for file in files:
            if "__pycache__" in file.parts:
                continue
            relative = file.relative_to(ROOT).as_posix()
            assert _sent_to_the_builder(relative), f"{relative} is left out of the build context"
