"""deploy/k8s/load/ (manifests) and deploy/loadtest/ (image): a distributed Locust run, checked
without a cluster: the kustomization and its files, the master-worker wiring (name, ports, the
network policies), the image (its Locust is the locked one, it holds the files the pods run),
the pods' hardening, and that every option and variable they set is one Locust or the
locustfile reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "deploy" / "k8s" / "load"
DOCKERFILE = ROOT / "deploy" / "loadtest" / "Dockerfile"
#: The edge gateway's Service, which the run's public hosts resolve to.
GATEWAY = ROOT / "deploy" / "k8s" / "base" / "edge" / "gateway.yaml"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
HADOLINT = Path(sys.executable).parent / "hadolint"
NAMESPACE = "tessera-load"
MERCHANT_SECRET = "tessera-loadtest-merchant"
DEFAULT_MASTER_PORT = 5557  # Locust's, when a worker passes no --master-port
MASTER_KIND = "Job"  # a run ends: master.yaml says why the master is no Deployment

Resource = dict[str, Any]


# --- reading the folder ------------------------------------------------------------------------


@cache
def kustomization() -> Resource:
    loaded: Resource = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    return loaded


@cache
def resources() -> tuple[Resource, ...]:
    found: list[Resource] = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]
    return tuple(found)


def resource(kind: str, name: str) -> Resource:
    matches = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def workloads() -> list[Resource]:
    return [r for r in resources() if r["kind"] in ("Deployment", "Job", "StatefulSet")]


def master() -> Resource:
    return resource(MASTER_KIND, "locust-master")


def worker() -> Resource:
    return resource("Deployment", "locust-worker")


def pod_spec(workload: Resource) -> Resource:
    spec: Resource = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Resource) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def container(workload: Resource) -> Resource:
    (only,) = pod_spec(workload)["containers"]
    assert isinstance(only, dict)
    return only


def args(workload: Resource) -> list[str]:
    return [str(arg) for arg in container(workload).get("args", [])]


def option(words: list[str], *names: str) -> str | None:
    """The value of an option (`--name value` or `--name=value`), None when absent."""
    for i, word in enumerate(words):
        name, sep, value = word.partition("=")
        if name in names:
            return value if sep else words[i + 1]
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def run_settings() -> dict[str, str]:
    """The literals of the configMapGenerator the master reads its run from."""
    (generator,) = kustomization()["configMapGenerator"]
    return assignments(str(literal) for literal in generator["literals"])


def assignments(words: Iterable[str]) -> dict[str, str]:
    """NAME=value words (a generator's literals, an ENV line) as a dict."""
    found: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        assert sep, word
        found[name] = value
    return found


def master_port() -> int:
    return int(option(args(master()), "--master-bind-port") or DEFAULT_MASTER_PORT)


def container_port(workload: Resource, name_or_number: str | int) -> int:
    for port in container(workload)["ports"]:
        if name_or_number in (port.get("name"), port["containerPort"]):
            number: int = port["containerPort"]
            return number
    raise AssertionError(f"{workload['metadata']['name']} has no port {name_or_number}")


def service_target(service_port: int) -> int:
    """The master's container port behind a port of the master Service."""
    (port,) = [
        p
        for p in resource("Service", "locust-master")["spec"]["ports"]
        if p["port"] == service_port
    ]
    return container_port(master(), port.get("targetPort", port["port"]))


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == package]
    assert isinstance(version, str)
    return version


def dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerfile(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile_lines() if line.split()[0] == keyword]


def cpu(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory(quantity: str | int) -> int:
    text = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# --- the kustomization ---------------------------------------------------------------------------


def test_every_resource_the_kustomization_lists_exists_and_every_manifest_is_listed() -> None:
    listed = kustomization()["resources"]
    assert all((FOLDER / name).is_file() for name in listed), listed
    # reader.yaml is applied by hand after a run (results.yaml says how), never with the run.
    on_disk = {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml", "reader.yaml"}
    assert set(listed) == on_disk
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources()}
    assert len(kinds) == len(resources()), "two resources of one kind share a name"
    assert {
        ("Namespace", NAMESPACE),
        (MASTER_KIND, "locust-master"),
        ("Service", "locust-master"),
        ("Deployment", "locust-worker"),
    } <= kinds
    assert any(kind == "NetworkPolicy" for kind, _ in kinds)


def test_everything_lands_in_the_namespace_the_folder_creates() -> None:
    assert kustomization()["namespace"] == NAMESPACE
    resource("Namespace", NAMESPACE)
    # kustomize sets the namespace; a resource naming another one would be moved silently.
    assert all(r["metadata"].get("namespace", NAMESPACE) == NAMESPACE for r in resources())


def test_kustomize_builds_the_folder() -> None:
    # Never skipped: without kubectl the check is missing, not passed.
    assert shutil.which("kubectl"), "kubectl is missing: install it (make deploy-check says how)"
    built = subprocess.run(
        ["kubectl", "kustomize", str(FOLDER)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in namespaced)
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    (image,) = kustomization()["images"]
    for doc in docs:
        if doc["kind"] not in (MASTER_KIND, "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for each in spec["containers"]:
            assert each["image"] == f"{image['newName']}@{image['digest']}"
            for source in each.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps  # the hashed name
    (workers,) = [d for d in docs if d["kind"] == "Deployment"]
    assert workers["spec"]["replicas"] == int(run_settings()["LOCUST_EXPECT_WORKERS"])


def test_the_master_waits_for_as_many_workers_as_the_kustomization_runs() -> None:
    (count,) = [r["count"] for r in kustomization()["replicas"] if r["name"] == "locust-worker"]
    expected = int(run_settings()["LOCUST_EXPECT_WORKERS"])
    assert count == expected == worker()["spec"]["replicas"]
    assert option(args(master()), "--expect-workers") is None  # one place: the run's settings


# --- master and workers --------------------------------------------------------------------------


def test_the_workers_dial_the_master_service_on_the_port_the_master_binds() -> None:
    service = resource("Service", "locust-master")
    worker_args = args(worker())
    assert "--worker" in worker_args
    assert "--master" in args(master())
    assert option(worker_args, "--master-host") == service["metadata"]["name"]
    selector = service["spec"]["selector"]
    assert selects(selector, pod_labels(master()))
    assert not selects(selector, pod_labels(worker()))
    port = int(option(worker_args, "--master-port") or DEFAULT_MASTER_PORT)
    assert service_target(port) == master_port()


def test_the_master_runs_headless_and_writes_csv_and_html_to_the_results_claim() -> None:
    words = args(master())
    assert "--headless" in words
    assert "--autostart" not in words  # the web UI's mode: --expect-workers would be ignored
    results = PurePosixPath(option(words, "--results-dir") or "")
    csv, html = option(words, "--csv"), option(words, "--html")
    assert csv is not None
    assert html is not None
    assert PurePosixPath(csv).parent == results == PurePosixPath(html).parent
    volumes = {v["name"]: v for v in pod_spec(master())["volumes"]}
    (mount,) = [m for m in container(master())["volumeMounts"] if m["mountPath"] == str(results)]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert resource("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The reader pod mounts the same claim, read-only, to copy the reports out.
    reader = yaml.safe_load((FOLDER / "reader.yaml").read_text())
    (volume,) = reader["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}


def test_the_worker_selector_matches_its_pods_and_not_the_master() -> None:
    selector = worker()["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(worker()))
    assert not selects(selector, pod_labels(master()))


def test_the_master_prints_the_summary_its_results_dir_gets() -> None:
    command = container(master())["command"]
    results = option(args(master()), "--results-dir")
    assert results, "no --results-dir: the master would write no summary.json"
    assert f"cat {PurePosixPath(results) / 'summary.json'}" in command[2]
    assert "exit $code" in command[2], "the Job must fail when Locust does"
    spec = master()["spec"]
    assert spec["backoffLimit"] == 0, "a failed run must not be run again"
    assert pod_spec(master())["restartPolicy"] == "Never"


# --- the network policies ------------------------------------------------------------------------


def policies_for(workload: Resource) -> list[Resource]:
    """The policies that name the workload's pods (the namespace's default deny names none)."""
    return [
        r
        for r in resources()
        if r["kind"] == "NetworkPolicy"
        and r["spec"]["podSelector"]
        and selects(r["spec"]["podSelector"]["matchLabels"], pod_labels(workload))
    ]


def test_the_namespace_denies_everything_by_default() -> None:
    (deny,) = [
        r for r in resources() if r["kind"] == "NetworkPolicy" and not r["spec"]["podSelector"]
    ]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny["spec"].get("ingress")
    assert not deny["spec"].get("egress")


def allowed(rules: list[Resource], port: int, protocol: str = "TCP") -> list[Resource]:
    """The rules that open `port`, with their peers (`to` / `from`, absent for any peer)."""
    return [
        rule
        for rule in rules
        if any(
            p["port"] == port and p.get("protocol", "TCP") == protocol
            for p in rule.get("ports", [])
        )
    ]


@pytest.mark.parametrize("which", ["master", "worker"])
def test_every_pod_is_isolated_both_ways(which: str) -> None:
    workload = master() if which == "master" else worker()
    (policy,) = policies_for(workload)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    rules = policy["spec"].get("egress", []) + policy["spec"].get("ingress", [])
    assert all(rule.get("ports") for rule in rules), "a rule without ports opens every port"


def test_only_the_workers_reach_the_master_and_only_on_its_port() -> None:
    (policy,) = policies_for(master())
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [master_port()]
    (peer,) = rule["from"]
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(worker()))
    assert not selects(peer["podSelector"]["matchLabels"], pod_labels(master()))
    (worker_policy,) = policies_for(worker())
    assert worker_policy["spec"]["ingress"] == []
    (to_master,) = allowed(worker_policy["spec"]["egress"], master_port())
    (peer,) = to_master["to"]
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(master()))


def url_port(url: str) -> int:
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https"), url
    assert parts.hostname, url
    return parts.port or (443 if parts.scheme == "https" else 80)


@pytest.mark.parametrize(
    ("which", "targets"),
    [("master", ["LOCUST_HOST"]), ("worker", ["LOCUST_HOST", "TESSERA_LOAD_VAULT_URL"])],
)
def test_the_pods_reach_dns_and_the_ports_of_their_targets(which: str, targets: list[str]) -> None:
    """The master reads the payments back from the API; the workers call the API and the vault.
    Both through the edge gateway: its load balancer's port is the URLs', and the cluster
    translates it to the gateway pods' port, which the policy opens to those pods only."""
    (policy,) = policies_for(master() if which == "master" else worker())
    egress = policy["spec"]["egress"]
    documents = list(yaml.safe_load_all(GATEWAY.read_text()))
    (service,) = [d for d in documents if d["kind"] == "Service"]
    (gateway,) = [d for d in documents if d["kind"] == "Deployment"]
    (proxy,) = gateway["spec"]["template"]["spec"]["containers"]
    for name in targets:
        (port,) = [
            p for p in service["spec"]["ports"] if p["port"] == url_port(run_settings()[name])
        ]
        (target,) = [p["containerPort"] for p in proxy["ports"] if p["name"] == port["targetPort"]]
        (rule,) = allowed(egress, target)
        (peer,) = rule["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": gateway["metadata"].get("namespace", "tessera-edge")
        }
        assert selects(
            peer["podSelector"]["matchLabels"], gateway["spec"]["template"]["metadata"]["labels"]
        )
    for protocol in ("UDP", "TCP"):
        (dns,) = allowed(egress, 53, protocol)
        (peer,) = dns["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "kube-system"
        }


# --- the image -----------------------------------------------------------------------------------


def test_the_image_is_locust_at_the_locked_version() -> None:
    (base,) = dockerfile("FROM")
    assert base == f"locustio/locust:{locked_version('locust')}"
    assert f"docker.io/{base}" in DOCKERFILE.read_text()  # the base.name label says the same


def test_hadolint_accepts_the_dockerfile() -> None:
    assert HADOLINT.exists(), f"hadolint is not installed next to {sys.executable}"
    linted = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def copied_files() -> dict[str, str]:
    """Destination path in the image -> source path in the repository."""
    files: dict[str, str] = {}
    for line in dockerfile("COPY"):
        *sources, destination = line.split()
        assert destination.endswith("/"), line
        assert not sources[0].startswith("--"), line
        for source in sources:
            files[str(PurePosixPath(destination) / PurePosixPath(source).name)] = source
    return files


def test_the_image_holds_the_locustfiles_the_pods_name() -> None:
    copied = copied_files()
    allowed_sources = {
        line[1:]
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert set(copied.values()) <= allowed_sources, "the build context lacks a copied file"
    assert all((ROOT / source).is_file() for source in copied.values())
    (env,) = dockerfile("ENV")
    named = [option(args(w), "-f", "--locustfile") for w in workloads()]
    named.append(assignments(env.split())["LOCUST_LOCUSTFILE"])
    for paths in named:
        assert paths, "a pod names no locustfile"
        assert all(path in copied for path in paths.split(",")), paths


def test_the_pods_run_the_image_the_kustomization_names() -> None:
    (image,) = kustomization()["images"]
    assert {container(w)["image"] for w in workloads()} == {image["name"]}


# --- hardening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["master", "worker"])
def test_every_container_runs_as_non_root_read_only_and_limited(which: str) -> None:
    workload = master() if which == "master" else worker()
    spec, box = pod_spec(workload), container(workload)
    context = {**spec.get("securityContext", {}), **box.get("securityContext", {})}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0
    assert context["runAsGroup"] > 0
    (user,) = dockerfile("USER")
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}", "image and pod differ"
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    requests, limits = box["resources"]["requests"], box["resources"]["limits"]
    assert cpu(requests["cpu"]) <= cpu(limits["cpu"])
    assert memory(requests["memory"]) <= memory(limits["memory"])


@pytest.mark.parametrize("which", ["master", "worker"])
def test_every_path_locust_writes_is_a_volume(which: str) -> None:
    workload = master() if which == "master" else worker()
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    mounts = {
        m["mountPath"]: m["name"]
        for m in container(workload)["volumeMounts"]
        if not m.get("readOnly")
    }
    # Scratch space is an emptyDir; the master's reports go to their claim (tested above).
    assert all(
        "emptyDir" in volumes[name] or "persistentVolumeClaim" in volumes[name]
        for name in mounts.values()
    )
    written = ["/tmp"]
    written += [v for v in [option(args(workload), "--results-dir")] if v]
    for path in written:
        assert any(PurePosixPath(path).is_relative_to(mount) for mount in mounts), path


# --- what the pods set is what Locust and the locustfile read ------------------------------------


@cache
def locust_options() -> frozenset[str]:
    """Locust's own options, from its help (the locustfile's are not in it)."""
    shown = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found: set[str] = set()
    for line in shown.splitlines():
        if line.startswith("  -"):
            found |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line.split("  ")[1]))
    return frozenset(found)


def locustfile_options() -> list[re.Pattern[str]]:
    """The locustfile's add_argument names; an f-string's fields match any word."""
    names = re.findall(r'add_argument\(\s*f?"(--[^"]+)"', LOCUSTFILE.read_text())
    assert {"--vault-url", "--results-dir"} <= set(names), names
    return [re.compile(re.sub(r"\\\{\w+\\\}", "[a-z]+", re.escape(name))) for name in names]


@pytest.mark.parametrize("which", ["master", "worker"])
def test_every_option_in_the_args_is_one_locust_or_the_locustfile_reads(which: str) -> None:
    workload = master() if which == "master" else worker()
    used = [word.partition("=")[0] for word in args(workload) if re.match(r"--?[A-Za-z]", word)]
    assert used
    ours = locustfile_options()
    unknown = [
        name
        for name in used
        if name not in locust_options() and not any(p.fullmatch(name) for p in ours)
    ]
    assert not unknown


def variables_read() -> set[str]:
    spec = find_spec("locust")  # finds the package without importing it (and gevent's patching)
    assert spec is not None
    assert spec.origin is not None
    parser = Path(spec.origin).parent / "argument_parser.py"
    pattern = r'env_var="([A-Z0-9_]+)"'
    return set(re.findall(pattern, parser.read_text() + LOCUSTFILE.read_text()))


def test_every_variable_the_pods_get_is_one_locust_or_the_locustfile_reads() -> None:
    names = set(run_settings())
    for workload in workloads():
        names |= {variable["name"] for variable in container(workload).get("env", [])}
    (env,) = dockerfile("ENV")
    names |= set(assignments(env.split()))
    assert not names - variables_read() - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


def test_the_run_targets_are_urls_and_the_master_reads_them() -> None:
    settings = run_settings()
    for name in ("LOCUST_HOST", "TESSERA_LOAD_VAULT_URL"):
        url_port(settings[name])
    sources = [s["configMapRef"]["name"] for s in container(master()).get("envFrom", [])]
    assert sources == [kustomization()["configMapGenerator"][0]["name"]]


def test_the_merchant_keys_come_from_the_secret_and_only_to_the_master() -> None:
    """The keys are files of the Secret, read into the locustfile's variables by the master's
    command: never a value in the pod spec, never on a worker."""
    volumes = {v["name"]: v for v in pod_spec(master())["volumes"]}
    (mount,) = [m for m in container(master())["volumeMounts"] if m["name"] == "merchant"]
    assert mount["readOnly"] is True
    assert volumes["merchant"]["secret"]["secretName"] == MERCHANT_SECRET
    command = container(master())["command"][2]
    run_py = (ROOT / "loadtests" / "run.py").read_text()
    for variable, key in (
        ("TESSERA_LOAD_SECRET_KEY", "secret_key"),
        ("TESSERA_LOAD_PUBLISHABLE_KEY", "publishable_key"),
    ):
        assert f"{variable}=$(cat {PurePosixPath(mount['mountPath']) / key})" in command
        assert variable in variables_read()
        assert f'merchant["{key}"]' in run_py  # the field `merchants create --json` prints
    assert "env" not in container(master())
    # The workers get the keys with the master's options; no key is written down anywhere.
    assert "env" not in container(worker())
    assert all(v["name"] != "merchant" for v in pod_spec(worker())["volumes"])
    for path in FOLDER.iterdir():
        assert not re.search(r"\b[sp]k_(test|live)_\w", path.read_text()), path
