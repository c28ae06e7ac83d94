"""The segmentation campaign: the deployment of flows.yaml in network namespaces, with the real
services in their segments, checked by a probe matrix, end-to-end payments and a negative control.

    sudo make segmentation        # or: .venv/bin/python -m tests.segmentation

1. One namespace per segment behind a router namespace; the router's nftables policy is
   rendered from deploy/flows.yaml (policy.py) and is on from the start, so everything below
   runs through it.
2. The real processes in their segments: the vault (cde), the API (app), PSP A and B (psp-card
   and psp-api: two addresses of one host), a private Postgres cluster for each database, a
   Redis for each service, the gRPC Cloud KMS stand-in of the test suite (kms). Migrations run
   from the services' segments, as jobs would.
3. The probe matrix: every (source, destination, port) of the model, allowed or not, as a TCP
   connect (UDP datagram for udp ports) from the source's address; expected reachable iff
   flows.yaml lists it.
4. End to end through the policy: a token from the browser, payments from the merchant (API ->
   vault -> PSP card endpoint, captures and refunds API -> PSP operations endpoint, PSP B's
   notification back to the API), the vault's admin endpoint from admin; the router's counters
   then show every flow with a real service behind it carried that traffic.
5. The matrix bites: with one flow taken out of the policy and one flow too many put in,
   it reports exactly those two cells.
6. Negative control: with the policy off, every denied probe gets through.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

from tests.segmentation import policy
from tests.segmentation.agent import FILTERED, OPEN, REFUSED
from tests.segmentation.model import Flow, FlowModel, Probe, Service, load
from tests.segmentation.netns import ROOT, Network, NsProcess, run, sweep_stale, wait_for

#: The newest PostgreSQL server binaries Debian installed (initdb, postgres).
PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    default=Path("/usr/lib/postgresql/15/bin"),
)
KMS_KEY = "projects/tessera-segmentation/locations/europe-west1/keyRings/vault/cryptoKeys/kek"
#: The vault may speak plaintext gRPC only to a loopback KMS endpoint (vault/kms/gcp.py): a
#: socat relay in the vault's own namespace stands for the TLS connection of production, so
#: the bytes still cross the router from the cde segment to the kms segment.
KMS_RELAY_PORT = 8443
#: Seconds a probe waits for an answer before it calls the path dropped (RECHECK_TIMEOUT: the
#: second try of a cell the policy opens).
PROBE_TIMEOUT = 2.0
RECHECK_TIMEOUT = 6.0
PY = sys.executable
AGENT = [PY, "-m", "tests.segmentation.agent"]
MERCHANTS = [PY, "-m", "api", "merchants"]
CARD = "4242424242424242"  # the documented test card; only ever sent to the vault

#: Which real program answers where (segment, port). Any other (destination, port) that a flow
#: names gets a stand-in listener, so the probes can still see it open.
REAL_SERVICES: dict[tuple[str, Service], str] = {
    ("cde", Service(8100, "tcp")): "vault (public listener)",
    ("cde", Service(8101, "tcp")): "vault (service listener)",
    ("cde", Service(8102, "tcp")): "vault (admin listener)",
    ("app", Service(8000, "tcp")): "api",
    ("api-db", Service(5432, "tcp")): "postgres (tessera_api)",
    ("vault-db", Service(5432, "tcp")): "postgres (tessera_vault)",
    ("api-redis", Service(6379, "tcp")): "redis",
    ("vault-redis", Service(6379, "tcp")): "redis",
    ("kms", Service(443, "tcp")): "Cloud KMS stand-in (gRPC)",
    ("psp-card", Service(8201, "tcp")): "PSP A",
    ("psp-api", Service(8201, "tcp")): "PSP A",
    ("psp-card", Service(8202, "tcp")): "PSP B",
    ("psp-api", Service(8202, "tcp")): "PSP B",
}
#: The bite checks: the API's service flow to the vault taken out of the policy, and the flow
#: that must never exist (the API reaching the vault's database) put in.
MISSING = ("app", "cde", Service(8101, "tcp"))
EXTRA_FLOW = Flow("app", "vault-db", 5432, "tcp", "a mistake the matrix must catch")
#: The two Postgres segments: (service, database) each.
DATABASES = {"api-db": ("api", "tessera_api"), "vault-db": ("vault", "tessera_vault")}


class PrerequisiteError(RuntimeError):
    """The machine cannot run the campaign; the message says how to make it able to."""


REQUIRED_TOOLS = {
    "ip": "iproute2",
    "nft": "nftables",
    "socat": "socat",
    "redis-server": "redis-server",
    "setpriv": "util-linux",
}


def missing_tools() -> list[str]:
    missing = [name for name in REQUIRED_TOOLS if shutil.which(name) is None]
    if not (PG_BIN / "postgres").exists():
        missing.append(str(PG_BIN / "postgres"))
    return missing


def check_prerequisites(install: bool) -> None:
    """Root, and the tools; with `install`, Debian's packages for missing ones (as root)."""
    how = "run `sudo make segmentation` (it installs what is missing with apt-get)"
    if os.geteuid() != 0:
        raise PrerequisiteError(
            "network namespaces and nftables need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): " + how
        )
    missing = missing_tools()
    if missing and install and shutil.which("apt-get"):
        packages = sorted({REQUIRED_TOOLS.get(name, "postgresql") for name in missing})
        print(f"segmentation: installing {', '.join(packages)} with apt-get ...", flush=True)
        quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=quiet, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *packages],
            env=quiet,
            check=False,
            stdout=subprocess.DEVNULL,
        )
        missing = missing_tools()
    if missing:
        raise PrerequisiteError(f"missing: {', '.join(missing)}: {how}")


# --- the report -----------------------------------------------------------------------------


@dataclass
class Round:
    """One pass of the probe matrix under one ruleset."""

    name: str
    results: dict[Probe, str]

    def reachable(self, probe: Probe) -> bool:
        return self.results[probe] in (OPEN, REFUSED)

    def mismatches(self, expected: FlowModel) -> list[tuple[Probe, str]]:
        """Cells where the network disagrees with `expected`: an allowed flow that does not
        open, or a denied one that is not dropped (a refusal means the packet got through)."""
        return [
            (probe, status)
            for probe, status in sorted(self.results.items())
            if status != (OPEN if expected.allows(probe) else FILTERED)
        ]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    model: FlowModel
    rounds: dict[str, Round] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]


def _cell(services: Iterable[Service]) -> str:
    return ",".join(str(s.port) + ("u" if s.protocol == "udp" else "") for s in sorted(services))


def matrix_table(model: FlowModel, result: Round, *, mark: bool = True) -> str:
    """Sources down, destinations across; a cell lists the ports the source reached (`u`: UDP),
    `all` when every probed port, `-` for none, `.` where the model does not probe (same
    segment, or both on the internet); with `mark`, a disagreement with flows.yaml gets `!`."""
    names = list(model.segments)
    wrong = {probe for probe, _ in result.mismatches(model)} if mark else set()
    cells: dict[tuple[str, str], str] = {}
    for source in names:
        for destination in names:
            probes = [
                p for p in result.results if (p.source, p.destination) == (source, destination)
            ]
            reached = [p.service for p in probes if result.reachable(p)]
            if not probes:
                text = "."
            elif len(reached) == len(probes):
                text = "all"
            else:
                text = _cell(reached) or "-"
            if any(p in wrong for p in probes):
                text += "!"
            cells[source, destination] = text
    width = {d: max(len(d), *(len(cells[s, d]) for s in names)) for d in names}
    first = max(len(s) for s in names) + 2
    lines = ["from \\ to".ljust(first) + " ".join(d.ljust(width[d]) for d in names)]
    for source in names:
        row = " ".join(cells[source, d].ljust(width[d]) for d in names)
        lines.append(source.ljust(first) + row)
    return "\n".join(lines)


def counts(model: FlowModel, result: Round) -> str:
    allowed = [p for p in result.results if model.allows(p)]
    denied = [p for p in result.results if not model.allows(p)]
    reached = sum(result.results[p] == OPEN for p in allowed)
    blocked = sum(result.results[p] == FILTERED for p in denied)
    return (
        f"{len(result.results)} probes: allowed and reachable {reached}/{len(allowed)}, "
        f"denied and blocked {blocked}/{len(denied)}, "
        f"mismatches {len(result.mismatches(model))}"
    )


def render_report(report: Report) -> str:
    model = report.model
    out = []
    policy_round = report.rounds.get("policy")
    if policy_round:
        out += [
            "Probe matrix with the policy of deploy/flows.yaml "
            f"({len(model.flows)} flows, {len(model.segments)} segments, "
            f"ports {', '.join(map(str, model.services()))}):",
            matrix_table(model, policy_round),
            counts(model, policy_round),
            "",
        ]
    open_round = report.rounds.get("open")
    if open_round:
        denied = [p for p in open_round.results if not model.allows(p)]
        now = sum(open_round.reachable(p) for p in denied)
        out += [
            "Negative control, the policy off (every forward accepted):",
            matrix_table(model, open_round, mark=False),
            f"denied probes that now get through: {now}/{len(denied)} "
            f"(open {sum(open_round.results[p] == OPEN for p in denied)}, "
            f"refused by the host {sum(open_round.results[p] == REFUSED for p in denied)})",
            "",
        ]
    if report.carried:
        out.append(
            "Connections each flow's rule let through before the probes (the services' start-up "
            "and the end-to-end run; a rule sees a connection's first packet):"
        )
        for flow in model.flows:
            comment = policy.rule_comment(flow)
            count = report.carried.get(comment, 0)
            answers = REAL_SERVICES.get((flow.destination, flow.service))
            note = answers or "a stand-in listener: probed only"
            out.append(f"  {comment:<30} {count:>5}  ({note})")
        out.append("")
    if report.timings:
        out.append("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()))
    if report.phases:
        out.append("Start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items()))
    out.append("Checks:")
    for check in report.checks:
        mark = "ok  " if check.ok else "FAIL"
        out.append(f"  {mark} {check.name}" + (f": {check.detail}" if check.detail else ""))
    failed = len(report.failures)
    out.append(f"{len(report.checks) - failed} checks passed, {failed} failed")
    return "\n".join(out)


# --- the deployment -------------------------------------------------------------------------


def _base_env() -> dict[str, str]:
    """The machine's environment without Tessera settings or proxies (nothing outside the
    namespaces is reachable from them)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TESSERA_") and "proxy" not in key.lower()
    }


class Deployment:
    """The real services of the model, each in its segment's namespace."""

    def __init__(self, net: Network, work: Path) -> None:
        self.net = net
        self.work = work
        self.processes: list[NsProcess] = []
        self.tokens = {"service": token_urlsafe(32), "admin": token_urlsafe(32)}
        self.env = _base_env()
        self.timings: dict[str, float] = {}
        self._last_mark = time.monotonic()

    def address(self, segment: str) -> str:
        return self.net.links[segment].address

    def host(self, segment: str) -> str:
        return self.net.links[segment].host

    # --- environments, as deploy/compose.yaml wires them ------------------------------------

    def vault_env(self) -> dict[str, str]:
        destinations = {
            "psp_a": {
                "url": f"http://{self.address('psp-card')}:8201",
                "paths": ["/v1/authorizations"],
            },
            "psp_b": {"url": f"http://{self.address('psp-card')}:8202", "paths": ["/v1/payments"]},
        }
        db = self.address("vault-db")
        return {
            **self.env,
            "TESSERA_MODE": "development",
            "TESSERA_VAULT_HOST": self.address("cde"),
            "TESSERA_VAULT_PORT": "8100",
            "TESSERA_VAULT_SERVICE_PORT": "8101",
            "TESSERA_VAULT_ADMIN_PORT": "8102",
            "TESSERA_VAULT_DATABASE_URL": f"postgresql://tessera_vault@{db}:5432/tessera_vault",
            "TESSERA_VAULT_MIGRATION_URL": f"postgresql://tessera_vault_owner@{db}:5432/tessera_vault",
            "TESSERA_VAULT_REDIS_URL": f"redis://{self.address('vault-redis')}:6379/0",
            "TESSERA_VAULT_SERVICE_TOKEN": self.tokens["service"],
            "TESSERA_VAULT_ADMIN_TOKEN": self.tokens["admin"],
            "TESSERA_VAULT_KMS_PROVIDER": "gcp",
            "TESSERA_VAULT_GCP_KMS_KEY_NAME": KMS_KEY,
            "TESSERA_VAULT_GCP_KMS_ENDPOINT": f"127.0.0.1:{KMS_RELAY_PORT}",
            "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations),
            "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "5",
            "TESSERA_VAULT_SHUTDOWN_TIMEOUT_SECONDS": "3",
        }

    def api_env(self) -> dict[str, str]:
        db = self.address("api-db")
        psp = self.address("psp-api")
        return {
            **self.env,
            "TESSERA_MODE": "development",
            "TESSERA_API_HOST": self.address("app"),
            "TESSERA_API_PORT": "8000",
            "TESSERA_API_DATABASE_URL": f"postgresql://tessera_api@{db}:5432/tessera_api",
            "TESSERA_API_MIGRATION_URL": f"postgresql://tessera_api_owner@{db}:5432/tessera_api",
            "TESSERA_API_REDIS_URL": f"redis://{self.address('api-redis')}:6379/0",
            "TESSERA_API_VAULT_URL": f"http://{self.address('cde')}:8101",
            "TESSERA_API_VAULT_SERVICE_TOKEN": self.tokens["service"],
            "TESSERA_API_PSP_A_URL": f"http://{psp}:8201",
            "TESSERA_API_PSP_B_URL": f"http://{psp}:8202",
            "TESSERA_API_SHUTDOWN_TIMEOUT_SECONDS": "3",
        }

    def psp_env(self) -> dict[str, str]:
        return {
            **self.env,
            # Every address of the processors' host: the card and the operations endpoint.
            "TESSERA_PSP_A_HOST": "0.0.0.0",  # inside its own namespace
            "TESSERA_PSP_A_PORT": "8201",
            "TESSERA_PSP_B_HOST": "0.0.0.0",  # inside its own namespace
            "TESSERA_PSP_B_PORT": "8202",
            "TESSERA_PSP_B_NOTIFY_URL": f"http://{self.address('app')}:8000/v1/notifications/psp_b",
        }

    # --- processes ------------------------------------------------------------------------

    def start(
        self,
        name: str,
        segment: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> NsProcess:
        process = NsProcess.start(
            name,
            self.net.exec_argv(self.host(segment), argv),
            env or self.env,
            self.work / f"{name}.log",
            stop_signal,
        )
        self.processes.append(process)
        return process

    def agent(
        self, segment: str, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = self.net.exec_argv(self.host(segment), [*AGENT, *args])
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=self.env,
        )

    def in_segment(
        self, segment: str, argv: list[str], env: Mapping[str, str]
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.net.exec_argv(self.host(segment), argv),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=dict(env),
        )

    def wait_ready(self, waits: list[tuple[NsProcess, str, str]], timeout: float = 60) -> None:
        """Wait until every (process, segment, target) answers, all at once: one waiting agent
        each, in the process's segment; fail at once (with its log) if a process exits."""
        wait = ["--wait", str(timeout)]
        agents = [
            (
                process,
                target,
                subprocess.Popen(
                    self.net.exec_argv(self.host(segment), [*AGENT, "ready", target, *wait]),
                    cwd=ROOT,
                    env=self.env,
                ),
            )
            for process, segment, target in waits
        ]
        try:
            pending = list(agents)
            while pending:
                for process, target, agent in list(pending):
                    if agent.poll() is not None:
                        if agent.returncode != 0:
                            raise RuntimeError(
                                f"{process.name} not ready at {target} in {timeout:.0f} s:\n"
                                f"{process.tail()}"
                            )
                        pending.remove((process, target, agent))
                    elif not process.alive():
                        raise RuntimeError(
                            f"{process.name} exited with {process.popen.returncode}:\n"
                            f"{process.tail()}"
                        )
                time.sleep(0.05)
        finally:
            for _, _, agent in agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()

    def _postgres(self, segment: str) -> NsProcess:
        base = self.work / segment
        base.mkdir()
        data = base / "data"
        run(["chown", "postgres:postgres", str(base)])
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        run([*as_postgres, *initdb, "-E", "UTF8", "--no-sync"])
        # Trust from the model's addresses: which segment may connect at all is the network
        # policy's job here (production uses IAM or passwords on top).
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 10.77.0.0/16 trust\n")
        address = self.address(segment)
        argv = [
            *as_postgres,
            str(PG_BIN / "postgres"),
            "-D", str(data),
            "-c", f"listen_addresses={address},127.0.0.1",
            "-c", "port=5432",
            "-c", f"unix_socket_directories={base}",
            "-c", "max_connections=60",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip
        return self.start(segment, segment, argv, stop_signal=signal.SIGINT)

    def start_all(self, stand_ins: Mapping[str, list[Service]]) -> None:
        """Everything, as early as its dependencies allow, the policy already on."""
        self.work.chmod(0o711)  # the postgres user reaches its own folder under it
        # On port 6379, nothing written to disk; protected mode off: the policy decides who
        # connects (production adds TLS and AUTH).
        options = ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        redis = {
            segment: self.start(
                segment, segment, ["redis-server", "--bind", self.address(segment), *options]
            )
            for segment in ("api-redis", "vault-redis")
        }
        kms = self.start("kms", "kms", [*AGENT, "kms", self.address("kms"), "443", KMS_KEY])
        relay = self.start(
            "kms-relay",
            "cde",
            [
                "socat",
                f"TCP-LISTEN:{KMS_RELAY_PORT},bind=127.0.0.1,reuseaddr,fork",
                f"TCP:{self.address('kms')}:443",
            ],
        )
        psps = {
            name: self.start(name, "psp-api", [PY, "-m", f"sandbox.{name}"], self.psp_env())
            for name in ("psp_a", "psp_b")
        }
        listeners = []
        for segment, services in stand_ins.items():
            specs = [f"{s.protocol}:{s.port}" for s in services]
            process = self.start(
                f"stand-in-{segment}", segment, [*AGENT, "listen", self.address(segment), *specs]
            )
            tcp = [s for s in services if s.protocol == "tcp"]
            if tcp:
                listeners.append((process, segment, f"tcp://{self.address(segment)}:{tcp[0].port}"))
        with ThreadPoolExecutor(max_workers=len(DATABASES)) as pool:
            postgres = dict(zip(DATABASES, pool.map(self._postgres, DATABASES), strict=True))
        self.wait_ready(
            [
                (process, segment, f"tcp://{self.address(segment)}:5432")
                for segment, process in postgres.items()
            ]
        )
        self.mark("postgres")

        def create_database(segment: str) -> None:
            service, database = DATABASES[segment]
            admin = "postgresql://postgres@127.0.0.1:5432/postgres"
            done = self.agent(segment, "create-database", admin, service, database)
            if done.returncode != 0:
                raise RuntimeError(f"database set-up in {segment} failed: {done.stderr}")

        with ThreadPoolExecutor(max_workers=len(DATABASES)) as pool:
            list(pool.map(create_database, DATABASES))
        self.mark("databases")
        # The services start at once; they answer /readyz once their migrations are applied.
        vault = self.start("vault", "cde", [PY, "-m", "vault", "serve"], self.vault_env())
        api = self.start("api", "app", [PY, "-m", "api", "serve"], self.api_env())
        # Migrations run from the services' own segments (as jobs would), through the policy.
        migrations = [
            subprocess.Popen(
                self.net.exec_argv(self.host(segment), [PY, "-m", service, "migrate"]),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=ROOT,
                env=env,
            )
            for segment, service, env in (
                ("cde", "vault", self.vault_env()),
                ("app", "api", self.api_env()),
            )
        ]
        for migration in migrations:
            output, _ = migration.communicate(timeout=120)
            if migration.returncode != 0:
                raise RuntimeError(f"migration failed: {output}")
        self.mark("migrations")
        waits = [
            *(
                (process, segment, f"tcp://{self.address(segment)}:6379")
                for segment, process in redis.items()
            ),
            (kms, "kms", f"tcp://{self.address('kms')}:443"),
            (relay, "cde", f"tcp://127.0.0.1:{KMS_RELAY_PORT}"),
            (psps["psp_a"], "psp-api", "http://127.0.0.1:8201/healthz"),
            (psps["psp_b"], "psp-api", "http://127.0.0.1:8202/healthz"),
            *listeners,
            (vault, "cde", f"http://{self.address('cde')}:8100/readyz"),
            (api, "app", f"http://{self.address('app')}:8000/readyz"),
        ]
        self.wait_ready(waits)
        self.mark("services")

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = now - self._last_mark
        self._last_mark = now

    def stop_all(self) -> None:
        """All at once: the signal to each, then the waits (a graceful shutdown each)."""
        for process in self.processes:
            if process.alive():
                process.popen.send_signal(process.stop_signal)
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()

    # --- requests from inside a segment -----------------------------------------------------

    def http(
        self,
        segment: str,
        method: str,
        url: str,
        *,
        bearer: str,
        body: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One request from inside `segment`; the status and the JSON object answered (or
        `{"error": …}`)."""
        headers = {"authorization": f"Bearer {bearer}"}
        if idempotency_key:
            headers["idempotency-key"] = idempotency_key
        request = {"method": method, "url": url, "headers": headers, "body": body}
        done = self.agent(segment, "http", stdin=json.dumps(request))
        if done.returncode != 0:
            raise RuntimeError(f"agent http failed in {segment}: {done.stderr}")
        answer = json.loads(done.stdout)
        body = answer.get("body")
        return int(answer["status"]), body if isinstance(body, dict) else {"error": body or answer}

    def create_merchant(self, name: str, processors: str | None = None) -> dict[str, str]:
        """`tessera merchants create` run where the deploy docs run it: from the admin segment
        (the vault's admin listener and the API's database), with the admin token passed to
        that one command."""
        env = {
            **self.api_env(),
            "TESSERA_VAULT_ADMIN_TOKEN": self.tokens["admin"],
            "TESSERA_VAULT_ADMIN_URL": f"http://{self.address('cde')}:8102",
        }
        created = self.in_segment(
            "admin",
            [*MERCHANTS, "create", "--name", name, "--origin", "https://shop.example", "--json"],
            env,
        )
        if created.returncode != 0:
            raise RuntimeError(f"merchants create failed: {created.stderr}")
        merchant: dict[str, str] = json.loads(created.stdout)
        if processors:
            routing = ["--merchant", merchant["merchant_id"], "--processors", processors]
            configured = self.in_segment(
                "admin", [*MERCHANTS, "configure", *routing], self.api_env()
            )
            if configured.returncode != 0:
                raise RuntimeError(f"merchants configure failed: {configured.stderr}")
        return merchant


# --- the campaign ---------------------------------------------------------------------------


def _probe(net: Network, probes: list[Probe], timeout: float) -> dict[Probe, str]:
    """The probes at once: one agent per source namespace, all agents in parallel."""
    by_source: dict[str, list[Probe]] = {}
    for probe in probes:
        by_source.setdefault(probe.source, []).append(probe)

    def probe_from(source: str) -> list[str]:
        link = net.links[source]
        targets = [
            (net.links[p.destination].address, p.service.port, p.service.protocol)
            for p in by_source[source]
        ]
        argv = [*AGENT, "probe", "--source", link.address, "--timeout", str(timeout)]
        done = subprocess.run(
            net.exec_argv(link.host, argv),
            input=json.dumps(targets),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=_base_env(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe from {source} failed: {done.stderr}")
        statuses: list[str] = json.loads(done.stdout)
        return statuses

    results: dict[Probe, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(by_source))) as pool:
        for source, statuses in zip(by_source, pool.map(probe_from, by_source), strict=True):
            results.update(zip(by_source[source], statuses, strict=True))
    return results


def probe_round(
    net: Network, model: FlowModel, name: str, in_force: Callable[[Probe], bool]
) -> Round:
    """Every probe of the model (but those inside one namespace). A cell that the ruleset in
    force opens but that timed out is probed once more with a longer time-out, so that a busy
    machine cannot make a slow answer look dropped; nothing is retried the other way (a
    connection that opened was open)."""
    probes = [
        p for p in model.probes() if net.links[p.source].host != net.links[p.destination].host
    ]
    results = _probe(net, probes, PROBE_TIMEOUT)
    again = [p for p in probes if results[p] == FILTERED and in_force(p)]
    if again:
        results.update(_probe(net, again, RECHECK_TIMEOUT))
    return Round(name, results)


def _listed(mismatches: list[tuple[Probe, str]]) -> str:
    return "; ".join(f"{probe} is {status}" for probe, status in mismatches[:10])


def _timed(report: Report, name: str, action: Callable[[], Round]) -> Round:
    started = time.monotonic()
    result = action()
    report.timings[name] = time.monotonic() - started
    report.rounds[result.name] = result
    return result


def end_to_end(deployment: Deployment, report: Report) -> None:
    """Real traffic through the policy, from the segments it comes from."""
    cde = f"http://{deployment.address('cde')}:8100"
    cde_admin = f"http://{deployment.address('cde')}:8102"
    api = f"http://{deployment.address('app')}:8000"
    admin_token = deployment.tokens["admin"]
    status, _body = deployment.http(
        "admin", "GET", f"{cde_admin}/v1/audit/verify", bearer=admin_token
    )
    report.check("admin -> vault admin listener (audit verification)", status == 200, f"{status}")
    # The policy lets browsers reach the public listener; the vault itself keeps the admin
    # routes off it, even for a caller holding the admin credential.
    status, _body = deployment.http("browser", "GET", f"{cde}/v1/audit/verify", bearer=admin_token)
    report.check(
        "browser -> vault public listener: an admin route answers 404", status == 404, f"{status}"
    )

    def tokenize(merchant: dict[str, str]) -> str:
        card = {"number": CARD, "exp_month": 12, "exp_year": 2040, "cvc": "123"}
        status, body = deployment.http(
            "browser", "POST", f"{cde}/v1/tokens", bearer=merchant["publishable_key"], body=card
        )
        ok = status == 201 and str(body.get("id", "")).startswith("tok_")
        report.check(
            "browser -> vault: a card tokenized (vault -> its DB, Redis, KMS)", ok, f"{status}"
        )
        return str(body["id"]) if ok else ""

    def call(
        merchant: dict[str, str], method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        key = token_urlsafe(12) if method == "POST" else None
        return deployment.http(
            "merchant",
            method,
            api + path,
            bearer=merchant["secret_key"],
            body=body,
            idempotency_key=key,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        made_a = pool.submit(deployment.create_merchant, "Segmented shop A")
        made_b = pool.submit(deployment.create_merchant, "Segmented shop B", "psp_b")
        shop_a, shop_b = made_a.result(), made_b.result()
    token = tokenize(shop_a)
    status, payment = call(
        shop_a,
        "POST",
        "/v1/payments",
        {"amount": 2599, "currency": "EUR", "token": token, "capture": False},
    )
    report.check(
        "merchant -> API -> vault -> PSP A's card endpoint: authorized",
        status == 201
        and payment.get("status") == "authorized"
        and payment.get("processor") == "psp_a",
        f"{status} {payment.get('status')}",
    )
    payment_id = payment.get("id", "")
    status, captured = call(shop_a, "POST", f"/v1/payments/{payment_id}/capture", {"amount": 2000})
    report.check(
        "merchant -> API -> PSP A's operations endpoint: captured",
        status == 200
        and captured.get("status") == "captured"
        and captured.get("amount_captured") == 2000,
        f"{status}",
    )
    status, refund = call(shop_a, "POST", f"/v1/payments/{payment_id}/refunds", {"amount": 500})
    report.check(
        "merchant -> API -> PSP A's operations endpoint: refunded",
        status == 201 and refund.get("status") == "succeeded",
        f"{status} {refund.get('status')}",
    )

    token = tokenize(shop_b)
    status, payment = call(
        shop_b, "POST", "/v1/payments", {"amount": 1500, "currency": "EUR", "token": token}
    )
    report.check(
        "merchant -> API -> vault -> PSP B's card endpoint: captured",
        status == 201
        and payment.get("status") == "captured"
        and payment.get("processor") == "psp_b",
        f"{status}",
    )
    payment_id = payment.get("id", "")
    status, refund = call(shop_b, "POST", f"/v1/payments/{payment_id}/refunds", {"amount": 400})
    pending = status == 201 and refund.get("status") == "pending"
    report.check(
        "merchant -> API -> PSP B's operations endpoint: refund pending", pending, f"{status}"
    )
    if pending:

        def confirmed() -> bool:
            _, read = call(shop_b, "GET", f"/v1/refunds/{refund['id']}")
            return bool(read.get("status") == "succeeded")

        try:
            wait_for(confirmed, 15, "PSP B's notification")
            arrived = True
        except TimeoutError:
            arrived = False
        report.check("PSP B -> API: its signed notification confirmed the refund", arrived)


def run_campaign(
    model: FlowModel | None = None, *, install: bool = False, keep_logs: bool = False
) -> Report:
    check_prerequisites(install)
    model = model or load()
    report = Report(model)
    swept = sweep_stale()
    if swept:
        print(f"segmentation: removed {len(swept)} namespaces of an interrupted run", flush=True)
    net = Network(list(model.segments))
    work = Path(tempfile.mkdtemp(prefix=f"{net.run_id}-"))
    deployment = Deployment(net, work)
    stand_ins: dict[str, list[Service]] = {}
    for flow in model.flows:
        if (flow.destination, flow.service) not in REAL_SERVICES:
            stand_ins.setdefault(flow.destination, [])
            if flow.service not in stand_ins[flow.destination]:
                stand_ins[flow.destination].append(flow.service)
    failed = True
    try:
        started = time.monotonic()
        net.create()
        net.apply(policy.render(model, net.links))
        deployment.mark("namespaces")
        deployment.start_all(stand_ins)
        report.timings["start-up"] = time.monotonic() - started
        report.phases = dict(deployment.timings)

        started = time.monotonic()
        end_to_end(deployment, report)
        report.timings["end-to-end"] = time.monotonic() - started
        # Before any probe: what the rules counted is the services' own traffic (start-up,
        # migrations, pools, the payments above). A rule counts the first packet of each new
        # connection; the answers go through connection tracking.
        report.carried = net.counters()
        silent = [
            str(flow)
            for flow in model.flows
            if (flow.destination, flow.service) in REAL_SERVICES
            and report.carried.get(policy.rule_comment(flow), 0) == 0
        ]
        report.check(
            "every flow to a real service carried the services' own traffic",
            not silent,
            "none through " + ", ".join(silent) if silent else "",
        )

        at = {link.address: segment for segment, link in net.links.items()}
        tried = [
            f"{at.get(source, source)} -> {at.get(destination, destination)} {port}"
            for source, destination, port in net.dropped(policy.TABLE, policy.DENIED)
        ]
        report.check(
            "the services tried no flow that flows.yaml does not list (nothing dropped yet)",
            report.carried.get(policy.DENIED, 0) == 0,
            f"{report.carried.get(policy.DENIED, 0)} packets dropped: " + ", ".join(tried)
            if report.carried.get(policy.DENIED, 0)
            else "",
        )

        checked = _timed(report, "matrix", lambda: probe_round(net, model, "policy", model.allows))
        wrong = checked.mismatches(model)
        report.check(
            "policy: the probe matrix equals flows.yaml",
            not wrong,
            _listed(wrong),
        )

        # The matrix bites: a policy with one flow missing and one too many (a wrong file, or
        # rules edited by hand) must show up as exactly those two cells.
        removed = next(f for f in model.flows if (f.source, f.destination, f.service) == MISSING)
        mutated = model.without(removed).plus(EXTRA_FLOW)
        net.apply(policy.render(mutated, net.links))
        bitten = _timed(report, "bite", lambda: probe_round(net, model, "mutated", mutated.allows))
        missing = Probe(removed.source, removed.destination, removed.service)
        extra = Probe(EXTRA_FLOW.source, EXTRA_FLOW.destination, EXTRA_FLOW.service)
        report.check(
            f"bite: with the flow {removed} taken out of the policy and {EXTRA_FLOW} put in, "
            "the matrix reports exactly those two cells",
            bitten.mismatches(model) == sorted([(missing, FILTERED), (extra, OPEN)]),
            _listed(bitten.mismatches(model)),
        )
        missing_at = (
            net.links[missing.source].address,
            net.links[missing.destination].address,
            missing.service.port,
        )
        report.check(
            "bite: the router's record of dropped connections shows the missing flow too",
            missing_at in net.dropped(policy.TABLE, policy.DENIED),
        )

        net.apply(policy.render_open())
        opened = _timed(
            report, "negative control", lambda: probe_round(net, model, "open", lambda _: True)
        )
        hidden = [p for p in opened.results if not model.allows(p) and not opened.reachable(p)]
        report.check(
            "negative control: with the policy off, every denied probe gets through",
            not hidden,
            "still blocked: " + ", ".join(map(str, hidden[:10])) if hidden else "",
        )
        failed = bool(report.failures)
    finally:
        stopping = time.monotonic()
        if failed:
            for process in deployment.processes:
                if not process.alive():
                    print(f"--- {process.name} exited early; its log ends:\n{process.tail()}")
        deployment.stop_all()
        net.destroy()
        report.timings["clean-up"] = time.monotonic() - stopping
        if failed or keep_logs:
            for segment in ("api-db", "vault-db"):
                shutil.rmtree(work / segment / "data", ignore_errors=True)
            print(f"segmentation: logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


#: Where `make segmentation` leaves its result for the assessor's kit (`tessera pci evidence`,
#: control `segmentation`, setting TESSERA_PCI_SEGMENTATION_RESULT); git-ignored like all .run/.
RESULT_PATH = ROOT / ".run" / "segmentation" / "latest.json"


def result_record(
    report: Report, finished: datetime.datetime, commit: str | None
) -> dict[str, Any]:
    """What the kit judges a run on: when, at which commit, the probe counts and the verdict."""
    model = report.model
    checked = report.rounds.get("policy")
    opened = report.rounds.get("open")
    record: dict[str, Any] = {
        "kind": "tessera-segmentation-result",
        "version": 1,
        "date": finished.isoformat(),
        "commit": commit,
        "flows": len(model.flows),
        "segments": len(model.segments),
        "passed": not report.failures and checked is not None and opened is not None,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
        "failed_checks": [c.name for c in report.failures],
        "timings_seconds": {k: round(v, 1) for k, v in report.timings.items()},
    }
    if checked is not None:
        allowed = [p for p in checked.results if model.allows(p)]
        denied = [p for p in checked.results if not model.allows(p)]
        record["probes"] = len(checked.results)
        record["allowed"] = len(allowed)
        record["allowed_reachable"] = sum(checked.results[p] == OPEN for p in allowed)
        record["denied"] = len(denied)
        record["denied_blocked"] = sum(checked.results[p] == FILTERED for p in denied)
        record["mismatches"] = [
            f"{probe} is {status}" for probe, status in checked.mismatches(model)
        ]
    if opened is not None:
        denied = [p for p in opened.results if not model.allows(p)]
        record["negative_control"] = {
            "denied_probes": len(denied),
            "through_with_policy_off": sum(opened.reachable(p) for p in denied),
        }
    return record


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def write_result(report: Report, path: Path = RESULT_PATH) -> Path:
    record = result_record(report, datetime.datetime.now(datetime.UTC), _commit())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)  # a reader never sees half a file
    return path


def main() -> int:
    # A plain `kill` ends the run through its clean-up, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run_campaign(install=True)
    except PrerequisiteError as exc:
        print(f"segmentation: {exc}", file=sys.stderr)
        return 2
    print(render_report(report))
    print(f"segmentation: result written to {write_result(report)}")
    return 1 if report.failures else 0
